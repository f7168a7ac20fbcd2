"""A surrogate gradient for the heads that stage 2's deployed forward pass empties, so that they can come back.

In the deployed stage 2 a head with no kept channel skips its middle tokens (the cache stores none of them), so
its output does not depend on its factors and they get no gradient: once emptied, a head only returns when other
heads' factors fall below its own. With ``TrainSettings(empty_head_gradient="top")`` the forward pass stays
exactly the deployed one, but the backward pass treats each emptied head as if it read its middle tokens through
its ``align`` best channels by current factor, the smallest count the binarization could give it back:

    out = deployed + (surrogate - surrogate.detach())

``surrogate`` is the head's attention with the middle read through those channels (scale = the straight-through
scale, 0 there, plus the 0/1 choice: value 1 on the chosen channels, gradient straight to the factors), computed
from *detached* queries, keys and values. So the loss and every other gradient are unchanged; the emptied heads'
factors get the gradient of "what if this head read its middle again", taken at the state it would return to.

Why not the authors' meaning (middle keys at logit 0) for the gradient: logit 0 puts a head in a state it is never
deployed in (it attends to every middle token with the same weight), so its gradient answers another question; the
top-channel read is the exact alternative the binarization chooses between.
"""

from __future__ import annotations

import torch

from leank_ref.masks import top_count_mask, zero_head_rule
from leank_ref.train.student import StudentAttention, student_attention
from leank_ref.windows import Windows


def surrogate_channels(factors: torch.Tensor, align: int) -> torch.Tensor:
    """0/1 [L, G, D] (no gradient): every head's ``align`` largest factors, the channels an emptied head would
    get back first."""
    counts = torch.full(factors.shape[:-1], align, dtype=torch.long)
    return top_count_mask(factors.detach().cpu(), counts).to(factors.device)


class EmptyHeadSurrogate(StudentAttention):
    """:class:`StudentAttention` in the deployed meaning whose emptied heads pass the surrogate gradient (module
    docstring). ``channels`` [L, G, D]: :func:`surrogate_channels` of the current factors."""

    def __init__(self, scale, channels: torch.Tensor, windows: Windows, decode_start: int):
        super().__init__(scale, windows, decode_start, exclude_zero_heads=True)
        self.channels = channels

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        out = super().__call__(module, query, key, value, attention_mask, scaling=scaling, **kwargs)  # [B, T, H, D]
        scale = (self.scale() if callable(self.scale) else self.scale)[module.layer_idx]  # [G, D]
        empty = zero_head_rule(scale).nonzero()[:, 0]
        if not len(empty) or not scale.requires_grad:
            return out
        b, h, t, d = query.shape
        g = key.shape[1]
        r = h // g
        read = scale[empty] + self.channels[module.layer_idx, empty].to(scale.device, scale.dtype)  # [E, D]
        q = query.detach().reshape(b, g, r, t, d)[:, empty].reshape(b, len(empty) * r, t, d)
        k, v = key.detach()[:, empty], value.detach()[:, empty]
        scaling = d**-0.5 if scaling is None else scaling
        surrogate = student_attention(q, k, v, read, self.windows, scaling, exclude_zero_heads=False)
        heads = (empty[:, None] * r + torch.arange(r, device=empty.device)).reshape(-1).to(out.device)  # [E*r]
        delta = torch.zeros_like(out).index_copy(2, heads, surrogate - surrogate.detach())
        return out + delta
