"""The ``evaluate`` command: ``python -m leank_ref evaluate ...`` (options, then the run they drive)."""

from __future__ import annotations

from pathlib import Path

from leank_ref.data import SOURCES
from leank_ref.evaluate.grid import ALL_METHODS, TEACHER_FORCED_TASKS, EvalGrid


def add_arguments(parser) -> None:
    """The ``evaluate`` options (defaults: the full grid of notebook 06)."""
    d = EvalGrid()
    parser.add_argument("--method", nargs="+", choices=ALL_METHODS, help="methods compared with dense (default: all)")
    parser.add_argument("--ratio", nargs="+", type=float, help="pruning ratios (default 0.5 0.7 0.8)")
    parser.add_argument("--task", nargs="+", choices=TEACHER_FORCED_TASKS, default=list(d.tasks))
    parser.add_argument("--lengths", nargs="+", type=int, help="context lengths in tokens (default 1024 2048 4096)")
    parser.add_argument("--source", nargs="+", choices=SOURCES, default=list(d.sources), help="haystack text sources")
    parser.add_argument("--samples", type=int, help=f"samples per (task, source, length) (default {d.samples})")
    parser.add_argument(
        "--greedy-lengths",
        nargs="*",
        type=int,
        help="greedy passkey accuracy at these lengths (default: where the dense scan reaches 0.8)",
    )
    parser.add_argument("--greedy-samples", type=int, default=d.greedy_samples, help="samples per greedy length")
    parser.add_argument(
        "--no-uniform-ablation",
        action="store_true",
        help="skip the heuristics at uniform counts where LeanK's counts are the budget",
    )
    parser.add_argument("--tiny", action="store_true", help="a grid of a few samples (a smoke test)")
    parser.add_argument(
        "--windows-grid",
        action="store_true",
        help="the window x length x ratio grid: windows 16/64, 64/256 and 128/768 (each with its own masks), "
        "2K/4K/8K tokens, ratios 0.5-0.8, LeanK and every heuristic, 32 samples; writes eval_w<sink>-<recent> "
        "files and eval_windows.json (with --tiny: small windows, 256 tokens, r=0.7, one sample per task)",
    )
    parser.add_argument(
        "--window",
        nargs="+",
        metavar="SINK/RECENT/BLOCK",
        help="with --windows-grid: only these windows, e.g. 128/768/128 (the others' entries in eval_windows.json "
        "are kept, so the windows can run one call each)",
    )
    parser.add_argument(
        "--merge-from",
        metavar="DIR",
        help="with --windows-grid: instead of running, join each window's run in DIR (same grid, other lengths) with "
        "the one in --out, and update eval_windows.json there",
    )
    parser.add_argument(
        "--scan",
        nargs="*",
        type=int,
        metavar="LENGTH",
        help="instead of the grid: dense passkey accuracy at these lengths (default 256 ... 2048)",
    )
    parser.add_argument("--scan-samples", type=int, default=30, help="samples per length of --scan")
    parser.add_argument("--masks-dir", help="folder of the learned masks and factors (default: the shipped masks)")
    parser.add_argument("--out", default="results", help="output folder (default: results/ of the working directory)")
    parser.add_argument(
        "--name",
        help="file stem: <name>.json, <name>_samples.csv, <name>_summary.csv (default eval; with --scan: "
        "passkey_dense_scan, the file the grid reads its greedy lengths from)",
    )
    parser.add_argument(
        "--model", help="local Llama/Qwen2 checkpoint folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes of one thread each sharing the samples (2 on a 2-core machine: fastest)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads of a single process (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (e.g. cuda)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def grid_from_args(args, out: Path) -> EvalGrid:
    """The grid the options ask for: ``--tiny``'s small grid, or the full one with the options applied."""
    from leank_ref.evaluate.grid import tiny_grid
    from leank_ref.evaluate.scan import SCAN_FILE, accuracy_lengths

    overrides = dict(tasks=tuple(args.task), uniform_ablation=not args.no_uniform_ablation)
    for key, value in (("methods", args.method), ("ratios", args.ratio), ("samples", args.samples)):
        if value is not None:
            overrides[key] = tuple(value) if isinstance(value, list) else value
    if args.greedy_lengths is not None:
        overrides["greedy_lengths"] = tuple(args.greedy_lengths)
    if args.tiny:
        return tiny_grid(**overrides)
    if args.greedy_lengths is None:  # the dense scan of the output folder
        overrides["greedy_lengths"] = accuracy_lengths(out / SCAN_FILE)
    if args.lengths:
        overrides["lengths"] = tuple(args.lengths)
    return EvalGrid(**overrides, sources=tuple(args.source), greedy_samples=args.greedy_samples)


def windows_grids_from_args(args) -> list[EvalGrid]:
    """The window x length x ratio grids the options ask for (:func:`leank_ref.evaluate.windows_grid.windows_grid`)."""
    from leank_ref.evaluate.windows_grid import windows_grid

    overrides = dict(tasks=tuple(args.task))
    if not args.tiny or args.source != list(SOURCES):
        overrides["sources"] = tuple(args.source)
    for key, value in (("methods", args.method), ("ratios", args.ratio), ("lengths", args.lengths)):
        if value is not None:
            overrides[key] = tuple(value)
    from leank_ref.windows import Windows

    windows = None
    if args.window:
        try:
            windows = tuple(Windows(*(int(x) for x in w.split("/"))) for w in args.window)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--window takes SINK/RECENT/BLOCK, e.g. 128/768/128; got {args.window}: {e}") from e
    return windows_grid(args.tiny, args.samples, windows, **overrides)


def print_windows_summary(summary: dict) -> None:
    """Per window: missing masks (with their commands), the headline, and LeanK's paired differences at r=0.7."""
    for entry in summary["windows"]:
        w = entry["windows"]
        label = f"sink {w['sink']} / recent {w['recent']} / block {w['block']}"
        if entry["missing_masks"]:
            print(f"{label}: missing masks {', '.join(entry['missing_masks']['files'])}; make them with:")
            for command in entry["missing_masks"]["commands"]:
                print(f"  {command}")
        for source, methods in entry["headline"].items():
            held = ", ".join(f"{m} r={rec['ratio']}" for m, rec in methods.items())
            print(f"{label} {source}: holds dense up to {held}")
        for source, paired in entry["paired"].items():
            if "missing" in paired:
                print(f"{label} {source} at {entry['paired_length']} tokens: {paired['missing']}")
                continue
            for against, key in (("dense", "vs_dense"), (paired["best_heuristic"], "vs_best_heuristic")):
                for name, c in paired[key].items():
                    print(
                        f"{label} {source} {entry['paired_length']} tokens: LeanK - {against} {name} "
                        f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] {c['verdict']}"
                    )


