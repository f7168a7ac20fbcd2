"""Channel masks: alignment-aware binarization, validation, the authors' on-disk format, statistics.

A mask is a float32 tensor [L, G, D] of 0.0/1.0 (1 = keep that K channel for middle tokens), saved with
``torch.save`` exactly like the authors' released masks (``masks/reference/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def check_ratio(ratio: float) -> None:
    """Raise unless 0 < ratio < 1 (the fraction of K channels pruned)."""
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio={ratio} must lie strictly between 0 and 1 (the fraction of K channels to prune).")


def check_align(align: int, head_dim: int) -> None:
    """Raise unless ``align`` is a positive divisor of ``head_dim``."""
    if align < 1 or head_dim % align != 0:
        divisors = [a for a in range(1, head_dim + 1) if head_dim % a == 0]
        raise ValueError(f"align={align} must divide head_dim={head_dim}; choose one of {divisors}.")


def check_shape(tensor: torch.Tensor, shape: tuple[int, int, int] | None, what: str = "mask") -> None:
    """Raise unless ``tensor`` is 3-D [L, G, D] and, if given, exactly ``shape`` (the model's)."""
    if tensor.ndim != 3:
        raise ValueError(
            f"{what} must be [layers, kv_heads, head_dim]; got a {tensor.ndim}-D tensor {list(tensor.shape)}."
        )
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{what} has shape {list(tensor.shape)} but the model needs {list(shape)} "
            "([layers, kv_heads, head_dim]); was it made for another model?"
        )


def check_finite(tensor: torch.Tensor, what: str = "factors") -> None:
    """Raise unless every entry of ``tensor`` is finite (a NaN would otherwise rank silently as a kept channel)."""
    bad = ~torch.isfinite(tensor.detach().float())
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"{what} hold {int(bad.sum())} NaN/inf values (first at index {where}); a diverged training run? "
            f"Retrain, or replace them (e.g. torch.nan_to_num({what}, nan=0.0)) before using them."
        )


