"""
LeanK decode: flash decoding over a cache whose middle keys keep only c of D channels
=====================================================================================

LeanK (Zhang et al., EMNLP 2025) learns, once and offline, which key channels each KV head
needs. The cache then holds every token's K and V at full width only for the *full part*
(the first tokens, the "sink", and the most recent ones); for the *middle* tokens a head keeps
only its c kept key channels, and a head with c = 0 keeps no middle K or V at all. Heads with
the same c are stored together as one ``MiddleGroup`` (c is a multiple of the alignment a, so
there are at most D/a groups), which lets one kernel launch serve the whole group.

For query head h of KV head g the logits are

    full-part token j:   scale * sum over all D channels of q[d] * k_full[j, d]
    middle token j:      scale * sum over the c kept channels d of q[d] * k_mid[j, d]
                         (heads with c = 0: no middle tokens, not even with logit 0)

and the output is the softmax-weighted sum of the matching values. This is exactly the split-KV
problem of ``decode_dense.py`` with more splits: the full part is split as in dense decoding,
every group's middle part is split the same way, and each split writes a partial output and
its log-sum-exp into one shared scratch buffer. The merge kernel of ``decode_dense.py`` then
combines all of a head's splits exactly; slots a head does not use (the middle slots of a
head with c = 0) hold lse = -inf and weigh nothing.

The middle kernel differs from the dense one in two lines: it gathers the c kept channels of
each query row (``q[:, channels]``), and it loads key tiles c channels wide (padded to a power
of two with a mask, so c = 96 loads 96 channels and the tensor cores see 128). It reads
c + D values per middle token and KV head instead of 2 D: with the authors' Llama-3.1-8B mask
(31.25 % of K channels kept, 47 of 256 heads without middle V) that is 56 % of the dense bytes,
an ideal speed-up of 1.77x at long context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode_dense import (
    LOG2E,
    DecodeConfig,
    _attend_tokens,
    _store_partial,
    block_h,
    check_dtypes,
    check_head_dim,
    check_last_dim_contiguous,
    check_runnable,
    dot_precision,
    launch_dense_partials,
    launch_merge,
    plan_splits,
)

MIN_KEPT = 16  # tl.dot needs at least 16 channels; the alignment a (16 or 32) guarantees it


@dataclass
class MiddleGroup:
    """The middle tokens of the KV heads that keep the same number c of key channels."""

    kv_heads: torch.Tensor  # int64 [Gc]: KV-head indices (in 0..G-1) whose kept count is c
    channels: torch.Tensor  # int64 [Gc, c]: each head's kept channel indices (original order, post-RoPE)
    k: torch.Tensor  # [B, Gc, Nm, c]: middle keys, only the kept channels
    v: torch.Tensor  # [B, Gc, Nm, D]: middle values (full width)


@triton.jit
def _leank_middle_kernel(
    Q, KV_HEADS, CHANNELS, K, V, O_PART, LSE_PART,
    qk_scale, n_tokens, tokens_per_split, GC, H, S_TOTAL, slot0,
    stride_qb, stride_qh, stride_cr,
    stride_kb, stride_kr, stride_kn,
    stride_vb, stride_vr, stride_vn,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    C: tl.constexpr, C_PAD: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program = one (sequence b, row r of the group, split) over the group's middle tokens."""
    pid_br = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_br // GC
    r = pid_br % GC
    g = tl.load(KV_HEADS + r)  # the KV head this row of the group stores
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = g * GROUP + offs_h
    offs_c = tl.arange(0, C_PAD)
    c_mask = offs_c < C  # C_PAD = next power of two >= C
    chan = tl.load(CHANNELS + r * stride_cr + offs_c, mask=c_mask, other=0)  # [C_PAD] kept channels
    # The only new idea: gather the kept channels of each query row, q[:, chan] -> [BLOCK_H, C_PAD].
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + chan[None, :],
        mask=h_mask[:, None] & c_mask[None, :],
        other=0.0,
    )
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    m_i, l_i, acc = _attend_tokens(
        q, K + b * stride_kb + r * stride_kr, V + b * stride_vb + r * stride_vr, stride_kn, stride_vn,
        offs_c, c_mask, start, end, qk_scale, BLOCK_H, BLOCK_N, D, DOT_PRECISION,
    )  # fmt: skip
    _store_partial(O_PART, LSE_PART, b * H + heads, h_mask, slot0 + split, S_TOTAL, m_i, l_i, acc, D)


