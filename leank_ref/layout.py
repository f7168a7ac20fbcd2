"""The compact middle-store layout shared by the LeanK cache, its torch decode path and the Triton kernel.

Kept in a module of its own (torch only) so the torch path never needs Triton (an optional dependency).

Two objects describe one layer:

* :class:`HeadGroups`, built **once** from the layer's 0/1 mask (or from explicit index lists, which it
  validates on the host): which KV heads keep how many key channels, and which ones. Heads that keep the
  same count ``c > 0`` form a group; heads that keep none store no middle tokens at all.
* :class:`MiddleGroup`, the stored middle tokens of one group (the cache's views of its buffers).

Both the cache and the kernels take their grouping from :meth:`HeadGroups.from_mask`, so there is one
definition of "group" in the project, and :meth:`HeadGroups.validate` is its one check. :func:`gather_kept` is the
one gather into the compact layout; :func:`leank_layout_from_dense` applies it to a whole dense cache layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .windows import Windows


@dataclass
class MiddleGroup:
    """The middle tokens of the KV heads that keep the same number c of key channels."""

    kv_heads: torch.Tensor  # int64 [Gc]: KV-head indices (in 0..G-1) whose kept count is c
    channels: torch.Tensor  # int64 [Gc, c]: each head's kept channel indices (original order, post-RoPE)
    k: torch.Tensor  # [B, Gc, Nm, c]: middle keys, only the kept channels
    v: torch.Tensor  # [B, Gc, Nm, D]: middle values (full width)


@dataclass(frozen=True)
class HeadGroups:
    """One layer's KV heads grouped by kept count ``c > 0``: heads ``[Gc]`` and kept channels ``[Gc, c]`` per group.

    The tensors are int64 on the CPU and already validated (every index in range, no head in two groups, no
    channel twice in a head), so whoever moves them to a device once can use them without further checks.
    Groups are in increasing ``c``; within a group, heads in increasing index.
    """

    kv_heads: tuple[torch.Tensor, ...]
    channels: tuple[torch.Tensor, ...]
    num_kv_heads: int
    head_dim: int

    @property
    def counts(self) -> list[int]:
        """The kept count ``c`` of each group."""
        return [int(ch.shape[1]) for ch in self.channels]

    @property
    def middle_heads(self) -> int:
        """KV heads that store middle tokens (the sum of the group sizes)."""
        return sum(int(h.numel()) for h in self.kv_heads)

    @classmethod
    def from_mask(cls, layer_mask: torch.Tensor) -> HeadGroups:
        """Group the heads of a 0/1 (or bool) layer mask ``[G, D]``; heads that keep no channel get no group."""
        if layer_mask.dim() != 2:
            raise ValueError(f"a layer mask is [G, D] (KV heads x head_dim), got shape {list(layer_mask.shape)}")
        keep = layer_mask.detach().cpu() > 0
        counts = keep.sum(dim=1)
        heads, channels = [], []
        for c in sorted({int(n) for n in counts if n > 0}):
            idx = torch.nonzero(counts == c).flatten()  # [Gc]
            heads.append(idx)
            channels.append(torch.stack([torch.nonzero(keep[g]).flatten() for g in idx.tolist()]))
        return cls(tuple(heads), tuple(channels), keep.shape[0], keep.shape[1])

    @classmethod
    def from_indices(
        cls,
        kv_heads: Sequence[torch.Tensor],
        channels: Sequence[torch.Tensor],
        num_kv_heads: int,
        head_dim: int,
    ) -> HeadGroups:
        """Groups from explicit index tensors (any device, any order); raise ``ValueError`` on an invalid layout."""
        if len(kv_heads) != len(channels):
            raise ValueError(f"{len(kv_heads)} kv_heads tensors but {len(channels)} channels tensors: one per group")
        heads_cpu = tuple(torch.as_tensor(h).detach().cpu().long() for h in kv_heads)
        channels_cpu = tuple(torch.as_tensor(c).detach().cpu().long() for c in channels)
        groups = cls(heads_cpu, channels_cpu, num_kv_heads, head_dim)
        groups.validate()
        return groups

    def validate(self) -> None:
        """Raise ``ValueError`` unless every group is well formed and keeps channels, and no index is out of range
        or repeated: the one check of a layer's head grouping (the cache, the torch path and the kernels rely on it).
        """
        listed = sum(int(h.numel()) for h in self.kv_heads)
        if listed > self.num_kv_heads:
            raise ValueError(
                f"the groups list {listed} KV heads but there are only G={self.num_kv_heads}: each head belongs to "
                "one group"
            )
        if len(self.kv_heads) != len(self.channels):
            raise ValueError(f"{len(self.kv_heads)} kv_heads tensors but {len(self.channels)} channels tensors")
        seen: set[int] = set()
        for i, (h, ch) in enumerate(zip(self.kv_heads, self.channels)):
            if h.dim() != 1 or ch.dim() != 2 or ch.shape[0] != h.shape[0]:
                raise ValueError(
                    f"groups[{i}]: kv_heads must be [Gc] and channels [Gc, c], got {list(h.shape)} and {list(ch.shape)}"
                )
            if ch.shape[1] == 0:
                raise ValueError(
                    f"groups[{i}] keeps 0 channels: leave those heads out of groups (their middle is excluded)"
                )
            heads = h.tolist()
            bad = [x for x in heads if not 0 <= x < self.num_kv_heads]
            if bad:
                raise ValueError(f"groups[{i}].kv_heads {bad} are outside 0..{self.num_kv_heads - 1}")
            if seen.intersection(heads) or len(set(heads)) != len(heads):
                raise ValueError(f"groups[{i}].kv_heads {heads} repeat a KV head: each head belongs to one group")
            seen.update(heads)
            if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= self.head_dim):
                raise ValueError(f"groups[{i}].channels must lie in 0..{self.head_dim - 1}")
            if ch.numel() and (ch.sort(dim=1).values.diff(dim=1) == 0).any():
                raise ValueError(f"groups[{i}].channels repeat a channel within a head")


def gather_kept(
    k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor, channels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact middle layout of one group: k, v [B, G, n, D] -> k [B, Gc, n, c] (kept channels), v [B, Gc, n, D].

    ``heads`` [Gc] and ``channels`` [Gc, c] (on k's device) are one group of :class:`HeadGroups`. This is the one
    gather of the project: the cache's compaction and the kernels' test layouts both call it.
    """
    b, _, n, _ = k.shape
    index = channels[None, :, None, :].expand(b, heads.numel(), n, channels.shape[1])  # [B, Gc, n, c]
    return torch.gather(k.index_select(1, heads), -1, index), v.index_select(1, heads)


