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


SAMPLE_KEY = ("task", "source", "length", "seed")  # what identifies one sample (every method sees the same ones)
CONFIG_KEY = ("method", "ratio", "budget")  # what identifies one method at one budget
HIGHER_IS_BETTER = {"ll": True, "top1": True, "correct": True, "kl": False}


def config_label(config: tuple) -> str:
    """``think@0.7/leank`` for ("think", 0.7, "leank"); ``dense`` for the dense row."""
    method, ratio, budget = config
    return "dense" if method == "dense" else f"{method}@{ratio:g}/{budget}"


def summarize(rows: list[dict], by: tuple[str, ...] = ("task", "source", "method", "ratio", "budget")) -> list[dict]:
    """One record per group of ``by``: n, then for each metric present its mean and 95% interval (accuracy: Wilson,
    continuous metrics: normal). Unpaired, for describing one method; compare methods with :func:`compare`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        rec = dict(zip(by, key), n=len(members))
        for metric in HIGHER_IS_BETTER:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if not values:
                continue
            if metric == "correct":
                k = sum(int(v) for v in values)
                lo, hi = wilson_interval(k, len(values))
                rec.update(accuracy=k / len(values), acc_low=lo, acc_high=hi)
            else:
                mean, lo, hi = mean_interval([float(v) for v in values])
                rec.update({metric: mean, f"{metric}_low": lo, f"{metric}_high": hi})
        out.append(rec)
    return out


def paired_values(rows: list[dict], a: tuple, b: tuple, metric: str) -> tuple[list[float], list[float]]:
    """The values of ``metric`` for configs ``a`` and ``b`` (:data:`CONFIG_KEY` tuples) on their common samples."""

    def values(config: tuple) -> dict[tuple, float]:
        return {
            tuple(r[k] for k in SAMPLE_KEY): float(r[metric])
            for r in rows
            if tuple(r[k] for k in CONFIG_KEY) == config and r.get(metric) is not None
        }

    va, vb = values(a), values(b)
    keys = sorted(set(va) & set(vb), key=str)
    return [va[k] for k in keys], [vb[k] for k in keys]


def compare(rows: list[dict], a: tuple, b: tuple, metric: str, tolerance: float = 0.0, n_boot: int = 2000) -> dict:
    """Paired comparison of config ``a`` with config ``b`` on ``metric`` over their common samples.

    Oriented so that a positive difference means ``a`` is better (for ``kl``: ``kl_b - kl_a``). Returns the
    paired bootstrap ``{mean, low, high, n}``, the :func:`verdict` at ``tolerance``, and for ``correct`` also
    the exact sign test (``wins_a``, ``wins_b``, ``ties``, ``p``).
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric '{metric}'; choose from {sorted(HIGHER_IS_BETTER)}.")
    x, y = paired_values(rows, a, b, metric)
    if not x:
        raise ValueError(f"{config_label(a)} and {config_label(b)} share no samples with '{metric}'.")
    better, worse = (x, y) if HIGHER_IS_BETTER[metric] else (y, x)
    out = {"a": config_label(a), "b": config_label(b), "metric": metric, **paired_bootstrap(better, worse, n_boot)}
    out["verdict"] = verdict(out["low"], out["high"], tolerance)
    if metric == "correct":
        out.update(sign_test(x, y))
    return out


def compare_all(
    rows: list[dict],
    tolerance: float,
    metrics: tuple[str, ...] = ("ll", "kl", "top1", "correct"),
    by: tuple[str, ...] = ("task", "source"),
) -> list[dict]:
    """Every config against dense, and every config against LeanK at its ratio, within each group of ``by``.

    One record per (group, a, b, metric) where both have values (:func:`compare`; ``a`` the config, ``b`` dense
    or LeanK's learned mask at the same ratio).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        configs = sorted({tuple(r[k] for k in CONFIG_KEY) for r in members}, key=lambda c: (c[1], str(c)))
        dense = next((c for c in configs if c[0] == "dense"), None)
        for config in configs:
            refs = [] if config == dense or dense is None else [dense]
            leank = (config[0] != "leank") and next((c for c in configs if c[0] == "leank" and c[1] == config[1]), None)
            if leank and config[0] != "dense":
                refs.append(leank)
            for ref in refs:
                for metric in metrics:
                    if not any(m.get(metric) is not None for m in members):
                        continue
                    out.append(
                        {
                            **dict(zip(by, key)),
                            **dict(zip(CONFIG_KEY, config)),
                            **compare(members, config, ref, metric, tolerance),
                        }
                    )
    return out


def headline(
    comparisons: list[dict], tasks: tuple[str, ...], metrics: tuple[str, ...] = ("ll", "kl"), source: str = "pydoc"
) -> dict[str, dict]:
    """Per method: the highest pruning ratio at which it *holds* dense on every task and metric, and at every lower
    ratio tested (``ratio: None`` if it fails at the lowest).

    Reads :func:`compare_all` records against dense, one text ``source``, equal-budget configs only: a learned
    mask at its own counts ("leank", "own"), heuristics at LeanK's counts, or uniform counts where no learned
    mask sets the budget. ``ratios`` maps each tested ratio to whether it held, and ``failed`` to what failed.
    """
    vs_dense = [c for c in comparisons if c["b"] == "dense" and c.get("source") == source and c["task"] in tasks]
    if not vs_dense:
        raise ValueError(f"no comparisons against dense for source '{source}' and tasks {list(tasks)}.")
    leank_ratios = {c["ratio"] for c in vs_dense if c["budget"] == "leank"}
    cells: dict[str, dict[float, list[dict]]] = {}
    for c in vs_dense:
        equal = c["budget"] in ("leank", "own") or (c["budget"] == "uniform" and c["ratio"] not in leank_ratios)
        if equal and c["metric"] in metrics:
            cells.setdefault(c["method"], {}).setdefault(c["ratio"], []).append(c)
    out = {}
    for method, by_ratio in cells.items():
        rec = {"ratio": None, "ratios": {}, "failed": {}}
        holding = True
        for ratio in sorted(by_ratio):
            checks = by_ratio[ratio]
            bad = [
                f"{c['task']} {c['metric']}: {c['verdict']}" for c in checks if c["verdict"] not in ("holds", "beats")
            ]
            missing = len(checks) < len(tasks) * len(metrics)
            held = not bad and not missing
            rec["ratios"][ratio] = held
            if bad or missing:
                rec["failed"][ratio] = bad + (["missing comparisons"] if missing else [])
            holding = holding and held
            if holding:
                rec["ratio"] = ratio
        out[method] = rec
    return out
