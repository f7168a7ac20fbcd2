"""The command line: ``python -m leank_ref <command> ...`` (``leank-ref`` once installed).

Each command lives in the module that does the work; that module defines ``add_arguments(parser)`` and
``run_command(args) -> int``. Adding a command is an import and one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from leank_ref import evaluation, scorecard
from leank_ref.train import cli as train_cli

COMMANDS: dict[str, ModuleType] = {  # command -> module defining add_arguments(parser) and run_command(args)
    "train": train_cli,
    "evaluate": evaluation,
    "scorecard": scorecard,
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m leank_ref", description="LeanK reference implementation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        summary = (module.run_command.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(command)
        command.set_defaults(run=module.run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments) and run the chosen command."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
