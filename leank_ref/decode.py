"""LeanK decode attention over the compact layout: a full window and the middle head groups, under one softmax.

At a decode step one query token per sequence meets two kinds of stored keys:

* the **full window** (sink + recent tokens), every channel: ``k_full, v_full [B, G, Nf, D]``;
* the **middle store**, one :class:`MiddleGroup` per kept count ``c > 0``: the heads that keep ``c``
  K channels, with only those channels of their middle keys ``k [B, Gc, Nm, c]`` and all of their
  middle values ``v [B, Gc, Nm, D]``. Heads that keep no channel store nothing for middle tokens.

A middle logit is ``q[kept] . k[kept]``: the gathered query channels against the stored ones, which is
the simulated ``q . (k * mask)`` of training without ever materialising pruned channels.
:func:`leank_decode_torch` is the reference implementation of this attention: every head sees the same
``Nf + Nm`` token slots, so it writes all logits into one ``[B, G, r, Nf + Nm]`` tensor (``-inf`` for the
middle of a head that keeps nothing) and takes one float32 softmax (few small ops per layer: CPU speed is
Python-bound). The Triton kernel of ``leank_ref.kernels`` instead splits the tokens across programs and merges
the parts with their log-sum-exp (split-KV flash decoding); its tests compare it with this reference.

:func:`decode_attention` runs one layer's step with the backend a cache chose: the reference, or the Triton
kernel (``backend="triton"``, or ``"auto"`` on CUDA). The Triton path builds one ``LeanKDecoder`` per layer at
the first decode step and keeps it on the layer, so each later step is a single kernel launch.
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import torch

from .layout import HeadGroups, MiddleGroup

BACKENDS = ("auto", "torch", "triton")


class DecodeStore(Protocol):
    """What the decode path reads from one cache layer (:class:`leank_ref.cache.LeanKLayer`)."""

    layer_idx: int
    keys: torch.Tensor  # [B, G, Nf, D]: the full window (sink + recent), last token = the query's own
    values: torch.Tensor  # [B, G, Nf, D]
    groups: list[MiddleGroup]  # views of the middle buffers [B, Gc, cap, c] / [B, Gc, cap, D], in heads' order
    heads: HeadGroups  # the layer's grouping (built once from its mask)
    # Optional: ``lengths`` (int32 device tensor [n_full, n_mid], for CUDA graphs) and ``decoder`` (set here).


def leank_decode_torch(
    q: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    groups: list[MiddleGroup],
    scaling: float,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference implementation of LeanK decode attention over the compact layout, in plain torch (float32
    softmax): q [B, H, D] -> output [B, H, D] in q's dtype. The cache's torch backend runs it; the Triton kernel's
    tests compare against it.

    ``lengths`` (optional int tensor ``[n_full, n_mid]`` on q's device): the tensors are whole preallocated
    buffers and only their first ``n_full`` full-window slots and ``n_mid`` middle tokens count; the rest is
    masked on the device (no host synchronisation, so a CUDA graph can replay it).
    """
    b, h, d = q.shape
    g, nf = k_full.shape[1], k_full.shape[2]
    r = h // g  # query heads per KV head (GQA): query head i uses KV head i // r
    qf = (q.float() * scaling).view(b, g, r, d)
    full = qf @ k_full.float().transpose(-1, -2)  # [B, G, r, Nf]
    if lengths is not None:
        full = full.masked_fill(torch.arange(nf, device=q.device) >= lengths[0], float("-inf"))
    nm = groups[0].k.shape[2] if groups else 0
    if nm == 0:  # no middle token stored (short context, or every head keeps nothing)
        return (torch.softmax(full, -1) @ v_full.float()).view(b, h, d).to(q.dtype)
    logits = full.new_full((b, g, r, nf + nm), float("-inf"))  # middle of zero-count heads stays -inf
    logits[..., :nf] = full
    for grp in groups:
        index = grp.channels[None, :, None, :].expand(b, -1, r, -1)  # [B, Gc, r, c]
        q_kept = torch.gather(qf.index_select(1, grp.kv_heads), -1, index)  # [B, Gc, r, c]
        mid = q_kept @ grp.k.float().transpose(-1, -2)  # [B, Gc, r, Nm]
        if lengths is not None:
            mid = mid.masked_fill(torch.arange(nm, device=q.device) >= lengths[1], float("-inf"))
        logits[:, grp.kv_heads, :, nf:] = mid
    p = torch.softmax(logits, -1)  # [B, G, r, Nf + Nm]
    out = p[..., :nf] @ v_full.float()  # [B, G, r, D]
    for grp in groups:
        out.index_add_(1, grp.kv_heads, p[:, grp.kv_heads, :, nf:] @ grp.v.float())
    return out.view(b, h, d).to(q.dtype)


