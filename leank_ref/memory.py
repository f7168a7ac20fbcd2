"""What a LeanK cache holds, in bytes: the one memory formula of the project.

Per layer, with ``B`` sequences, ``G`` KV heads, head_dim ``D`` and ``Nm`` middle tokens (whole blocks that left
the recent window, :meth:`~leank_ref.windows.Windows.middle_length`):

* full window (sink + recent): ``B * G * (tokens - Nm) * D`` values of K and the same of V;
* middle K: ``B * Nm * sum of the kept counts`` values (only the kept channels are stored);
* middle V: ``B * Nm * D`` values per KV head that keeps at least one channel (an empty head stores none).

:meth:`leank_ref.cache.LeanKCache.memory_report` measures the same quantities from the tensors a real cache
holds, and a test checks that the two agree byte for byte. :func:`mask_stats` reads its savings from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leank_ref.masks import kept_counts, validate_mask, zero_head_rule
from leank_ref.windows import SMOLLM2, Windows, check_windows

__all__ = ["MaskStats", "MemoryReport", "mask_stats", "memory_formula"]


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of K and V in a LeanK cache (full window, middle store) beside a dense cache of the same length."""

    tokens: int  # tokens cached per sequence
    middle_tokens: int  # of which compacted into the middle store
    full_k: int
    full_v: int
    middle_k: int
    middle_v: int
    dense_k: int  # a dense cache of `tokens` tokens
    dense_v: int
    dense_middle_k: int  # the dense cache's K (and V) for the middle tokens alone
    dense_middle_v: int
    allocated: int = field(default=0, compare=False)  # bytes of the buffers behind them (growth slack included)

    @property
    def k(self) -> int:
        """LeanK K bytes (full window + middle)."""
        return self.full_k + self.middle_k

    @property
    def v(self) -> int:
        """LeanK V bytes (full window + middle)."""
        return self.full_v + self.middle_v

    @property
    def total(self) -> int:
        """LeanK K + V bytes."""
        return self.k + self.v

    @property
    def dense_total(self) -> int:
        """Dense K + V bytes."""
        return self.dense_k + self.dense_v

    @property
    def k_saved(self) -> float:
        """Share of the dense K bytes saved."""
        return 1.0 - self.k / self.dense_k if self.dense_k else 0.0

    @property
    def v_saved(self) -> float:
        """Share of the dense V bytes saved."""
        return 1.0 - self.v / self.dense_v if self.dense_v else 0.0

    @property
    def kv_saved(self) -> float:
        """Share of the dense K + V bytes saved."""
        return 1.0 - self.total / self.dense_total if self.dense_total else 0.0

    def __str__(self) -> str:
        mib = 2.0**20
        return (
            f"LeanK cache of {self.tokens} tokens ({self.middle_tokens} of them in the pruned middle store): "
            f"K {self.k / mib:.2f} MiB + V {self.v / mib:.2f} MiB = {self.total / mib:.2f} MiB; a dense cache: "
            f"{self.dense_total / mib:.2f} MiB (K {self.k_saved:.0%} smaller, V {self.v_saved:.0%} smaller)"
        )


def memory_formula(
    mask: torch.Tensor, tokens: int, windows: Windows = SMOLLM2, *, batch: int = 1, bytes_per_value: int = 2
) -> MemoryReport:
    """The :class:`MemoryReport` a LeanK cache of ``tokens`` tokens would give, from the mask's counts alone.

    ``bytes_per_value``: 2 for bf16/fp16, 4 for fp32. ``allocated`` is left at 0 (it depends on the buffers'
    growth, not on the mask).
    """
    check_windows(windows)
    if tokens < 0 or batch < 1 or bytes_per_value < 1:
        raise ValueError(
            f"need tokens >= 0, batch >= 1, bytes_per_value >= 1; got {tokens}, {batch}, {bytes_per_value}"
        )
    mask = validate_mask(mask)
    layers, g, d = mask.shape
    middle = windows.middle_length(tokens)
    unit = batch * bytes_per_value
    dense = layers * g * d * tokens * unit
    dense_middle = layers * g * d * middle * unit
    full = dense - dense_middle
    middle_k = int(kept_counts(mask).sum()) * middle * unit
    middle_v = int((~zero_head_rule(mask)).sum()) * d * middle * unit
    return MemoryReport(tokens, middle, full, full, middle_k, middle_v, dense, dense, dense_middle, dense_middle)


@dataclass
class MaskStats:
    """What a mask prunes, and what it saves in a cache of ``context`` tokens with the given windows."""

    pruned_ratio: float  # share of all K channels pruned (for middle tokens)
    count_histogram: dict[int, int]  # kept count -> number of heads
    zero_heads: int  # heads with no kept channel: their middle V is dropped too
    num_heads: int
    windows: Windows
    context: int
    k_saved: float  # share of the whole K cache saved at this context (memory_formula)
    v_saved: float  # share of the whole V cache saved at this context (memory_formula)


def mask_stats(mask: torch.Tensor, context: int, windows: Windows = SMOLLM2) -> MaskStats:
    """Pruned ratio, per-head count histogram, empty heads and the K/V savings at ``context`` tokens."""
    mask = validate_mask(mask)
    counts = kept_counts(mask)
    values, freq = torch.unique(counts, return_counts=True)
    report = memory_formula(mask, context, windows)
    return MaskStats(
        pruned_ratio=1.0 - counts.sum().item() / counts.numel() / mask.shape[-1],
        count_histogram={int(v): int(f) for v, f in zip(values, freq)},
        zero_heads=int((counts == 0).sum()),
        num_heads=counts.numel(),
        windows=windows,
        context=context,
        k_saved=report.k_saved,
        v_saved=report.v_saved,
    )
