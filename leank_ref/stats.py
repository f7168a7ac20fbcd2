"""Statistics of the evaluation: intervals of one method, paired comparisons of two, the summary tables.

A single method's score gets an interval of its own (Wilson for a proportion, normal for a mean). Two methods
are only ever compared on the *same* samples, through the per-sample difference: a paired bootstrap interval of
its mean for continuous metrics (log-likelihood, KL), and an exact sign test for 0/1 outcomes (accuracy). Pairing
removes the between-sample variance (some needles are hard for every method), which is most of it.

Reading a paired interval ``[low, high]`` of ``method - reference`` (higher = better):
- *beats*: ``low > 0``; *worse*: ``high < 0``; otherwise the samples cannot tell them apart;
- *holds within tolerance t*: ``low > -t``, i.e. a loss of ``t`` or more is excluded (non-inferiority).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, min(p, center - half)), min(1.0, max(p, center + half)))  # contains p despite rounding


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): normal 95% interval of the mean over samples."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value.")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _paired(a: Sequence[float], b: Sequence[float] | None) -> torch.Tensor:
    x = torch.as_tensor(list(a), dtype=torch.float64)
    if b is not None:
        y = torch.as_tensor(list(b), dtype=torch.float64)
        if x.shape != y.shape:
            raise ValueError(f"paired samples need equal lengths; got {x.numel()} and {y.numel()} (same samples).")
        x = x - y
    if x.numel() == 0:
        raise ValueError("no samples to compare.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("a per-sample value is NaN or infinite; drop or fix that sample before comparing.")
    return x


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float] | None = None, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict:
    """Mean of the per-sample difference ``a - b`` and its percentile bootstrap interval (samples resampled).

    ``a[i]`` and ``b[i]`` must come from the same sample. ``b=None`` bootstraps the mean of ``a`` itself (e.g.
    a KL that is already a per-sample comparison with the reference). Returns ``{mean, low, high, n}``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must lie in (0, 1), e.g. 0.95.")
    d = _paired(a, b)
    n = d.numel()
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=generator)
    means = d[idx].mean(dim=1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    mean = float(d.mean())
    return {"mean": mean, "low": min(low, mean), "high": max(high, mean), "n": n}


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided sign test of paired outcomes (e.g. 0/1 correct): does ``a`` win more often than ``b``?

    Ties are dropped; under the null each untied pair is won by ``a`` with probability 1/2. Returns
    ``{wins_a, wins_b, ties, p}``.
    """
    d = _paired(a, b)
    wins_a, wins_b = int((d > 0).sum()), int((d < 0).sum())
    m, k = wins_a + wins_b, min(wins_a, wins_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m if m else 1.0
    return {"wins_a": wins_a, "wins_b": wins_b, "ties": d.numel() - m, "p": min(1.0, 2 * tail)}


def verdict(low: float, high: float, tolerance: float = 0.0) -> str:
    """Read a paired interval of ``method - reference`` (higher = better) at ``tolerance`` (module docstring).

    ``"beats"`` (low > 0), ``"holds"`` (low > -tolerance), ``"worse"`` (high < 0, and a loss of ``tolerance``
    not excluded), else ``"unclear"``.
    """
    if low > 0:
        return "beats"
    if low > -tolerance:
        return "holds"
    return "worse" if high < 0 else "unclear"


def summarize(rows: list[dict], by: tuple[str, ...] = ("task", "method", "ratio", "budget")) -> list[dict]:
    """One record per group of ``by``: n and accuracy with Wilson interval, or KL / top-1 with normal intervals."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        rec = dict(zip(by, key), n=len(members))
        if members[0].get("correct") is not None:
            k = sum(int(m["correct"]) for m in members)
            lo, hi = wilson_interval(k, len(members))
            rec.update(accuracy=k / len(members), acc_low=lo, acc_high=hi)
        else:
            for metric in ("kl", "top1"):
                mean, lo, hi = mean_interval([float(m[metric]) for m in members])
                rec.update({metric: mean, f"{metric}_low": lo, f"{metric}_high": hi})
        out.append(rec)
    return out


def headline(summary: list[dict], task: str, tolerance: float = 0.02, budget: str = "equal") -> dict[str, dict]:
    """Per method: the highest ratio whose accuracy is >= dense's minus ``tolerance``, with that cell's interval.

    ``budget="equal"`` reads the equal-budget rows (LeanK's counts where they exist, uniform elsewhere);
    ``"uniform"`` only the uniform-count rows. A method that fails at every ratio gets ``ratio: None``.
    """
    cells = [s for s in summary if s["task"] == task]
    dense = next((s for s in cells if s["method"] == "dense"), None)
    if dense is None:
        raise ValueError(f"no dense row for task '{task}': the headline compares against dense.")
    leank_ratios = {s["ratio"] for s in cells if s["budget"] == "leank"}
    out: dict[str, dict] = {}
    for s in sorted(cells, key=lambda s: s["ratio"]):
        if s["method"] == "dense":
            continue
        equal = s["budget"] == "leank" or (s["budget"] == "uniform" and s["ratio"] not in leank_ratios)
        if (budget == "equal" and not equal) or (budget == "uniform" and s["budget"] != "uniform"):
            continue
        rec = out.setdefault(s["method"], {"ratio": None, "dense": dense["accuracy"]})
        if s["accuracy"] >= dense["accuracy"] - tolerance:
            rec.update(ratio=s["ratio"], accuracy=s["accuracy"], acc_low=s["acc_low"], acc_high=s["acc_high"])
    return out
