"""
Dense flash decoding: split-KV attention for one query token, with GQA
=====================================================================

At decode time each sequence adds one token, so attention is one query row per head against
the whole cache. For a KV head the kernel reads N keys and N values of D channels (4*N*D bytes
in bf16) and does about 4*N*D floating-point operations for each of the H/G query heads that
share it: H/G operations per byte, 4 for Llama-3.1-8B, against the ~300 FLOP/byte at which an
H100 stops waiting on memory. Decode attention is therefore *memory-bound*: its time is the
bytes it reads divided by memory bandwidth, and the only ways to speed it up are to read each
byte once (and at full bandwidth) or to read fewer bytes (LeanK, in ``decode_leank.py``).

Two things make a kernel read each byte once at full bandwidth:

1. **All query heads of a KV head in one program.** Query head h uses KV head h // (H/G). One
   program loads the H/G query rows of a KV head as a small matrix (padded to 16 rows so that
   ``tl.dot`` can use the tensor cores) and streams that head's K and V once for all of them.
2. **Split-KV (flash decoding).** One program per (sequence, KV head) gives B*G programs, 8 for
   Llama at batch 1: 8 of the H100's 132 multiprocessors would work. So the N tokens are split
   into S chunks, each handled by its own program, which returns a *partial* result: the
   softmax-weighted average of its chunk's values ``o_s`` and the log-sum-exp of its chunk's
   logits ``lse_s = log sum_j exp(s_j)``. The exact result is recovered by a second, tiny kernel:

       lse = log sum_s exp(lse_s)          o = sum_s exp(lse_s - lse) * o_s

   This is exact, not an approximation: exp(lse_s - lse) is the share of the softmax mass that
   chunk s holds. Inside a chunk, the program walks BLOCK_N tokens at a time with the online
   softmax of FlashAttention (keep a running max m, running denominator l and running
   unnormalised output acc; rescale both by exp(m_old - m_new) when the max grows).

Logits are kept in base 2 (``exp2`` is one instruction; the scale is multiplied by log2(e)),
so the partial ``lse_s`` the kernels store are base-2 log-sum-exps.

``dense_decode`` is the kernel; ``dense_decode_reference`` is the same function in plain torch
with float32 arithmetic. On a machine without CUDA, set ``TRITON_INTERPRET=1`` *before*
importing this module and pass CPU tensors: Triton then runs the kernels in its interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    LOG2E,
    DecodeConfig,
    block_h,
    check_dtypes,
    check_head_dim,
    check_last_dim_contiguous,
    check_runnable,
    dot_precision,
    plan_splits,
)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attend_tokens(
    q,  # [BLOCK_H, KC] query rows (only the key channels this part stores)
    k_base,  # pointer to token 0 of this head's keys; row stride stride_kn
    v_base,  # pointer to token 0 of this head's values; row stride stride_vn
    stride_kn,
    stride_vn,
    offs_kc,  # [KC] key-channel offsets inside a key row
    kc_mask,  # [KC] which of them exist (KC is padded to a power of two)
    start,
    end,  # this program's tokens: [start, end), never empty
    qk_scale,  # softmax scale * log2(e)
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over tokens [start, end): returns the running max, denominator, output."""
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of base-2 logits
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_H, D], tl.float32)  # running sum of exp2(logit - m_i) * v
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_kc[None, :],
            mask=n_mask[:, None] & kc_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, KC]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_partial(O_PART, LSE_PART, rows, h_mask, slot, S_TOTAL, m_i, l_i, acc, D: tl.constexpr):
    """Write one split's normalised output and base-2 log-sum-exp for each query head."""
    offs_d = tl.arange(0, D)
    # O_PART [B*H, S_TOTAL, D] and LSE_PART [B*H, S_TOTAL], both float32 and contiguous.
    tl.store(O_PART + (rows[:, None] * S_TOTAL + slot) * D + offs_d[None, :], acc / l_i[:, None], mask=h_mask[:, None])
    tl.store(LSE_PART + rows * S_TOTAL + slot, m_i + tl.log2(l_i), mask=h_mask)


