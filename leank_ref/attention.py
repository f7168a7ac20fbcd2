"""Attention functions registered with transformers' ``AttentionInterface``: capture and simulated LeanK.

One function, ``"leank_ref"``, is registered once. It forwards to whichever *hook* is active (a stack,
managed by :func:`use_hook`), or to transformers' own SDPA attention when none is. So a loaded model is
never modified: ``with use_hook(model, QKCapture()):`` records queries and keys, ``with use_hook(model,
SimulatedLeanK(...)):`` computes LeanK's pruned attention, and on exit the model is exactly as before.

Shapes inside the attention function (transformers' convention, after RoPE):
query [B, H, T, D], key/value [B, G, N, D] with N >= T; query i sits at absolute position N - T + i.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "leank_ref"


class AttentionHook(Protocol):
    """What a hook implements: the attention of one layer, returning [B, T, H, D] like transformers does."""

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs) -> torch.Tensor: ...


_HOOKS: list[AttentionHook] = []


def default_attention(module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
    """Transformers' own SDPA attention: the reference every hook must agree with when it changes nothing."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]


def leank_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: the innermost active hook, else default SDPA."""
    hook = _HOOKS[-1] if _HOOKS else default_attention
    return hook(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None


AttentionInterface.register(ATTN_NAME, leank_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # same masks as "sdpa", so pass-through is exact


@contextmanager
def use_hook(model, hook: AttentionHook) -> Iterator[AttentionHook]:
    """Route the model's attention through ``hook`` inside the block; restore the previous attention after."""
    previous = model.config._attn_implementation
    if previous != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    _HOOKS.append(hook)
    try:
        yield hook
    finally:
        _HOOKS.remove(hook)
        if previous != ATTN_NAME:
            model.set_attn_implementation(previous)


