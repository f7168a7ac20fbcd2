"""Channel importance of the K cache: how much of q·k each (layer, KV head, channel) carries (notebook 01).

q·k = sum_c q_c k_c, so the magnitude a channel contributes to the attention logits is |q_c|·|k_c|.
Averaged over the queries and keys of a real input, this gives one importance per (layer, KV head,
channel), ``[L, G, D]``; GQA-aware: a KV head's importance pools the H/G query heads that read it.
From it: the share of a head's |q|·|k| mass per channel, the concentration curve over ranked channels,
the overlap of top-channel sets between two inputs (is the ranking static?), and each channel's RoPE
frequency (is the important set the slowly rotating pairs?).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from leank_ref.attention import capture_prefill
from leank_ref.masks import top_count_mask


def _as_layer_list(tensors: Mapping[int, torch.Tensor] | Sequence[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """(layer, tensor) pairs in sorted layer order from a dict {layer: tensor} or a list (index = position)."""
    if isinstance(tensors, Mapping):
        return sorted(tensors.items())
    return list(enumerate(tensors))


def channel_importance(
    queries: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
    keys: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
) -> torch.Tensor:
    """Importance [L', G, D]: mean over query heads of a KV head and over all (query, key) pairs of |q_c|·|k_c|.

    Takes post-RoPE queries {layer: [B, H, T, D]} and keys {layer: [B, G, N, D]} (as :class:`QKCapture`
    records them; layers in sorted order, or lists). For one sequence, the mean of |q_tc|·|k_nc| over all
    T x N pairs factorises exactly into mean_t |q_tc| times mean_n |k_nc|, and since k does not depend on the
    query head, the mean over a KV head's H/G query heads moves onto the q factor; so no [T, N, D] tensor is
    built. All pairs are counted, including the non-causal ones (key after query); the batch is averaged.
    """
    q_items, k_items = _as_layer_list(queries), _as_layer_list(keys)
    q_layers, k_layers = [l for l, _ in q_items], [l for l, _ in k_items]
    if q_layers != k_layers:
        raise ValueError(
            f"queries cover layers {q_layers} but keys cover {k_layers}; capture both for the same layers."
        )
    if not q_items:
        raise ValueError("no layers given: capture queries and keys of at least one layer first.")
    out = []
    for (layer, q), (_, k) in zip(q_items, k_items):
        if q.ndim != 4 or k.ndim != 4:
            raise ValueError(
                f"layer {layer}: expected query [B, H, T, D] and key [B, G, N, D]; "
                f"got {list(q.shape)} and {list(k.shape)}."
            )
        (b, h, _, d), (bk, g, _, dk) = q.shape, k.shape
        if b != bk or d != dk or h % g != 0:
            raise ValueError(
                f"layer {layer}: query {list(q.shape)} and key {list(k.shape)} must share batch and head_dim, "
                "and the query heads must be a multiple of the KV heads."
            )
        q_mean = q.float().abs().mean(dim=2).reshape(b, g, h // g, d).mean(dim=2)  # [B, G, D]
        k_mean = k.float().abs().mean(dim=2)  # [B, G, D]
        out.append((q_mean * k_mean).mean(dim=0))  # [G, D]
    return torch.stack(out)  # [L', G, D]


def importance_share(importance: torch.Tensor) -> torch.Tensor:
    """[L, G, D]: each channel's share of its head's |q|·|k| mass (sums to 1 over channels)."""
    _check_importance(importance)
    total = importance.sum(dim=-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("a head has zero total importance; its share is undefined (check the captured q/k).")
    return importance / total


def concentration_curve(importance: torch.Tensor) -> torch.Tensor:
    """[L, G, D]: entry k-1 = share of the head's mass held by its top-k channels (ranked by importance)."""
    share = importance_share(importance)
    return share.sort(dim=-1, descending=True).values.cumsum(dim=-1)


def top_count(head_dim: int, frac: float) -> int:
    """Number of channels in a top-``frac`` set: round(frac * head_dim), at least 1."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac={frac} must lie in (0, 1] (the fraction of channels kept, e.g. 0.3).")
    return max(1, round(frac * head_dim))


def mass_in_top(importance: torch.Tensor, frac: float) -> torch.Tensor:
    """[L, G]: share of each head's |q|·|k| mass held by its top ``frac`` of channels."""
    k = top_count(importance.shape[-1], frac)
    return concentration_curve(importance)[..., k - 1]


def top_channels(importance: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool [L, G, D]: True for each head's top ``frac`` channels (ties broken toward the lower index)."""
    _check_importance(importance)
    k = top_count(importance.shape[-1], frac)
    return top_count_mask(importance, torch.full(importance.shape[:-1], k)).bool()


def topk_overlap(imp_a: torch.Tensor, imp_b: torch.Tensor, frac: float) -> torch.Tensor:
    """[L, G]: |A ∩ B| / k for the top-``frac`` channel sets A, B of two importances (1 = same set)."""
    if imp_a.shape != imp_b.shape:
        raise ValueError(
            f"importances have shapes {list(imp_a.shape)} and {list(imp_b.shape)}; compare the same layers."
        )
    k = top_count(imp_a.shape[-1], frac)
    both = top_channels(imp_a, frac) & top_channels(imp_b, frac)
    return both.sum(dim=-1).float() / k


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """[D]: RoPE angular frequency (radians per position) of each channel, HF Llama rotate_half layout.

    Channel c and c + D/2 form one rotating pair with frequency theta^(-2(c mod D/2)/D): channel 0 rotates
    fastest (1 rad/token), channel D/2 - 1 slowest. RoPE scaling variants (e.g. Llama 3's) are ignored.
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be a positive even number (RoPE rotates channel pairs).")
    if theta <= 1:
        raise ValueError(f"theta={theta} must be > 1 (the RoPE base, e.g. 10000 or the model's rope_theta).")
    half = torch.arange(head_dim // 2, dtype=torch.float64)
    freq = theta ** (-2.0 * half / head_dim)  # [D/2]
    return torch.cat([freq, freq]).float()  # [D]


def _check_importance(importance: torch.Tensor) -> None:
    if importance.ndim != 3:
        raise ValueError(f"importance must be [layers, kv_heads, head_dim]; got shape {list(importance.shape)}.")


def capture_importance(model, input_ids: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` ([T] or [B, T]) under :class:`QKCapture`; importance [L', G, D] of ``layers``."""
    chosen = None if layers is None else sorted(set(layers))
    capture, _ = capture_prefill(model, input_ids, layers=chosen)
    return channel_importance(capture.queries, capture.keys)