def _check_inputs(q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, groups: list[MiddleGroup]) -> None:
    """Shape, dtype, device and stride checks that need no GPU synchronisation."""
    if q.dim() != 3 or k_full.dim() != 4:
        raise ValueError(
            f"expected q [B, H, D] and k_full, v_full [B, G, Nf, D], got q {list(q.shape)} and k_full {list(k_full.shape)}"
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
    check_dtypes(q=q, k_full=k_full, v_full=v_full, **{f"groups[{i}].k": g.k for i, g in enumerate(groups)},
                 **{f"groups[{i}].v": g.v for i, g in enumerate(groups)})  # fmt: skip
    tensors = [q, k_full, v_full]
    n_heads = 0
    for i, grp in enumerate(groups):
        if grp.kv_heads.dtype != torch.int64 or grp.channels.dtype != torch.int64:
            raise TypeError(f"groups[{i}].kv_heads and .channels must be int64: use .long()")
        if grp.kv_heads.dim() != 1 or grp.channels.dim() != 2 or grp.channels.shape[0] != grp.kv_heads.shape[0]:
            raise ValueError(
                f"groups[{i}]: kv_heads must be [Gc] and channels [Gc, c], got {list(grp.kv_heads.shape)} "
                f"and {list(grp.channels.shape)}"
            )
        Gc, c = grp.channels.shape
        if c == 0:
            raise ValueError(f"groups[{i}] keeps 0 channels: leave those heads out of groups (their middle is excluded)")
        if c % MIN_KEPT != 0 or c > D:
            raise ValueError(f"groups[{i}] keeps c={c} channels: c must be a multiple of {MIN_KEPT} and at most D={D}")
        if grp.k.dim() != 4 or grp.k.shape[:2] != (B, Gc) or grp.k.shape[3] != c:
            raise ValueError(f"groups[{i}].k has shape {list(grp.k.shape)}, expected [{B}, {Gc}, Nm, {c}]")
        if grp.v.shape != (B, Gc, grp.k.shape[2], D):
            raise ValueError(f"groups[{i}].v has shape {list(grp.v.shape)}, expected [{B}, {Gc}, {grp.k.shape[2]}, {D}]")
        check_last_dim_contiguous(**{f"groups[{i}].k": grp.k, f"groups[{i}].v": grp.v,
                                     f"groups[{i}].kv_heads": grp.kv_heads,
                                     f"groups[{i}].channels": grp.channels})  # fmt: skip
        tensors += [grp.kv_heads, grp.channels, grp.k, grp.v]
        n_heads += Gc
    if n_heads > G:
        raise ValueError(f"the groups list {n_heads} KV heads but there are only G={G}: each head belongs to one group")
    check_runnable(*tensors)
    check_last_dim_contiguous(q=q, k_full=k_full, v_full=v_full)


def check_group_indices(groups: list[MiddleGroup], num_kv_heads: int, head_dim: int) -> None:
    """Raise unless head and channel indices are in range and no head or channel repeats (syncs the GPU)."""
    seen: set[int] = set()
    for i, grp in enumerate(groups):
        heads = grp.kv_heads.tolist()
        bad = [h for h in heads if not 0 <= h < num_kv_heads]
        if bad:
            raise ValueError(f"groups[{i}].kv_heads {bad} are outside 0..{num_kv_heads - 1}")
        if seen.intersection(heads) or len(set(heads)) != len(heads):
            raise ValueError(f"groups[{i}].kv_heads {heads} repeat a KV head: each head belongs to one group")
        seen.update(heads)
        ch = grp.channels
        if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= head_dim):
            raise ValueError(f"groups[{i}].channels must lie in 0..{head_dim - 1}")
        if ch.numel() and (ch.sort(dim=1).values.diff(dim=1) == 0).any():
            raise ValueError(f"groups[{i}].channels repeat a channel within a head")


