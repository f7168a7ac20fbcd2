"""Attention hooks for a loaded model: QK capture, simulated LeanK, and the LeanK cache's decode attention.

One attention function, ``"leank_ref"``, is registered with transformers' ``AttentionInterface`` once, at import,
and never changes. It runs the *hook* bound to the calling attention module (the module's ``leank_hook``
attribute), or transformers' own SDPA attention when none is. :func:`use_hook` binds a hook to every attention
module of one model for the duration of a ``with`` block and switches that model to ``"leank_ref"``; leaving the
block (also by an exception) restores both. So a model is modified only inside a block, and only that model:
two models in two threads never see each other's hooks. ``with use_hook(model, QKCapture()):`` records queries and
keys, ``with use_hook(model, SimulatedLeanK(...)):`` computes LeanK's pruned attention, and the LeanK cache's
attention (:class:`leank_ref.cache.LeanKAttention`) is bound the same way by ``with press(model):``.

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

from leank_ref.masks import zero_head_rule
from leank_ref.windows import Windows

ATTN_NAME = "leank_ref"
HOOK_ATTRIBUTE = "leank_hook"  # the attribute of an attention module that holds its bound hook


class AttentionHook(Protocol):
    """What a hook implements: the attention of one layer, returning [B, T, H, D] like transformers does."""

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs) -> torch.Tensor: ...


def default_attention(module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
    """Transformers' own SDPA attention: the reference every hook must agree with when it changes nothing."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]


def leank_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: the hook bound to ``module``, else default SDPA."""
    hook = getattr(module, HOOK_ATTRIBUTE, None) or default_attention
    return hook(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None


AttentionInterface.register(ATTN_NAME, leank_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # same masks as "sdpa", so pass-through is exact


def attention_modules(model) -> list:
    """The model's attention modules, one per layer in order (``model.base_model.layers[i].self_attn``)."""
    return [layer.self_attn for layer in model.base_model.layers]


