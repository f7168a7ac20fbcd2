"""The learning-rate schedule of both stages: the authors' trapezoid (Zhang et al., 2025, App. B)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrapezoidSchedule:
    """lr multiplier: ramp up over the first ``warmup`` share, flat at 1, ramp down over the last ``decay``
    share, never below ``floor`` (the authors' ``min(1, max((i+1)/(N//5), .1), max((N-i)/(N//5), .1))``)."""

    steps: int
    warmup: float = 0.2
    decay: float = 0.2
    floor: float = 0.1

    def __call__(self, step: int) -> float:
        up = max(1, int(self.steps * self.warmup))
        down = max(1, int(self.steps * self.decay))
        return min(1.0, max((step + 1) / up, self.floor), max((self.steps - step) / down, self.floor))
