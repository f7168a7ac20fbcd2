"""A whole evaluation: every sample of a grid (in one process or several), the paired analysis, the files."""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leank_ref.data import haystack_sha256
from leank_ref.evaluate.configs import Config, build_configs, config_memory
from leank_ref.evaluate.grid import TEACHER_FORCED_TASKS, EvalGrid
from leank_ref.evaluate.report import write_report
from leank_ref.evaluate.sample import evaluate_sample_jobs
from leank_ref.provenance import file_sha256
from leank_ref.stats import compare_all, headline, summarize


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Job = tuple[list[Config], EvalGrid]  # one evaluation sharing the samples' prefills with the others
_WORKER: dict = {}  # inside a worker process only: its model, tokenizer and jobs (set by _worker_init)


def _worker_init(model_path: str | None, jobs: list[Job]) -> None:
    """A worker process: one torch thread, its own copy of the model, the parent's configs and grids."""
    from leank_ref.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_path)
    _WORKER.update(model=model, tokenizer=tokenizer, jobs=jobs)


def _worker_sample(spec: dict) -> list[list[dict]]:
    return evaluate_sample_jobs(_WORKER["model"], _WORKER["tokenizer"], spec, _WORKER["jobs"])


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
    return evaluate_jobs(model, tokenizer, specs, [(configs, grid)], workers, model_path, progress)[0]


def haystack_hashes(specs: list[dict]) -> dict[str, str]:
    """SHA-256 of each text source the samples read: the same seed builds another prompt where it differs."""
    return {s: haystack_sha256(s) for s in sorted({spec["source"] for spec in specs if "source" in spec})}


def _partial_header(specs: list[dict], jobs: list[Job]) -> dict:
    """What a partial file must match to be resumed: the samples, the configs, the bytes of the learned masks and
    of the haystack texts (another Python version has other texts)."""
    configs = [c for job_configs, _ in jobs for c in job_configs]
    return {
        "specs": specs,
        "configs": [[c.key for c in cs] for cs, _ in jobs],
        "masks": mask_files(configs),
        "texts": haystack_hashes(specs),
    }


def _read_partial(path: Path | None, header: dict) -> dict[int, list[list[dict]]]:
    """Finished samples of an earlier run cut short (see :func:`evaluate_jobs`), by spec index."""
    if path is None or not path.exists():
        return {}
    lines = path.read_text().splitlines()
    if not lines or json.loads(lines[0]) != header:
        raise ValueError(
            f"{path} holds samples of a different run (other samples, configs, mask files or haystack texts, e.g. "
            "another Python version): delete it to start over"
        )
    return {record["i"]: record["rows"] for record in _partial_records(lines) if "i" in record}


def _partial_records(lines: list[str]) -> list[dict]:
    """The records after a partial file's header: finished samples (``i``, ``rows``) and process marks
    (``segment``); a line cut by an interruption is skipped."""
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def partial_segments(path: Path) -> list[dict]:
    """The processes that wrote a partial file, in order: each one's provenance and how many samples it finished
    (a run resumed on another machine has two segments)."""
    segments: list[dict] = []
    for record in _partial_records(path.read_text().splitlines()):
        if "segment" in record:
            segments.append({"provenance": record["segment"], "samples": 0})
        elif segments:
            segments[-1]["samples"] += 1
    return segments


def evaluate_jobs(
    model,
    tokenizer,
    specs: list[dict],
    jobs: list[Job],
    workers: int = 1,
    model_path: str | None = None,
    progress: bool = True,
    partial: str | Path | None = None,
    segment: dict | None = None,
) -> list[list[dict]]:
    """For each (configs, grid) job, the result rows of every spec in spec order; each sample's dense prefill is
    shared by the jobs. ``workers`` > 1 spreads samples over processes. ``partial``: a file that keeps every
    finished sample's rows as it completes, so a run cut short resumes where it stopped (same specs and configs);
    ``segment`` (e.g. this process's provenance) is written there before this process's samples
    (:func:`partial_segments`)."""
    partial = None if partial is None else Path(partial)
    header = _partial_header(specs, jobs)
    done = _read_partial(partial, header)
    if partial is not None and not partial.exists():
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(header) + "\n")
    if partial is not None and segment is not None and len(done) < len(specs):
        with open(partial, "a") as f:
            f.write(json.dumps({"segment": segment}) + "\n")
    todo = [i for i in range(len(specs)) if i not in done]
    configs = sum(len(c) for c, _ in jobs)
    desc = f"{len(specs)} samples x {configs} configs"
    bar = tqdm(total=len(specs), initial=len(done), desc=desc, disable=not progress)

    def keep(i: int, rows: list[list[dict]]) -> None:
        done[i] = rows
        if partial is not None:
            with open(partial, "a") as f:
                f.write(json.dumps({"i": i, "rows": rows}) + "\n")
        bar.update()

    if workers <= 1:
        for i in todo:
            keep(i, evaluate_sample_jobs(model, tokenizer, specs[i], jobs))
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init, initargs=(model_path, jobs)
        ) as pool:
            futures = {pool.submit(_worker_sample, specs[i]): i for i in todo}
            for future in as_completed(futures):
                keep(futures[future], future.result())
    bar.close()
    return [[row for i in range(len(specs)) for row in done[i][j]] for j in range(len(jobs))]


