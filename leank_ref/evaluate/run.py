"""A whole evaluation: every sample of a grid (in one process or several), the paired analysis, the files."""

from __future__ import annotations

import hashlib
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leank_ref.evaluate.configs import Config, build_configs, config_memory
from leank_ref.evaluate.grid import TEACHER_FORCED_TASKS, EvalGrid
from leank_ref.evaluate.report import write_report
from leank_ref.evaluate.sample import evaluate_sample
from leank_ref.stats import compare_all, headline, summarize


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_WORKER: dict = {}  # inside a worker process only: its model, tokenizer, configs and grid (set by _worker_init)


def _worker_init(model_path: str | None, configs: list[Config], grid: EvalGrid) -> None:
    """A worker process: one torch thread, its own copy of the model, the parent's configs."""
    from leank_ref.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_path)
    _WORKER.update(model=model, tokenizer=tokenizer, configs=configs, grid=grid)


def _worker_sample(spec: dict) -> list[dict]:
    return evaluate_sample(_WORKER["model"], _WORKER["tokenizer"], spec, _WORKER["configs"], _WORKER["grid"])


def evaluate_specs(
    model,
    tokenizer,
    specs: list[dict],
    configs: list[Config],
    grid: EvalGrid,
    workers: int = 1,
    model_path: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Result rows of every sample spec, in spec order; ``workers`` > 1 spreads samples over processes."""
    bar = tqdm(total=len(specs), desc=f"{len(specs)} samples x {len(configs)} configs", disable=not progress)
    if workers <= 1:
        rows = []
        for spec in specs:
            rows.extend(evaluate_sample(model, tokenizer, spec, configs, grid))
            bar.update()
        bar.close()
        return rows
    ctx = multiprocessing.get_context("spawn")
    results: dict[int, list[dict]] = {}
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(model_path, configs, grid)
    ) as pool:
        futures = {pool.submit(_worker_sample, spec): i for i, spec in enumerate(specs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    bar.close()
    return [row for i in range(len(specs)) for row in results[i]]


def mask_files(configs: list[Config]) -> dict[str, str]:
    """The learned mask files the configs read, by file name, with their SHA-256: which masks a result is about."""
    paths = sorted({Path(c.selector.path) for c in configs if hasattr(c.selector, "path")})
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def analyze(rows: list[dict], grid: EvalGrid) -> dict:
    """Summaries (pooled over lengths, and per length), paired comparisons against dense and LeanK (pooled and per
    length) and the headline of each text source, from the per-sample rows."""
    tasks = tuple(t for t in grid.tasks if t in TEACHER_FORCED_TASKS)
    comparisons = compare_all(rows, grid.tolerance, by=("task", "source"))
    per_length = compare_all(rows, grid.tolerance, metrics=("ll", "kl", "correct"), by=("task", "source", "length"))
    sources = sorted({r["source"] for r in rows if r["task"] in tasks})
    return {
        "summary": summarize(rows),
        "by_length": summarize(rows, ("task", "source", "length", "method", "ratio", "budget")),
        "comparisons": comparisons,
        "comparisons_by_length": [c for c in per_length if c["b"] == "dense"],
        "headline": {source: headline(comparisons, tasks, source=source) for source in sources} if tasks else {},
    }


def run_evaluation(
    model,
    tokenizer,
    grid: EvalGrid,
    out_dir: str | Path = "results",
    name: str = "eval",
    masks_dir: str | Path | None = None,
    progress: bool = True,
    workers: int = 1,
    model_path: str | None = None,
) -> dict:
    """Evaluate the grid; write ``<name>_samples.csv``, ``<name>_summary.csv`` and ``<name>.json`` under ``out_dir``
    (default ``results/`` of the working directory). ``masks_dir``: where the learned masks are (default: the
    shipped ones).

    ``workers`` > 1 runs samples in that many processes of one thread each (``model_path``: what they load; None =
    the embedded SmolLM2), the fastest use of a few CPU cores; results do not depend on it.
    """
    from leank_ref.provenance import provenance

    start, cpu_start = time.perf_counter(), cpu_seconds()
    configs, pending = build_configs(model, tokenizer, grid, masks_dir)
    specs = grid.specs()
    rows = evaluate_specs(model, tokenizer, specs, configs, grid, workers, model_path, progress)
    report = {
        "grid": asdict(grid),
        "configs": [c.key for c in configs],
        "mask_files": mask_files(configs),
        "pending": pending,
        **analyze(rows, grid),
        "memory": [m for n in sorted({s["length"] for s in specs}) for m in config_memory(configs, model, grid, n)],
        "runtime_s": time.perf_counter() - start,
        "workers": workers,
        "threads": 1 if workers > 1 else torch.get_num_threads(),
        "provenance": provenance(next(model.parameters()).device),
    }
    if workers <= 1:
        report["cpu_s"] = cpu_seconds() - cpu_start
    write_report(out_dir, name, report, rows)
    return report
