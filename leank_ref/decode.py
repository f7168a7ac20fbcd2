"""Decode attention over the LeanK cache: a full window and the middle head groups, under one softmax.

At a decode step one query token per sequence meets two kinds of stored keys:

* the **full window** (sink + recent tokens), every channel: ``k_full, v_full [B, G, Nf, D]``;
* the **middle store**, one :class:`MiddleGroup` per kept count ``c > 0``: the heads that keep ``c``
  K channels, with only those channels of their middle keys ``k [B, Gc, Nm, c]`` and all of their
  middle values ``v [B, Gc, Nm, D]``. Heads that keep no channel store nothing for middle tokens.

A middle logit is ``q[kept] . k[kept]``: the gathered query channels against the stored ones, which is
the simulated ``q . (k * mask)`` of training without ever materialising pruned channels. Every head
sees the same ``Nf + Nm`` token slots, so the torch path writes all logits into one ``[B, G, r, Nf + Nm]``
tensor (``-inf`` for the middle of a head that keeps nothing) and takes one float32 softmax: exactly the
softmax over the union of the parts, with few small ops per layer (CPU speed is Python-bound). The
Triton kernel of ``leank_ref.kernels`` instead splits the tokens across programs and merges the parts
with their log-sum-exp (split-KV flash decoding); both compute the same attention.

:class:`LeanKAttention` is the attention each ``LeanKCache`` brings along (its update routes the
layer's next attention call to it, see ``leank_ref.cache``): at prefill it runs ordinary attention (as
the authors do); at decode it reads the compact store of the layer the cache has just updated and runs
:func:`leank_decode_torch` or the Triton kernel (``backend="triton"``, or ``"auto"`` on CUDA). The
Triton path builds one ``LeanKDecoder`` per layer at the first decode step and keeps it on the layer,
so each later step is a single kernel launch.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from .attention import default_attention
from .layout import HeadGroups, MiddleGroup

BACKENDS = ("auto", "torch", "triton")


class DecodeStore(Protocol):
    """What the decode path reads from one cache layer (``LeanKLayer`` in ``cache.py``)."""

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
    """LeanK decode attention in plain torch (float32 softmax): q [B, H, D] -> output [B, H, D] in q's dtype.

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


def leank_decode_triton(
    q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, groups: list[MiddleGroup], scaling: float
) -> torch.Tensor:
    """The same attention through the Triton kernel in one call (it validates and plans every time)."""
    from leank_ref.kernels import leank_decode

    return leank_decode(q.contiguous(), k_full, v_full, groups, scale=scaling)


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


def check_no_padding(attention_mask: torch.Tensor | None) -> None:
    """Raise the "unsupported" error for padded batches (prompts of different lengths)."""
    if attention_mask is None:
        return
    last = attention_mask[..., -1, :]  # what the last prompt token may attend to: every key, unless padding
    padded = ~last.all() if attention_mask.dtype == torch.bool else (last != 0).any()
    if bool(padded):
        raise NotImplementedError(
            "LeanKCache does not support padded batches (prompts of different lengths): sink, middle and recent "
            "windows are cache positions, so padding would fall into them. Batch prompts of equal length, or "
            "generate each prompt on its own."
        )


class LeanKAttention:
    """A LeanK cache's attention: ordinary attention at prefill, LeanK decode attention after it.

    A ``LeanKCache`` layer announces itself in ``pending`` when the model updates it; this attention, called
    right after for the same layer, takes it and reads its store. With nothing pending it is plain SDPA.
    """

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend='{backend}' is not one of {BACKENDS}.")
        if backend == "triton" and not triton_available():
            raise ImportError("backend='triton' needs leank_ref.kernels (and triton); use backend='torch'.")
        self.backend = backend
        self.active = False  # set by the handle while the hook is installed
        self.pending: tuple[DecodeStore, bool] | None = None  # (layer, is_prefill) of the last cache update

    def uses_triton(self, device: torch.device) -> bool:
        """Whether decode on ``device`` runs the Triton kernel (``auto``: on CUDA when the kernel imports)."""
        if self.backend == "auto":
            return device.type == "cuda" and triton_available()
        return self.backend == "triton"

    def decode(self, store: DecodeStore, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Decode attention of one layer: query [B, H, 1, D] -> [B, 1, H, D], reading ``store``."""
        q = query[:, :, 0]  # [B, H, D]
        if self.uses_triton(q.device):
            return leank_decode_layer(store, q, scaling)[:, None]
        lengths = getattr(store, "lengths", None)
        return leank_decode_torch(q, store.keys, store.values, store.groups, scaling, lengths)[:, None]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is None:
            return default_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        store, is_prefill = pending
        if store.layer_idx != module.layer_idx:
            raise RuntimeError(
                f"LeanKCache updated layer {store.layer_idx} but attention ran for layer {module.layer_idx}: another "
                "attention hook is active inside apply_leank; remove it."
            )
        if is_prefill:
            check_no_padding(attention_mask)
            return default_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        return self.decode(store, query, scaling)
