"""The attention that reads a LeanK cache, as a hook for :func:`leank_ref.attention.use_hook`.

A press binds one :class:`LeanKAttention` to every attention module of its model for its ``with`` block and
points it at the cache of each forward pass. Called for a module, it reads that module's layer of the cache
(``cache.layers[module.layer_idx]``) and the kind of update that layer just stored (``layer.step``):

* ``"prefill"``: ordinary attention over the prompt, as the authors do (padded batches are refused here);
* ``"decode"``: LeanK decode attention over the compact store, with the backend the cache chose
  (:func:`leank_ref.decode.decode_attention`);
* ``"chunk"`` (several tokens appended to a non-empty cache, e.g. a chat's next turn): the tokens are stored one at
  a time, each attending as if it had been decoded, so a follow-up turn equals decoding its tokens one by one.

No cache in the forward pass (or no update since the last read): ordinary attention.
"""

from __future__ import annotations

import torch

from leank_ref.attention import default_attention
from leank_ref.decode import decode_attention

__all__ = ["LeanKAttention", "check_no_padding"]


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

    ``cache``: the :class:`~leank_ref.cache.LeanKCache` it reads (None: plain SDPA). Bind it with
    ``use_hook(model, LeanKAttention(cache))``; a press does that and sets ``cache`` for each forward pass.
    """

    def __init__(self, cache=None):
        self.cache = cache

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        layer = None if self.cache is None else self.cache.layers[module.layer_idx]
        step = None if layer is None else layer.step
        if layer is not None:
            layer.step = None  # read once
        if step is None or step == "prefill":
            if step == "prefill":
                check_no_padding(attention_mask)
            return default_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        backend = self.cache.backend
        if step == "decode":
            if key is not layer.keys:
                raise RuntimeError(
                    f"layer {module.layer_idx}'s attention received keys that its LeanK cache did not return: "
                    "another hook or cache is changing the attention inputs; remove it."
                )
            return decode_attention(layer, query[:, :, 0], scaling, backend)[:, None]  # [B, 1, H, D]
        check_no_padding(attention_mask)
        k, v = layer.chunk  # a chunk: store and attend one token at a time
        layer.chunk = None
        out = []
        for i in range(k.shape[2]):
            layer.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
            out.append(decode_attention(layer, query[:, :, i], scaling, backend))
        return torch.stack(out, 1)  # [B, T, H, D]