@functools.cache
def triton_available() -> bool:
    """True when the Triton LeanK kernel can be imported (``leank_ref.kernels``)."""
    try:
        from leank_ref.kernels import leank_decode  # noqa: F401
    except ImportError:
        return False
    return True


def store_heads(store: DecodeStore) -> HeadGroups:
    """The layer's head grouping as a validated :class:`HeadGroups` (the cache's own, or built from its groups)."""
    heads = getattr(store, "heads", None)
    if isinstance(heads, HeadGroups):
        return heads
    g, d = store.keys.shape[1], store.keys.shape[3]
    if heads is not None:
        return HeadGroups.from_indices(heads.kv_heads, heads.channels, g, d)
    return HeadGroups.from_indices([x.kv_heads for x in store.groups], [x.channels for x in store.groups], g, d)


def layer_decoder(store: DecodeStore, q: torch.Tensor, scaling: float):
    """The layer's :class:`leank_ref.kernels.LeanKDecoder`, built at its first decode step and kept on the layer.

    Splits are planned for the buffers' capacities (read from their strides). A new batch size, head count,
    dtype or device, or a middle store grown past twice the planned capacity, builds a new decoder.
    """
    decoder = getattr(store, "decoder", None)
    b, h, d = q.shape
    max_middle = store.groups[0].v.stride(1) // d if store.groups else 0
    if decoder is not None and (decoder.batch, decoder.num_heads, decoder.dtype, decoder.device) == (
        b,
        h,
        q.dtype,
        q.device,
    ):
        if max_middle <= 2 * max(decoder.max_middle, 1):
            return decoder
    from leank_ref.kernels import LeanKDecoder

    max_full = store.keys.stride(1) // d  # the full-window buffer's capacity
    decoder = LeanKDecoder(store_heads(store), b, h, q.dtype, q.device, max_full, max_middle, scale=scaling)
    store.decoder = decoder
    return decoder


def leank_decode_layer(store: DecodeStore, q: torch.Tensor, scaling: float) -> torch.Tensor:
    """One layer's decode step through its decoder: one kernel launch, no synchronisation, no allocation.

    The lengths are the cache's device tensor ``store.lengths`` when it has one (CUDA-graph decoding), else the
    Python lengths of its views.
    """
    decoder = layer_decoder(store, q, scaling)
    lengths = getattr(store, "lengths", None)
    groups = store.groups
    if lengths is None:
        lengths = (store.keys.shape[2], groups[0].k.shape[2] if groups else 0)
    return decoder(q, store.keys, store.values, [g.k for g in groups], [g.v for g in groups], lengths)


def check_backend(backend: str, device: torch.device | str | None = None) -> None:
    """Raise unless ``backend`` is one of :data:`BACKENDS` and can run on ``device`` (when given)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend='{backend}' is not one of {BACKENDS}.")
    if backend != "triton":
        return
    if not triton_available():
        raise ImportError("backend='triton' needs leank_ref.kernels (and triton); use backend='torch'.")
    if device is not None and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' runs on CUDA, but the model is on '{torch.device(device).type}': use backend='torch' "
            "(or 'auto'), move the model to a GPU, or set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter."
        )


def uses_triton(backend: str, device: torch.device) -> bool:
    """Whether decode on ``device`` runs the Triton kernel (``auto``: on CUDA when the kernel imports)."""
    if backend == "auto":
        return device.type == "cuda" and triton_available()
    return backend == "triton"


def decode_attention(store: DecodeStore, q: torch.Tensor, scaling: float, backend: str = "auto") -> torch.Tensor:
    """One layer's decode attention, q [B, H, D] -> [B, H, D], over ``store`` with ``backend``."""
    if uses_triton(backend, q.device):
        return leank_decode_layer(store, q, scaling)
    return leank_decode_torch(q, store.keys, store.values, store.groups, scaling, getattr(store, "lengths", None))
