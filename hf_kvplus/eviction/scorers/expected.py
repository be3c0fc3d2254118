"""Expected attention (arXiv 2510.00636): rank tokens by the attention future queries are expected to pay them.

Observed attention (H2O, TOVA) looks back: a token is kept for what past queries asked. Queries of one
head are, before RoPE, spread around a stable mean with a stable covariance, so the attention the
next queries will pay can be estimated without seeing them: a query ``q ~ N(mu, Sigma)`` (pre-RoPE),
rotated to a future position ``t``, gives a key ``k`` the logit ``s * (R_t q) . k``, whose expected
exponential is ``exp(s * (R_t mu) . k + s**2 / 2 * k^T R_t Sigma R_t^T k)`` (a Gaussian's moment
generating function). Averaging the rotation over the next ``future`` positions, ``R = mean_t R_t``,
turns that into one score per key and query head; a softmax over the kept keys makes it a share of
attention, averaged over the query heads of each KV head and multiplied by the norm of the token's
value (what the token adds to the output scales with it).

The statistics come from the queries themselves: the "kvplus" attention hands each forward's
queries (after RoPE) to the layer, which rotates them back to RoPE's position 0 and folds them into a
weighted count, sum and sum of outer products per query head (the first ``num_sink_tokens`` positions,
outliers, are left out). ``query_decay`` below 1 makes it a moving estimate over about
``1 / (1 - query_decay)`` recent queries, for long streams. Scores are recomputed from the kept keys at
every eviction, at prefill and at every decoding step (decoding runs in position order: this scorer has no
slot-storage step, so its step is not within the scorers' op budget).
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedConfig

from ...registry import CacheSpec, register_cache
from ...rope import channel_freq, rotate, shift_keys
from ...validate import check_int
from ..layer import EvictingLayer
from .h2o import ScoredCache


class ExpectedAttentionLayer(EvictingLayer):
    """Score = expected share of attention from the next ``future`` queries, times the value norm.

    Args:
        future (`int`, defaults to 512): positions ahead the query rotation is averaged over.
        query_decay (`float`, defaults to 1.0): weight of a query in the statistics per later query.
        covariance (`bool`, defaults to `True`): include the ``k^T Sigma k`` term (else the mean only).
        value_norm (`bool`, defaults to `True`): multiply the scores by the L2 norm of each token's value.
        observed (`float`, defaults to 0.0): weight of the observed attention share blended into the scores.
        query_rope (`tuple`, *optional*): ``(inv_freq, attention_scaling, layout)`` of the model's RoPE
            (:func:`hf_kvplus._compat.rope_parameters`); ``None``: queries are taken as they come (no RoPE).
        *args, **kwargs: see :class:`~hf_kvplus.eviction.layer.EvictingLayer`.
    """

    needs_attention = True  # the "kvplus" attention hands over the queries (see `observe_queries`)

    def __init__(self, *args, future: int = 512, query_decay: float = 1.0, covariance: bool = True,
                 value_norm: bool = True, observed: float = 0.0, query_rope=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.future, self.query_decay, self.observed = future, float(query_decay), float(observed)
        if query_rope is not None:  # a copy per layer (a few floats), counted with the layer's bytes
            query_rope = (query_rope[0].clone(), *query_rope[1:])
        self.covariance, self.value_norm, self.query_rope = covariance, value_norm, query_rope

    def _clear(self) -> None:
        super()._clear()
        self._qstats: tuple[torch.Tensor, ...] | None = None  # (weight [b,1,1], sum [b,qh,d], outer [b,qh,d,d])
        self._scaling = None

    def journal_open(self) -> None:
        super().journal_open()
        self.context.journal[self.layer_idx][1]["_qstats"] = self._qstats  # replaced, never changed in place

    def verification_refusal(self) -> str | None:
        """Assisted decoding is refused: the row-by-row replay of drafts does not rebuild the query statistics
        and expected scores each draft step would have had."""
        return "expected-attention scores (query statistics), which the row-by-row verification does not replay"

    def tensors(self) -> list[torch.Tensor]:
        held = super().tensors()
        if self._qstats is not None:
            held.extend(t for t in self._qstats if t is not None)
        if self.query_rope is not None:
            held.append(self.query_rope[0])
        return held

    def predict_nbytes(self, batch, kv_heads, tokens, head_dim, dtype):
        held = super().predict_nbytes(batch, kv_heads, tokens, head_dim, dtype)
        if held is None:
            return None
        rope = 0 if self.query_rope is None else self.query_rope[0].numel() * self.query_rope[0].element_size()
        if not tokens:
            return held + rope
        q_heads = kv_heads * self.query_groups
        stats = 1 + q_heads * head_dim + (q_heads * head_dim * head_dim if self.covariance else 0)  # float32
        return held + rope + 4 * batch * stats

    def attention_reduction(self) -> str:
        return "sum" if self.observed else "last"  # "last": the cheapest mass, not used

    def initial_state(self, key_states, value_states):
        state = {}
        if self.value_norm:
            state["value_norm"] = value_states.float().norm(dim=-1)  # [batch, kv_heads, new]
        if self.observed:
            state["mass"] = key_states.new_zeros(key_states.shape[:3], dtype=torch.float32)  # [batch, kv_heads, new]
        return state

    def on_attention(self, mass: torch.Tensor) -> None:
        if self.observed:
            self.token_state["mass"] = self.token_state["mass"] + mass  # [batch, kv_heads, kept]

    # ------------------------------------------------------------ statistics
    def observe_queries(self, query: torch.Tensor, scaling: float | None) -> None:
        """Fold this forward's queries (``[batch, q_heads, new, head_dim]``, after RoPE) into the statistics."""
        batch, heads, new, head_dim = query.shape
        self._scaling = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
        columns = torch.arange(self.seen - new, self.seen, device=query.device)  # [new]
        positions = columns.expand(batch, new)
        if self.context.padded:  # a left-padded row's positions start after its padding
            positions = positions - self.context.pad_len.to(query.device).view(-1, 1)
        q = query.detach().float()
        if self.query_rope is not None:  # back to RoPE's position 0
            inv_freq, attention_scaling = self.query_rope[0], self.query_rope[1]
            layout = self.query_rope[2] if len(self.query_rope) > 2 else "half"
            q = shift_keys(q, -positions[:, None, :], inv_freq, layout) / attention_scaling
        age = (self.seen - 1 - columns).float()  # [new]: queries asked after each one
        weight = torch.where(positions >= self.num_sink_tokens, self.query_decay ** age, 0.0)  # [batch, new]
        weighted = q * weight[:, None, :, None]  # [batch, q_heads, new, head_dim]
        total = weight.sum(dim=-1).view(batch, 1, 1)
        first = weighted.sum(dim=2)  # [batch, q_heads, head_dim]
        second = weighted.transpose(2, 3) @ q if self.covariance else None  # [batch, q_heads, d, d]
        if self._qstats is not None:
            carry = self.query_decay ** new
            held_total, held_first, held_second = self._qstats
            total, first = held_total * carry + total, held_first * carry + first
            second = None if second is None else held_second * carry + second
        self._qstats = (total, first, second)

    def _select_batch(self, index: torch.Tensor) -> None:
        super()._select_batch(index)
        if self._qstats is not None:
            index = index.to(self._qstats[0].device)
            self._qstats = tuple(None if t is None else t.index_select(0, index) for t in self._qstats)

    def _future_rotation(self, head_dim: int, device) -> torch.Tensor:
        """``M = mean_t R_t^T`` over the next ``future`` positions, ``[head_dim, head_dim]`` (``x @ M`` rotates rows)."""
        eye = torch.eye(head_dim, device=device)
        if self.query_rope is None:
            rotation = eye
        else:
            inv_freq, attention_scaling = self.query_rope[0], self.query_rope[1]
            layout = self.query_rope[2] if len(self.query_rope) > 2 else "half"
            rot = 2 * inv_freq.shape[-1]
            steps = torch.arange(self.seen, self.seen + self.future, dtype=torch.float64, device=device)  # [future]
            angles = steps[:, None] * channel_freq(inv_freq.to(device, torch.float64), layout)  # [future, rot]
            cos, sin = angles.cos().mean(0).float(), angles.sin().mean(0).float()  # [rot]
            part = eye[:, :rot]  # row i: the basis vector e_i's rotated channels
            rotated = part * cos + rotate(part, layout) * sin  # rows: (R e_i)^T over the rotated channels
            rotation = eye.clone()
            rotation[:, :rot] = rotated * attention_scaling
        return rotation

    def score(self) -> torch.Tensor | None:
        if self._qstats is None:
            return None
        keys = self.store.get()[0].float()  # [batch, kv_heads, kept, head_dim], after RoPE
        batch, kv_heads, kept, head_dim = keys.shape
        total, first, second = self._qstats
        total = total.clamp(min=1e-30)
        mean = first / total  # [batch, q_heads, d]
        rotation = self._future_rotation(head_dim, keys.device)  # [d, d]
        groups = mean.shape[1] // kv_heads
        grouped = keys.unsqueeze(2)  # [batch, kv_heads, 1, kept, d]
        future_mean = (mean @ rotation).view(batch, kv_heads, groups, head_dim, 1)
        logits = (grouped @ future_mean).squeeze(-1) * self._scaling  # [batch, kv_heads, groups, kept]
        if second is not None:
            cov = second / total.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)  # [batch, q_heads, d, d]
            cov = rotation.T @ cov @ rotation  # the averaged rotation applied on both sides
            cov = cov.view(batch, kv_heads, groups, head_dim, head_dim)
            logits = logits + 0.5 * self._scaling**2 * ((grouped @ cov) * grouped).sum(-1)
        shares = torch.softmax(logits, dim=-1).mean(dim=2)  # [batch, kv_heads, kept]
        if self.observed:  # blended with the mean attention each token received so far (H2O's normalized mass)
            seen_by = self.token_state["mass"] / (self.seen - self.pos).clamp(min=1)  # [batch, kv_heads, kept]
            seen_by = seen_by / seen_by.sum(dim=-1, keepdim=True).clamp(min=1e-30)
            shares = (1 - self.observed) * shares + self.observed * seen_by
        if self.value_norm:
            shares = shares * self.token_state["value_norm"]
        return shares