def query_positions(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Absolute positions [T] of the queries: the last T of the N keys (prefill: T == N)."""
    n_keys, n_queries = key.shape[-2], query.shape[-2]
    return torch.arange(n_keys - n_queries, n_keys, device=query.device)


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, G, N, D] -> [B, H, N, D]: each KV head repeated for the H/G query heads it serves (GQA)."""
    groups = x.shape[1]
    return x if groups == num_heads else x.repeat_interleave(num_heads // groups, dim=1)


class QKCapture:
    """Record post-RoPE queries [B, H, T, D] and keys [B, G, N, D] of chosen layers; attention is unchanged."""

    def __init__(self, layers: list[int] | None = None, num_layers: int | None = None, dtype=torch.float32):
        if layers is not None and num_layers is not None:
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise IndexError(f"layer indices {bad} are out of range: the model has layers 0..{num_layers - 1}.")
        self.layers = None if layers is None else set(layers)
        self.dtype = dtype
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        layer = module.layer_idx
        if self.layers is None or layer in self.layers:
            self.queries[layer] = query.detach().to("cpu", self.dtype)
            self.keys[layer] = key.detach().to("cpu", self.dtype)
        return default_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def middle_key_mask(q_pos: torch.Tensor, n_keys: int, sink: int, recent: int, decode_start: int = 0) -> torch.Tensor:
    """Bool [T, N]: True where query t sees key j through the *pruned* K.

    A key is pruned for query t when t is a decode query (t >= decode_start), j is past the sink
    (j >= sink) and j lies before t's own recent window (j <= t - recent). Sink keys, keys in
    (t - recent, t] and every key seen by a context query keep full K.
    """
    if sink < 0 or recent < 0:
        raise ValueError(f"sink={sink} and recent={recent} must be >= 0.")
    j = torch.arange(n_keys, device=q_pos.device)
    t = q_pos[:, None]
    return (j[None, :] >= sink) & (j[None, :] <= t - recent) & (t >= decode_start)


def zero_head_rule(mask: torch.Tensor, deployed: bool = True) -> torch.Tensor:
    """Bool [..., G]: heads whose middle tokens are *excluded* (logit -inf), given a 0/1 mask [..., G, D].

    Deployed meaning (this project's evaluation and cache): a head with zero kept channels stores no
    middle K or V, so its middle tokens are skipped. The authors' training simulation instead lets them
    through with logit 0; ``deployed=False`` gives that (no head excluded).
    """
    kept = mask.sum(-1)
    return kept == 0 if deployed else torch.zeros_like(kept, dtype=torch.bool)


class SimulatedLeanK:
    """LeanK's attention simulated on full tensors (SPEC sections 3-4).

    Decode queries (absolute position >= ``decode_start``) see full K for sink keys and for keys in their
    own recent window, and ``K * scale`` channel-wise for the middle keys; context queries attend normally.
    ``scale`` is ``[L, G, D]``: continuous factors (stage 1), or a 0/1 mask / masked factors (stage 2,
    deployment). q·(k*s) = (q*s)·k, so the factors multiply the (few) decode queries, not the (many) keys.
    With ``exclude_zero_heads`` a head whose scale is all zero skips its middle tokens entirely (deployed
    meaning, see :func:`zero_head_rule`); otherwise they get logit 0 as in the authors' training.
    """

    def __init__(
        self,
        scale: torch.Tensor | Callable[[], torch.Tensor],
        sink: int,
        recent: int,
        decode_start: int = 0,
        exclude_zero_heads: bool = True,
    ):
        if sink < 0 or recent < 1:
            raise ValueError(f"sink={sink} must be >= 0 and recent={recent} >= 1 (a query always sees itself).")
        self.scale = scale
        self.sink, self.recent = sink, recent
        self.decode_start = decode_start
        self.exclude_zero_heads = exclude_zero_heads

    def current_scale(self) -> torch.Tensor:
        """The [L, G, D] scale in effect (a callable lets stage 2 rebuild its STE mask each step)."""
        return self.scale() if callable(self.scale) else self.scale

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        b, h, t, d = query.shape
        n = key.shape[-2]
        scaling = d**-0.5 if scaling is None else scaling
        q_pos = query_positions(query, key)
        pruned = middle_key_mask(q_pos, n, self.sink, self.recent, self.decode_start)  # [T, N]
        if not pruned.any():
            return default_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

        s = self.current_scale()[module.layer_idx].to(query.device, torch.float32)  # [G, D]
        qf, kf, vf = query.float(), expand_kv(key, h).float(), expand_kv(value, h).float()
        s_h = s.repeat_interleave(h // s.shape[0], dim=0)  # [H, D]
        full = qf @ kf.transpose(-1, -2)  # [B, H, T, N]
        middle = (qf * s_h[None, :, None, :]) @ kf.transpose(-1, -2)  # [B, H, T, N]
        logits = torch.where(pruned, middle, full) * scaling

        allowed = torch.arange(n, device=query.device)[None, :] <= q_pos[:, None]  # causal [T, N]
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask
        elif attention_mask is not None:
            logits = logits + attention_mask
        if self.exclude_zero_heads:
            dropped = zero_head_rule(s).repeat_interleave(h // s.shape[0])  # [H]
            allowed = allowed & ~(dropped[None, :, None, None] & pruned)
        logits = logits.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(logits, dim=-1) @ vf  # [B, H, T, D]
        return out.to(query.dtype).transpose(1, 2).contiguous()  # [B, T, H, D]


def simulate_newest_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, sink: int, recent: int
) -> torch.Tensor:
    """:class:`SimulatedLeanK` (deployed meaning) for one new token over a one-layer cache: [B, H, D].

    q [B, H, D] is the newest token's query, k, v [B, G, N, D] the cache including that token, keep [G, D]
    the layer's 0/1 mask. For checking decode kernels and caches against the training-time simulation.
    """
    from types import SimpleNamespace

    sim = SimulatedLeanK(keep[None].float(), sink=sink, recent=recent, exclude_zero_heads=True)
    layer = SimpleNamespace(layer_idx=0, num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True)
    return sim(layer, q[:, :, None], k, v, attention_mask=None)[:, 0]  # [B, 1, H, D] -> [B, H, D]
