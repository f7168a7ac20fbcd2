"""Does LeanK hold dense in the paper's setting? The window x length x ratio grid, each window with its own masks.

The paper's authors deploy sink 128 / recent 768 / block 128 and evaluate from 4K tokens on (Zhang et al., 2025,
Sec. 4); this project's default masks and windows are sink 16 / recent 64 / block 32 at 1-4K tokens. The grid
runs the evaluation (:func:`leank_ref.evaluate.run.run_evaluation`) once per window setting, at lengths 2K, 4K and
8K (SmolLM2's limit) and ratios 0.5-0.8, with LeanK's masks trained for that window (looked up by name,
:func:`leank_ref.baselines.learned_mask_path`) and every heuristic at the same per-head counts and windows. The
all-ones control is the dense row itself: the mask that keeps every channel, through the same simulated LeanK
attention. Each window writes its own ``eval_w<sink>-<recent>`` files; ``eval_windows.json`` gathers, per window,
the headline (per text and method: the highest ratio that holds dense on every task, pooled over lengths), the
masks still missing with the commands that make them, and, at r=0.7 and the longest length, the paired
difference of LeanK against dense and against the best heuristic.

Blocks scale with the window (32, 64, 128: a quarter to a sixth of the recent window, the authors' 128 for theirs),
so the recent part of a deployed cache stays within 1.5x of its nominal size.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict
from pathlib import Path

from leank_ref.baselines import learned_mask_path, stage1_factors_path
from leank_ref.evaluate.grid import HEURISTICS, EvalGrid
from leank_ref.stats import compare
from leank_ref.windows import Windows

WINDOW_SETTINGS = (Windows(16, 64, 32), Windows(64, 256, 64), Windows(128, 768, 128))  # the last: the paper's
TRAIN_RECENT = {64: 64, 256: 256, 768: 1024}  # recent window while training: the authors train Llama at 1024
LENGTHS = (2048, 4096, 8192)
RATIOS = (0.5, 0.6, 0.7, 0.8)
HEADLINE_RATIO = 0.7
TINY_WINDOW_SETTINGS = (Windows(16, 64, 32), Windows(32, 128, 32))  # --tiny: small enough for 256-512 tokens
TINY_LENGTHS = (256,)
SUMMARY_FILE = "eval_windows.json"


def file_stem(windows: Windows) -> str:
    """The result-file stem of one window's run, e.g. ``eval_w128-768``."""
    return f"eval_w{windows.sink}-{windows.recent}"


def training_commands(windows: Windows, ratios: tuple[float, ...], masks_dir: str | Path | None = None) -> list[str]:
    """The ``train`` commands that make the masks for ``windows`` (stage 1 once, stage 2 per ratio; GPU)."""
    factors = stage1_factors_path(masks_dir, windows=windows)
    recent = TRAIN_RECENT.get(windows.recent, windows.recent)
    common = (
        f"--sink {windows.sink} --recent {recent} --block {windows.block} --context-min 2048 --context-max 8192 "
        "--pool 32 --device cuda"
    )
    out = [f"python -m leank_ref train --stage 1 {common} --out {factors}"]
    for ratio in ratios:
        mask = learned_mask_path(ratio, masks_dir, windows=windows)
        out.append(f"python -m leank_ref train --stage 2 --factors {factors} --ratio {ratio:g} {common} --out {mask}")
    return out


def missing_masks(windows: Windows, ratios: tuple[float, ...], masks_dir: str | Path | None = None) -> dict | None:
    """The mask files the grid needs for ``windows`` that do not exist, and the commands that make them; None if
    every one exists."""
    paths = [learned_mask_path(r, masks_dir, windows=windows) for r in ratios]
    absent = [str(p) for p in paths if not p.exists()]
    if not absent:
        return None
    return {"files": absent, "commands": training_commands(windows, ratios, masks_dir)}


def paired_at(rows: list[dict], tasks: tuple[str, ...], length: int, ratio: float, tolerance: float) -> dict:
    """At one length and ratio, per text: LeanK minus dense and minus the best heuristic (the one with the highest
    mean needle log-likelihood over the tasks at LeanK's counts), per task and metric (paired bootstrap)."""
    at = [r for r in rows if r["length"] == length and r["task"] in tasks]
    leank, dense = ("leank", ratio, "leank"), ("dense", 0.0, "none")
    out = {}
    for source in sorted({r["source"] for r in at}):
        sub = [r for r in at if r["source"] == source]
        if not any(r["method"] == "leank" and r["ratio"] == ratio for r in sub):
            out[source] = {"missing": f"no LeanK mask at r={ratio:g}"}
            continue
        means = {}
        for method in HEURISTICS:
            values = [r["ll"] for r in sub if (r["method"], r["ratio"], r["budget"]) == (method, ratio, "leank")]
            if values:
                means[method] = sum(values) / len(values)
        best = max(means, key=means.get) if means else None
        entry = {"best_heuristic": best, "vs_dense": {}, "vs_best_heuristic": {}}
        for task in tasks:
            task_rows = [r for r in sub if r["task"] == task]
            for metric in ("ll", "kl"):
                key = f"{task} {metric}"
                entry["vs_dense"][key] = compare(task_rows, leank, dense, metric, tolerance)
                if best is not None:
                    entry["vs_best_heuristic"][key] = compare(
                        task_rows, leank, (best, ratio, "leank"), metric, tolerance
                    )
        out[source] = entry
    return out


