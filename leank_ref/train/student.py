"""The student's attention for the answer tokens: LeanK over a prefilled context, without [heads, answer, N] tensors.

In training every answer query ``t`` (absolute position >= the context length) sees three kinds of keys: the
``sink`` first tokens and its own ``recent`` window (t - recent, t] through the full K, and the *middle* keys
between them through ``K * s`` channel-wise (``s``: the layer's factors [G, D], or a 0/1 mask). This is
:class:`~leank_ref.attention.SimulatedLeanK` restricted to the answer queries, computed so that memory grows
with the context only as much as the K/V cache itself does:

* ``s`` scales the *keys* (per KV head, so grouped queries need no copy of K per query head), and one SDPA call
  attends over ``[sink | middle * s | band]``: transformers' fused kernel, never a [H, T, N] logit tensor.
* Keys ``[sink, first - recent]`` are middle for every answer query (``first``: the first answer position),
  so one boolean mask [T, N'] shared by all heads says who sees what. The *band* after them, the last
  ``recent - 1 + T`` keys, is middle for some answer queries and full for others: its first ``T - 1`` keys are
  appended a second time, scaled, and each query's mask picks the copy it sees.
* A head whose ``s`` is all zero in stage 2's deployed variant skips its middle tokens (the cache stores none,
  see :func:`~leank_ref.masks.zero_head_rule`): such KV heads attend over the sink and the band only.

The 2-D mask is the one [answer, N] tensor per layer (bool, shared by all heads); for Llama-3.1-8B at 96K
tokens and 30 answer tokens it is 12 MB against the layer's 400 MB of K/V.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from leank_ref.masks import zero_head_rule
from leank_ref.windows import Windows, check_windows


def student_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: torch.Tensor,
    windows: Windows,
    scaling: float,
    exclude_zero_heads: bool,
) -> torch.Tensor:
    """LeanK attention of the last T positions of a sequence (all answer queries): [B, T, H, D].

    query [B, H, T, D] (post-RoPE, at absolute positions N - T .. N - 1), key/value [B, G, N, D] (the whole
    sequence), scale [G, D] (this layer's factors or mask). Queries of KV head g are heads g*r .. g*r + r - 1.
    """
    b, h, t, d = query.shape
    g, n = key.shape[1], key.shape[2]
    r = h // g
    sink, recent = windows.sink, windows.recent
    first = n - t  # absolute position of the first answer query
    split = min(max(first - recent + 1, sink), n)  # keys [sink, split) are middle for every answer query
    extra = max(0, min(n - split, n - recent - split))  # band keys that are middle for a later answer query
    dev = query.device
    pos = torch.arange(first, n, device=dev)[:, None]  # [T, 1]
    j = torch.arange(n, device=dev)[None, :]  # [1, N]
    middle = (j >= sink) & (j <= pos - recent)  # [T, N]: seen through K * s
    causal = j <= pos  # [T, N]

    s = scale.to(key.dtype)[None, :, None, :]  # [1, G, 1, D]
    qg = query.reshape(b, g, r * t, d)  # [B, G, r*T, D]: a KV head's queries stacked as rows

    def attend(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        mask = allowed.repeat(r, 1)  # [r*T, N']: the same per-query mask for each of the r query heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [B, G', r*T, D]

    ks = torch.cat(
        [key[:, :, :sink], key[:, :, sink:split] * s, key[:, :, split:], key[:, :, split : split + extra] * s], dim=2
    )  # [B, G, N + extra, D]
    vs = torch.cat([value, value[:, :, split : split + extra]], dim=2)
    allowed = torch.cat(
        [causal[:, :split], (causal & ~middle)[:, split:], middle[:, split : split + extra]], dim=1
    )  # [T, N + extra]

    dropped = zero_head_rule(scale) if exclude_zero_heads else torch.zeros(g, dtype=torch.bool, device=scale.device)
    if not bool(dropped.any()):
        out = attend(ks, vs, qg, allowed)
    else:  # zero-count heads: sink and band only, full K, no middle
        kept_idx, drop_idx = (~dropped).nonzero()[:, 0].to(dev), dropped.nonzero()[:, 0].to(dev)
        out = qg.new_empty(b, g, r * t, d)
        if len(kept_idx):
            out[:, kept_idx] = attend(ks[:, kept_idx], vs[:, kept_idx], qg[:, kept_idx], allowed)
        near = torch.cat([torch.arange(min(sink, split), device=dev), torch.arange(split, n, device=dev)])
        k_near, v_near = key[:, drop_idx][:, :, near], value[:, drop_idx][:, :, near]
        out[:, drop_idx] = attend(k_near, v_near, qg[:, drop_idx], (causal & ~middle)[:, near])
    return out.reshape(b, h, t, d).transpose(1, 2)  # [B, T, H, D]


class StudentAttention:
    """Attention hook for the student's answer pass (:func:`~leank_ref.attention.use_hook`).

    ``scale`` is [L, G, D] (factors, a 0/1 mask or masked factors; a callable returning one is read at each
    layer). Every query must be an answer query (position >= ``decode_start``); the model runs one unpadded
    sequence, so transformers' causal mask is rebuilt here and not read.
    """

    def __init__(
        self,
        scale: torch.Tensor | Callable[[], torch.Tensor],
        windows: Windows,
        decode_start: int,
        exclude_zero_heads: bool = True,
    ):
        self.scale, self.windows = scale, check_windows(windows)
        self.decode_start = decode_start
        self.exclude_zero_heads = exclude_zero_heads

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        t, n = query.shape[-2], key.shape[-2]
        if n - t < self.decode_start:
            raise ValueError(
                f"the student's attention runs the answer tokens only (positions >= {self.decode_start}), but "
                f"got queries from position {n - t}: prefill the context first (prefill_context)."
            )
        scale = self.scale() if callable(self.scale) else self.scale
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        return student_attention(
            query, key, value, scale[module.layer_idx], self.windows, scaling, self.exclude_zero_heads
        )
