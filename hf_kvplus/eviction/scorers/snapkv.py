"""SnapKV (arXiv 2404.14469): the last queries of the prompt already know which keys will matter.

At prefill, tokens are ranked by the attention they receive from an observation window (the last
``window`` queries of the forward), smoothed over neighbouring tokens by average pooling so that
kept tokens come with their context. During decoding the same score continues as a moving sum with
a horizon of ``window`` queries: each forward's attention is added after the old score decayed by
``(1 - 1/window)`` per query, so the ranking always reflects about the last ``window`` queries.
"""

from __future__ import annotations

import torch

from ...registry import CacheSpec, register_cache
from ...validate import check_int
from ..layer import EvictingLayer
from .h2o import ScoredCache


class SnapKVLayer(EvictingLayer):
    """Score = pooled attention from about the last ``window`` queries (``token_state["snap"]``)."""

    needs_attention = True

    def __init__(self, *args, window: int = 32, kernel_size: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.kernel_size, self._new = window, kernel_size, 0

    def attention_window(self) -> int:
        return self.window

    def initial_state(self, key_states, value_states):
        self._new = key_states.shape[-2]  # queries of this forward
        shape = (*key_states.shape[:2], key_states.shape[-2])  # [batch, kv_heads, new]
        return {"snap": key_states.new_zeros(shape, dtype=torch.float32)}

    def on_attention(self, mass: torch.Tensor) -> None:
        batch, heads, kept = mass.shape
        pool = (self.kernel_size, 1, self.kernel_size // 2)  # kernel, stride, padding
        if self.context.padded or self.adaptive:  # left padding or a head's unused entries are no neighbours
            lower = self.context.pad_len.to(mass.device).view(-1, 1, 1) if self.context.padded else 0
            real = (self.pos.expand(batch, heads, kept) >= lower).float()  # average over real tokens only
            sums = torch.nn.functional.avg_pool1d((mass * real).view(batch * heads, 1, kept), *pool)
            counts = torch.nn.functional.avg_pool1d(real.view(batch * heads, 1, kept), *pool)
            pooled = (sums / counts.clamp(min=1e-30)).view(batch, heads, kept) * real  # [batch, kv_heads, kept]
        else:
            pooled = torch.nn.functional.avg_pool1d(
                mass.view(batch * heads, 1, kept), *pool, count_include_pad=False
            ).view(batch, heads, kept)
        decay = (1.0 - 1.0 / self.window) ** self._new
        self.token_state["snap"] = self.token_state["snap"] * decay + pooled

    def score(self) -> torch.Tensor:
        return self.token_state["snap"]

    # slot storage: pooling needs neighbours in position order, so a step ranks slots by position (one sort of
    # budget + 1 positions), gathers this step's attention and the old scores into that order in one gather, pools
    # and scores there (the same avg_pool1d as `on_attention`), evicts there and writes the scores back to slots.
    slot_protects = False

    def slot_score(self, slots):  # not used by slot_evict below; marks this strategy as slot-capable
        return self.slot_mean(slots, slots.state["snap"]), 1

    def arrival_state(self, key_states, value_states):
        return {}  # the newest rank has decay 0: its score is its first pooled attention

    def enter_slots(self, slots):
        batch, heads, capacity = slots.state["snap"].shape
        decay = slots.score.new_full((capacity,), (1.0 - 1.0 / self.window))
        decay[-1] = 0.0
        slots.extra.update(
            both=slots.score.new_zeros(batch, heads, 2, capacity),  # [batch, kv_heads, (mass, snap), slots]
            ranked2=slots.score.new_zeros(batch, heads, 2, capacity),  # `both` in position order
            ranked=slots.score.new_zeros(batch, heads, capacity),  # new scores in position order
            sorted=slots.pos.new_zeros(slots.pos.shape),
            order=slots.pos.new_zeros(slots.pos.shape),  # [batch, rows, slots]: the slot of each rank
            victim=slots.pos.new_zeros(*slots.pos.shape[:2], 1),
            decay=decay,  # [slots]
        )
        slots.share_state("snap", "both", 1)  # the scores live in `both`, beside this step's attention

    def slot_extra_nbytes(self, batch, kv_heads, capacity):
        rows = kv_heads if self.per_head else 1
        floats = batch * kv_heads * 4 * capacity  # mass in `both` (its snap half is the state), ranked2, ranked
        return 4 * floats + 8 * (2 * batch * rows * capacity + batch * rows) + 4 * capacity

    def _views(self, slots):
        x, views = slots.extra, slots.extra_views
        if not views:
            batch, heads, _, capacity = x["both"].shape
            sinks, recent = slots.sinks, slots.recent
            views.update(
                mass3=x["both"][:, :, 0].view(batch * heads, 1, capacity),
                order2=x["order"].unsqueeze(2).expand(batch, heads, 2, capacity),
                order=x["order"].expand(batch, heads, capacity),
                mass_ranked=x["ranked2"][:, :, 0].view(batch * heads, 1, capacity),
                snap_ranked=x["ranked2"][:, :, 1],
                candidates=(x["ranked"] if self.per_head else slots.score)[..., sinks : capacity - recent],
                candidate_slots=x["order"][..., sinks:],
            )
        return views

    def slot_attention(self, slots, probs):  # probs: [batch * kv_heads, groups, slots]
        x, v = slots.extra, self._views(slots)
        v["mass3"].baddbmm_(slots.ones(probs.shape[1]), probs, beta=0.0, alpha=1.0 / probs.shape[1])
        torch.sort(slots.pos, dim=-1, out=(x["sorted"], x["order"]))  # [batch, rows, slots]: rank -> slot
        torch.gather(x["both"], 3, v["order2"], out=x["ranked2"])  # attention and scores, position order
        half = self.kernel_size // 2
        pooled = torch.nn.functional.avg_pool1d(v["mass_ranked"], self.kernel_size, stride=1, padding=half,
                                                count_include_pad=False)  # [batch * kv_heads, 1, slots]
        torch.addcmul(pooled.view(x["ranked"].shape), v["snap_ranked"], x["decay"], out=x["ranked"])

    def slot_evict(self, slots):
        x, v = slots.extra, self._views(slots)
        if not self.per_head:
            torch.mean(x["ranked"], dim=1, keepdim=True, out=slots.score)  # [batch, 1, slots]
        torch.argmin(v["candidates"], dim=-1, keepdim=True, out=x["victim"])  # ties: the older (lower rank)
        entry = slots.entry(slots.seen)  # [batch, rows, 1]: receives the victim's slot, the next token's
        if torch.compiler.is_compiling():  # a symbolic offset: fake tensors cannot check an out= for overlap
            entry.copy_(torch.gather(v["candidate_slots"], 2, x["victim"]))
        else:
            torch.gather(v["candidate_slots"], 2, x["victim"], out=entry)
        slots.state["snap"].scatter_(2, v["order"], x["ranked"])  # back to slot order

    def slot_undo(self, slots):
        # this step's gather still holds the scores before it, in the rank order it used: scatter them back
        v = self._views(slots)
        slots.state["snap"].scatter_(2, v["order"], v["snap_ranked"])


class SnapKVCache(ScoredCache):
    """SnapKV cache: the window of newest tokens plus the tokens the latest queries attend to.

    Args:
        config (`PreTrainedConfig`): the model's config.
        budget (`int`): tokens kept per layer and KV head.
        window (`int`, *optional*, defaults to 32): queries in the observation window.
        kernel_size (`int`, *optional*, defaults to 5): width of the average pooling over tokens (odd).
        recent_window (`int`, *optional*): newest tokens always kept; defaults to ``window`` (the
            observation window itself is kept, as in the paper).

    Raises:
        ValueError: at a budget at or below ``window + num_sink_tokens`` with the default ``recent_window``, or
            any setting with ``num_sink_tokens + recent_window >= budget``: no token would be kept by score (the
            plain ``window`` or ``sink`` cache). Pass a smaller ``window=`` or ``recent_window=``.
        **kwargs: ``num_sink_tokens``, ``per_head`` and storage keywords (see :class:`ScoredCache`).

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("snapkv", model, budget=512)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=200)
    ```
    """

    layer_class = SnapKVLayer
    layer_options = ("window", "kernel_size")

    def __init__(self, config, budget: int, window: int = 32, kernel_size: int = 5, recent_window=None, **kwargs):
        window = check_int("window", window)
        kernel_size = check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the pooling is centred on each token), got {kernel_size}")
        if recent_window is None and "heavy_ratio" not in kwargs:
            budget = check_int("budget", budget)
            sinks = check_int("num_sink_tokens", kwargs.get("num_sink_tokens", 0), minimum=0)
            if budget - sinks <= window:  # degenerate: the window fills the budget, nothing is chosen by score
                raise ValueError(
                    f"SnapKVCache budget={budget} (num_sink_tokens={sinks}) is at or below its observation window "
                    f"(window={window}): the default recent_window (the window itself) leaves no token to choose by "
                    f"score, so it would be the plain {'sink' if sinks else 'window'} cache. Allowed: budget > window + "
                    f"num_sink_tokens, a smaller window=, or recent_window= below budget - num_sink_tokens"
                )
            recent_window = window
        super().__init__(config, budget, window=window, kernel_size=kernel_size, recent_window=recent_window, **kwargs)


register_cache(
    CacheSpec(
        name="snapkv",
        factory=SnapKVCache,
        description="observation-window attention, pooled over neighbours (SnapKV)",
        paper="arXiv:2404.14469",
    )
)
