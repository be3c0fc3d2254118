"""Heavy hitters (H2O, arXiv 2306.14048), and the base every score-based strategy shares.

A few tokens receive most of the attention, whichever query asks: H2O keeps those "heavy hitters"
(ranked by the attention mass they accumulated, per KV head, averaged over the query heads of the
group) next to a window of the newest tokens, under a fixed budget. Eviction runs after every
forward, at prefill (chunk by chunk with ``prefill_chunk_size``) and at every decoding step, and
really frees memory: the store keeps only the chosen tokens.

:class:`ScoredCache` holds what every scorer shares (budget, heavy/recent split, sinks, per-head
choice, storage keywords); a scorer is one layer class with a ``score`` method (see ``tova.py`` and
``key_norm.py``, about 30 lines each).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from ...registry import CacheSpec, register_cache
from ...storage.factory import STORAGE_KEYWORDS
from ...validate import check_int
from ..cache import KVPlusCache
from ..layer import EvictingLayer


class ScoredCache(KVPlusCache):
    """A budgeted cache whose layers rank tokens with ``layer_class.score`` (higher is kept).

    Args:
        config (`PreTrainedConfig`): the model's config (a decoder with full attention layers).
        budget (`int`): tokens kept per layer and KV head between forwards, all kinds included.
        heavy_ratio (`float`, *optional*): share of the budget chosen by score; the rest is the
            window of newest tokens. Defaults to the strategy's ``default_heavy_ratio``.
        recent_window (`int`, *optional*): newest tokens always kept; overrides ``heavy_ratio``.
        num_sink_tokens (`int`, *optional*, defaults to 0): first tokens never evicted.
        per_head (`bool`, *optional*, defaults to `True`): each KV head keeps its own tokens; `False`
            averages the scores over the heads of a layer so all heads keep the same tokens.
        budget_allocation (`str`, *optional*, defaults to ``"uniform"``): ``"adaptive"`` splits a layer's
            ``budget * kv_heads`` tokens across its heads by score (AdaKV, arXiv:2407.11550): every head keeps its
            sinks, recent window and ``head_floor`` of its heavy budget by its own ranking, the rest goes to the
            highest scores pooled over the layer's heads. Reallocated after every forward of several tokens; a
            one-token decoding step keeps each head's count (each head evicts its own lowest token, in the dense
            path: no slot storage, no host read). Storage: one row per head as long as the fullest head, unused
            entries first (position ``-1``), masked per head by the "kvplus" attention; ``cache_nbytes`` counts those
            rows whole. Needs per_head=True and the "kvplus" attention (``make_cache`` attaches it).
        head_floor (`float`, *optional*, defaults to 0.2): AdaKV's safeguard ``alpha`` in ``[0, 1]``; 1 gives
            every head the same budget (the uniform choice).
        layer_budgets (`str`, *optional*, defaults to ``"uniform"``): ``"pyramid"`` gives the layers linearly
            decreasing budgets with the same total, ``num_layers * budget`` (PyramidKV, arXiv:2406.02069): the last
            layer ``budget / pyramid_beta`` (at least ``num_sink_tokens + recent_window + 1``), the first
            ``2 * budget`` minus that. Each layer then evicts to its own budget (``layer.budget``).
        pyramid_beta (`float`, *optional*, defaults to 20): PyramidKV's ``beta`` (>= 1; 1 is uniform).
        **layer_kwargs: the strategy's own keywords, then storage keywords (``nbits=``,
            ``store_factory=``) forwarded to :func:`~hf_kvplus.storage.base.make_store_factory`.

    Raises:
        ValueError: a bad value (naming it and the allowed range), or a degenerate split: ``num_sink_tokens +
            recent_window`` equal to the budget keeps no token by score (the plain ``sink``/``window`` cache);
            ``budget_allocation``/``layer_budgets`` not one of their values, ``head_floor`` outside ``[0, 1]``,
            ``pyramid_beta`` below 1, adaptive budgets with ``per_head=False`` or with quantized storage.

    Example (a scorer is a layer class with ``score``; see ``docs/strategies/heavy_hitter.md``):

    ```python
    >>> class ValueNormLayer(EvictingLayer):
    ...     def initial_state(self, key_states, value_states):
    ...         return {"value_norm": value_states.float().norm(dim=-1)}  # [batch, kv_heads, new]
    ...     def score(self):
    ...         return self.token_state["value_norm"]
    >>> class ValueNormCache(ScoredCache):
    ...     layer_class = ValueNormLayer
    >>> cache = ValueNormCache(model.config, budget=256)
    ```
    """

    default_heavy_ratio = 0.5
    layer_options: tuple[str, ...] = ()  # keywords passed on to every layer

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int,
        heavy_ratio: float | None = None,
        recent_window: int | None = None,
        num_sink_tokens: int = 0,
        per_head: bool = True,
        budget_allocation: str = "uniform",
        head_floor: float = 0.2,
        layer_budgets: str = "uniform",
        pyramid_beta: float = 20.0,
        **layer_kwargs,
    ):
        budget = check_int("budget", budget)
        num_sink_tokens = check_int("num_sink_tokens", num_sink_tokens, minimum=0)
        heavy_ratio = self.default_heavy_ratio if heavy_ratio is None else heavy_ratio
        if isinstance(heavy_ratio, bool) or not isinstance(heavy_ratio, (int, float)) or not 0 <= heavy_ratio <= 1:
            raise ValueError(f"heavy_ratio must be a number in [0, 1], got {heavy_ratio!r}")
        if recent_window is None:
            recent_window = budget - round(budget * heavy_ratio)
        recent_window = check_int("recent_window", recent_window, minimum=0)
        if num_sink_tokens + recent_window > budget:
            raise ValueError(
                f"num_sink_tokens ({num_sink_tokens}) + recent_window ({recent_window}) must not exceed the budget "
                f"({budget})"
            )
        if num_sink_tokens + recent_window == budget:  # degenerate: nothing is chosen by score
            raise ValueError(
                f"{type(self).__name__} with budget={budget}, num_sink_tokens={num_sink_tokens} and recent_window="
                f"{recent_window} (heavy_ratio={heavy_ratio}) keeps no token by score: it would be the plain "
                f"{'sink' if num_sink_tokens else 'window'} cache. Allowed: num_sink_tokens + recent_window < budget "
                f"(a heavy_ratio above 0), or make_cache('{'sink' if num_sink_tokens else 'window'}', ...) for that cache"
            )
        if not isinstance(per_head, bool):
            raise ValueError(f"per_head must be True or False, got {per_head!r}")
        if budget_allocation not in BUDGET_ALLOCATIONS:
            raise ValueError(f"budget_allocation must be one of {list(BUDGET_ALLOCATIONS)}, got {budget_allocation!r}")
        if layer_budgets not in LAYER_BUDGETS:
            raise ValueError(f"layer_budgets must be one of {list(LAYER_BUDGETS)}, got {layer_budgets!r}")
        if isinstance(head_floor, bool) or not isinstance(head_floor, (int, float)) or not 0 <= head_floor <= 1:
            raise ValueError(f"head_floor must be a number in [0, 1] (AdaKV's safeguard share), got {head_floor!r}")
        if isinstance(pyramid_beta, bool) or not isinstance(pyramid_beta, (int, float)) or not pyramid_beta >= 1:
            raise ValueError(f"pyramid_beta must be a number >= 1 (1 gives every layer the same budget), got {pyramid_beta!r}")
        if budget_allocation == "adaptive" and not per_head:
            raise ValueError("budget_allocation='adaptive' splits the budget across heads: it needs per_head=True, got "
                             "per_head=False")
        if budget_allocation == "adaptive" and (layer_kwargs.get("nbits") is not None
                                                or layer_kwargs.get("store_factory") is not None):
            raise ValueError("budget_allocation='adaptive' holds its heads in dense storage only; got nbits="
                             f"{layer_kwargs.get('nbits')!r}, store_factory={layer_kwargs.get('store_factory')!r}: "
                             "drop them or use budget_allocation='uniform'")
        options = {name: layer_kwargs.pop(name) for name in self.layer_options if name in layer_kwargs}
        storage_names = ["store_factory", *STORAGE_KEYWORDS]  # nbits=, group_size=, ...
        storage = {name: layer_kwargs.pop(name) for name in storage_names if name in layer_kwargs}
        if layer_kwargs:
            allowed = ["budget", "heavy_ratio", "recent_window", "num_sink_tokens", "per_head", "budget_allocation",
                       "head_floor", "layer_budgets", "pyramid_beta", *storage_names]
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {sorted(layer_kwargs)}; it accepts "
                f"{allowed + list(self.layer_options)}"
            )
        self.num_sink_tokens, self.recent_window = num_sink_tokens, recent_window
        self.heavy_budget = budget - recent_window - num_sink_tokens
        super().__init__(
            config, budget=budget, num_sink_tokens=num_sink_tokens, recent_window=recent_window, **storage, **options
        )
        self.budget_allocation, self.layer_budgets = budget_allocation, layer_budgets
        budgets = [budget] * len(self.layers)
        if layer_budgets == "pyramid":
            budgets = pyramid_budgets(budget, len(self.layers), pyramid_beta, num_sink_tokens + recent_window + 1)
        #: Layers hold different lengths (pyramid or adaptive budgets): one mask for the longest, which the "kvplus"
        #: attention cuts to each layer's keys and masks per head, so every layer goes through it.
        self.ragged_layers = budget_allocation == "adaptive" or layer_budgets == "pyramid"
        for layer, layer_budget in zip(self.layers, budgets, strict=True):
            layer.per_head = per_head
            layer.budget = layer_budget
            layer.adaptive, layer.head_floor = budget_allocation == "adaptive", float(head_floor)
            if self.ragged_layers:
                layer.needs_attention = layer.own_mask_length = True
        self.needs_attention = any(layer.needs_attention for layer in self.layers)  # read by the model hook

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Mask sizes for the longest layer when layers hold different lengths (each layer takes the last columns:
        kept keys sit at contiguous positions ending at the present, so that cut is exact, padding included)."""
        sizes = super().get_mask_sizes(query_length, layer_idx)
        if not self.ragged_layers:
            return sizes
        longest = max(layer.kept for layer in self.layers)
        return longest + query_length, self.layers[layer_idx].seen - longest


