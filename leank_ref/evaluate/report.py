"""Result files of an evaluation: ``<name>.json`` (grid, analysis, provenance) and the per-sample and summary CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` as CSV, one column per key seen in any row (first-seen order)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: str | Path) -> list[dict]:
    """Read a samples/summary CSV back with numbers as numbers (empty cells -> None)."""

    def parse(v: str):
        if v == "":
            return None
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: (v if k in ("answer", "output") else parse(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def write_report(out_dir: str | Path, name: str, report: dict, rows: list[dict]) -> Path:
    """Write ``<name>_samples.csv`` (``rows``), ``<name>_summary.csv`` (``report["summary"]``) and ``<name>.json``
    under ``out_dir`` (made if needed); return the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{name}_samples.csv", rows)
    write_csv(out / f"{name}_summary.csv", report["summary"])
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=1))
    return path
