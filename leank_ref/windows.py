"""The three token windows of a LeanK cache: ``sink``, ``recent`` and ``block``, with their check and defaults.

A cached token is in one of three places: the first ``sink`` tokens (full K and V), the newest ``recent`` tokens
(full K and V), or the *middle* between them (only the kept K channels). Tokens leave the recent part ``block``
at a time, so the recent part holds ``recent .. recent + block - 1`` tokens once the cache is long enough.

This module is the one place that defines those windows, their defaults and the memory they imply.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AUTHORS_DEPLOY",
    "AUTHORS_TRAIN",
    "SMOLLM2",
    "Windows",
    "check_windows",
    "effective_recent",
    "middle_length",
]


@dataclass(frozen=True)
class Windows:
    """Sink, recent and block sizes in tokens; checked when made (``Windows(16, 64, 32)``)."""

    sink: int = 16
    recent: int = 64
    block: int = 32

    def __post_init__(self) -> None:
        for name in ("sink", "recent", "block"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        if self.sink < 0 or self.recent < 1 or self.block < 1:
            raise ValueError(
                f"sink={self.sink}, recent={self.recent}, block={self.block}: need sink >= 0, recent >= 1 (the "
                "query's own token is recent) and block >= 1 (tokens compacted at a time); SmolLM2 defaults are "
                "Windows(sink=16, recent=64, block=32), the authors deploy Windows(128, 768, 128)."
            )

    @property
    def full(self) -> int:
        """Full-K tokens once the cache is long: sink + recent (the recent part may hold up to block - 1 more)."""
        return self.sink + self.recent

    def middle_length(self, tokens: int) -> int:
        """Tokens in the middle store once ``tokens`` are cached: whole blocks that left the recent window."""
        return max(tokens - self.sink - self.recent, 0) // self.block * self.block

    def effective_recent(self, tokens: int) -> int:
        """The recent window (full-K tokens after the sink) that the newest of ``tokens`` cached tokens sees."""
        return tokens - min(tokens, self.sink) - self.middle_length(tokens)

    def __str__(self) -> str:
        return f"sink {self.sink} / recent {self.recent} / block {self.block}"


SMOLLM2 = Windows(16, 64, 32)  # the defaults: scaled to SmolLM2 at 0.5-4K tokens (80 full-K tokens, 2% of 4K)
AUTHORS_DEPLOY = Windows(128, 768, 128)  # the authors' deployment (Zhang et al., 2025, Sec. 4)
AUTHORS_TRAIN = Windows(128, 1024, 1)  # the authors' training windows for Llama (block 1: no compaction)


def check_windows(windows: object) -> Windows:
    """Return ``windows`` if it is a :class:`Windows`, else raise a ``TypeError`` that names the fix."""
    if not isinstance(windows, Windows):
        raise TypeError(f"windows must be a leank_ref.windows.Windows, e.g. Windows(16, 64, 32); got {windows!r}")
    return windows


def middle_length(tokens: int, sink: int, recent: int, block: int) -> int:
    """:meth:`Windows.middle_length` for plain ints."""
    return Windows(sink, recent, block).middle_length(tokens)


def effective_recent(tokens: int, sink: int, recent: int, block: int) -> int:
    """:meth:`Windows.effective_recent` for plain ints."""
    return Windows(sink, recent, block).effective_recent(tokens)