@contextmanager
def use_hook(model, hook: AttentionHook) -> Iterator[AttentionHook]:
    """Bind ``hook`` to every attention module of ``model`` inside the block; restore what was there after.

    Blocks nest (the inner hook wins until it ends). Only this model changes, and only until the block ends.
    """
    modules = attention_modules(model)
    previous_hooks = [vars(m).get(HOOK_ATTRIBUTE) for m in modules]
    previous = model.config._attn_implementation
    try:
        for m in modules:
            setattr(m, HOOK_ATTRIBUTE, hook)
        if previous != ATTN_NAME:
            model.set_attn_implementation(ATTN_NAME)
        yield hook
    finally:
        for m, old in zip(modules, previous_hooks):
            if old is None:
                vars(m).pop(HOOK_ATTRIBUTE, None)
            else:
                setattr(m, HOOK_ATTRIBUTE, old)
        if model.config._attn_implementation != previous:
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
    """Record post-RoPE queries [B, H, T, D] and keys [B, G, N, D] of chosen layers; attention is unchanged.

    With ``values=True`` it also keeps the values [B, G, N, D]: everything a later decode step reads.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        num_layers: int | None = None,
        dtype=torch.float32,
        values: bool = False,
    ):
        if layers is not None and num_layers is not None:
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise IndexError(f"layer indices {bad} are out of range: the model has layers 0..{num_layers - 1}.")
        self.layers = None if layers is None else set(layers)
        self.dtype = dtype
        self.keep_values = values
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        layer = module.layer_idx
        if self.layers is None or layer in self.layers:
            self.queries[layer] = query.detach().to("cpu", self.dtype)
            self.keys[layer] = key.detach().to("cpu", self.dtype)
            if self.keep_values:
                self.values[layer] = value.detach().to("cpu", self.dtype)
        return default_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


@torch.no_grad()
def capture_prefill(
    model, input_ids: torch.Tensor, layers: list[int] | None = None, values: bool = False
) -> tuple[QKCapture, torch.Tensor]:
    """Dense prefill of ``input_ids`` ([T] or [B, T]) under :class:`QKCapture`: the capture and the logits at the
    last position [B, V] (float32). ``layers``: which layers to record (None = all); ``values``: keep V too."""
    ids = input_ids[None] if input_ids.ndim == 1 else input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [T] or [B, T]; got shape {list(input_ids.shape)}.")
    num_layers = model.config.num_hidden_layers
    capture = QKCapture(layers=layers, num_layers=num_layers, values=values)
    device = next(model.parameters()).device
    with use_hook(model, capture):
        out = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    return capture, out.logits[:, -1].float()


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


class SimulatedLeanK:
    """LeanK's attention simulated on full tensors, as in training (Zhang et al., EMNLP 2025).

    Decode queries (absolute position >= ``decode_start``) see full K for sink keys and for keys in their
    own recent window, and ``K * scale`` channel-wise for the middle keys; context queries attend normally.
    ``scale`` is ``[L, G, D]``: continuous factors (stage 1), or a 0/1 mask / masked factors (stage 2,
    deployment). q·(k*s) = (q*s)·k, so the factors multiply the (few) decode queries, not the (many) keys.
    With ``exclude_zero_heads`` a head whose scale is all zero skips its middle tokens entirely (deployed
    meaning, see :func:`zero_head_rule`); otherwise they get logit 0 as in the authors' training.
    It works on full tensors, not on :func:`leank_ref.decode.leank_decode_torch`'s compact layout: training's
    continuous factors need gradients through every channel of every key.
    """

    def __init__(
        self,
        scale: torch.Tensor | Callable[[], torch.Tensor],
        sink: int,
        recent: int,
        decode_start: int = 0,
        exclude_zero_heads: bool = True,
    ):
        Windows(sink, recent, 1)  # checks the windows
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


class SimulatedLeanKRows:
    """Simulated LeanK for many masks over one prompt: B rows decode after one shared prompt, row b under
    the 0/1 mask ``masks[b]`` [L, G, D].

    ``prompt`` is the :func:`capture_prefill` of the prompt with ``values=True``. The model then runs with
    ``use_cache=False`` and explicit ``position_ids``, so this hook receives only the new tokens' post-RoPE K/V
    [B, G, T, D]; it keeps them per row and attends over (prompt, generated so far). Every query is a decode
    query (position >= prompt length), so it computes :class:`SimulatedLeanK`'s attention (deployed meaning):
    full q·k for sink keys and keys in (t - recent, t], q[kept]·k[kept] for the middle, and
    :func:`zero_head_rule`. It equals :class:`SimulatedLeanK` row by row (tests), but reads the prompt's K/V
    once for all rows, so a whole grid of masks costs one prefill. It does not call the compact-layout reference
    :func:`leank_ref.decode.leank_decode_torch`: that one takes one query per sequence and one head grouping for the
    whole batch, while here each row has its own mask (its own grouping) and teacher forcing sends T > 1 queries.
    """

    def __init__(self, prompt: QKCapture, masks: torch.Tensor, sink: int, recent: int):
        Windows(sink, recent, 1)  # checks the windows
        if not prompt.values:
            raise ValueError("the prompt capture holds no values: capture it with capture_prefill(..., values=True).")
        self.keys = {l: k[0] for l, k in prompt.keys.items()}  # [G, P, D]
        self.values = {l: v[0] for l, v in prompt.values.items()}  # [G, P, D]
        self.prompt_len = next(iter(self.keys.values())).shape[1]
        self.masks = masks.float()  # [B, L, G, D]
        self.sink, self.recent = sink, recent
        self.gen_k: dict[int, torch.Tensor] = {}  # [B, G, n, D]
        self.gen_v: dict[int, torch.Tensor] = {}

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (drop finished ones from the batch)."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.masks = self.masks[idx]
        self.gen_k = {l: k[idx] for l, k in self.gen_k.items()}
        self.gen_v = {l: v[idx] for l, v in self.gen_v.items()}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        layer = module.layer_idx
        b, h, t, d = query.shape
        g = key.shape[1]
        r = h // g  # query heads per KV head; head i reads KV head i // r
        scaling = d**-0.5 if scaling is None else scaling
        if b != self.masks.shape[0]:
            raise ValueError(f"batch of {b} rows but {self.masks.shape[0]} masks; call select() when dropping rows.")
        gk = key.float() if layer not in self.gen_k else torch.cat([self.gen_k[layer], key.float()], dim=2)
        gv = value.float() if layer not in self.gen_v else torch.cat([self.gen_v[layer], value.float()], dim=2)
        self.gen_k[layer], self.gen_v[layer] = gk, gv  # [B, G, n, D]
        kp, vp = self.keys[layer].to(query.device), self.values[layer].to(query.device)  # [G, P, D]
        p, n = kp.shape[1], gk.shape[2]
        q_pos = torch.arange(p + n - t, p + n, device=query.device)  # [T] absolute positions
        pruned = middle_key_mask(q_pos, p + n, self.sink, self.recent)  # [T, P+n]
        causal = torch.arange(p + n, device=query.device)[None, :] <= q_pos[:, None]  # [T, P+n]

        s = self.masks[:, layer].to(query.device)  # [B, G, D]
        qg = query.float().reshape(b, g, r, t, d)  # [B, G, r, T, D]
        qm = qg * s[:, :, None, None, :]  # q[kept]·k[kept] == (q*mask)·k

        def prompt_logits(q: torch.Tensor) -> torch.Tensor:  # rows into the matmul's M dimension: one bmm
            flat = q.permute(1, 0, 2, 3, 4).reshape(g, b * r * t, d)  # [G, B*r*T, D]
            return torch.bmm(flat, kp.transpose(1, 2)).reshape(g, b, r, t, p).permute(1, 0, 2, 3, 4)  # [B, G, r, T, P]

        gen_t = gk[:, :, None].transpose(-1, -2)  # [B, G, 1, D, n]
        full = torch.cat([prompt_logits(qg), qg @ gen_t], dim=-1)  # [B, G, r, T, P+n]
        middle = torch.cat([prompt_logits(qm), qm @ gen_t], dim=-1)
        logits = torch.where(pruned, middle, full) * scaling
        dropped = zero_head_rule(s)[:, :, None, None, None]  # [B, G, 1, 1, 1]
        allowed = causal & ~(dropped & pruned)  # [B, G, 1, T, P+n]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)

        pp = probs[..., :p].permute(1, 0, 2, 3, 4).reshape(g, b * r * t, p)  # [G, B*r*T, P]
        out = torch.bmm(pp, vp).reshape(g, b, r, t, d).permute(1, 0, 2, 3, 4)  # [B, G, r, T, D]
        out = out + probs[..., p:] @ gv[:, :, None]  # [B, G, r, T, n] @ [B, G, 1, n, D]
        return out.reshape(b, h, t, d).transpose(1, 2).to(query.dtype).contiguous()  # [B, T, H, D]


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
