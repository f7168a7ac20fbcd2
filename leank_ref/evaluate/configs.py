"""The rows of a comparison: one :class:`Config` per (method, ratio, budget), and the cache memory each implies.

Every method at a ratio gets the same per-head kept counts (:func:`leank_ref.baselines.equal_budget`): the
learned mask's own counts where one exists for the ratio and the grid's windows, else uniform counts. Dense is
the first row and keeps every channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from leank_ref.attention import QKCapture
from leank_ref.baselines import (
    SELECTORS,
    Dense,
    LeanKFactors,
    LeanKLearned,
    RandomChannels,
    Selector,
    StaticImportance,
    ThinK,
    equal_budget,
    learned_mask_path,
    stage1_factors_path,
    uniform_counts,
)
from leank_ref.evaluate.grid import EvalGrid
from leank_ref.masks import kept_counts, load_mask, top_count_mask
from leank_ref.memory import memory_formula
from leank_ref.models import model_facts


@dataclass
class Config:
    """One row of the comparison: a selector at a ratio with its per-head budget (dense: ratio 0, no budget)."""

    method: str
    ratio: float
    budget: str  # where the per-head counts come from: "leank", "uniform", "own" (a learned mask's), "none" (dense)
    selector: Selector = field(repr=False)
    counts: torch.Tensor | None = field(default=None, repr=False)  # int [L, G]

    def mask(self, model, capture: QKCapture | None, align: int) -> torch.Tensor:
        """This row's [L, G, D] 0/1 mask for the current prompt (static selectors ignore ``capture``)."""
        return self.selector.select(model, self.counts, align, capture=capture)

    @property
    def key(self) -> str:
        """A short label, e.g. ``think@0.7/leank`` (method@ratio/budget source)."""
        return "dense" if self.method == "dense" else f"{self.method}@{self.ratio:g}/{self.budget}"


def build_configs(
    model, tokenizer, grid: EvalGrid, masks_dir: str | Path | None = None
) -> tuple[list[Config], list[str]]:
    """Dense first, then every (method, ratio, budget) of the grid; also what is pending (missing learned files).

    Learned files are looked up for the grid's windows (:func:`leank_ref.baselines.learned_mask_path`) in
    ``masks_dir`` (default: the shipped masks).
    """
    shape = model_facts(model).mask_shape
    windows = grid.windows
    pending: list[str] = []
    fixed: dict[str, Selector] = {}
    if "static_qk" in grid.methods:
        fixed["static_qk"] = StaticImportance.calibrate(
            model, tokenizer, grid.calibration_prompts, grid.calibration_length
        )
    if "leank_factors" in grid.methods:
        path = stage1_factors_path(masks_dir, windows=windows)
        if path.exists():
            fixed["leank_factors"] = LeanKFactors.load(path)
        else:
            pending.append(f"leank_factors: no stage-1 factors at {path}")
    fixed["think"] = ThinK(grid.think_window)
    fixed["random"] = RandomChannels(grid.random_seed)

    configs = [Config("dense", 0.0, "none", Dense())]
    for ratio in grid.ratios:
        counts, source = equal_budget(model, ratio, grid.align, masks_dir, windows)
        budgets = [(source, counts)]
        if source == "leank" and grid.uniform_ablation:  # same total as LeanK's mask, spread evenly over heads
            realized = 1.0 - counts.sum().item() / (counts.numel() * shape[2])
            budgets.append(("uniform", uniform_counts(shape, realized, grid.align)))
        for method in grid.methods:
            if method == "dense":
                continue
            if method == "leank_authors":  # the authors' stage-2 variant, at its own per-head counts
                path = learned_mask_path(ratio, masks_dir, variant="authors", windows=windows)
                if path.exists():
                    own = kept_counts(load_mask(path, shape, grid.align))
                    configs.append(Config(method, ratio, "own", LeanKLearned(path), own))
                else:
                    pending.append(f"leank_authors r={ratio:g}: no learned mask at {path}")
                continue
            if method == "leank":
                path = learned_mask_path(ratio, masks_dir, windows=windows)
                if source == "leank":
                    configs.append(Config("leank", ratio, "leank", LeanKLearned(path), counts))
                else:
                    pending.append(f"leank r={ratio:g}: no learned mask at {path}")
                continue
            if method == "leank_factors" and method not in fixed:
                continue
            selector = fixed.get(method) or SELECTORS[method]()
            configs.extend(Config(method, ratio, name, selector, c) for name, c in budgets)
    return configs, pending


def config_memory(configs: list[Config], model, grid: EvalGrid, context: int) -> list[dict]:
    """Per config: pruned ratio, zero-count heads and K/V cache saved at ``context`` tokens, counted as a LeanK
    cache with the grid's windows (block included) stores them (:func:`leank_ref.memory.memory_formula`)."""
    shape = model_facts(model).mask_shape
    out = []
    for c in configs:
        counts = torch.full(shape[:2], shape[2]) if c.counts is None else c.counts  # [L, G]
        report = memory_formula(top_count_mask(torch.zeros(shape), counts), context, grid.windows)
        out.append(
            {
                "method": c.method,
                "ratio": c.ratio,
                "budget": c.budget,
                "context": context,
                "pruned_ratio": 1.0 - counts.sum().item() / (counts.numel() * shape[2]),
                "zero_heads": int((counts == 0).sum()),
                "k_saved": report.k_saved,
                "v_saved": report.v_saved,
            }
        )
    return out
