"""One figure style for every notebook, and the single place figures are written (``figures/`` of the checkout).

Imported inside a Jupyter kernel, this module switches matplotlib to the inline backend, so every figure shows
in the notebook's saved outputs even when the environment sets ``MPLBACKEND=Agg`` (CI does, and a kernel
inherits it): a chapter opened on a code host shows its figures without being re-run.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 10,
}


def in_notebook_kernel() -> bool:
    """True when running inside a Jupyter kernel (not a terminal IPython, not a plain script or pytest)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def use_inline_backend() -> bool:
    """Show figures inline when inside a Jupyter kernel, whatever ``MPLBACKEND`` says; True if it switched."""
    if not in_notebook_kernel():
        return False
    from IPython import get_ipython

    get_ipython().run_line_magic("matplotlib", "inline")
    return True


use_inline_backend()
plt.rcParams.update(STYLE)  # after the backend switch, which may set rcParams of its own


def is_fast() -> bool:
    """True in CI's fast mode (``LEANK_FAST=1``): shorter inputs, fewer steps."""
    return os.environ.get("LEANK_FAST", "0") not in ("", "0", "false", "False")


def figures_dir() -> Path:
    """``$LEANK_FIGURES`` when set, else ``figures/`` of the checkout at or above the working directory
    (:func:`leank_ref.checkout.find_checkout`; the working directory itself outside a checkout)."""
    from leank_ref.checkout import find_checkout

    return Path(os.environ.get("LEANK_FIGURES") or find_checkout() / "figures")


def save_figure(fig, name: str) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` (name like ``01_importance_heatmap``) and return the path."""
    if not name[:2].isdigit():
        raise ValueError(f"figure name '{name}' should start with its notebook number, e.g. '01_{name}'.")
    path = figures_dir() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def head_heatmap(ax, values, title: str, label: str, **imshow_kwargs):
    """Draw a per-(layer, KV head) quantity ``values`` [L, G] as a heatmap, heads across, layers down."""
    im = ax.imshow(values, aspect="auto", interpolation="nearest", **imshow_kwargs)
    ax.set(xlabel="KV head", ylabel="layer", title=title, xticks=range(len(values[0])))
    ax.grid(False)
    ax.figure.colorbar(im, ax=ax, label=label)
    return im


def training_curves(axes, records: list[dict], keys: tuple[str, ...], title: str = "") -> None:
    """One panel per key of a training log (the ``.log.jsonl`` records ``python -m leank_ref train`` writes)."""
    steps = [r["step"] for r in records]
    for ax, key in zip(axes, keys):
        ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 50 else None)
        ax.set(xlabel="step", title=f"{title}{key}")
