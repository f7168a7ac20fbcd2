"""The compact middle-store layout shared by the LeanK cache, its torch decode path and the Triton kernel.

Kept in a module of its own (torch only) so the torch path never needs Triton (an optional dependency).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MiddleGroup:
    """The middle tokens of the KV heads that keep the same number c of key channels."""

    kv_heads: torch.Tensor  # int64 [Gc]: KV-head indices (in 0..G-1) whose kept count is c
    channels: torch.Tensor  # int64 [Gc, c]: each head's kept channel indices (original order, post-RoPE)
    k: torch.Tensor  # [B, Gc, Nm, c]: middle keys, only the kept channels
    v: torch.Tensor  # [B, Gc, Nm, D]: middle values (full width)


MIN_KEPT = 16  # kept counts of a middle group are multiples of this: the Triton kernel's tl.dot needs >= 16 channels


def check_windows(sink: int, recent: int, block: int = 1) -> None:
    """Raise unless sink >= 0, recent >= 1 (a query always sees itself) and block >= 1 (tokens compacted at a time)."""
    if sink < 0 or recent < 1 or block < 1:
        raise ValueError(
            f"sink={sink}, recent={recent}, block={block}: need sink >= 0, recent >= 1 (the query's own token is "
            "recent) and block >= 1 (tokens compacted at a time); SmolLM2 defaults are sink=16, recent=64, block=32."
        )


def group_heads(layer_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group one layer's KV heads by kept count: ``[(kv_heads [Gc], channels [Gc, c]), ...]``, c ascending.

    ``layer_mask`` [G, D] is 0/1 (or bool). Heads that keep no channel get no group: they store no middle K or V
    (the deployed meaning). Index tensors are int64 on the mask's device, channels in their original order.
    """
    keep = layer_mask > 0
    counts = keep.sum(-1)  # [G]
    groups = []
    for c in sorted(set(counts.tolist()) - {0}):
        heads = torch.nonzero(counts == c).flatten()  # [Gc]
        groups.append((heads, torch.nonzero(keep[heads])[:, 1].view(len(heads), c)))
    return groups
