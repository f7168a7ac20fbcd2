"""One evaluation from several runs of the same grid at different lengths (e.g. 8K tokens in one GPU call, 2K and
4K in another).

A sample is fixed by its (task, text, length, seed), never by the other lengths of the grid
(:meth:`~leank_ref.evaluate.grid.EvalGrid.specs`), so the rows of runs that differ only in their lengths are the
rows one run over all of them would give. :func:`merge_reports` checks that the runs agree on everything else
(grid, configs, mask files), joins their rows and analyses them again; the merged report keeps each run's
provenance, text hashes and runtime under ``runs``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from leank_ref.evaluate.grid import EvalGrid
from leank_ref.evaluate.report import read_rows
from leank_ref.windows import Windows

SPEC_KEYS = ("task", "source", "length", "seed")
RUN_KEYS = ("haystack_sha256", "runtime_s", "evaluated_with", "workers", "threads", "cpu_s", "provenance", "segments")


def grid_from_dict(values: dict) -> EvalGrid:
    """The :class:`EvalGrid` a report's ``grid`` entry describes (lists back to tuples, windows to :class:`Windows`)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k != "windows"}
    return EvalGrid(**fields, windows=Windows(**values["windows"]))


def load_run(path: str | Path) -> tuple[dict, list[dict]]:
    """A report ``<name>.json`` and its per-sample rows ``<name>_samples.csv`` (same folder)."""
    path = Path(path)
    return json.loads(path.read_text()), read_rows(path.with_name(f"{path.stem}_samples.csv"))


def run_records(report: dict) -> list[dict]:
    """What a report contributes to a merged report's ``runs``: per run, its lengths, where, when and how long it
    ran (a merged report brings its own runs)."""
    runs = report.get("runs")
    if runs is not None:  # already a merged report
        return runs
    return [{"lengths": report["grid"]["lengths"], **{k: report[k] for k in RUN_KEYS if k in report}}]


def merge_reports(runs: list[tuple[dict, list[dict]]]) -> tuple[dict, list[dict], EvalGrid]:
    """(report, rows) of runs of one grid that differ only in their lengths -> the merged (report, rows, grid).

    Raises ``ValueError`` if the runs differ in anything but the lengths (windows, ratios, methods, samples, configs,
    mask files) or measure a length twice: re-run the odd one out with the others' options."""
    from leank_ref.evaluate.run import analyze

    if len(runs) < 2:
        raise ValueError("merging needs at least two runs")
    first = runs[0][0]

    def without_lengths(report: dict) -> dict:
        return {k: v for k, v in report["grid"].items() if k != "lengths"}

    for report, _ in runs[1:]:
        for what, a, b in (
            ("grid (other than lengths)", without_lengths(first), without_lengths(report)),
            ("configs", first["configs"], report["configs"]),
            ("mask files", first["mask_files"], report["mask_files"]),
        ):
            if a != b:
                raise ValueError(f"these runs differ in their {what}: only runs of one grid at other lengths merge")
    lengths = [n for report, _ in runs for n in report["grid"]["lengths"]]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"these runs measure a length twice ({sorted(lengths)}): drop one of them")
    grid = grid_from_dict({**first["grid"], "lengths": sorted(lengths)})
    order = {tuple(s[k] for k in SPEC_KEYS): i for i, s in enumerate(grid.specs())}  # one run's row order
    rows = sorted((r for _, rs in runs for r in rs), key=lambda r: order[tuple(r[k] for k in SPEC_KEYS)])
    records = [rec for report, _ in runs for rec in run_records(report)]
    devices = list(dict.fromkeys(rec["provenance"]["device"] for rec in records))
    merged = {
        "grid": asdict(grid),
        "configs": first["configs"],
        "mask_files": first["mask_files"],
        "pending": first.get("pending"),
        **analyze(rows, grid),
        "memory": sorted((m for report, _ in runs for m in report["memory"]), key=lambda m: m["context"]),
        "runtime_s": sum(rec["runtime_s"] for rec in records),
        "device": " and ".join(devices),
        "runs": sorted(records, key=lambda rec: min(rec["lengths"])),
    }
    return merged, rows, grid
