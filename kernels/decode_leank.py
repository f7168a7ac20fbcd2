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

Launches. By default (``DecodeConfig.leank_single_launch``) the full part and up to four groups share one
launch (a 1-D grid whose program ranges select the part; each part keeps its compile-time width), and the
programs themselves mark the slots their heads leave unused, so a layer costs two launches, as dense decoding
does. With ``leank_single_launch=False``, or more than four groups, a layer costs one launch for the full part,
one per group, a fill of the scratch with -inf and the merge. On the H100, timed as CUDA graphs of a whole
32-layer step (benchmarks/decode_profile.py), the single launch took 7.03 ms against 7.59 ms at B8 N32K and
4.56 ms against 4.98 ms at B1 N128K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leank_ref.layout import MiddleGroup  # the layout the cache stores; re-exported here

from .decode_dense import (
    LOG2E,
    DecodeConfig,
    _attend_tokens,
    _dense_program,
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


@triton.jit
def _middle_program(
    b,
    r,
    split,
    Q,
    KV_HEADS,
    CHANNELS,
    K,
    V,
    O_PART,
    LSE_PART,
    qk_scale,
    n_tokens,
    tokens_per_split,
    H,
    S_TOTAL,
    slot0,
    stride_qb,
    stride_qh,
    stride_cr,
    stride_kb,
    stride_kr,
    stride_kn,
    stride_vb,
    stride_vr,
    stride_vn,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Sequence b, row r of a group, one split of the group's middle tokens, written to slot0 + split."""
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
        q,
        K + b * stride_kb + r * stride_kr,
        V + b * stride_vb + r * stride_vr,
        stride_kn,
        stride_vn,
        offs_c,
        c_mask,
        start,
        end,
        qk_scale,
        BLOCK_H,
        BLOCK_N,
        D,
        DOT_PRECISION,
    )
    _store_partial(O_PART, LSE_PART, b * H + heads, h_mask, slot0 + split, S_TOTAL, m_i, l_i, acc, D)


@triton.jit
def _leank_middle_kernel(
    Q,
    KV_HEADS,
    CHANNELS,
    K,
    V,
    O_PART,
    LSE_PART,
    qk_scale,
    n_tokens,
    tokens_per_split,
    GC,
    H,
    S_TOTAL,
    slot0,
    stride_qb,
    stride_qh,
    stride_cr,
    stride_kb,
    stride_kr,
    stride_kn,
    stride_vb,
    stride_vr,
    stride_vn,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = one (sequence b, row r of the group, split) over the group's middle tokens."""
    pid_br = tl.program_id(0).to(tl.int64)
    _middle_program(
        pid_br // GC,
        pid_br % GC,
        tl.program_id(1),
        Q,
        KV_HEADS,
        CHANNELS,
        K,
        V,
        O_PART,
        LSE_PART,
        qk_scale,
        n_tokens,
        tokens_per_split,
        H,
        S_TOTAL,
        slot0,
        stride_qb,
        stride_qh,
        stride_cr,
        stride_kb,
        stride_kr,
        stride_kn,
        stride_vb,
        stride_vr,
        stride_vn,
        GROUP,
        BLOCK_H,
        BLOCK_N,
        C,
        C_PAD,
        D,
        DOT_PRECISION,
    )


# ----------------------------------------------------------------------------------------------
# One launch for the whole layer: the full part and up to MAX_FUSED_GROUPS groups
# ----------------------------------------------------------------------------------------------
MAX_FUSED_GROUPS = 4  # D / a for D = 128 and a = 32; more groups fall back to one launch per group


@triton.jit
def _fill_unused(LSE_PART, rows, h_mask, first, S_TOTAL, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    """lse = -inf in slots [first, S_TOTAL) of the given rows: slots this head leaves unused weigh nothing."""
    for s0 in range(first, S_TOTAL, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        tl.store(
            LSE_PART + rows[:, None] * S_TOTAL + offs_s[None, :],
            tl.full([BLOCK_H, BLOCK_S], float("-inf"), tl.float32),
            mask=h_mask[:, None] & (offs_s < S_TOTAL)[None, :],
        )


@triton.jit
def _count_in_group(g, KV_HEADS, GC, G_PAD: tl.constexpr):
    """1 if KV head g is one of the group's GC heads, else 0."""
    offs = tl.arange(0, G_PAD)
    heads = tl.load(KV_HEADS + offs, mask=offs < GC, other=-1)
    return tl.sum((heads == g).to(tl.int32), 0)


@triton.jit
def _group_program(
    pid,
    first_pid,
    end_pid,
    full_splits,
    Q,
    O_PART,
    LSE_PART,
    qk_scale,
    H,
    S_TOTAL,
    stride_qb,
    stride_qh,
    KV_HEADS,
    CHANNELS,
    K,
    V,
    GC,
    NM,
    PER,
    SPLITS,
    stride_cr,
    stride_kb,
    stride_kr,
    stride_kn,
    stride_vb,
    stride_vr,
    stride_vn,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """If pid falls in [first_pid, end_pid): one (sequence, row, split) program of this group, splits fastest."""
    if (pid >= first_pid) & (pid < end_pid):
        local = pid - first_pid
        split = (local % SPLITS).to(tl.int32)  # int32 like program_id(1) in the one-launch-per-part kernels
        br = local // SPLITS
        b = br // GC
        r = br % GC
        _middle_program(
            b,
            r,
            split,
            Q,
            KV_HEADS,
            CHANNELS,
            K,
            V,
            O_PART,
            LSE_PART,
            qk_scale,
            NM,
            PER,
            H,
            S_TOTAL,
            full_splits,
            stride_qb,
            stride_qh,
            stride_cr,
            stride_kb,
            stride_kr,
            stride_kn,
            stride_vb,
            stride_vr,
            stride_vn,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            C,
            C_PAD,
            D,
            DOT_PRECISION,
        )
        if split == 0:  # this head's slots past its own splits
            offs_h = tl.arange(0, BLOCK_H)
            g = tl.load(KV_HEADS + r)
            _fill_unused(
                LSE_PART, b * H + g * GROUP + offs_h, offs_h < GROUP, full_splits + SPLITS, S_TOTAL, BLOCK_H, BLOCK_S
            )


@triton.jit
def _leank_fused_kernel(
    Q,
    KF,
    VF,
    O_PART,
    LSE_PART,
    qk_scale,
    H,
    G,
    S_TOTAL,
    n_full,
    full_per_split,
    full_splits,
    end_full,
    stride_qb,
    stride_qh,
    stride_kfb,
    stride_kfg,
    stride_kfn,
    stride_vfb,
    stride_vfg,
    stride_vfn,
    H0,
    CH0,
    K0,
    V0,
    GC0,
    NM0,
    PER0,
    SPLITS0,
    END0,
    scr0,
    skb0,
    skr0,
    skn0,
    svb0,
    svr0,
    svn0,
    H1,
    CH1,
    K1,
    V1,
    GC1,
    NM1,
    PER1,
    SPLITS1,
    END1,
    scr1,
    skb1,
    skr1,
    skn1,
    svb1,
    svr1,
    svn1,
    H2,
    CH2,
    K2,
    V2,
    GC2,
    NM2,
    PER2,
    SPLITS2,
    END2,
    scr2,
    skb2,
    skr2,
    skn2,
    svb2,
    svr2,
    svn2,
    H3,
    CH3,
    K3,
    V3,
    GC3,
    NM3,
    PER3,
    SPLITS3,
    END3,
    scr3,
    skb3,
    skr3,
    skn3,
    svb3,
    svr3,
    svn3,
    NUM_GROUPS: tl.constexpr,
    C0: tl.constexpr,
    CP0: tl.constexpr,
    C1: tl.constexpr,
    CP1: tl.constexpr,
    C2: tl.constexpr,
    CP2: tl.constexpr,
    C3: tl.constexpr,
    CP3: tl.constexpr,
    G_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program of a 1-D grid: programs [0, end_full) do the full part, then each group's range in turn."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < end_full:
        split = (pid % full_splits).to(tl.int32)
        bg = pid // full_splits
        b = bg // G
        g = bg % G
        _dense_program(
            b,
            g,
            split,
            Q,
            KF,
            VF,
            O_PART,
            LSE_PART,
            qk_scale,
            n_full,
            full_per_split,
            H,
            S_TOTAL,
            0,
            stride_qb,
            stride_qh,
            stride_kfb,
            stride_kfg,
            stride_kfn,
            stride_vfb,
            stride_vfg,
            stride_vfn,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            D,
            DOT_PRECISION,
        )
        if split == 0:  # a head in no group (kept count 0) uses no middle slot
            member = _count_in_group(g, H0, GC0, G_PAD)
            if NUM_GROUPS >= 2:
                member += _count_in_group(g, H1, GC1, G_PAD)
            if NUM_GROUPS >= 3:
                member += _count_in_group(g, H2, GC2, G_PAD)
            if NUM_GROUPS >= 4:
                member += _count_in_group(g, H3, GC3, G_PAD)
            if member == 0:
                offs_h = tl.arange(0, BLOCK_H)
                _fill_unused(
                    LSE_PART, b * H + g * GROUP + offs_h, offs_h < GROUP, full_splits, S_TOTAL, BLOCK_H, BLOCK_S
                )
    _group_program(
        pid,
        end_full,
        END0,
        full_splits,
        Q,
        O_PART,
        LSE_PART,
        qk_scale,
        H,
        S_TOTAL,
        stride_qb,
        stride_qh,
        H0,
        CH0,
        K0,
        V0,
        GC0,
        NM0,
        PER0,
        SPLITS0,
        scr0,
        skb0,
        skr0,
        skn0,
        svb0,
        svr0,
        svn0,
        GROUP,
        BLOCK_H,
        BLOCK_N,
        C0,
        CP0,
        D,
        DOT_PRECISION,
        BLOCK_S,
    )
    if NUM_GROUPS >= 2:
        _group_program(
            pid,
            END0,
            END1,
            full_splits,
            Q,
            O_PART,
            LSE_PART,
            qk_scale,
            H,
            S_TOTAL,
            stride_qb,
            stride_qh,
            H1,
            CH1,
            K1,
            V1,
            GC1,
            NM1,
            PER1,
            SPLITS1,
            scr1,
            skb1,
            skr1,
            skn1,
            svb1,
            svr1,
            svn1,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            C1,
            CP1,
            D,
            DOT_PRECISION,
            BLOCK_S,
        )
    if NUM_GROUPS >= 3:
        _group_program(
            pid,
            END1,
            END2,
            full_splits,
            Q,
            O_PART,
            LSE_PART,
            qk_scale,
            H,
            S_TOTAL,
            stride_qb,
            stride_qh,
            H2,
            CH2,
            K2,
            V2,
            GC2,
            NM2,
            PER2,
            SPLITS2,
            scr2,
            skb2,
            skr2,
            skn2,
            svb2,
            svr2,
            svn2,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            C2,
            CP2,
            D,
            DOT_PRECISION,
            BLOCK_S,
        )
    if NUM_GROUPS >= 4:
        _group_program(
            pid,
            END2,
            END3,
            full_splits,
            Q,
            O_PART,
            LSE_PART,
            qk_scale,
            H,
            S_TOTAL,
            stride_qb,
            stride_qh,
            H3,
            CH3,
            K3,
            V3,
            GC3,
            NM3,
            PER3,
            SPLITS3,
            scr3,
            skb3,
            skr3,
            skn3,
            svb3,
            svr3,
            svn3,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            C3,
            CP3,
            D,
            DOT_PRECISION,
            BLOCK_S,
        )


def _check_inputs(q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, groups: list[MiddleGroup]) -> None:
    """Shape, dtype, device and stride checks that need no GPU synchronisation."""
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
            raise ValueError(
                f"groups[{i}] keeps 0 channels: leave those heads out of groups (their middle is excluded)"
            )
        if c % MIN_KEPT != 0 or c > D:
            raise ValueError(f"groups[{i}] keeps c={c} channels: c must be a multiple of {MIN_KEPT} and at most D={D}")
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
    if config.leank_single_launch and 0 < len(middles) <= MAX_FUSED_GROUPS:
        lse_part = torch.empty(B, H, s_total, device=q.device, dtype=torch.float32)  # the kernel marks unused slots
        _launch_fused(q, k_full, v_full, middles, o_part, lse_part, qk_scale, full_splits, full_per_split, config)
        out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
        launch_merge(o_part, lse_part, out)
        return out
    if middles:  # slots a head leaves unused (the middle of a zero-count head) must weigh nothing
        lse_part = torch.full((B, H, s_total), float("-inf"), device=q.device, dtype=torch.float32)
    else:  # only the full part: the dense kernel writes every slot
        lse_part = torch.empty(B, H, s_total, device=q.device, dtype=torch.float32)

    launch_dense_partials(q, k_full, v_full, o_part, lse_part, qk_scale, full_splits, full_per_split, 0, config)
    for grp, splits, per_split in middles:
        Gc, Nm, c = grp.k.shape[1], grp.k.shape[2], grp.k.shape[3]
        _leank_middle_kernel[(B * Gc, splits)](
            q,
            grp.kv_heads,
            grp.channels,
            grp.k,
            grp.v,
            o_part,
            lse_part,
            qk_scale,
            Nm,
            per_split,
            Gc,
            H,
            s_total,
            full_splits,
            q.stride(0),
            q.stride(1),
            grp.channels.stride(0),
            grp.k.stride(0),
            grp.k.stride(1),
            grp.k.stride(2),
            grp.v.stride(0),
            grp.v.stride(1),
            grp.v.stride(2),
            GROUP=H // G,
            BLOCK_H=block_h(H // G),
            BLOCK_N=config.block_n,
            C=c,
            C_PAD=triton.next_power_of_2(c),
            D=D,
            DOT_PRECISION=dot_precision(q.dtype),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    launch_merge(o_part, lse_part, out)
    return out


def _launch_fused(q, k_full, v_full, middles, o_part, lse_part, qk_scale, full_splits, full_per_split, config) -> None:
    """One launch: B*G*full_splits full-part programs, then each group's B*Gc*splits programs (1-4 groups)."""
    B, H, D = q.shape
    G, Nf = k_full.shape[1], k_full.shape[2]
    end = B * G * full_splits
    group_args, constexprs = [], {}
    for i in range(MAX_FUSED_GROUPS):
        grp, splits, per_split = middles[min(i, len(middles) - 1)]  # absent groups repeat the last (never run)
        Gc, Nm, c = grp.k.shape[1], grp.k.shape[2], grp.k.shape[3]
        if i < len(middles):
            end += B * Gc * splits
        group_args += [
            grp.kv_heads,
            grp.channels,
            grp.k,
            grp.v,
            Gc,
            Nm,
            per_split,
            splits,
            end,
            grp.channels.stride(0),
            grp.k.stride(0),
            grp.k.stride(1),
            grp.k.stride(2),
            grp.v.stride(0),
            grp.v.stride(1),
            grp.v.stride(2),
        ]
        constexprs[f"C{i}"], constexprs[f"CP{i}"] = c, triton.next_power_of_2(c)
    _leank_fused_kernel[(end,)](
        q,
        k_full,
        v_full,
        o_part,
        lse_part,
        qk_scale,
        H,
        G,
        o_part.shape[2],
        Nf,
        full_per_split,
        full_splits,
        B * G * full_splits,
        q.stride(0),
        q.stride(1),
        k_full.stride(0),
        k_full.stride(1),
        k_full.stride(2),
        v_full.stride(0),
        v_full.stride(1),
        v_full.stride(2),
        *group_args,
        NUM_GROUPS=len(middles),
        **constexprs,
        G_PAD=triton.next_power_of_2(G),
        GROUP=H // G,
        BLOCK_H=block_h(H // G),
        BLOCK_N=config.block_n,
        D=D,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_S=16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


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


def masked_dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, sink: int, recent: int
) -> torch.Tensor:
    """LeanK's attention for the newest token, computed on the dense cache (float32 SDPA) [B, H, D].

    An independent check of the compact layout: q [B, H, D], k, v [B, G, N, D], keep [G, D] (bool or 0/1);
    the middle tokens ``[sink, N - recent)`` see K with the pruned channels zeroed, and a head that keeps no
    channel skips its middle tokens entirely (the deployed meaning).
    """
    B, H, D = q.shape
    G, N = k.shape[1], k.shape[2]
    R = H // G
    keep = keep.bool()
    mid = slice(sink, max(sink, N - recent))
    k = k.float().clone()
    k[:, :, mid] *= keep[None, :, None, :].float()
    allowed = torch.ones(B, G, N, dtype=torch.bool, device=q.device)
    allowed[:, keep.sum(1) == 0, mid] = False
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None],
        k.repeat_interleave(R, 1),
        v.float().repeat_interleave(R, 1),
        attn_mask=allowed.repeat_interleave(R, 1)[:, :, None],  # [B, H, 1, N]
    )
    return out[:, :, 0]
