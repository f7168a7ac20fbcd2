"""The command line: ``python -m leank_ref <command> ...`` (``leank-ref`` once installed).

Each command's options and entry point live in a module of their own, above the code they drive; that module
defines ``add_arguments(parser)`` and ``run_command(args) -> int``. This dispatcher only names them: it imports the
one module of the command asked for, so ``--help`` and every command start without loading the others (or torch).
Adding a command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {  # command -> (module with add_arguments and run_command, one-line summary)
    "train": ("leank_ref.train.cli", "Train stage 1 (channel factors) or stage 2 (a binary mask) on the model."),
    "evaluate": (
        "leank_ref.evaluate.cli",
        "Every channel selector at every pruning ratio, paired against dense, on held-in and held-out text.",
    ),
    "scorecard": (
        "leank_ref.scorecard.cli",
        "The paper's claims beside the numbers measured here, read from a checkout's result files.",
    ),
}


def command_module(name: str):
    """Import the module of command ``name`` (see ``COMMANDS``)."""
    return importlib.import_module(COMMANDS[name][0])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser, one subparser per command; only ``command``'s options are loaded (its module imported)."""
    parser = argparse.ArgumentParser(prog="python -m leank_ref", description="LeanK reference implementation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        subparser = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            module = command_module(name)
            module.add_arguments(subparser)
            subparser.set_defaults(run=module.run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments) and run the chosen command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
