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