def mask_files(configs: list[Config]) -> dict[str, str]:
    """The learned mask files the configs read, by file name, with their SHA-256: which masks a result is about."""
    paths = sorted({Path(c.selector.path) for c in configs if hasattr(c.selector, "path")})
    return {p.name: file_sha256(p) for p in paths}


def analyze(rows: list[dict], grid: EvalGrid) -> dict:
    """Summaries (pooled over lengths, and per length), paired comparisons against dense and LeanK (pooled and per
    length) and the headline of each text source (pooled over lengths, and per length), from the per-sample rows."""
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
        "headline_by_length": {
            str(n): {s: headline([c for c in per_length if c["length"] == n], tasks, source=s) for s in sources}
            for n in sorted({r["length"] for r in rows if r["task"] in tasks})
        }
        if tasks
        else {},
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
    the embedded SmolLM2), the fastest use of a few CPU cores; results do not depend on it. Finished samples are
    kept in ``out_dir/.<name>.partial.jsonl`` while the run lasts: run the same command again after an
    interruption and it goes on from there.
    """
    return run_evaluations(model, tokenizer, [(name, grid)], out_dir, masks_dir, progress, workers, model_path)[0]


def run_evaluations(
    model,
    tokenizer,
    grids: list[tuple[str, EvalGrid]],
    out_dir: str | Path = "results",
    masks_dir: str | Path | None = None,
    progress: bool = True,
    workers: int = 1,
    model_path: str | None = None,
) -> list[dict]:
    """:func:`run_evaluation` for several named grids over the same samples (e.g. one per window setting): each
    sample's dense prefill runs once for all of them. One report (and file set) per grid."""
    from leank_ref.provenance import provenance

    specs = grids[0][1].specs()
    if any(grid.specs() != specs for _, grid in grids[1:]):
        raise ValueError("grids evaluated together must share their samples (tasks, texts, lengths, samples)")
    start, cpu_start = time.perf_counter(), cpu_seconds()
    ran = provenance(next(model.parameters()).device)  # at the start: the code that runs, not the checkout at the end
    built = [build_configs(model, tokenizer, grid, masks_dir) for _, grid in grids]
    jobs = [(configs, grid) for (configs, _), (_, grid) in zip(built, grids)]
    partial = Path(out_dir) / f".{'+'.join(name for name, _ in grids)}.partial.jsonl"
    all_rows = evaluate_jobs(model, tokenizer, specs, jobs, workers, model_path, progress, partial, segment=ran)
    runtime, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    segments = partial_segments(partial)
    reports = []
    for (name, grid), (configs, pending), rows in zip(grids, built, all_rows):
        lengths = sorted({s["length"] for s in specs})
        report = {
            "grid": asdict(grid),
            "configs": [c.key for c in configs],
            "mask_files": mask_files(configs),
            "haystack_sha256": haystack_hashes(specs),
            "pending": pending,
            **analyze(rows, grid),
            "memory": [m for n in lengths for m in config_memory(configs, model, grid, n)],
            "runtime_s": runtime,
            "evaluated_with": [n for n, _ in grids],  # these shared the prefills and the runtime
            "workers": workers,
            "threads": 1 if workers > 1 else torch.get_num_threads(),
            "provenance": ran,
            "segments": segments,  # every process that finished samples of this run (a resumed run has several)
        }
        if workers <= 1:
            report["cpu_s"] = cpu
        write_report(out_dir, name, report, rows)
        reports.append(report)
    partial.unlink(missing_ok=True)
    return reports
