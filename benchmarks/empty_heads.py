"""The empty-head effect at equal K bytes, and masks compared paired on the evaluation's samples (CPU, SmolLM2).

    python benchmarks/empty_heads.py experiment               # results/empty_heads.json + _samples.csv
    python benchmarks/empty_heads.py compare --name empty_head_levers \
        --mask plain=masks/laptop/smollm2-135m_r0.7.pth --mask surrogate=build/surrogate_r0.7.pth

``experiment``: the shipped r=0.7 mask beside its equal-K-bytes surgeries (:mod:`leank_ref.evaluate.empty_heads`):
every head keeping 16 channels emptied with its channels given to a head of its layer (``swap``), every empty
head restored with 16 channels taken from one (``restore``), each alone and all at once, and the emptying alone
(``empty_only``, fewer K bytes). ``compare``: any masks side by side; the first is the reference of the paired
differences. Both: the evaluation's teacher-forced tasks (needle log-likelihood ``ll``, KL to dense over the
answer ``kl``), the training text (pydoc) and the held-out one (stdlib), fixed seeds, one dense prefill per
sample shared by every row (:func:`leank_ref.evaluate.sample.evaluate_sample`), paired bootstrap intervals
(:func:`leank_ref.stats.compare`). Paths are relative to the repository root.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from leank_ref.evaluate.configs import Config
from leank_ref.evaluate.empty_heads import (
    BASE,
    FixedMask,
    all_moves,
    analyze_moves,
    bytes_of,
    combined_moves,
    empty_heads_configs,
)
from leank_ref.evaluate.grid import EvalGrid
from leank_ref.evaluate.report import write_csv
from leank_ref.evaluate.run import cpu_seconds, evaluate_specs
from leank_ref.masks import kept_counts, load_mask
from leank_ref.models import load_model
from leank_ref.provenance import file_sha256, provenance
from leank_ref.stats import summarize

ROOT = Path(__file__).resolve().parent.parent
RATIO = 0.7
ALIGN = 16


def grid_from(args) -> EvalGrid:
    return EvalGrid(
        methods=("leank",),
        ratios=(RATIO,),
        tasks=tuple(args.tasks),
        lengths=tuple(args.lengths),
        sources=tuple(args.sources),
        samples=args.samples,
        uniform_ablation=False,
    )


def run(args, configs: list[Config], grid: EvalGrid) -> tuple[list[dict], float, float]:
    if args.device == "cpu":
        torch.set_num_threads(1)
    model, tokenizer = load_model(device=args.device)
    start, cpu = time.perf_counter(), cpu_seconds()
    workers = args.workers if args.device == "cpu" else 1  # one process drives a GPU
    rows = evaluate_specs(model, tokenizer, grid.specs(), configs, grid, workers=workers)
    return rows, time.perf_counter() - start, cpu_seconds() - cpu


def experiment(args) -> dict:
    mask_path, factors_path = ROOT / args.mask_file, ROOT / args.factors
    mask = load_mask(mask_path, align=ALIGN)
    factors = torch.load(factors_path, map_location="cpu", weights_only=True).float()
    configs, moves = empty_heads_configs(mask, factors, RATIO, ALIGN, single=not args.no_single)
    grid = grid_from(args)
    rows, wall, cpu = run(args, configs, grid)
    methods = [c.method for c in configs if c.method not in ("dense", BASE)]
    combined = [m for m in methods if m.endswith(("_all", "_only"))]
    counts = kept_counts(mask)
    return {
        "what": "the empty-head effect at equal K bytes (leank_ref.evaluate.empty_heads): positive differences "
        "mean the surgery is better than the unmodified mask (ll: higher, kl: lower)",
        "mask": {"path": args.mask_file, "sha256": file_sha256(mask_path), "counts": counts.tolist()},
        "factors": {"path": args.factors, "sha256": file_sha256(factors_path)},
        "moves": [asdict(m) for m in moves],
        "heads": {
            "keep_16": int((counts == ALIGN).sum()),
            "empty": int((counts == 0).sum()),
            "swaps_possible": len(all_moves(mask, factors, ALIGN, "swap")),
            "restores_possible": len(all_moves(mask, factors, ALIGN, "restore")),
        },
        "combined_moves": {
            kind: [asdict(m) for m in combined_moves(mask, factors, ALIGN, kind)[1]] for kind in ("swap", "restore")
        },
        **report_body(args, configs, grid, rows, (wall, cpu), methods, combined),
    }


def report_body(args, configs, grid, rows, times, pooled: list, split: list) -> dict:
    """The part both result files share: bytes, grid, paired comparisons (``pooled`` methods over lengths and tasks,
    ``split`` methods per task and per length), summary, rows and timing."""
    wall, cpu = times
    return {
        "bytes": {str(n): bytes_of(configs, n, grid.windows) for n in (*grid.lengths, 4096)},
        "grid": asdict(grid),
        "comparisons": analyze_moves(rows, pooled, RATIO, grid.tolerance, ("source",)),
        "comparisons_by_task": analyze_moves(rows, split, RATIO, grid.tolerance, ("source", "task")),
        "comparisons_by_length": analyze_moves(rows, split, RATIO, grid.tolerance, ("source", "length")),
        "summary": summarize(rows),
        "rows": rows,
        "wall_s": wall,
        "cpu_s_main_process": cpu,
        "workers": args.workers if args.device == "cpu" else 1,
    }


def compare_masks(args) -> dict:
    named = [spec.split("=", 1) for spec in args.mask]
    masks = {name: load_mask(ROOT / path, align=ALIGN) for name, path in named}
    from leank_ref.baselines import Dense

    ref = named[0][0]
    configs = [Config("dense", 0.0, "none", Dense())]
    for name, m in masks.items():
        configs.append(
            Config(
                BASE if name == ref else name, RATIO, "leank" if name == ref else "own", FixedMask(m), kept_counts(m)
            )
        )
    grid = grid_from(args)
    rows, wall, cpu = run(args, configs, grid)
    methods = [c.method for c in configs if c.method not in ("dense", BASE)]
    return {
        "what": f"masks compared paired with '{ref}' (labelled {BASE!r} in the rows): positive = better than it",
        "masks": {name: {"path": path, "sha256": file_sha256(ROOT / path)} for name, path in named},
        **report_body(args, configs, grid, rows, (wall, cpu), methods + [BASE], methods),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("experiment", "compare"))
    parser.add_argument("--name", default="empty_heads", help="result files results/<name>.json, _samples.csv")
    parser.add_argument("--mask-file", default="masks/smollm2-135m_r0.7.pth", help="experiment: the mask operated on")
    parser.add_argument("--factors", default="masks/smollm2-135m_stage1_factors.pth", help="its stage-1 factors")
    parser.add_argument("--mask", action="append", default=[], help="compare: name=path (first = reference)")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "kv_retrieval", "continuation"])
    parser.add_argument(
        "--sources", nargs="+", default=["pydoc", "stdlib"], help="pydoc: training text; stdlib: held out"
    )
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--samples", type=int, default=10, help="per (task, source, length)")
    parser.add_argument("--workers", type=int, default=2, help="CPU: processes of one thread each")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (one process)")
    parser.add_argument("--no-single", action="store_true", help="experiment: only the combined surgeries")
    args = parser.parse_args()
    report = experiment(args) if args.mode == "experiment" else compare_masks(args)
    report["command"] = shlex.join(["python", "benchmarks/empty_heads.py", *sys.argv[1:]])
    report["provenance"] = provenance(args.device)
    rows = report.pop("rows")
    out = ROOT / "results"
    write_csv(out / f"{args.name}_samples.csv", rows)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    for c in report["comparisons"]:
        if c["b"] != "dense" and not c["a"].startswith(("swap_L", "restore_L")):
            print(f"{c['source']:7s} {c['a']:14s} {c['metric']}: {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]")
    print(f"wrote results/{args.name}.json ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
