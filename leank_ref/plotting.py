"""One figure style for every notebook, and the single place figures are written (``figures/`` of the checkout).

Imported inside a Jupyter kernel, this module switches matplotlib to the inline backend, so every figure shows
in the notebook's saved outputs even when the environment sets ``MPLBACKEND=Agg`` (CI does, and a kernel
inherits it): a chapter opened on a code host shows its figures without being re-run.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

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


CURVE_LABELS = {  # readable names of the per-step fields of a training log (.log.jsonl)
    "distill_loss": "distillation loss (hidden-state MSE)",
    "reg_loss": "mean factor (L1 term before lambda)",
    "loss": "total loss",
    "mean_factor": "mean factor",
    "share_below_0.1": "share of factors < 0.1",
    "lr": "learning rate",
    "mask_changes": "mask entries changed",
    "pruned_ratio": "pruned share of K channels",
    "seconds": "seconds per step",
}


def training_curves(axes, records: list[dict], keys: tuple[str, ...], title: str = "") -> None:
    """One panel per key of a training log (the ``.log.jsonl`` records ``python -m leank_ref train`` writes),
    titled ``title`` + the key's readable name (:data:`CURVE_LABELS`), which also labels the y axis.

    Each step of a run trains on a new example, so a per-step loss moves with the example as well as the factors.
    """
    steps = [r["step"] for r in records]
    for ax, key in zip(axes, keys):
        label = CURVE_LABELS.get(key, key)
        ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 50 else None)
        ax.set(xlabel="step", ylabel=label, title=f"{title}{label}")


def moving_average(values, window: int = 20) -> torch.Tensor:
    """Trailing mean over the last ``window`` values (fewer at the start), as a float64 tensor of the same length.

    Training logs draw a new example every step, so their raw per-step losses are noisy; plot this instead.
    """
    x = torch.as_tensor(values, dtype=torch.float64)
    total = torch.cat([torch.zeros(1, dtype=x.dtype), x.cumsum(0)])
    end = torch.arange(1, len(x) + 1)
    start = (end - window).clamp(min=0)
    return (total[end] - total[start]) / (end - start)


def draw_cache_layer(ax, layer, what: str, kept: list[int]) -> None:
    """Draw what one LeanK cache layer stores, K or V (``what``): one lane per KV head, as tall as the channels
    stored, token position across; dashed, what a dense cache stores. ``kept``: the layer's kept count per head."""
    from matplotlib.patches import Rectangle

    g, n_full, d = layer.keys.shape[1], layer.keys.shape[2], layer.keys.shape[3]
    n_mid, sink = layer.middle, min(layer.sink, layer.length)
    width = dict.fromkeys(range(g), 0)  # channels stored per middle token, per head
    for grp in layer.groups:
        for h in grp.kv_heads.tolist():
            width[h] = grp.k.shape[-1] if what == "K" else grp.v.shape[-1]
    for h in range(g):
        y = (g - 1 - h) * (d + 12)
        ax.add_patch(Rectangle((0, y), layer.length, d, fill=False, ls="--", lw=0.8, ec="gray"))
        ax.add_patch(Rectangle((0, y), sink, d, color="tab:blue"))
        ax.add_patch(Rectangle((sink + n_mid, y), n_full - sink, d, color="tab:blue"))
        if width[h]:
            ax.add_patch(Rectangle((sink, y), n_mid, width[h], color="tab:orange"))
        label = f"head {h}: keeps {int(kept[h])} K ch." if what == "K" else f"head {h}"
        if not width[h]:
            label += ", middle dropped"
        ax.text(sink + n_mid / 2, y + 0.8 * d, label, ha="center", va="center", fontsize=8)
    ax.set(xlim=(-5, layer.length + 5), ylim=(-6, g * (d + 12)), yticks=[], xlabel="token position")
    ax.set_title(f"{what} cache, layer {layer.layer_idx} ({layer.length} tokens)")