BUDGET_ALLOCATIONS = ("uniform", "adaptive")
LAYER_BUDGETS = ("uniform", "pyramid")


def pyramid_budgets(budget: int, num_layers: int, beta: float, minimum: int = 1) -> list[int]:
    """PyramidKV's layer budgets (arXiv:2406.02069): linear from ``2 * budget - top`` (layer 0) down to ``top =
    max(budget / beta, minimum)`` (the last layer), rounded so they sum to ``num_layers * budget`` exactly.

    Args:
        budget (`int`): the uniform budget per layer (tokens per KV head).
        num_layers (`int`): decoder layers.
        beta (`float`): PyramidKV's ``beta`` (>= 1); 1 gives every layer ``budget``.
        minimum (`int`, defaults to 1): smallest budget of a layer (its protected tokens plus one).

    Returns:
        `list[int]`: one budget per layer, non-increasing, summing to ``num_layers * budget``.

    Example:

    ```python
    >>> pyramid_budgets(100, 4, beta=5)
    [180, 127, 73, 20]
    ```
    """
    if num_layers == 1:
        return [budget]
    top = min(budget, max(budget / beta, minimum))
    bottom = 2 * budget - top
    exact = [bottom - (bottom - top) * i / (num_layers - 1) for i in range(num_layers)]
    budgets = [int(b) for b in exact]  # floor, then hand the remainder to the largest fractions
    order = sorted(range(num_layers), key=lambda i: exact[i] - budgets[i], reverse=True)
    for i in order[: num_layers * budget - sum(budgets)]:
        budgets[i] += 1
    return budgets