def top_count_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[..., D] 0/1 float mask: each head's top-``counts[...]`` channels by ``scores`` (ties: lower channel index).

    The one ranking rule of the project: binarization, every baseline selector and the top-channel sets of
    notebook 01 all keep a head's highest-scoring channels this way.
    """
    check_finite(scores, "scores")
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices  # [..., D]
    rank = torch.argsort(order, dim=-1)  # rank of each channel within its head
    return (rank < torch.as_tensor(counts)[..., None]).float()


def binarize(factors: torch.Tensor, ratio: float, align: int) -> torch.Tensor:
    """Alignment-aware binarization of factors [L, G, D] into a 0/1 float32 mask (the authors' ``sparsify``).

    Threshold = the ``ratio``-quantile of all factors; each head keeps the count of its factors >= threshold,
    rounded to the nearest multiple of ``align`` (halves up), taking its largest factors (ties: lower index).
    """
    check_ratio(ratio)
    check_shape(factors, None, "factors")
    _, _, d = factors.shape
    check_align(align, d)
    f = factors.detach().float().cpu()
    check_finite(f, "factors")
    threshold = torch.quantile(f.flatten(), float(ratio))
    counts = (f >= threshold).sum(-1)  # [L, G]
    counts = torch.div(counts + align // 2, align, rounding_mode="floor") * align
    return top_count_mask(f, counts)


def kv_pruned_ratio(mask: torch.Tensor) -> float:
    """Share of the middle tokens' K + V values a mask prunes: per head, ``kept`` K channels plus ``D`` V values if
    it keeps any (an empty head stores no middle V, :func:`zero_head_rule`), against ``2 * D`` for a dense head."""
    counts = kept_counts(mask)
    d = mask.shape[-1]
    stored = counts.sum() + d * (counts > 0).sum()
    return 1.0 - float(stored) / (2 * d * counts.numel())


def binarize_kv(factors: torch.Tensor, ratio: float, align: int) -> torch.Tensor:
    """Binarize factors [L, G, D] under a budget in K *and* V bytes: prune ``ratio`` of the middle's K + V values.

    A head keeping ``c`` channels (a multiple of ``align``) stores ``c`` K values per middle token, plus ``D`` V
    values if ``c > 0`` (:func:`kv_pruned_ratio`). Every head takes the count that maximises (sum of its top ``c``
    factors) - lambda * (its values stored), and lambda is the smallest that meets the budget (bisection): the
    quantile rule of :func:`binarize`, with each head's first block also paying for its V. Each head keeps its
    largest factors (ties: lower index).
    """
    check_ratio(ratio)
    check_shape(factors, None, "factors")
    layers, heads, d = factors.shape
    check_align(align, d)
    f = factors.detach().float().cpu()
    check_finite(f, "factors")
    options = torch.arange(0, d + 1, align)  # candidate counts [K]
    top_sums = f.sort(-1, descending=True).values.cumsum(-1)  # [L, G, D]
    value = torch.cat([torch.zeros(layers, heads, 1), top_sums[..., options[1:] - 1]], dim=-1)  # [L, G, K]
    stored = (options + d * (options > 0)).float()  # [K]
    budget = (1.0 - float(ratio)) * 2 * d * layers * heads

    def choice(lam: float) -> torch.Tensor:  # [L, G] index into options; ties -> the smaller count
        return (value - lam * stored).argmax(-1)

    low, high = 0.0, float(f.max()) + 1.0  # at `high` every head stores nothing
    for _ in range(64):
        mid = (low + high) / 2
        low, high = (low, mid) if float(stored[choice(mid)].sum()) <= budget else (mid, high)
    return top_count_mask(f, options[choice(high)])


def kept_counts(mask: torch.Tensor) -> torch.Tensor:
    """Int [L, G]: kept channels per (layer, KV head)."""
    return mask.sum(-1).round().long()


def validate_mask(
    mask: torch.Tensor, shape: tuple[int, int, int] | None = None, align: int | None = None
) -> torch.Tensor:
    """Check a mask (3-D, the model's shape, only 0/1, counts multiples of ``align``); return it as float32."""
    check_shape(mask, shape)
    if not mask.is_floating_point() and mask.dtype != torch.bool:
        mask = mask.float()
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise ValueError(
            f"mask holds {int((~torch.isfinite(mask)).sum())} NaN/inf values; a mask is 0/1 only: "
            "binarize finite factors (masks.binarize) or rebuild the file."
        )
    values = torch.unique(mask.float())
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError(f"mask must hold only 0 and 1; found values {values[:8].tolist()}. Binarize factors first.")
    mask = mask.float()
    if align is not None:
        check_align(align, mask.shape[-1])
        counts = kept_counts(mask)
        bad = (counts % align != 0).nonzero().tolist()
        if bad:
            l, g = bad[0]
            raise ValueError(
                f"{len(bad)} heads keep a count that is not a multiple of align={align} "
                f"(e.g. layer {l} head {g} keeps {int(counts[l, g])}); binarize with align={align}."
            )
    return mask


def save_mask(mask: torch.Tensor, path: str | os.PathLike) -> None:
    """Save a validated mask in the authors' format (float32 [L, G, D], ``torch.save``)."""
    mask = validate_mask(mask)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(mask.contiguous().cpu(), path)


def load_mask(
    path: str | os.PathLike, shape: tuple[int, int, int] | None = None, align: int | None = None
) -> torch.Tensor:
    """Load a mask saved in the authors' format (``weights_only=True``) and validate it."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a [L, G, D] tensor.")
    return validate_mask(obj, shape, align)


def zero_head_rule(mask: torch.Tensor, deployed: bool = True) -> torch.Tensor:
    """Bool [..., G]: heads whose middle tokens are *excluded* (logit -inf), given a 0/1 mask [..., G, D].

    Deployed meaning (this project's evaluation and cache): a head with zero kept channels stores no
    middle K or V, so its middle tokens are skipped. The authors' training simulation instead lets them
    through with logit 0; ``deployed=False`` gives that (no head excluded).
    """
    kept = mask.sum(-1)
    return kept == 0 if deployed else torch.zeros_like(kept, dtype=torch.bool)
