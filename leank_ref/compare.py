"""Compare two channel masks of one model, e.g. a mask you trained with the authors' released one.

Per (layer, KV head): the Jaccard overlap of the kept-channel sets (|A and B| / |A or B|; 1 where both heads are
empty) and the kept counts of each. A summary reads them against *chance*: the overlap two masks with the same
per-head counts would have if each head's channels were drawn at random (expected intersection ``a * b / D``
per head), so "0.4" can be told apart from what any two masks of those counts share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leank_ref.masks import kept_counts, validate_mask


@dataclass(frozen=True)
class MaskComparison:
    """Per-head overlap and counts of ``mask`` against ``reference`` (both [L, G, D] 0/1)."""

    jaccard: torch.Tensor  # float [L, G]: |A and B| / |A or B| per head (1.0 where both keep nothing)
    chance_jaccard: torch.Tensor  # float [L, G]: random channels at these counts, E[|A and B|] / E[|A or B|]
    intersection: torch.Tensor  # int [L, G]: channels kept by both
    counts: torch.Tensor  # int [L, G]: kept by ``mask``
    reference_counts: torch.Tensor  # int [L, G]: kept by ``reference``
    head_dim: int

    @property
    def count_difference(self) -> torch.Tensor:
        """Int [L, G]: ``counts - reference_counts`` (positive: the mask keeps more in that head)."""
        return self.counts - self.reference_counts

    def summary(self) -> dict:
        """Means over heads and the totals, as plain numbers (for printing or a JSON file)."""
        a, b, d = self.counts, self.reference_counts, self.count_difference
        both = int(self.intersection.sum())
        union = int(a.sum() + b.sum()) - both
        return {
            "heads": int(a.numel()),
            "mean_jaccard": float(self.jaccard.mean()),
            "mean_chance_jaccard": float(self.chance_jaccard.mean()),
            "channel_jaccard": both / union if union else 1.0,  # all kept (layer, head, channel) at once
            "kept_share": float(a.sum()) / (a.numel() * self.head_dim),
            "reference_kept_share": float(b.sum()) / (b.numel() * self.head_dim),
            "same_count_heads": int((d == 0).sum()),
            "mean_abs_count_difference": float(d.abs().float().mean()),
            "empty_heads": int((a == 0).sum()),
            "reference_empty_heads": int((b == 0).sum()),
            "empty_in_both": int(((a == 0) & (b == 0)).sum()),
        }


def compare_masks(mask: torch.Tensor, reference: torch.Tensor) -> MaskComparison:
    """Per-head overlap of ``mask``'s kept channels with ``reference``'s (same model shape [L, G, D], 0/1)."""
    mask, reference = validate_mask(mask), validate_mask(reference)
    if mask.shape != reference.shape:
        raise ValueError(
            f"masks of different shapes {list(mask.shape)} and {list(reference.shape)}: compare masks of one "
            "model ([layers, kv_heads, head_dim]); the authors' released masks are for Llama-3.1-8B-Instruct "
            "[32, 8, 128] and Qwen2.5-7B-Instruct [28, 4, 128]."
        )
    d = mask.shape[-1]
    a, b = kept_counts(mask), kept_counts(reference)
    inter = ((mask > 0) & (reference > 0)).sum(-1)
    union = a + b - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32))
    expected = a * b / d  # expected intersection of random channel sets of these sizes
    chance = torch.where(union > 0, expected / (a + b - expected).clamp(min=1e-9), torch.ones_like(expected))
    return MaskComparison(jaccard.float(), chance.float(), inter, a, b, d)
