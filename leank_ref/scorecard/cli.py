"""The ``scorecard`` command: ``python -m leank_ref scorecard [--root DIR] [--write FILE | --check FILE]``."""

from __future__ import annotations

from pathlib import Path

from leank_ref.scorecard.table import replace_block, scorecard_markdown


def add_arguments(parser) -> None:
    """The ``scorecard`` options."""
    parser.add_argument(
        "--root",
        help="checkout holding masks/, results/ and benchmarks/results/ (default: the nearest folder at or above "
        "the working directory that holds a pyproject.toml)",
    )
    parser.add_argument("--write", metavar="FILE", help="refresh the table between the scorecard markers of FILE")
    parser.add_argument("--check", metavar="FILE", help="exit 1 if FILE's scorecard table is not the current one")


def run_command(args) -> int:
    """Print the scorecard built from the result files (or refresh or check a file's copy); return the exit code."""
    table = scorecard_markdown(args.root)
    for path in filter(None, (args.write, args.check)):
        text = Path(path).read_text()
        updated = replace_block(text, table)
        if args.check and updated != text:
            print(f"{path}: the scorecard table is out of date; run python -m leank_ref scorecard --write {path}")
            return 1
        if args.write and updated != text:
            Path(path).write_text(updated)
            print(f"wrote the scorecard into {path}")
    if not (args.write or args.check):
        print(table)
    return 0