def windows_grid(
    tiny: bool = False, samples: int | None = None, windows: tuple[Windows, ...] | None = None, **overrides
) -> list[EvalGrid]:
    """One :class:`EvalGrid` per window setting: LeanK and every heuristic, no greedy decoding (``overrides`` go
    to every grid, e.g. ``sources`` or ``tasks``). ``tiny``: small windows, 256 tokens, r=0.7, held-out text,
    one sample."""
    values = dict(
        methods=("leank", *HEURISTICS),
        ratios=RATIOS,
        lengths=TINY_LENGTHS if tiny else LENGTHS,
        samples=1 if tiny else 32,
        greedy_lengths=(),
        uniform_ablation=False,
    )
    if tiny:
        values.update(answer_length=8, calibration_prompts=1, calibration_length=256, ratios=(HEADLINE_RATIO,))
        values.update(sources=("stdlib",))
    if samples is not None:
        values["samples"] = samples
    values.update(overrides)
    settings = windows or (TINY_WINDOW_SETTINGS if tiny else WINDOW_SETTINGS)
    return [EvalGrid(windows=w, **values) for w in settings]


def run_windows_grid(
    model,
    tokenizer,
    grids: list[EvalGrid],
    out_dir: str | Path = "results",
    masks_dir: str | Path | None = None,
    progress: bool = True,
    workers: int = 1,
    model_path: str | None = None,
) -> dict:
    """Run every grid, write each window's files and ``eval_windows.json`` under ``out_dir``; return the gathered
    summary. The windows share every sample's dense prefill (one run, :func:`~leank_ref.evaluate.run.run_evaluations`;
    an interrupted run resumes). Entries of other windows already in ``eval_windows.json`` are kept, so the windows
    can also run in separate calls or parallel processes (``--window``; :func:`merge_summary`)."""
    from leank_ref.evaluate.report import read_rows
    from leank_ref.evaluate.run import run_evaluations

    out = Path(out_dir)
    named = [(file_stem(grid.windows), grid) for grid in grids]
    reports = run_evaluations(model, tokenizer, named, out, masks_dir, progress, workers, model_path)
    entries = [
        summary_entry(name, grid, report, read_rows(out / f"{name}_samples.csv"), masks_dir)
        for (name, grid), report in zip(named, reports)
    ]
    return merge_summary(out, entries)


def summary_entry(name: str, grid: EvalGrid, report: dict, rows: list[dict], masks_dir: str | Path | None) -> dict:
    """One window's entry of ``eval_windows.json``: its headline, the masks it lacks, the paired differences at
    r=0.7 and the longest length, where and how long it ran."""
    length = max(grid.lengths)
    return {
        "windows": asdict(grid.windows),
        "file": f"{name}.json",
        "lengths": list(grid.lengths),
        "samples": grid.samples,
        "missing_masks": missing_masks(grid.windows, grid.ratios, masks_dir),
        "headline": report["headline"],
        "headline_by_length": report.get("headline_by_length", {}),
        "paired_length": length,
        "paired": paired_at(rows, grid.tasks, length, HEADLINE_RATIO, grid.tolerance)
        if HEADLINE_RATIO in grid.ratios
        else {},
        "runtime_s": report["runtime_s"],
        **({"device": report["device"]} if "device" in report else {}),
        "provenance": report["provenance"],
    }


def merge_window_runs(out_dir: str | Path, other_dir: str | Path, masks_dir: str | Path | None = None) -> dict:
    """Join each window's run in ``other_dir`` with the same window's run in ``out_dir`` (same grid, other lengths;
    :func:`~leank_ref.evaluate.merge.merge_reports`), write the merged files into ``out_dir`` and update
    ``eval_windows.json``; return the whole summary. Windows only ``other_dir`` holds are copied as they are."""
    from leank_ref.evaluate.merge import grid_from_dict, load_run, merge_reports
    from leank_ref.evaluate.report import write_report
    from leank_ref.provenance import provenance

    out, other = Path(out_dir), Path(other_dir)
    names = sorted(p.stem for p in other.glob("eval_w*-*.json"))
    if not names:
        raise ValueError(f"{other} holds no eval_w<sink>-<recent>.json of a window grid run")
    entries = []
    for name in names:
        runs = [load_run(d / f"{name}.json") for d in (out, other) if (d / f"{name}.json").exists()]
        if len(runs) == 1:
            report, rows = runs[0]
            grid = grid_from_dict(report["grid"])
        else:
            report, rows, grid = merge_reports(runs)
            report["provenance"] = provenance("cpu")  # the code that merged; each run's is in "runs"
        write_report(out, name, report, rows)
        entries.append(summary_entry(name, grid, report, rows, masks_dir))
    return merge_summary(out, entries)


def merge_summary(out_dir: str | Path, entries: list[dict]) -> dict:
    """Write ``entries`` into ``out_dir/eval_windows.json``, replacing those of the same windows and keeping the
    others; return the whole summary. Read and written under a file lock, so windows run in parallel processes
    (one ``--window`` each, same ``--out``) all land in the file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SUMMARY_FILE
    lock = os.open(out, os.O_RDONLY)  # a lock on the folder itself: no lock file is left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = {"paper_windows": str(WINDOW_SETTINGS[-1]), "headline_ratio": HEADLINE_RATIO, "windows": []}
        ran = [e["windows"] for e in entries]
        if path.exists():
            summary["windows"] = [e for e in json.loads(path.read_text()).get("windows", []) if e["windows"] not in ran]
        summary["windows"] = sorted(
            summary["windows"] + entries, key=lambda e: (e["windows"]["recent"], e["windows"]["sink"])
        )
        path.write_text(json.dumps(summary, indent=1))
    finally:
        os.close(lock)  # closing releases the lock
    return summary
