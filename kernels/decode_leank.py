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

Launches. A layer costs **one launch** per decode step (``_leank_layer_kernel``): a 1-D grid whose first
programs take the full part and the rest the middle rows of every group (each group keeps its compile-time
width c). The merge happens inside the same launch: each program counts itself in for its (sequence, KV head)
with an atomic add, and the last one to arrive merges that head's partials and resets the counter. Everything
that does not change between steps (head and channel indices, split counts, scratch buffers) is built once by
:class:`LeanKDecoder`; the lengths can live on the device, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leank_ref.layout import (  # the layout the cache stores; re-exported here
    MIN_KEPT,
    HeadGroups,
    MiddleGroup,
    gather_kept,
)

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
    plan_splits,
)

MAX_GROUPS = 8  # distinct kept counts per layer one launch serves (D / 16 for D = 128)


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
    cap_mid,
    H,
    S_TOTAL,
    slot,
    MID_SPLITS,
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
    per = tl.cdiv(tl.cdiv(n_mid, MID_SPLITS), BLOCK_N) * BLOCK_N  # whole blocks per split
    start = split * per
    end = tl.minimum(start + per, n_mid)  # an empty range (short middle) stores lse = -inf: it weighs nothing
    row = (b * gc + r) * cap_mid  # the group's buffers are [B, Gc, cap_mid, C] and [B, Gc, cap_mid, D]
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
def _group_split(
    row,
    b,
    g,
    split,
    lo,
    hi,
    Q,
    CHAN,
    K,
    V,
    O_PART,
    LSE_PART,
    qk_scale,
    n_mid,
    cap_mid,
    H,
    S_TOTAL,
    FULL_SPLITS,
    MID_SPLITS,
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
    """If middle row ``row`` lies in this group's rows [lo, hi): run its split (C is the group's kept count)."""
    if (row >= lo) & (row < hi):
        _middle_split(
            b,
            g,
            row - lo,
            hi - lo,
            split,
            Q,
            CHAN + row * D,
            K,
            V,
            O_PART,
            LSE_PART,
            qk_scale,
            n_mid,
            cap_mid,
            H,
            S_TOTAL,
            FULL_SPLITS + split,
            MID_SPLITS,
            stride_qb,
            stride_qh,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            C,
            C_PAD,
            D,
            DOT_PRECISION,
        )


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
    # Pass 1: each head's largest partial lse. The loads bypass L1 (.cg): other programs wrote these slots.
    m = tl.full([GP], float("-inf"), tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = h_mask[:, None] & (offs_s < n_slots)[None, :]
        lse = tl.load(
            LSE_PART + rows[:, None] * S_TOTAL + offs_s[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg"
        )
        m = tl.maximum(m, tl.max(lse, 1))
    # Pass 2: o = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m); empty splits (lse = -inf) weigh nothing.
    acc = tl.zeros([GP, D], tl.float32)
    den = tl.zeros([GP], tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = h_mask[:, None] & (offs_s < n_slots)[None, :]
        lse = tl.load(
            LSE_PART + rows[:, None] * S_TOTAL + offs_s[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg"
        )
        used = lse > float("-inf")
        w = tl.where(used, tl.exp2(lse - m[:, None]), 0.0)  # [GP, BLOCK_S]
        o = tl.load(
            O_PART + (rows[:, None, None] * S_TOTAL + offs_s[None, :, None]) * D + offs_d[None, None, :],
            mask=used[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )  # [GP, BLOCK_S, D]
        acc += tl.sum(w[:, :, None] * o, 1)
        den += tl.sum(w, 1)
    tl.store(
        OUT + rows[:, None] * D + offs_d[None, :], (acc / den[:, None]).to(OUT.dtype.element_ty), mask=h_mask[:, None]
    )


@triton.jit(do_not_specialize=["n_full", "n_mid"])
def _leank_layer_kernel(
    Q,
    KF,
    VF,
    K0,
    V0,
    K1,
    V1,
    K2,
    V2,
    K3,
    V3,
    K4,
    V4,
    K5,
    V5,
    K6,
    V6,
    K7,
    V7,
    O_PART,
    LSE_PART,
    OUT,
    COUNT,
    META,
    CHAN,
    LENGTHS,
    n_full,
    n_mid,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kfb,
    stride_kfg,
    stride_kfn,
    cap_mid,
    G,
    H,
    S_TOTAL,
    FULL_SPLITS,
    MID_SPLITS,
    GM,
    END_FULL,
    NUM_GROUPS: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    C4: tl.constexpr,
    C5: tl.constexpr,
    C6: tl.constexpr,
    C7: tl.constexpr,
    CP0: tl.constexpr,
    CP1: tl.constexpr,
    CP2: tl.constexpr,
    CP3: tl.constexpr,
    CP4: tl.constexpr,
    CP5: tl.constexpr,
    CP6: tl.constexpr,
    CP7: tl.constexpr,
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
    middle row, split) of the middle store, the middle row selecting the group (and so the compile-time width C).
    Every program writes its partial output and lse, then counts itself in for its (sequence, KV head); the
    program that arrives last merges that head's slots into OUT and resets the counter for the next step.
    META (int32): [0, 9) the groups' first middle rows (row offsets, NUM_GROUPS + 1 used), [16, 16 + G) each KV
    head's middle row (-1: no middle), [16 + G, 16 + G + GM) each middle row's KV head. CHAN [GM, D] (int32):
    each middle row's kept channels.
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets pass 2**31 at long contexts
    if LENGTHS_ON_DEVICE:  # CUDA-graph replay: the cache advances the lengths on the device
        n_full = tl.load(LENGTHS)
        n_mid = tl.load(LENGTHS + 1)
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
        has_middle = tl.load(META + 16 + g) >= 0
        n_slots = tl.where(has_middle, FULL_SPLITS + MID_SPLITS, FULL_SPLITS)
    else:
        local = pid - END_FULL
        split = (local % MID_SPLITS).to(tl.int32)
        rest = local // MID_SPLITS
        b = rest // GM
        row = rest % GM
        g = tl.load(META + 16 + G + row).to(tl.int64)
        lo = tl.load(META + 0)
        hi = tl.load(META + 1)
        _group_split(
            row,
            b,
            g,
            split,
            lo,
            hi,
            Q,
            CHAN,
            K0,
            V0,
            O_PART,
            LSE_PART,
            qk_scale,
            n_mid,
            cap_mid,
            H,
            S_TOTAL,
            FULL_SPLITS,
            MID_SPLITS,
            stride_qb,
            stride_qh,
            GROUP,
            BLOCK_H,
            BLOCK_N,
            C0,
            CP0,
            D,
            DOT_PRECISION,
        )
        if NUM_GROUPS > 1:
            lo = hi
            hi = tl.load(META + 2)
            _group_split(
                row,
                b,
                g,
                split,
                lo,
                hi,
                Q,
                CHAN,
                K1,
                V1,
                O_PART,
                LSE_PART,
                qk_scale,
                n_mid,
                cap_mid,
                H,
                S_TOTAL,
                FULL_SPLITS,
                MID_SPLITS,
                stride_qb,
                stride_qh,
                GROUP,
                BLOCK_H,
                BLOCK_N,
                C1,
                CP1,
                D,
                DOT_PRECISION,
            )
        if NUM_GROUPS > 2:
            lo = hi
            hi = tl.load(META + 3)
            _group_split(
                row,
                b,
                g,
                split,
                lo,
                hi,
                Q,
                CHAN,
                K2,
                V2,
                O_PART,
                LSE_PART,
                qk_scale,
                n_mid,
                cap_mid,
                H,
                S_TOTAL,
                FULL_SPLITS,
                MID_SPLITS,
                stride_qb,
                stride_qh,
                GROUP,
                BLOCK_H,
                BLOCK_N,
                C2,
                CP2,
                D,
                DOT_PRECISION,
            )
        if NUM_GROUPS > 3:
            lo = hi
            hi = tl.load(META + 4)
            _group_split(
                row,
                b,
                g,
                split,
                lo,
                hi,
                Q,
                CHAN,
                K3,
                V3,
                O_PART,
                LSE_PART,
                qk_scale,
                n_mid,
                cap_mid,
                H,
                S_TOTAL,
                FULL_SPLITS,
                MID_SPLITS,
                stride_qb,
                stride_qh,
                GROUP,
                BLOCK_H,
                BLOCK_N,
                C3,
                CP3,
                D,
                DOT_PRECISION,
            )
        if NUM_GROUPS > 4:
            lo = hi
            hi = tl.load(META + 5)
            _group_split(
                row,
                b,
                g,
                split,
                lo,
                hi,
                Q,
                CHAN,
                K4,
                V4,
                O_PART,
                LSE_PART,
                qk_scale,
                n_mid,
                cap_mid,
                H,
                S_TOTAL,
                FULL_SPLITS,
                MID_SPLITS,
                stride_qb,
                stride_qh,
                GROUP,
                BLOCK_H,
                BLOCK_N,
                C4,
                CP4,
                D,
                DOT_PRECISION,
            )
        if NUM_GROUPS > 5:
            lo = hi
            hi = tl.load(META + 6)
            _group_split(
                row,
                b,
                g,
                split,
                lo,
                hi,
                Q,
                CHAN,
                K5,
                V5,
                O_PART,
                LSE_PART,
                qk_scale,
                n_mid,
                cap_mid,
                H,
                S_TOTAL,
                FULL_SPLITS,
                MID_SPLITS,
                stride_qb,
                stride_qh,
                GROUP,
                BLOCK_H,
                BLOCK_N,
                C5,
                CP5,
                D,
                DOT_PRECISION,
            )
        if NUM_GROUPS > 6:
            lo = hi
            hi = tl.load(META + 7)
            _group_split(
                row,
                b,
                g,
                split,
                lo,
                hi,
                Q,
                CHAN,
                K6,
                V6,
                O_PART,
                LSE_PART,
                qk_scale,
                n_mid,
                cap_mid,
                H,
                S_TOTAL,
                FULL_SPLITS,
                MID_SPLITS,
                stride_qb,
                stride_qh,
                GROUP,
                BLOCK_H,
                BLOCK_N,
                C6,
                CP6,
                D,
                DOT_PRECISION,
            )
        if NUM_GROUPS > 7:
            lo = hi
            hi = tl.load(META + 8)
            _group_split(
                row,
                b,
                g,
                split,
                lo,
                hi,
                Q,
                CHAN,
                K7,
                V7,
                O_PART,
                LSE_PART,
                qk_scale,
                n_mid,
                cap_mid,
                H,
                S_TOTAL,
                FULL_SPLITS,
                MID_SPLITS,
                stride_qb,
                stride_qh,
                GROUP,
                BLOCK_H,
                BLOCK_N,
                C7,
                CP7,
                D,
                DOT_PRECISION,
            )
        n_slots = FULL_SPLITS + MID_SPLITS
    # Count this split in; the last of the head's n_slots programs merges (acq_rel: it sees every partial).
    tl.debug_barrier()  # every thread of this program has issued its partial stores
    counter = COUNT + b * G + g
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    if arrived == n_slots - 1:
        _merge_heads(O_PART, LSE_PART, OUT, b, g, H, S_TOTAL, n_slots, GROUP, GP, BLOCK_S, D)
        tl.atomic_xchg(counter, 0, sem="relaxed")  # ready for the next step (or CUDA-graph replay)


# ----------------------------------------------------------------------------------------------
# Host side: everything that does not change between decode steps is built once
# ----------------------------------------------------------------------------------------------
def _merge_block_s(gp: int) -> int:
    """Slots the in-kernel merge reads at a time: [GP, BLOCK_S, D] float32 tiles of 4K values (no spills)."""
    return max(2, 32 // gp)


class LeanKDecoder:
    """One layer's LeanK decode attention: one kernel launch per step, nothing rebuilt or synchronised per step.

    Built once per cache layer from its :class:`~leank_ref.layout.HeadGroups` (validated on the host, so no
    kernel ever reads out of bounds): it moves the head and channel indices to the device, plans the splits for
    the capacities ``max_full`` / ``max_middle`` (tokens per split follow the actual lengths inside the kernel,
    so any length is correct, only the balance is planned), and allocates the partial-result scratch, the merge
    counters and the output buffer. A call then binds the current tensors and launches once:

        out = decoder(q, k_full, v_full, mid_k, mid_v, lengths)   # [B, H, D], the same buffer every step

    ``k_full, v_full [B, G, >= n_full, D]`` (views or whole buffers; unit stride in D); ``mid_k[i] [B, Gc, cap, c]``
    and ``mid_v[i] [B, Gc, cap, D]`` per group, in the groups' order, with one capacity ``cap`` for all groups
    (views of the first tokens of such buffers are fine). ``lengths``: Python ints ``(n_full, n_mid)`` (eager), or
    an int32 device tensor ``[2]`` that the cache advances itself (what a CUDA graph replays). The kernel attends
    to the first ``n_full`` full-window slots, in any order, and the first ``n_mid`` middle tokens of each group.
    The output buffer is overwritten by the next call: consume it (or copy it) before then.
    """

    def __init__(
        self,
        heads: HeadGroups,
        batch: int,
        num_heads: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_full: int,
        max_middle: int,
        scale: float | None = None,
        config: DecodeConfig = DecodeConfig(),
    ):
        heads.validate()  # host-side, once: indices in range, nothing repeated
        G, D = heads.num_kv_heads, heads.head_dim
        check_head_dim(D)
        if num_heads % G != 0:
            raise ValueError(f"query heads H={num_heads} must be a multiple of KV heads G={G} (GQA)")
        counts = heads.counts
        if len(counts) > MAX_GROUPS:
            raise ValueError(
                f"{len(counts)} distinct kept counts in one layer, but one launch serves at most {MAX_GROUPS}: "
                f"binarize with an alignment a >= {D // MAX_GROUPS}"
            )
        for c in counts:
            if c % MIN_KEPT != 0 or c > D:
                raise ValueError(f"a group keeps c={c} channels: c must be a multiple of {MIN_KEPT} and at most D={D}")
        device = torch.device(device)
        self.heads, self.batch, self.num_heads, self.dtype, self.device = heads, batch, num_heads, dtype, device
        self.max_full, self.max_middle = max_full, max_middle
        self.config = config
        self.qk_scale = (D**-0.5 if scale is None else scale) * LOG2E
        gm = heads.middle_heads
        self.full_splits, _ = plan_splits(max(max_full, 1), batch * G, device, config)
        self.mid_splits = plan_splits(max(max_middle, 1), batch * gm, device, config)[0] if gm else 1
        s_total = self.full_splits + (self.mid_splits if gm else 0)
        # Metadata (int32, on the device): group row offsets, each KV head's middle row, each row's KV head.
        meta = torch.full((16 + G + max(gm, 1),), -1, dtype=torch.int32)
        offsets = [0]
        for h in heads.kv_heads:
            offsets.append(offsets[-1] + h.numel())
        meta[: len(offsets)] = torch.tensor(offsets, dtype=torch.int32)
        chan = torch.zeros(max(gm, 1), D, dtype=torch.int32)
        row = 0
        for h, ch in zip(heads.kv_heads, heads.channels):
            for i, g in enumerate(h.tolist()):
                meta[16 + g] = row
                meta[16 + G + row] = g
                chan[row, : ch.shape[1]] = ch[i].to(torch.int32)
                row += 1
        self.meta, self.chan = meta.to(device), chan.to(device)
        self.o_part = torch.empty(batch, num_heads, s_total, D, device=device, dtype=torch.float32)
        self.lse_part = torch.empty(batch, num_heads, s_total, device=device, dtype=torch.float32)
        self.count = torch.zeros(batch * G, device=device, dtype=torch.int32)  # the kernel leaves it at 0
        self.out = torch.empty(batch, num_heads, D, device=device, dtype=dtype)
        self.grid = (batch * G * self.full_splits + (batch * gm * self.mid_splits),)
        group = num_heads // G
        gp = triton.next_power_of_2(group)
        pad = counts + [counts[-1] if counts else MIN_KEPT] * (MAX_GROUPS - len(counts))
        self.constexprs = dict(
            NUM_GROUPS=len(counts),
            **{f"C{i}": c for i, c in enumerate(pad)},
            **{f"CP{i}": triton.next_power_of_2(c) for i, c in enumerate(pad)},
            GROUP=group,
            BLOCK_H=block_h(group),
            GP=gp,
            BLOCK_N=config.block_n,
            BLOCK_S=_merge_block_s(gp),
            D=D,
            DOT_PRECISION=dot_precision(dtype),
        )
        self._fixed = (
            self.o_part,
            self.lse_part,
            self.out,
            self.count,
            self.meta,
            self.chan,
        )
        self._tail = (
            G,
            num_heads,
            s_total,
            self.full_splits,
            self.mid_splits,
            max(gm, 1),
            batch * G * self.full_splits,
        )
        self._bound: tuple | None = None  # data pointers of the buffers last checked
        self._runners: dict = {}  # (lengths on device, q strides) -> the compiled kernel's launcher
        names = list(_leank_layer_kernel.arg_names)
        tail = names[names.index("NUM_GROUPS") :]
        if tail != [*self.constexprs, "LENGTHS_ON_DEVICE"]:
            raise RuntimeError(f"constexpr order {tail} does not match the kernel signature")
        self._constexpr_values = {flag: (*self.constexprs.values(), flag) for flag in (False, True)}

    def _check_buffers(self, k_full, v_full, mid_k, mid_v) -> int:
        """Validate the cache's buffers (once per set of buffers, not per step); return the middle capacity."""
        B, G, D = self.batch, self.heads.num_kv_heads, self.heads.head_dim
        if k_full.dim() != 4 or k_full.shape[0] != B or k_full.shape[1] != G or k_full.shape[3] != D:
            raise ValueError(f"k_full has shape {list(k_full.shape)}, expected [{B}, {G}, Nf, {D}]")
        if v_full.shape != k_full.shape or v_full.stride() != k_full.stride():
            raise ValueError("v_full must have k_full's shape and strides (one buffer layout for K and V)")
        check_last_dim_contiguous(k_full=k_full, v_full=v_full)
        if len(mid_k) != len(self.heads.counts) or len(mid_v) != len(mid_k):
            raise ValueError(f"expected {len(self.heads.counts)} middle K and V tensors (one per group)")
        check_dtypes(k_full=k_full, v_full=v_full, **{f"mid_k[{i}]": t for i, t in enumerate(mid_k)})
        if k_full.dtype != self.dtype or any(t.dtype != self.dtype for t in mid_v):
            raise TypeError(f"the cache must hold {self.dtype} (the decoder was built for it): cast with .to()")
        cap = None
        for i, (k, v, h, c) in enumerate(zip(mid_k, mid_v, self.heads.kv_heads, self.heads.counts)):
            gc = h.numel()
            if k.dim() != 4 or k.shape[:2] != (B, gc) or k.shape[3] != c or v.shape != (B, gc, k.shape[2], D):
                raise ValueError(
                    f"group {i}: middle K {list(k.shape)} / V {list(v.shape)}, expected [{B}, {gc}, Nm, {c}] / "
                    f"[{B}, {gc}, Nm, {D}]"
                )
            cap_i = k.stride(1) // c
            want_k = (gc * cap_i * c, cap_i * c, c, 1)
            want_v = (gc * cap_i * D, cap_i * D, D, 1)
            if k.stride() != want_k or v.stride() != want_v or (cap is not None and cap_i != cap):
                raise ValueError(
                    f"group {i}: the middle buffers must be contiguous [B, Gc, cap, c] / [B, Gc, cap, D] with one "
                    "capacity cap for every group (views of their first tokens are fine): pass .contiguous() copies"
                )
            cap = cap_i
        check_runnable(k_full, v_full, *mid_k, *mid_v, self.meta)
        return cap or 1

    def __call__(
        self,
        q: torch.Tensor,
        k_full: torch.Tensor,
        v_full: torch.Tensor,
        mid_k: list[torch.Tensor],
        mid_v: list[torch.Tensor],
        lengths: torch.Tensor | tuple[int, int],
    ) -> torch.Tensor:
        """Decode attention of one layer, one launch: q [B, H, D] -> out [B, H, D] (the decoder's buffer)."""
        key = (k_full.data_ptr(), k_full.stride(), *(t.data_ptr() for t in mid_v))
        if key != self._bound:
            self._cap = self._check_buffers(k_full, v_full, mid_k, mid_v)
            self._mids = []
            for i in range(MAX_GROUPS):  # absent groups repeat the last one (their code is compiled out)
                j = min(i, len(mid_k) - 1)
                self._mids += [mid_k[j], mid_v[j]] if mid_k else [k_full, v_full]
            self._runners = {}
            self._bound = key
        if q.shape != self.out.shape or q.stride(-1) != 1 or q.dtype != self.dtype:
            raise ValueError(
                f"q must be {self.dtype} [B, H, D] = {list(self.out.shape)} with unit stride in D, got "
                f"{q.dtype} {list(q.shape)}"
            )
        on_device = isinstance(lengths, torch.Tensor)
        n_full, n_mid = (0, 0) if on_device else lengths
        args = (
            q,
            k_full,
            v_full,
            *self._mids,
            *self._fixed,
            lengths if on_device else self.meta,
            n_full,
            n_mid,
            self.qk_scale,
            q.stride(0),
            q.stride(1),
            k_full.stride(0),
            k_full.stride(1),
            k_full.stride(2),
            self._cap,
            *self._tail,
        )
        fast = self._runners.get((on_device, q.stride(0), q.stride(1)))
        if fast is not None and q.data_ptr() % 16 == 0:
            # The compiled kernel's own launcher: Triton's per-call argument binding and cache lookup skipped.
            fast(*args, *self._constexpr_values[on_device], stream=torch._C._cuda_getCurrentRawStream(q.device.index))
            return self.out
        compiled = _leank_layer_kernel[self.grid](
            *args,
            **self.constexprs,
            LENGTHS_ON_DEVICE=on_device,
            num_warps=self.config.num_warps,
            num_stages=self.config.num_stages,
        )
        if q.device.type == "cuda" and q.data_ptr() % 16 == 0 and hasattr(compiled, "packed_metadata"):
            self._runners[(on_device, q.stride(0), q.stride(1))] = compiled[(self.grid[0], 1, 1)]  # runner needs 3-D
        return self.out


def _check_inputs(q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, groups: list[MiddleGroup]) -> None:
    """Shape, dtype, device and stride checks of :func:`leank_decode`'s arguments."""
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
    config: DecodeConfig = DecodeConfig(),
) -> torch.Tensor:
    """Decode attention over a LeanK cache (full part + per-group pruned middle), exact LSE merge: [B, H, D].

    A one-call convenience: it validates everything (the index check reads the indices back to the host, a
    synchronisation on CUDA) and builds a :class:`LeanKDecoder` for this call. A decode loop builds the decoder
    once per layer instead (``leank_ref.decode`` does), so its steps are one launch each and never synchronise.
    """
    _check_inputs(q, k_full, v_full, groups)
    B, H, D = q.shape
    G = k_full.shape[1]
    groups = [g for g in groups if g.kv_heads.numel() > 0]
    heads = HeadGroups.from_indices([g.kv_heads for g in groups], [g.channels for g in groups], G, D)
    nm = groups[0].k.shape[2] if groups else 0
    mid_k, mid_v = _standard_layout(groups)
    decoder = LeanKDecoder(heads, B, H, q.dtype, q.device, k_full.shape[2], nm, scale, config)
    return decoder(q, k_full, v_full, mid_k, mid_v, (k_full.shape[2], nm))


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
    layout = HeadGroups.from_mask(keep)  # the cache's own grouping: by kept count, zero-count heads left out
    groups = []
    for heads, channels in zip(layout.kv_heads, layout.channels):
        heads, channels = heads.to(k.device), channels.to(k.device)  # [Gc], [Gc, c]
        k_mid, v_mid = gather_kept(k[:, :, mid], v[:, :, mid], heads, channels)
        groups.append(MiddleGroup(heads, channels, k_mid.contiguous(), v_mid.contiguous()))
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


__all__ = [
    "HeadGroups",
    "LeanKDecoder",
    "MiddleGroup",
    "leank_decode",
    "leank_decode_reference",
    "leank_layout_from_dense",
]


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