class ExpectedAttentionCache(ScoredCache):
    """Expected attention: the window of newest tokens plus those future queries are expected to attend to.

    Args:
        config (`PreTrainedConfig`): the model's config (RoPE read from it; see ``query_rope`` of the layer).
        budget (`int`): tokens kept per layer and KV head.
        future (`int`, *optional*, defaults to 512): positions ahead the RoPE rotation is averaged over.
        query_decay (`float`, *optional*, defaults to 1.0): in ``(0, 1]``; below 1 the query statistics follow
            about the last ``1 / (1 - query_decay)`` queries (long streams); 1 weighs every query alike.
        covariance (`bool`, *optional*, defaults to `True`): include the queries' covariance (else the mean).
        value_norm (`bool`, *optional*, defaults to `True`): multiply scores by the norm of each value.
        observed (`float`, *optional*, defaults to 0.0): in ``[0, 1]``, the weight of observed attention blended
            in: each token's mean attention so far (H2O's normalized mass, as a share of the kept tokens')
            times ``observed``, plus the expected share times ``1 - observed``.
        num_sink_tokens (`int`, *optional*, defaults to 4): first tokens never evicted (their queries, outliers,
            stay out of the statistics), as in the paper.
        heavy_ratio (`float`, *optional*, defaults to 0.8): share of the budget chosen by score (the rest: the
            newest tokens; measured on ``benchmarks/peers.py`` at keep 0.25: 1.0 gives 11.343, 0.9 11.304, 0.8
            11.285).
        **kwargs: ``recent_window``, ``per_head`` and storage keywords (see :class:`ScoredCache`).

    Raises:
        ValueError: ``future`` not a positive integer, ``query_decay`` outside ``(0, 1]``, ``observed`` outside
            ``[0, 1]``, ``covariance`` or
            ``value_norm`` not a bool, or a bad budget split (see :class:`ScoredCache`).

    Needs the "kvplus" attention (it hands over the queries): build it with ``make_cache("expected", model, ...)``.
    Decoding runs in position order and recomputes every kept token's score per step (``O(budget * head_dim**2)``
    per query head with ``covariance``): fine at prefill and for short generations, slower than ``h2o`` per step.

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("expected", model, budget=512)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=100)
    ```
    """

    layer_class = ExpectedAttentionLayer
    layer_options = ("future", "query_decay", "covariance", "value_norm", "observed", "query_rope")
    default_heavy_ratio = 0.8  # keep 0.25 of the 3-window protocol: 11.343 at 1.0, 11.304 at 0.9, 11.285 at 0.8

    def __init__(self, config: PreTrainedConfig, budget: int, future: int = 512, query_decay: float = 1.0,
                 covariance: bool = True, value_norm: bool = True, observed: float = 0.0, num_sink_tokens: int = 4,
                 **kwargs):
        future = check_int("future", future)
        if isinstance(query_decay, bool) or not isinstance(query_decay, (int, float)) or not 0 < query_decay <= 1:
            raise ValueError(f"query_decay must be a number in (0, 1] (1: every query alike), got {query_decay!r}")
        if isinstance(observed, bool) or not isinstance(observed, (int, float)) or not 0 <= observed <= 1:
            raise ValueError(f"observed must be a number in [0, 1] (the weight of observed attention), got {observed!r}")
        for name, value in (("covariance", covariance), ("value_norm", value_norm)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if "query_rope" in kwargs:
            raise TypeError("query_rope is read from the config; it is not a keyword of ExpectedAttentionCache")
        from ..._compat import rope_parameters

        super().__init__(config, budget, future=future, query_decay=float(query_decay), covariance=covariance,
                         value_norm=value_norm, observed=float(observed), num_sink_tokens=num_sink_tokens, query_rope=rope_parameters(config),
                         **kwargs)


register_cache(
    CacheSpec(
        name="expected",
        factory=ExpectedAttentionCache,
        description="expected attention of future queries from query statistics and RoPE (Expected Attention)",
        paper="arXiv:2510.00636",
    )
)