def print_report(report: dict) -> None:
    """What is pending, every comparison against dense, and the headline per text."""
    for line in report["pending"]:
        print(f"pending: {line}")
    for c in report["comparisons"]:
        if c["b"] == "dense" and c["metric"] in ("ll", "kl", "correct"):
            print(
                f"{c['task']:>14} {c['source']:>6} {c['a']:<28} {c['metric']:>7} vs dense "
                f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] n={c['n']} {c['verdict']}"
            )
    for source, methods in report["headline"].items():
        for method, rec in methods.items():
            print(f"headline {source:>6} {method:<14} holds up to r={rec['ratio']}")


def run_command(args) -> int:
    """Run ``evaluate`` (or its dense scan) and print the comparisons; return the exit code."""
    import torch

    from leank_ref.evaluate.run import run_evaluation
    from leank_ref.evaluate.scan import SCAN_FILE, SCAN_LENGTHS, run_scan
    from leank_ref.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.merge_from:
        from leank_ref.evaluate.windows_grid import SUMMARY_FILE, merge_window_runs

        if not args.windows_grid:
            raise SystemExit("--merge-from joins window-grid runs: add --windows-grid")
        print_windows_summary(merge_window_runs(out, args.merge_from, args.masks_dir))
        print(f"merged the runs of {args.merge_from} into {out}/{SUMMARY_FILE} and its window files")
        return 0
    model, tokenizer = load_model(args.model, device=args.device)
    if args.scan is not None:
        name = args.name or Path(SCAN_FILE).stem
        report = run_scan(
            model, tokenizer, tuple(args.scan) or SCAN_LENGTHS, args.scan_samples, out, name, not args.no_progress
        )
        for s in report["summary"]:
            print(
                f"length {s['length']:>5}: dense passkey {s['accuracy']:.2f} "
                f"[{s['acc_low']:.2f}, {s['acc_high']:.2f}] (n={s['n']})"
            )
        return 0
    if args.windows_grid:
        from leank_ref.evaluate.windows_grid import SUMMARY_FILE, run_windows_grid

        grids = windows_grids_from_args(args)
        summary = run_windows_grid(
            model, tokenizer, grids, out, args.masks_dir, not args.no_progress, args.workers, args.model
        )
        print_windows_summary(summary)
        print(f"wrote {out}/{SUMMARY_FILE} and one file set per window")
        return 0
    grid = grid_from_args(args, out)
    name = args.name or "eval"
    report = run_evaluation(
        model,
        tokenizer,
        grid,
        out,
        name,
        args.masks_dir,
        progress=not args.no_progress,
        workers=args.workers,
        model_path=args.model,
    )
    print_report(report)
    print(f"wrote {out}/{name}.json ({report['runtime_s']:.0f} s wall, {args.workers} worker(s))")
    return 0
