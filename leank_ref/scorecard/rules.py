"""One scorecard row, and the rules that turn a measured number into a verdict against the paper's."""

from __future__ import annotations

from dataclasses import dataclass

SPEED_TOLERANCE = 0.95  # a speed-up reproduces if it reaches 95% of the paper's
ACCURACY_TOLERANCE = 0.05  # accuracy is held if LeanK's is at most 5 points below dense (right/wrong answers)
# (claim, paper, result key, low, high, tolerance): a share reproduces within `tolerance` of [low, high]; "up to 70%"
# allows 5 points because the sink and recent windows always keep full K, 16-18% allows 2 points.
MEMORY_CLAIMS = (
    ("K cache saved", "up to 70%", "k_saved", 0.70, 0.70, 0.05),
    ("V cache saved", "16-18%", "v_saved", 0.16, 0.18, 0.02),
)


@dataclass(frozen=True)
class Rules:
    """The tolerances every verdict uses (defaults: the module constants)."""

    speed_tolerance: float = SPEED_TOLERANCE
    accuracy_tolerance: float = ACCURACY_TOLERANCE
    memory_claims: tuple[tuple[str, str, str, float, float, float], ...] = MEMORY_CLAIMS

    def share(self, value: float, low: float, high: float, tolerance: float) -> str:
        """Verdict on a memory share: "yes" within ``tolerance`` of the paper's [low, high]."""
        if low - tolerance <= value <= high + tolerance:
            return "yes"
        paper = f"{100 * low:.0f}%" if low == high else f"{100 * low:.0f}-{100 * high:.0f}%"
        return f"no (more than {100 * tolerance:.0f} points from {paper})"

    def speed(self, value: float, claim: float) -> str:
        """Verdict on a speed-up: "yes" from ``speed_tolerance`` of the paper's ``claim`` on."""
        if value >= self.speed_tolerance * claim:
            return "yes"
        return f"no (below {self.speed_tolerance:.0%} of {claim}x)"


RULES = Rules()


@dataclass(frozen=True)
class Row:
    """One line of the scorecard."""

    claim: str  # the quantity, e.g. "K cache saved"
    paper: str  # the paper's number, e.g. "70%"
    ours: str  # our number, formatted, or "not measured"
    setting: str  # model, mask, shape, device
    source: str  # result file (and entry) the number comes from
    verdict: str  # "yes", "no", "no result" or "not tested at the paper's scale", with a short reason


def missing(claim: str, paper: str, source: str, why: str) -> Row:
    """The row of a claim whose result file or entry is absent."""
    return Row(claim, paper, "not measured", "", source, f"no result ({why})")


def device_of(result: dict) -> str:
    """The device a result file names (top level or under ``provenance``), e.g. 'one NVIDIA H100 80GB HBM3'."""
    device = result.get("device") or (result.get("provenance") or {}).get("device") or "unknown device"
    return f"one {device}" if device.startswith("NVIDIA") else device
