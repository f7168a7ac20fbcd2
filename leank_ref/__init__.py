"""leank_ref: a notebook-first reference implementation of LeanK (Zhang et al., EMNLP 2025)."""

__version__ = "0.1.0"
