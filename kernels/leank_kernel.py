"""The LeanK decode kernel: one layer's attention for one new token, in one launch (Triton).

A layer's cache holds a *full window* (sink + recent tokens, every channel) and a *middle store*: for each kept
count c, the KV heads that keep c key channels, with only those channels of their middle keys (LeanK, Zhang et
al., EMNLP 2025). For query head h of KV head g the logits are

    full-window token j:  scale * sum over all D channels of q[d] * k_full[j, d]
    middle token j:       scale * sum over the c kept channels d of q[d] * k_mid[j, d]
                          (heads with c = 0: no middle tokens, not even with logit 0)

and the output is the softmax-weighted sum of the matching values. This is the split-KV problem of
``decode_dense.py`` with more splits: the full window is split as in dense decoding, every group's middle is
split the same way, and each split writes a partial output and its log-sum-exp into one scratch buffer.

One launch per layer. The grid is 1-D: its first programs take (sequence, KV head, split) of the full window,
the rest (sequence, middle row, split) of the middle store, the middle row selecting its group and so the
compile-time width c. Each program then counts itself in for its (sequence, KV head) with an atomic add; the
last one to arrive merges that head's partials exactly (:func:`_merge_heads`) and resets the counter. The
middle kernel differs from the dense one in two lines: it gathers the c kept channels of each query row
(``q[:, channels]``), and it loads key tiles c channels wide (padded to a power of two with a mask).

The groups are a loop over compile-time tuples: ``MID_K``, ``MID_V`` (one pointer per group) and ``COUNTS``
(each group's c), unrolled by ``tl.static_range``; a layer with n groups compiles n middle paths.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_dense import _attend_tokens, _dense_program, _store_partial

# Where META's sections start (int32): the groups' first rows at 0, their first programs, their split counts, then
# one entry per KV head and one per middle row (at most 8 groups: 9 row and program offsets, 8 split counts).
META_PROGRAMS = tl.constexpr(9)
META_SPLITS = tl.constexpr(18)
META_HEADS = tl.constexpr(32)


@triton.jit
def _middle_split(
    b,
    g,
    r,
    gc,
    split,
    Q,
    CHAN_ROW,
    K,
    V,
    O_PART,
    LSE_PART,
    qk_scale,
    n_mid,
    mid_pitch,
    H,
    S_TOTAL,
    slot,
    splits,
    stride_qb,
    stride_qh,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Sequence b, KV head g (row r of a group of gc heads keeping C channels), one split of the middle tokens."""
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = g * GROUP + offs_h
    offs_c = tl.arange(0, C_PAD)
    c_mask = offs_c < C  # C_PAD = next power of two >= C
    chan = tl.load(CHAN_ROW + offs_c, mask=c_mask, other=0)  # [C_PAD] kept channels of head g
    # The only new idea: gather the kept channels of each query row, q[:, chan] -> [BLOCK_H, C_PAD].
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + chan[None, :],
        mask=h_mask[:, None] & c_mask[None, :],
        other=0.0,
    )
    per = tl.cdiv(tl.cdiv(n_mid, splits), BLOCK_N) * BLOCK_N  # whole blocks per split
    start = split * per
    end = tl.minimum(start + per, n_mid)  # an empty range (short middle) stores lse = -inf: it weighs nothing
    row = (b * gc + r) * mid_pitch  # the group's buffers are [B, Gc, mid_pitch, C] and [B, Gc, mid_pitch, D]
    m_i, l_i, acc = _attend_tokens(
        q,
        K + row * C,
        V + row * D,
        C,
        D,
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
    _store_partial(O_PART, LSE_PART, b * H + heads, h_mask, slot, S_TOTAL, m_i, l_i, acc, D)


@triton.jit
def _merge_heads(
    O_PART,
    LSE_PART,
    OUT,
    b,
    g,
    H,
    S_TOTAL,
    n_slots,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
):
    """Exact log-sum-exp merge of slots [0, n_slots) for the GROUP query heads of KV head g, into OUT [B, H, D]."""
    offs_h = tl.arange(0, GP)
    h_mask = offs_h < GROUP
    rows = b * H + g * GROUP + offs_h  # [GP] query-head rows of O_PART / LSE_PART / OUT
    offs_d = tl.arange(0, D)
    # One pass, online (as flash attention does over tokens): a running max m, denominator and output, rescaled
    # when m grows. The lse and output loads of a block do not depend on each other (one memory round trip per
    # block, the merge being latency-bound) and bypass L1 (.cg): other programs wrote these slots. Empty splits
    # (lse = -inf) weigh nothing; their output slots may hold anything, so they are excluded with a select.
    m = tl.full([GP], float("-inf"), tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    den = tl.zeros([GP], tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = h_mask[:, None] & (offs_s < n_slots)[None, :]
        lse = tl.load(
            LSE_PART + rows[:, None] * S_TOTAL + offs_s[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg"
        )  # [GP, BLOCK_S]
        o = tl.load(
            O_PART + (rows[:, None, None] * S_TOTAL + offs_s[None, :, None]) * D + offs_d[None, None, :],
            mask=ok[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )  # [GP, BLOCK_S, D]
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no slot used yet: keep the arithmetic finite
        alpha = tl.exp2(m - m_ref)  # 0 while m = -inf
        used = lse > float("-inf")
        w = tl.where(used, tl.exp2(lse - m_ref[:, None]), 0.0)
        acc = acc * alpha[:, None] + tl.sum(tl.where(used[:, :, None], w[:, :, None] * o, 0.0), 1)
        den = den * alpha + tl.sum(w, 1)
        m = m_new
    tl.store(
        OUT + rows[:, None] * D + offs_d[None, :], (acc / den[:, None]).to(OUT.dtype.element_ty), mask=h_mask[:, None]
    )


@triton.jit(do_not_specialize=["n_full", "n_mid", "max_full", "max_mid"])
def leank_layer_kernel(
    Q,
    KF,
    VF,
    MID_K,  # tuple: each group's middle keys [B, Gc, mid_pitch, c]
    MID_V,  # tuple: each group's middle values [B, Gc, mid_pitch, D]
    O_PART,
    LSE_PART,
    OUT,
    COUNT,
    META,
    CHAN,
    LENGTHS,
    n_full,
    n_mid,
    max_full,
    max_mid,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kfb,
    stride_kfg,
    stride_kfn,
    mid_pitch,
    G,
    H,
    S_TOTAL,
    FULL_SPLITS,
    END_FULL,
    COUNTS: tl.constexpr,  # tuple: each group's kept count c
    COUNTS_PAD: tl.constexpr,  # tuple: each c rounded up to a power of two
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LENGTHS_ON_DEVICE: tl.constexpr,
):
    """The whole decode attention of one layer in one launch.

    Programs [0, END_FULL) each take one (sequence, KV head, split) of the full window; the rest one (sequence,
    middle row, split) of the middle store, group by group, each group with its own split count (the host
    sizes the splits so that every program moves about the same bytes). Every program writes its partial output
    and lse, then counts itself in for its (sequence, KV head); the program that arrives last merges that head's
    slots into OUT and resets the counter for the next step. The lengths are clamped to [1, max_full] and
    [0, max_mid], the tokens the buffers hold, so no length read from the device makes a program read outside.
    META (int32, see ``LeanKDecoder``): per group i, its first middle row [i], its first program after END_FULL
    [META_PROGRAMS + i] and its split count [META_SPLITS + i]; per KV head g its middle split count (0: no
    middle) [META_HEADS + g]; per middle row its KV head [META_HEADS + G + row]. CHAN [rows, D]: kept channels.
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets pass 2**31 at long contexts
    if LENGTHS_ON_DEVICE:  # CUDA-graph replay: the cache advances the lengths on the device
        n_full = tl.load(LENGTHS)
        n_mid = tl.load(LENGTHS + 1)
    n_full = tl.minimum(tl.maximum(n_full, 1), max_full)
    n_mid = tl.minimum(tl.maximum(n_mid, 0), max_mid)
    if pid < END_FULL:
        split = (pid % FULL_SPLITS).to(tl.int32)
        bg = pid // FULL_SPLITS
        b = bg // G
        g = bg % G
        per = tl.cdiv(tl.cdiv(n_full, FULL_SPLITS), BLOCK_N) * BLOCK_N
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
            per,
            H,
            S_TOTAL,
            0,
            stride_qb,
            stride_qh,
            stride_kfb,
            stride_kfg,
            stride_kfn,
            stride_kfb,
            stride_kfg,
            stride_kfn,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            D,
            DOT_PRECISION,
        )
        n_slots = FULL_SPLITS + tl.load(META + META_HEADS + g)
    else:
        local = pid - END_FULL
        b = local * 0  # set by the group this program belongs to
        g = local * 0
        n_slots = FULL_SPLITS
        for i in tl.static_range(len(COUNTS)):  # one compiled path per group; the program runs the one it is in
            first = tl.load(META + META_PROGRAMS + i)
            if (local >= first) & (local < tl.load(META + META_PROGRAMS + i + 1)):
                splits = tl.load(META + META_SPLITS + i)
                lo = tl.load(META + i)
                gc = tl.load(META + i + 1) - lo
                rest = (local - first) // splits  # programs of a group: (sequence, row, split), split fastest
                split = ((local - first) % splits).to(tl.int32)
                b = rest // gc
                row = lo + rest % gc
                g = tl.load(META + META_HEADS + G + row).to(tl.int64)
                n_slots = FULL_SPLITS + splits
                _middle_split(
                    b,
                    g,
                    row - lo,
                    gc,
                    split,
                    Q,
                    CHAN + row * D,
                    MID_K[i],
                    MID_V[i],
                    O_PART,
                    LSE_PART,
                    qk_scale,
                    n_mid,
                    mid_pitch,
                    H,
                    S_TOTAL,
                    FULL_SPLITS + split,
                    splits,
                    stride_qb,
                    stride_qh,
                    GROUP,
                    BLOCK_H,
                    BLOCK_N,
                    COUNTS[i],
                    COUNTS_PAD[i],
                    D,
                    DOT_PRECISION,
                )
    # Count this split in; the last of the head's n_slots programs merges (acq_rel: it sees every partial).
    tl.debug_barrier()  # every thread of this program has issued its partial stores
    counter = COUNT + b * G + g
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    if arrived == n_slots - 1:
        _merge_heads(O_PART, LSE_PART, OUT, b, g, H, S_TOTAL, n_slots, GROUP, GP, BLOCK_S, D)
        tl.atomic_xchg(counter, 0, sem="relaxed")  # ready for the next step (or CUDA-graph replay)