def leank_decode(
    q: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    groups: list[MiddleGroup],
    scale: float | None = None,
    *,
    check_indices: bool | None = None,
    config: DecodeConfig = DecodeConfig(),
) -> torch.Tensor:
    """Decode attention over a LeanK cache (full part + per-group pruned middle), exact LSE merge: [B, H, D].

    check_indices (default: only off CUDA, since it synchronises the GPU) validates the index tensors.
    """
    _check_inputs(q, k_full, v_full, groups)
    B, H, D = q.shape
    G, Nf = k_full.shape[1], k_full.shape[2]
    if check_indices or (check_indices is None and q.device.type != "cuda"):
        check_group_indices(groups, G, D)
    qk_scale = (D**-0.5 if scale is None else scale) * LOG2E

    full_splits, full_per_split = plan_splits(Nf, B * G, q.device, config)
    middles = [
        (grp, *plan_splits(grp.k.shape[2], B * grp.k.shape[1], q.device, config))
        for grp in groups
        if grp.k.shape[1] > 0 and grp.k.shape[2] > 0
    ]  # (group, splits, tokens_per_split) for every group with middle tokens
    s_total = full_splits + max((splits for _, splits, _ in middles), default=0)
    o_part = torch.empty(B, H, s_total, D, device=q.device, dtype=torch.float32)
    if middles:  # slots a head leaves unused (the middle of a zero-count head) must weigh nothing
        lse_part = torch.full((B, H, s_total), float("-inf"), device=q.device, dtype=torch.float32)
    else:  # only the full part: the dense kernel writes every slot
        lse_part = torch.empty(B, H, s_total, device=q.device, dtype=torch.float32)

    launch_dense_partials(q, k_full, v_full, o_part, lse_part, qk_scale, full_splits, full_per_split, 0, config)
    for grp, splits, per_split in middles:
        Gc, Nm, c = grp.k.shape[1], grp.k.shape[2], grp.k.shape[3]
        _leank_middle_kernel[(B * Gc, splits)](
            q, grp.kv_heads, grp.channels, grp.k, grp.v, o_part, lse_part,
            qk_scale, Nm, per_split, Gc, H, s_total, full_splits,
            q.stride(0), q.stride(1), grp.channels.stride(0),
            grp.k.stride(0), grp.k.stride(1), grp.k.stride(2),
            grp.v.stride(0), grp.v.stride(1), grp.v.stride(2),
            GROUP=H // G, BLOCK_H=block_h(H // G), BLOCK_N=config.block_n,
            C=c, C_PAD=triton.next_power_of_2(c), D=D, DOT_PRECISION=dot_precision(q.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    launch_merge(o_part, lse_part, out)
    return out


def leank_layout_from_dense(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, n_sink: int, n_recent: int
) -> tuple[torch.Tensor, torch.Tensor, list[MiddleGroup]]:
    """Split a dense cache k, v [B, G, N, D] by keep [G, D] (bool) into (k_full, v_full, groups)."""
    B, G, N, D = k.shape
    if keep.shape != (G, D):
        raise ValueError(f"keep has shape {list(keep.shape)} but the cache needs [{G}, {D}]")
    n_mid = max(0, N - n_sink - n_recent)
    full = torch.cat([torch.arange(min(n_sink, N)), torch.arange(min(n_sink, N) + n_mid, N)]).to(k.device)
    k_full, v_full = k[:, :, full].contiguous(), v[:, :, full].contiguous()  # [B, G, Nf, D]
    mid = slice(n_sink, n_sink + n_mid)
    keep = keep.to(k.device, torch.bool)
    counts = keep.sum(dim=1)  # [G]
    groups = []
    for c in sorted(set(counts.tolist()) - {0}):
        heads = torch.nonzero(counts == c).flatten()  # [Gc]
        channels = torch.stack([torch.nonzero(keep[h]).flatten() for h in heads.tolist()])  # [Gc, c]
        k_mid = torch.gather(k[:, heads, mid], 3, channels[None, :, None, :].expand(B, len(heads), n_mid, c))
        groups.append(MiddleGroup(heads, channels, k_mid.contiguous(), v[:, heads, mid].contiguous()))
    return k_full, v_full, groups


def leank_decode_reference(
    q: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    groups: list[MiddleGroup],
    scale: float | None = None,
) -> torch.Tensor:
    """The same attention in plain torch (float32): per-part softmax statistics, merged exactly."""
    B, H, D = q.shape
    G = k_full.shape[1]
    R = H // G
    scale = D**-0.5 if scale is None else scale
    qf = q.float().view(B, G, R, D)  # [B, G, R, D]
    # Full part, every head: natural-log lse and normalised output.
    s = torch.einsum("bgrd,bgnd->bgrn", qf, k_full.float()) * scale  # [B, G, R, Nf]
    lse_full = torch.logsumexp(s, dim=-1)  # [B, G, R]
    o_full = torch.einsum("bgrn,bgnd->bgrd", torch.softmax(s, dim=-1), v_full.float())
    # Middle part, group by group; heads in no group keep lse = -inf (their middle is excluded).
    lse_mid = torch.full_like(lse_full, float("-inf"))
    o_mid = torch.zeros_like(o_full)
    for grp in groups:
        if grp.k.shape[2] == 0:
            continue
        Gc, c = grp.channels.shape
        q_kept = torch.gather(qf[:, grp.kv_heads], 3, grp.channels.view(1, Gc, 1, c).expand(B, Gc, R, c))
        s = torch.einsum("bgrc,bgnc->bgrn", q_kept, grp.k.float()) * scale  # [B, Gc, R, Nm]
        lse_mid[:, grp.kv_heads] = torch.logsumexp(s, dim=-1)
        o_mid[:, grp.kv_heads] = torch.einsum("bgrn,bgnd->bgrd", torch.softmax(s, dim=-1), grp.v.float())
    lse = torch.logaddexp(lse_full, lse_mid)
    o = torch.exp(lse_full - lse)[..., None] * o_full + torch.exp(lse_mid - lse)[..., None] * o_mid
    return o.reshape(B, H, D).to(q.dtype)


__all__ = ["MiddleGroup", "check_group_indices", "leank_decode", "leank_decode_reference", "leank_layout_from_dense"]