@triton.jit
def _dense_program(
    b,
    g,
    split,
    Q,
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
    stride_kb,
    stride_kg,
    stride_kn,
    stride_vb,
    stride_vg,
    stride_vn,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Sequence b, KV head g, one split: all GROUP query heads of g over one chunk, written to slot0 + split."""
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP  # rows past GROUP are padding for tl.dot
    heads = g * GROUP + offs_h  # [BLOCK_H] query heads of KV head g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    m_i, l_i, acc = _attend_tokens(
        q,
        K + b * stride_kb + g * stride_kg,
        V + b * stride_vb + g * stride_vg,
        stride_kn,
        stride_vn,
        offs_d,
        offs_d < D,
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
def _dense_partial_kernel(
    Q,
    K,
    V,
    O_PART,
    LSE_PART,
    qk_scale,
    n_tokens,
    tokens_per_split,
    G,
    H,
    S_TOTAL,
    slot0,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kg,
    stride_kn,
    stride_vb,
    stride_vg,
    stride_vn,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = one (sequence b, KV head g, split): all GROUP query heads of g, one chunk."""
    pid_bg = tl.program_id(0).to(tl.int64)  # int64: b * stride_kb can pass 2**31 at long contexts
    _dense_program(
        pid_bg // G,
        pid_bg % G,
        tl.program_id(1),
        Q,
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
        stride_kb,
        stride_kg,
        stride_kn,
        stride_vb,
        stride_vg,
        stride_vn,
        GROUP,
        BLOCK_H,
        BLOCK_N,
        D,
        DOT_PRECISION,
    )


@triton.jit
def _merge_kernel(O_PART, LSE_PART, OUT, S_TOTAL, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """One program = one (sequence, query head, BLOCK_D channels): exact log-sum-exp merge of its S_TOTAL splits."""
    row = tl.program_id(0).to(tl.int64)  # b * H + h
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    # Pass 1: the largest partial log-sum-exp. Unused slots hold -inf and weigh nothing.
    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S_TOTAL, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(LSE_PART + row * S_TOTAL + offs_s, mask=offs_s < S_TOTAL, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse)
    m = tl.max(m_vec, 0)
    # Pass 2: o = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m).
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, S_TOTAL, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(LSE_PART + row * S_TOTAL + offs_s, mask=offs_s < S_TOTAL, other=float("-inf"))
        used = lse > float("-inf")
        w = tl.where(used, tl.exp2(lse - m), 0.0)
        o = tl.load(O_PART + (row * S_TOTAL + offs_s[:, None]) * D + offs_d[None, :], mask=used[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        den += w
    tl.store(OUT + row * D + offs_d, (acc / tl.sum(den, 0)).to(OUT.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------


def launch_dense_partials(
    q: torch.Tensor,  # [B, H, D]
    k: torch.Tensor,  # [B, G, N, D]
    v: torch.Tensor,  # [B, G, N, D]
    o_part: torch.Tensor,  # [B, H, S_TOTAL, D] float32
    lse_part: torch.Tensor,  # [B, H, S_TOTAL] float32
    qk_scale: float,
    splits: int,
    tokens_per_split: int,
    slot0: int,
    config: DecodeConfig,
) -> None:
    """Launch the split-KV kernel over k/v, writing split s into partial slot slot0 + s."""
    B, H, D = q.shape
    G, N = k.shape[1], k.shape[2]
    _dense_partial_kernel[(B * G, splits)](
        q,
        k,
        v,
        o_part,
        lse_part,
        qk_scale,
        N,
        tokens_per_split,
        G,
        H,
        o_part.shape[2],
        slot0,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        GROUP=H // G,
        BLOCK_H=block_h(H // G),
        BLOCK_N=config.block_n,
        D=D,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def launch_merge(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor) -> None:
    """Merge partials [B, H, S, D] (+ lse [B, H, S]) into out [B, H, D]; -inf slots are skipped.

    The grid splits D into chunks of 32 channels: at batch 1 there are only H (sequence, head) rows, and with
    hundreds of splits one program per row left most SMs idle (0.9 of 4.7 ms GPU time at B1 N128K on the H100).
    """
    B, H, S, D = o_part.shape
    block_d = min(D, 32)
    _merge_kernel[(B * H, D // block_d)](
        o_part, lse_part, out, S, BLOCK_S=min(64, triton.next_power_of_2(S)), BLOCK_D=block_d, D=D, num_warps=4
    )


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def dense_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    *,
    config: DecodeConfig = DecodeConfig(),
) -> torch.Tensor:
    """Attention of one query token per sequence over a dense KV cache (split-KV, GQA): [B, H, D]."""
    if q.dim() != 3 or k.dim() != 4:
        raise ValueError(f"expected q [B, H, D] and k, v [B, G, N, D], got q {list(q.shape)} and k {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    B, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k has shape {list(k.shape)} but q [B, H, D] = {list(q.shape)} needs [{B}, G, N, {D}]")
    G, N = k.shape[1], k.shape[2]
    if H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads G={G} (GQA)")
    if N < 1:
        raise ValueError("the cache is empty (N = 0): decode needs at least one key")
    check_head_dim(D)
    check_dtypes(q=q, k=k, v=v)
    check_runnable(q, k, v)
    check_last_dim_contiguous(q=q, k=k, v=v)
    scale = D**-0.5 if scale is None else scale

    splits, per_split = plan_splits(N, B * G, q.device, config, num_splits)
    o_part = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    launch_dense_partials(q, k, v, o_part, lse_part, scale * LOG2E, splits, per_split, 0, config)
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    launch_merge(o_part, lse_part, out)
    return out


def dense_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The same attention in plain torch with float32 arithmetic: [B, H, D] in q.dtype."""
    B, H, D = q.shape
    G = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    qf = q.float().view(B, G, H // G, D)  # [B, G, R, D]: the R query heads of each KV head
    s = torch.einsum("bgrd,bgnd->bgrn", qf, k.float()) * scale
    o = torch.einsum("bgrn,bgnd->bgrd", torch.softmax(s, dim=-1), v.float())
    return o.reshape(B, H, D).to(q.dtype)


__all__ = ["dense_decode", "dense_decode_reference"]