def leank_layout_from_dense(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, windows: Windows
) -> tuple[torch.Tensor, torch.Tensor, list[MiddleGroup]]:
    """Split a dense cache k, v [B, G, N, D] by keep [G, D] (bool) into (k_full, v_full, groups), as a cache holds it.

    The full window is the first ``windows.sink`` tokens and every token after the middle; the middle holds
    ``windows.middle_length(N)`` tokens, gathered per group by :func:`gather_kept`. For tests and benchmarks.
    """
    B, G, N, D = k.shape
    if keep.shape != (G, D):
        raise ValueError(f"keep has shape {list(keep.shape)} but the cache needs [{G}, {D}]")
    sink, n_mid = min(windows.sink, N), windows.middle_length(N)
    full = torch.cat([torch.arange(sink), torch.arange(sink + n_mid, N)]).to(k.device)
    k_full, v_full = k[:, :, full].contiguous(), v[:, :, full].contiguous()  # [B, G, Nf, D]
    mid = slice(sink, sink + n_mid)
    layout = HeadGroups.from_mask(keep)  # the cache's own grouping: by kept count, zero-count heads left out
    groups = []
    for heads, channels in zip(layout.kv_heads, layout.channels):
        heads, channels = heads.to(k.device), channels.to(k.device)  # [Gc], [Gc, c]
        k_mid, v_mid = gather_kept(k[:, :, mid], v[:, :, mid], heads, channels)
        groups.append(MiddleGroup(heads, channels, k_mid.contiguous(), v_mid.contiguous()))
    return k_full, v_full, groups


MIN_KEPT = 16  # kept counts of a middle group are multiples of this: the Triton kernel's tl.dot needs >= 16 channels
