"""The checkout a repository tool reads (scorecard, benchmark figures, committed results), found from the working
directory, never from where the package is installed: an installed wheel has no results or benchmarks of its own.
"""

from __future__ import annotations

from pathlib import Path


def find_checkout(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding a ``pyproject.toml``, so
    that a notebook running in ``notebooks/`` finds the checkout above it; ``start`` itself when none does."""
    here = Path.cwd() if start is None else Path(start)
    here = here.resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here
