"""LeanK decode in one call: check a compact cache layer, build a :class:`LeanKDecoder` for it, launch once.

LeanK (Zhang et al., EMNLP 2025) learns, once and offline, which key channels each KV head needs. The cache
then holds every token's K and V at full width only in the *full window* (the first tokens, the "sink", and the
most recent ones); for the *middle* tokens a head keeps only its c kept key channels, and a head with c = 0
keeps no middle K or V at all. Heads with the same c are stored together as one ``MiddleGroup`` (c a multiple
of 16, so there are at most D/16 groups). Per middle token and KV head the kernel reads c + D values instead of
2 D: with the authors' Llama-3.1-8B mask (31.25 % of K channels kept, 47 of 256 heads without middle V) that is
56 % of the dense bytes, an ideal speed-up of 1.77x at long context.

The kernel is in ``leank_kernel.py``, its host side (plan, buffers, checks) in ``leank_decoder.py``. A decode
loop builds one :class:`LeanKDecoder` per layer and calls it every step; :func:`leank_decode` here is the
one-call form for tests and notebooks, which validates everything and builds a decoder every time.
"""

from __future__ import annotations

import torch

from leank_ref.layout import HeadGroups, MiddleGroup

from .launch import DecodeConfig, check_dtypes, check_head_dim, check_last_dim_contiguous, check_runnable
from .leank_decoder import LEANK_CONFIG, LeanKDecoder


def _check_inputs(q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, groups: list[MiddleGroup]) -> HeadGroups:
    """Check :func:`leank_decode`'s arguments; return the groups' validated :class:`HeadGroups`."""
    if q.dim() != 3 or k_full.dim() != 4:
        raise ValueError(
            f"expected q [B, H, D] and k_full, v_full [B, G, Nf, D], "
            f"got q {list(q.shape)} and k_full {list(k_full.shape)}"
        )
    if v_full.shape != k_full.shape:
        raise ValueError(f"v_full must have k_full's shape {list(k_full.shape)}, got {list(v_full.shape)}")
    B, H, D = q.shape
    G, Nf = k_full.shape[1], k_full.shape[2]
    if k_full.shape[0] != B or k_full.shape[3] != D:
        raise ValueError(f"k_full has shape {list(k_full.shape)} but q {list(q.shape)} needs [{B}, G, Nf, {D}]")
    if H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads G={G} (GQA)")
    if Nf < 1:
        raise ValueError("the full part is empty (Nf = 0): it must hold at least the newest token")
    check_head_dim(D)
    check_dtypes(
        q=q,
        k_full=k_full,
        v_full=v_full,
        **{f"groups[{i}].k": g.k for i, g in enumerate(groups)},
        **{f"groups[{i}].v": g.v for i, g in enumerate(groups)},
    )
    for i, grp in enumerate(groups):
        if grp.kv_heads.dtype != torch.int64 or grp.channels.dtype != torch.int64:
            raise TypeError(f"groups[{i}].kv_heads and .channels must be int64: use .long()")
    heads = HeadGroups.from_indices([g.kv_heads for g in groups], [g.channels for g in groups], G, D)
    tensors = [q, k_full, v_full]
    for i, (grp, c) in enumerate(zip(groups, heads.counts)):
        Gc = grp.kv_heads.numel()
        if grp.k.dim() != 4 or grp.k.shape[:2] != (B, Gc) or grp.k.shape[3] != c:
            raise ValueError(f"groups[{i}].k has shape {list(grp.k.shape)}, expected [{B}, {Gc}, Nm, {c}]")
        if grp.v.shape != (B, Gc, grp.k.shape[2], D):
            raise ValueError(
                f"groups[{i}].v has shape {list(grp.v.shape)}, expected [{B}, {Gc}, {grp.k.shape[2]}, {D}]"
            )
        check_last_dim_contiguous(
            **{
                f"groups[{i}].k": grp.k,
                f"groups[{i}].v": grp.v,
                f"groups[{i}].kv_heads": grp.kv_heads,
                f"groups[{i}].channels": grp.channels,
            }
        )
        tensors += [grp.kv_heads, grp.channels, grp.k, grp.v]
    check_runnable(*tensors)
    check_last_dim_contiguous(q=q, k_full=k_full, v_full=v_full)
    return heads


def _standard_layout(groups: list[MiddleGroup]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The groups' middle K and V with one capacity and contiguous rows (copies only where they are not)."""
    nm = groups[0].k.shape[2] if groups else 0
    ks, vs = [], []
    caps = set()
    for grp in groups:
        k, v = grp.k, grp.v
        c, D, gc = k.shape[3], v.shape[3], k.shape[1]
        cap = k.stride(1) // c if c else 0
        if k.stride() != (gc * cap * c, cap * c, c, 1) or v.stride() != (gc * cap * D, cap * D, D, 1):
            k, v, cap = k.contiguous(), v.contiguous(), k.shape[2]
        ks.append(k)
        vs.append(v)
        caps.add(cap)
    if any(k.shape[2] != nm for k in ks):
        raise ValueError("every group must hold the same number of middle tokens Nm")
    if len(caps) > 1:
        ks, vs = [k.contiguous() for k in ks], [v.contiguous() for v in vs]
    return ks, vs


def leank_decode(
    q: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    groups: list[MiddleGroup],
    scale: float | None = None,
    *,
    config: DecodeConfig = LEANK_CONFIG,
) -> torch.Tensor:
    """Decode attention over a LeanK cache (full window + per-group pruned middle), exact LSE merge: [B, H, D].

    A one-call convenience: it validates everything (the index check reads the indices back to the host, a
    synchronisation on CUDA) and builds a :class:`LeanKDecoder` for this call. A decode loop builds the decoder
    once per layer instead (``leank_ref.decode`` does), so its steps are one launch each and never synchronise.
    """
    groups = [g for g in groups if g.kv_heads.numel() > 0]
    heads = _check_inputs(q, k_full, v_full, groups)
    B, H, _ = q.shape
    nm = groups[0].k.shape[2] if groups else 0
    mid_k, mid_v = _standard_layout(groups)
    decoder = LeanKDecoder(heads, B, H, q.dtype, q.device, k_full.shape[2], nm, scale, config)
    return decoder(q, k_full, v_full, mid_k, mid_v, (k_full.shape[2], nm))


__all__ = ["leank_decode"]
