"""The host side of the LeanK decode kernel: a layer's plan, buffers and checks, built once; one launch a step.

:class:`LeanKDecoder` is what a decode loop keeps per layer. Everything that does not change between steps
(head and channel indices on the device, split counts, scratch buffers, the compiled launcher) is made when it
is built; a call checks the lengths, binds the tensors and launches :func:`leank_kernel.leank_layer_kernel` once.
"""

from __future__ import annotations

import math

import torch
import triton

from leank_ref.layout import MIN_KEPT, HeadGroups

from . import leank_kernel
from .launch import (
    LOG2E,
    DecodeConfig,
    block_h,
    check_dtypes,
    check_head_dim,
    check_last_dim_contiguous,
    check_runnable,
    dot_precision,
    sm_count,
)
from .leank_kernel import META_HEADS, META_PROGRAMS, META_SPLITS

MAX_GROUPS = 8  # distinct kept counts per layer one launch serves (D / 16 for D = 128)
# The LeanK launch's defaults: 3 programs per multiprocessor in all, the number that fit on one at a time (144
# registers per thread, 70 KB of shared memory per program in bf16 at D = 128 on Hopper): one wave, and few
# partial results per head for the merge. Measured on an H100 against 4, 6, 9 and 12 (benchmarks/results).
LEANK_CONFIG = DecodeConfig(programs_per_sm=3)


def check_kernel_counts(heads: HeadGroups) -> None:
    """Raise unless the kernel serves every group's kept count (aligned, at most D) and their number."""
    counts, D = heads.counts, heads.head_dim
    if len(counts) > MAX_GROUPS:
        raise ValueError(
            f"{len(counts)} distinct kept counts in one layer, but one launch serves at most {MAX_GROUPS}: "
            f"binarize with an alignment a >= {D // MAX_GROUPS}"
        )
    for c in counts:
        if c % MIN_KEPT != 0 or c > D:
            raise ValueError(f"a group keeps c={c} channels: c must be a multiple of {MIN_KEPT} and at most D={D}")


def plan_layer_splits(
    heads: HeadGroups, batch: int, max_full: int, max_middle: int, device: torch.device, config: DecodeConfig
) -> tuple[int, list[int]]:
    """Split counts of the full window and of each group's middle, sized by the bytes each program moves.

    A full-window token costs 2 D values (K and V), a middle token of a group keeping c channels c + D. The
    launch's bytes are cut into programs of at most U bytes, U chosen so that all of them together amount to
    no more than ``config.programs_per_sm`` programs of U bytes per multiprocessor: with that a multiple of how
    many programs fit on one at a time, the programs fill whole waves and none is left running alone at the end.
    Every split is whole blocks long and, unless its part is shorter, has ``config.min_tokens_per_split`` tokens.
    """
    D, G = heads.head_dim, heads.num_kv_heads
    parts = [(batch * G, max(max_full, 1), 2 * D)]
    parts += [(batch * h.numel(), max(max_middle, 1), c + D) for h, c in zip(heads.kv_heads, heads.counts)]
    total = sum(rows * tokens * width for rows, tokens, width in parts)
    target = config.programs_per_sm * sm_count(device)
    limit = total / target  # bytes (in values) per program
    for _ in range(32):
        splits, largest = [], 0
        for _rows, tokens, width in parts:
            want = min(math.ceil(tokens * width / limit), math.ceil(tokens / config.min_tokens_per_split))
            per = math.ceil(math.ceil(tokens / max(want, 1)) / config.block_n) * config.block_n  # whole blocks
            splits.append(math.ceil(tokens / per))
            largest = max(largest, min(per, tokens) * width)
        if total <= target * largest:  # the programs fit in `target` programs of the largest one's size
            break
        limit *= 1.02
    return splits[0], splits[1:]


