"""leank_ref: a notebook-first reference implementation of LeanK (Zhang et al., EMNLP 2025).

The names of the quick start are importable from here (loaded on first use, so ``import leank_ref.kernels``
stays light): ``load_model``, ``shipped_mask``, ``apply_leank``, ``LeanKPress``, ``LeanKCache``, ``Windows``.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models",
    "shipped_mask": "models",
    "masks_dir": "models",
    "apply_leank": "cache",
    "LeanKCache": "cache",
    "LeanKPress": "cache",
    "Windows": "windows",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