class HeavyHitterLayer(EvictingLayer):
    """Ranks tokens by the attention mass they received since they arrived (``token_state["mass"]``).

    Args:
        normalize (`bool`, defaults to `True`): divide the mass by the number of queries that could
            see each token (``seen - pos``), so old tokens are not favoured just for being old.
        decay (`float`, defaults to 1.0): each query's attention counts ``decay**age`` times, ``age`` in queries
            since it was asked (``1``: every query counts the same, the paper's sum). Below 1 the mass is an
            exponential moving sum over about ``1 / (1 - decay)`` queries, so a token that mattered long ago but
            no longer does stops outranking the ones the text now attends to; with ``normalize`` it is divided by
            the same decayed count of the queries that saw it (``token_state["count"]``). Within one forward of
            several queries they count the same (the decay applies between forwards, to the mass and the count
            alike), so a prefill in one forward ranks as with ``decay=1``; token by token it is exact.
        *args, **kwargs: see :class:`~hf_kvplus.eviction.layer.EvictingLayer`.
    """

    needs_attention = True

    def __init__(self, *args, normalize: bool = True, decay: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalize, self.decay = normalize, float(decay)
        self._counts = normalize and self.decay != 1.0  # the decayed count of queries is a state of its own

    def verification_refusal(self) -> str | None:
        if self.decay != 1.0:
            return f"a decayed attention mass (decay={self.decay}), which the row-by-row verification does not replay"
        return super().verification_refusal()

    def initial_state(self, key_states, value_states):
        shape = (*key_states.shape[:2], key_states.shape[-2])  # [batch, kv_heads, new]
        state = {"mass": key_states.new_zeros(shape, dtype=torch.float32)}
        if self._counts:
            state["count"] = key_states.new_zeros(shape, dtype=torch.float32)  # decayed queries that saw each token
        return state

    def on_attention(self, mass: torch.Tensor) -> None:
        if self.decay == 1.0:
            self.token_state["mass"] += mass  # [batch, kv_heads, kept], summed over this forward's queries
            return
        new = self.seen - self._aged_at  # queries since the mass was last aged
        self._aged_at = self.seen
        carry = self.decay**new
        self.token_state["mass"] = self.token_state["mass"] * carry + mass  # [batch, kv_heads, kept]
        if self._counts:  # this forward's queries that saw each token count 1 each, as in the mass
            saw = (self.seen - self.pos).clamp(max=new).float()  # [kept] or [batch, kv_heads, kept]
            self.token_state["count"] = self.token_state["count"] * carry + saw

    # `_aged_at` (a host number): the `seen` the mass was last aged at; slot steps age it themselves
    def _clear(self) -> None:
        super()._clear()
        self._aged_at = 0

    def _leave_slots(self) -> None:
        super()._leave_slots()
        self._aged_at = self.seen

    def journal_open(self) -> None:
        super().journal_open()
        self.context.journal[self.layer_idx][1]["_aged_at"] = self._aged_at

    def score(self) -> torch.Tensor:
        mass = self.token_state["mass"]
        if not self.normalize:
            return mass
        if self._counts:
            return mass / self.token_state["count"].clamp(min=1)
        return mass / (self.seen - self.pos).clamp(min=1)  # pos: [kept] or [batch, kv_heads, kept]

    # slot storage: the same rule, in place over every slot
    def arrival_state(self, key_states, value_states):
        return {"mass": 0.0, "count": 0.0} if self._counts else {"mass": 0.0}

    @property
    def slot_stepped(self) -> tuple[str, ...]:
        return ("mass", "count") if self._counts else ("mass",)

    def enter_slots(self, slots):
        if self._counts:
            slots.extra["one"] = slots.score.new_ones(1)  # [1]: the step's own query, added to every count

    def slot_extra_nbytes(self, batch, kv_heads, capacity):
        return 4 if self._counts else 0

    def slot_attention(self, slots, probs):  # probs: [batch * kv_heads, groups, slots]
        torch.baddbmm(slots.rows3["mass"], slots.ones(probs.shape[1]), probs, beta=self.decay,
                      alpha=1.0 / probs.shape[1], out=slots.spare_rows3["mass"])  # the mass before the step stays
        slots.advance("mass")  # intact (see slot_stepped)
        if self._counts:  # count * decay + 1, into the spare as well
            torch.add(slots.extra["one"], slots.rows3["count"], alpha=self.decay, out=slots.spare_rows3["count"])
            slots.advance("count")

    def slot_score(self, slots):
        mass = slots.state["mass"]  # [batch, kv_heads, slots]
        if not self.normalize:
            return self.slot_mean(slots, mass), 1
        if self._counts:  # the decayed mean attention (>= 0); protected slots are above every candidate anyway
            if self.per_head:
                torch.div(mass, slots.state["count"], out=slots.score)
                return "score", 1
            return self.slot_mean(slots, torch.div(mass, slots.state["count"])), 1
        # minus the mean attention per query that saw each token (mass / (pos - seen) <= 0): its magnitude ranks
        if self.per_head:
            torch.div(mass, torch.sub(slots.pos, self.seen), out=slots.score)
            return "score", 1
        return self.slot_mean(slots, torch.div(mass, torch.sub(slots.pos, self.seen))), 1


class HeavyHitterCache(ScoredCache):
    """H2O: the ``budget`` tokens per KV head are the newest ones plus the heaviest hitters.

    Args:
        config (`PreTrainedConfig`): the model's config.
        budget (`int`): tokens kept per layer and KV head.
        heavy_ratio (`float`, *optional*, defaults to 0.9): share of the budget kept by accumulated
            attention; the rest is the window of newest tokens. The paper splits evenly (0.5); on the
            embedded model 0.9 loses far less perplexity (``docs/strategies/heavy_hitter.md``).
        normalize (`bool`, *optional*, defaults to `True`): rank by the mean attention per query that
            could see each token (mass divided by ``seen - pos``), so new tokens compete fairly with old
            ones; `False` ranks by the summed mass, as the paper does.
        decay (`float`, *optional*, defaults to 1.0): weight of a query's attention per later query, in
            ``(0, 1]``: ``1`` sums every query alike (the paper); below 1 the scores follow the last
            ``1 / (1 - decay)`` queries or so and do not go stale on long streams (see :class:`HeavyHitterLayer`).
            Streaming 4,096 tokens (``benchmarks/eviction_streaming.py``), 0.99 against 1: perplexity 14.72 vs
            15.17 at budget 128, 12.99 vs 13.61 at 256, 11.95 vs 12.46 at 512. Assisted decoding with a decay below
            1 is not yet exactly plain greedy decoding (the draft replay ages the mass differently).
        **kwargs: ``recent_window``, ``num_sink_tokens``, ``per_head`` (see :class:`ScoredCache`) and
            storage keywords (``nbits=4`` keeps the heavy hitters in quantized storage).

    Needs attention scores: build it with ``make_cache("h2o", model, ...)``, or call
    ``hf_kvplus.attach(model, attention_scores=True)`` once; otherwise the first forward raises.

    Example:

    ```python
    >>> import hf_kvplus
    >>> cache = hf_kvplus.make_cache("h2o", model, budget=256)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=500, prefill_chunk_size=256)
    >>> cache.max_held  # never more than 256 tokens per layer between forwards
    256
    ```
    """

    layer_class = HeavyHitterLayer
    layer_options = ("normalize", "decay")
    default_heavy_ratio = 0.9
    # Measured on the 4,096-token streaming protocol (benchmarks/eviction_streaming.py --strategies h2o --options
    # '{"decay": D}'): budget 128 / 256 / 512 give 15.17 / 13.61 / 12.46 at D=1, 14.72 / 12.99 / 11.95 at D=0.99
    # (11.94 at D=0.95, budget 512). Stays 1 until draft verification (assisted decoding) replays the decay exactly.
    default_decay = 1.0

    def __init__(self, config: PreTrainedConfig, budget: int, normalize: bool = True, decay: float | None = None,
                 **kwargs):
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        decay = self.default_decay if decay is None else decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"decay must be a number in (0, 1] (1: no decay, the paper's sum), got {decay!r}")
        super().__init__(config, budget, normalize=normalize, decay=float(decay), **kwargs)


register_cache(
    CacheSpec(
        name="h2o",
        factory=HeavyHitterCache,
        description="heavy hitters: accumulated attention + recent window (H2O)",
        paper="arXiv:2306.14048",
    )
)
