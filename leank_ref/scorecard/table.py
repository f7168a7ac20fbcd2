"""The whole scorecard, in the order of the paper's abstract, as rows or as the Markdown table the README holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from leank_ref.checkout import find_checkout
from leank_ref.scorecard.rows import accuracy_rows, decoding_rows, kernel_rows, memory_rows
from leank_ref.scorecard.rules import RULES, Row, Rules

BEGIN, END = "<!-- scorecard:begin -->", "<!-- scorecard:end -->"
SECTIONS: tuple[Callable[[Path, Rules], list[Row]], ...] = (memory_rows, kernel_rows, decoding_rows, accuracy_rows)


def scorecard(root: str | Path | None = None, rules: Rules = RULES) -> list[Row]:
    """Every row, from the result files under ``root`` (default: the checkout at or above the working directory,
    :func:`leank_ref.checkout.find_checkout`), judged by ``rules``."""
    root = find_checkout() if root is None else Path(root)
    return [row for section in SECTIONS for row in section(root, rules)]


def scorecard_markdown(root: str | Path | None = None, rules: Rules = RULES) -> str:
    """The scorecard as a Markdown table."""
    lines = [
        "| Claim (paper's abstract) | Paper | Ours | Setting | Source | Reproduces? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in scorecard(root, rules):
        cells = (r.claim, r.paper, r.ours, r.setting, f"`{r.source}`", r.verdict)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    """``text`` with the part between the scorecard markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the file has no scorecard block: add a line '{BEGIN}' and a line '{END}' where it goes.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"