def _merge_block_s(gp: int) -> int:
    """Slots the in-kernel merge reads at a time: [GP, BLOCK_S, D] float32 tiles of 8K values (64 per thread)."""
    return max(2, 64 // gp)


class LeanKDecoder:
    """One layer's LeanK decode attention: one kernel launch per step, nothing rebuilt or synchronised per step.

    Built once per cache layer from its :class:`~leank_ref.layout.HeadGroups` (validated on the host, so no
    kernel ever reads out of bounds): it moves the head and channel indices to the device, plans the splits for
    the capacities ``max_full`` / ``max_middle`` (tokens per split follow the actual lengths inside the kernel,
    so any length is correct, only the balance is planned), and allocates the partial-result scratch, the merge
    counters and the output buffer. A call then binds the current tensors and launches once:

        out = decoder(q, k_full, v_full, mid_k, mid_v, lengths)   # [B, H, D], the same buffer every step

    ``k_full, v_full [B, G, Nf, D]`` (views or whole buffers; unit stride in D); ``mid_k[i] [B, Gc, Nm, c]``
    and ``mid_v[i] [B, Gc, Nm, D]`` per group, in the groups' order, views of the first ``Nm`` tokens of
    contiguous buffers with one capacity for all groups. ``lengths``: Python ints ``(n_full, n_mid)`` (eager),
    checked against the tensors (``1 <= n_full <= Nf``, ``0 <= n_mid <= Nm``), or an int32 device tensor
    ``[2]`` that the cache advances itself (what a CUDA graph replays), which the kernel clamps into the same
    ranges. The kernel attends to the first ``n_full`` full-window slots, in any order, and the first ``n_mid``
    middle tokens of each group. The output buffer is overwritten by the next call: consume it before then.
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
        config: DecodeConfig = LEANK_CONFIG,
    ):
        heads.validate()  # host-side, once: indices in range, nothing repeated
        G, D = heads.num_kv_heads, heads.head_dim
        check_head_dim(D)
        if num_heads % G != 0:
            raise ValueError(f"query heads H={num_heads} must be a multiple of KV heads G={G} (GQA)")
        check_kernel_counts(heads)
        device = torch.device(device)
        self.heads, self.batch, self.num_heads, self.dtype, self.device = heads, batch, num_heads, dtype, device
        self.max_full, self.max_middle = max_full, max_middle
        self.config = config
        self.qk_scale = (D**-0.5 if scale is None else scale) * LOG2E
        self.full_splits, self.mid_splits = plan_layer_splits(heads, batch, max_full, max_middle, device, config)
        s_total = self.full_splits + max(self.mid_splits, default=0)
        self.meta, self.chan = self._metadata(heads, batch, self.mid_splits)
        self.meta, self.chan = self.meta.to(device), self.chan.to(device)
        self.o_part = torch.empty(batch, num_heads, s_total, D, device=device, dtype=torch.float32)
        self.lse_part = torch.empty(batch, num_heads, s_total, device=device, dtype=torch.float32)
        self.count = torch.zeros(batch * G, device=device, dtype=torch.int32)  # the kernel leaves it at 0
        self.out = torch.empty(batch, num_heads, D, device=device, dtype=dtype)
        mid_programs = sum(batch * h.numel() * n for h, n in zip(heads.kv_heads, self.mid_splits))
        self.grid = (batch * G * self.full_splits + mid_programs,)
        group = num_heads // G
        gp = triton.next_power_of_2(group)
        self.constexprs = dict(
            COUNTS=tuple(heads.counts),
            COUNTS_PAD=tuple(triton.next_power_of_2(c) for c in heads.counts),
            GROUP=group,
            BLOCK_H=block_h(group),
            GP=gp,
            BLOCK_N=config.block_n,
            BLOCK_S=_merge_block_s(gp),
            D=D,
            DOT_PRECISION=dot_precision(dtype),
        )
        self._fixed = (self.o_part, self.lse_part, self.out, self.count, self.meta, self.chan)
        self._tail = (G, num_heads, s_total, self.full_splits, batch * G * self.full_splits)
        self._bound: tuple | None = None  # data pointers of the buffers last checked
        self._device_lengths: torch.Tensor | None = None  # the lengths tensor last checked
        self._runners: dict = {}  # (lengths on device, q strides) -> the compiled kernel's launcher
        names = list(leank_kernel.leank_layer_kernel.arg_names)
        tail = names[names.index("COUNTS") :]
        if tail != [*self.constexprs, "LENGTHS_ON_DEVICE"]:
            raise RuntimeError(f"constexpr order {tail} does not match the kernel signature")
        self._constexpr_values = {flag: (*self.constexprs.values(), flag) for flag in (False, True)}

    @staticmethod
    def _metadata(heads: HeadGroups, batch: int, mid_splits: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """META (int32, sections as ``leank_kernel`` reads them) and CHAN [rows, D]: each middle row's channels."""
        G, D, gm = heads.num_kv_heads, heads.head_dim, heads.middle_heads
        at_programs, at_splits, at_heads = (int(x.value) for x in (META_PROGRAMS, META_SPLITS, META_HEADS))
        meta = torch.zeros(at_heads + G + max(gm, 1), dtype=torch.int32)
        chan = torch.zeros(max(gm, 1), D, dtype=torch.int32)
        row = program = 0
        for i, (h, ch, splits) in enumerate(zip(heads.kv_heads, heads.channels, mid_splits)):
            meta[i], meta[at_programs + i], meta[at_splits + i] = row, program, splits
            for j, g in enumerate(h.tolist()):
                meta[at_heads + g] = splits
                meta[at_heads + G + row] = g
                chan[row, : ch.shape[1]] = ch[j].to(torch.int32)
                row += 1
            program += batch * h.numel() * splits
        meta[len(mid_splits)], meta[at_programs + len(mid_splits)] = row, program
        return meta, chan

    def _check_buffers(self, k_full, v_full, mid_k, mid_v) -> int:
        """Validate the cache's buffers (once per set of buffers, not per step); return the middle row pitch."""
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
        pitch = None
        for i, (k, v, h, c) in enumerate(zip(mid_k, mid_v, self.heads.kv_heads, self.heads.counts)):
            gc = h.numel()
            if k.dim() != 4 or k.shape[:2] != (B, gc) or k.shape[3] != c or v.shape != (B, gc, k.shape[2], D):
                raise ValueError(
                    f"group {i}: middle K {list(k.shape)} / V {list(v.shape)}, expected [{B}, {gc}, Nm, {c}] / "
                    f"[{B}, {gc}, Nm, {D}]"
                )
            pitch_i = k.stride(1) // c
            want_k = (gc * pitch_i * c, pitch_i * c, c, 1)
            want_v = (gc * pitch_i * D, pitch_i * D, D, 1)
            if k.stride() != want_k or v.stride() != want_v or (pitch is not None and pitch_i != pitch):
                raise ValueError(
                    f"group {i}: the middle buffers must be contiguous [B, Gc, cap, c] / [B, Gc, cap, D] with one "
                    "capacity cap for every group (views of their first tokens are fine): pass .contiguous() copies"
                )
            pitch = pitch_i
        check_runnable(k_full, v_full, *mid_k, *mid_v, self.meta)
        return pitch or 1

    def _check_lengths(self, lengths, q: torch.Tensor, max_full: int, max_mid: int) -> tuple[int, int]:
        """Host lengths: raise unless 1 <= n_full <= max_full and 0 <= n_mid <= max_mid. Device: dtype and shape."""
        if isinstance(lengths, torch.Tensor):
            if lengths is not self._device_lengths:
                if lengths.dtype != torch.int32 or lengths.shape != (2,) or lengths.device != q.device:
                    raise ValueError(
                        f"device lengths must be an int32 tensor [n_full, n_mid] on {q.device}, got "
                        f"{lengths.dtype} {list(lengths.shape)} on {lengths.device}"
                    )
                self._device_lengths = lengths
            return 0, 0
        if len(lengths) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
            raise TypeError(f"lengths must be Python ints (n_full, n_mid) or an int32 device tensor, got {lengths!r}")
        n_full, n_mid = lengths
        if not 1 <= n_full <= max_full:
            raise ValueError(
                f"n_full={n_full} but the full window k_full, v_full holds {max_full} tokens: need 1 <= n_full <= "
                f"{max_full} (it holds at least the newest token); pass the lengths the cache filled"
            )
        if not 0 <= n_mid <= max_mid:
            raise ValueError(
                f"n_mid={n_mid} but the middle buffers hold {max_mid} tokens: need 0 <= n_mid <= {max_mid}; pass "
                "the lengths the cache filled (or views that hold them)"
            )
        return n_full, n_mid

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
        key = (k_full.data_ptr(), k_full.stride(), *(t.data_ptr() for t in mid_k), *(t.data_ptr() for t in mid_v))
        if key != self._bound:
            self._pitch = self._check_buffers(k_full, v_full, mid_k, mid_v)
            self._mids = (tuple(mid_k), tuple(mid_v))
            self._runners = {}
            self._bound = key
        if q.shape != self.out.shape or q.stride(-1) != 1 or q.dtype != self.dtype:
            raise ValueError(
                f"q must be {self.dtype} [B, H, D] = {list(self.out.shape)} with unit stride in D, got "
                f"{q.dtype} {list(q.shape)}"
            )
        # The tokens the tensors of this call hold: the kernel never reads past them, whatever the lengths say.
        max_full = min(k_full.shape[2], v_full.shape[2])
        max_mid = min(t.shape[2] for t in (*mid_k, *mid_v)) if mid_k else 0
        n_full, n_mid = self._check_lengths(lengths, q, max_full, max_mid)
        on_device = isinstance(lengths, torch.Tensor)
        args = (
            q,
            k_full,
            v_full,
            *self._mids,
            *self._fixed,
            lengths if on_device else self.meta,
            n_full,
            n_mid,
            max_full,
            max_mid,
            self.qk_scale,
            q.stride(0),
            q.stride(1),
            k_full.stride(0),
            k_full.stride(1),
            k_full.stride(2),
            self._pitch,
            *self._tail,
        )
        fast = self._runners.get((on_device, q.stride(0), q.stride(1)))
        if fast is not None and q.data_ptr() % 16 == 0:
            # The compiled kernel's own launcher: Triton's per-call argument binding and cache lookup skipped.
            fast(*args, *self._constexpr_values[on_device], stream=torch._C._cuda_getCurrentRawStream(q.device.index))
            return self.out
        compiled = leank_kernel.leank_layer_kernel[self.grid](
            *args,
            **self.constexprs,
            LENGTHS_ON_DEVICE=on_device,
            num_warps=self.config.num_warps,
            num_stages=self.config.num_stages,
        )
        if q.device.type == "cuda" and q.data_ptr() % 16 == 0 and hasattr(compiled, "packed_metadata"):
            self._runners[(on_device, q.stride(0), q.stride(1))] = compiled[(self.grid[0], 1, 1)]  # runner needs 3-D
        return self.out
