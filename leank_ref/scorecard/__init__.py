"""The paper's headline claims beside this project's measured numbers, read from a checkout's result files.

Zhang et al. (EMNLP 2025, arXiv 2508.02215) claim in their abstract: up to 70% of the K cache and 16-18% of the V
cache saved, a 1.3x faster attention kernel, a 1.45x faster decoding step, and no loss of accuracy. Each row of
the scorecard puts one claim beside our number for the same quantity, the file (and entry) it comes from, and a
verdict by a rule stated in the row. Nothing is typed by hand: ``python -m leank_ref scorecard`` prints the table
and ``--write README.md`` refreshes the copy in the README (a test checks that copy is current).

Modules: ``rules`` (a row, and the verdict rules), ``rows`` (the rows of each claim, from the result files),
``table`` (the whole scorecard as Markdown), ``cli`` (the ``scorecard`` command).
"""
