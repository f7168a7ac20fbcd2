"""The LeanK cache: full K/V for sink + recent tokens, only the kept K channels for the middle.

Per layer, a token lives in one of three places (B batch, G KV heads, D head_dim):

* **sink**: the first ``sink`` tokens, full K and V, forever;
* **recent**: the newest tokens, full K and V. Sink and recent together are the *full window*
  ``keys, values [B, G, Nf, D]`` (sink first, then the recent tokens in order);
* **middle**: when the recent part reaches ``recent + block`` tokens, its oldest ``block`` tokens are
  compacted into the middle store: per group of heads that keep the same count ``c > 0`` of K channels,
  ``k [B, Gc, Nm, c]`` (those channels only, post-RoPE, original channel order) and ``v [B, Gc, Nm, D]``
  (the :class:`~leank_ref.layout.MiddleGroup` layout the Triton kernel reads). Heads with no kept
  channel keep neither K nor V of middle tokens (:func:`~leank_ref.attention.zero_head_rule`).

So the recent part holds ``recent .. recent + block - 1`` tokens once the cache is long enough, as in
the authors' deployment (``recent .. recent + 127``). The key of the query's own token is appended
before attention, so at query position ``t`` (``t + 1`` tokens cached) the middle tokens are
``[sink, sink + Nm)`` with ``Nm = block * floor((t + 1 - sink - recent) / block)``: LeanK's attention
(:class:`~leank_ref.attention.SimulatedLeanK`) with the *effective* recent window
``recent + (t + 1 - sink - recent) mod block`` (exactly ``recent`` when ``block = 1``). The tests compare
against ``SimulatedLeanK`` with that window.

No weight is touched: the kept channels are gathered from the post-RoPE keys at compaction, and from
the query at decode, so RoPE needs no permutation.

Two ways in, both with the same cache:

* ``with apply_leank(model, mask) as lk:``: inside the block every ``model.generate(...)`` and every forward
  pass that would start a new cache gets a fresh :class:`LeanKCache` (``lk.cache`` is the last one); passing a
  cache of another kind raises. Creating the handle changes nothing; leaving the block restores the model.
* ``model.generate(ids, past_key_values=LeanKCache(model, mask))``: the cache on its own, as with any
  transformers cache (``cache=`` on transformers >= 5.2x, see :func:`~leank_ref.models.cache_argument`).

A cache brings its own decode path. Transformers calls ``cache.update`` right before it looks up the
attention function; the update points this one attention call at the cache's
:class:`~leank_ref.decode.LeanKAttention` (ordinary attention at prefill, LeanK decode attention after it),
which puts the model's own attention setting back before it computes anything. So the model never stays
changed, and caches of different masks can be used side by side.

Storage is preallocated, never concatenated per token: the full window lives in a buffer of
``sink + recent + block`` tokens (a new token is one copy; a compaction shifts the recent part once per
``block`` tokens), and each middle group in a buffer that grows geometrically (or is reserved up front
with ``max_tokens``). ``keys``, ``values`` and ``groups`` are views of the filled part; a static cache
(``static=True``, for CUDA graphs: :mod:`leank_ref.static_decode`) exposes the whole buffers and ``lengths``.
Batches: prompts of equal length only; padded batches raise ``NotImplementedError``.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import ATTN_NAME
from .decode import LeanKAttention
from .layout import MIN_KEPT, HeadGroups, MiddleGroup, check_windows, gather_kept
from .masks import check_align, validate_mask
from .memory import MemoryReport
from .models import cache_argument, check_supported, model_facts
from .windows import middle_length

__all__ = ["LeanKCache", "LeanKHandle", "apply_leank", "cache_argument"]

CACHE_ATTENTION = "leank_cache"  # the attention function one LeanK cache update routes its layer's call to
ATTENTIONS = (None, "sdpa", "eager", ATTN_NAME)  # model attention settings whose masks the prefill path reads
_ROUTES: list[tuple[LeanKLayer, object, str | None]] = []  # (layer, config, the config's own attention setting)


def _route(layer: LeanKLayer, config) -> None:
    """Point the next attention call of ``config``'s model at ``layer``'s LeanK attention (called by its update)."""
    _unroute()  # a route no attention call consumed (an update made outside a forward pass)
    _ROUTES.append((layer, config, config._attn_implementation))
    config._attn_implementation = CACHE_ATTENTION


def _unroute() -> LeanKLayer | None:
    """Restore the model's attention setting; return the layer that was routed (None if none was)."""
    if not _ROUTES:
        return None
    layer, config, previous = _ROUTES.pop()
    config._attn_implementation = previous
    return layer


def _cache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: restore the model's setting, then run the routed layer's attention."""
    layer = _unroute()
    if layer is None:
        raise RuntimeError(f"attention '{CACHE_ATTENTION}' runs only right after a LeanKCache update; use 'sdpa'.")
    return layer.attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None


AttentionInterface.register(CACHE_ATTENTION, _cache_attention)
AttentionMaskInterface.register(CACHE_ATTENTION, sdpa_mask)


class LeanKLayer(CacheLayerMixin):
    """One layer's LeanK cache: full window ``keys, values [B, G, Nf, D]`` and the middle ``groups``."""

    is_sliding = False
    is_compileable = False
    is_croppable = False  # compacted tokens cannot be restored to full width

    def __init__(
        self,
        layer_idx: int,
        heads: HeadGroups,
        sink: int,
        recent: int,
        block: int,
        attention: LeanKAttention,
        config,
        max_tokens: int | None = None,
        static: bool = False,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = heads  # HeadGroups.from_mask(mask[layer]): kv_heads [Gc], channels [Gc, c] per kept count c > 0
        self.config = config  # the model's config, whose attention setting each update routes
        self.sink, self.recent, self.block = sink, recent, block
        self.attention = attention
        self.max_tokens = max_tokens
        self.groups: list[MiddleGroup] = []
        self.length = 0  # tokens seen (sink + middle + recent, including the compacted ones)
        self.middle = 0  # tokens compacted into the middle store
        self.n_full = 0  # tokens in the full window (sink + recent)
        self.static = static  # whole buffers, lengths on the device: a decode step has fixed shapes and addresses
        self.driven = False  # static: a decode loop keeps the host counters (begin_step / end_step), not update
        self.lengths: torch.Tensor | None = None  # static: int32 [2] on the device, (n_full, middle)

    # -- storage ------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate the full-window buffer and the (reserved) middle buffers on the keys' device and dtype."""
        b, g, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        new = key_states.new_zeros if self.static else key_states.new_empty  # static: unused slots stay finite
        self._kv_full = new(2, b, g, self.sink + self.recent + self.block, d)  # K and V
        self._heads = [h.to(self.device) for h in self.heads.kv_heads]
        self._channels = [c.to(self.device) for c in self.heads.channels]
        reserve = middle_length(self.max_tokens, self.sink, self.recent, self.block) if self.max_tokens else 0
        self._mid_k = [new(b, len(h), reserve, c.shape[1]) for h, c in zip(self._heads, self._channels)]
        self._mid_v = [new(b, len(h), reserve, d) for h in self._heads]
        if self.static:
            self.lengths = torch.zeros(2, dtype=torch.int32, device=self.device)
            self._one_more = torch.tensor([1, 0], dtype=torch.int32, device=self.device)
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self, middle: bool = True) -> None:
        """Point ``keys``, ``values`` (and ``groups``) at the filled part of the buffers (views, no copies).

        Static: at the whole buffers (fixed shapes and addresses), and ``lengths`` holds the filled sizes.
        """
        if self.static:
            self.keys, self.values = self._kv_full[0], self._kv_full[1]
            self.groups = [MiddleGroup(*parts) for parts in zip(self._heads, self._channels, self._mid_k, self._mid_v)]
            self.lengths.copy_(torch.tensor([self.n_full, self.middle], dtype=torch.int32))
            return
        self.keys = self._kv_full[0, :, :, : self.n_full]
        self.values = self._kv_full[1, :, :, : self.n_full]
        if not middle:
            return
        m = self.middle
        self.groups = [
            MiddleGroup(h, c, k[:, :, :m], v[:, :, :m])
            for h, c, k, v in zip(self._heads, self._channels, self._mid_k, self._mid_v)
        ]

    def _reserve_middle(self, tokens: int) -> None:
        """Make room for ``tokens`` middle tokens, growing the buffers geometrically (amortised O(1) per token)."""
        capacity = self._mid_v[0].shape[2] if self._mid_v else tokens
        if tokens <= capacity:
            return
        if self.static:
            raise ValueError(
                f"a static LeanKCache holds at most max_tokens={self.max_tokens} tokens; give a larger max_tokens."
            )
        new = max(tokens, 2 * capacity)
        new = -(-new // self.block) * self.block
        for store in (self._mid_k, self._mid_v):
            for i, old in enumerate(store):
                buf = old.new_empty(*old.shape[:2], new, old.shape[3])
                buf[:, :, : self.middle] = old[:, :, : self.middle]
                store[i] = buf

    def _to_middle(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append tokens k, v [B, G, n, D] to the middle store: kept K channels and V of each group's heads."""
        n, m = k.shape[2], self.middle
        self._reserve_middle(m + n)
        for heads, channels, mk, mv in zip(self._heads, self._channels, self._mid_k, self._mid_v):
            mk[:, :, m : m + n], mv[:, :, m : m + n] = gather_kept(k, v, heads, channels)
        self.middle += n

    # -- the Cache protocol ---------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new tokens [B, G, T, D]; return the K/V the attention of this step sees (see ``LeanKAttention``).

        The first call (prefill) returns the prompt's full K/V, so prefill attention is ordinary. Later calls take
        one token and return the full window; the hook reads the middle store itself.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prefill = self.length == 0
        t = key_states.shape[-2]
        if not prefill and t != 1:
            raise NotImplementedError(
                f"LeanKCache takes a multi-token input only as the first call (prefill); got {t} tokens for a "
                "non-empty cache. Decode one token at a time, or start a new LeanKCache for the next prompt."
            )
        if key_states.shape[0] != self._kv_full.shape[1]:
            raise ValueError(
                f"batch size {key_states.shape[0]} does not match the cache's {self._kv_full.shape[1]}: "
                "use a new cache."
            )
        if prefill:
            if self.static and self.max_tokens < t:
                raise ValueError(
                    f"a {t}-token prompt does not fit a static LeanKCache of max_tokens={self.max_tokens}."
                )
            self._prefill(key_states, value_states)
            self._announce(prefill)
            return key_states, value_states
        if self.static:
            return self._static_update(key_states, value_states)
        self._kv_full[0, :, :, self.n_full] = key_states[:, :, 0]
        self._kv_full[1, :, :, self.n_full] = value_states[:, :, 0]
        self.n_full += 1
        self.length += 1
        n = middle_length(self.length, self.sink, self.recent, self.block) - self.middle
        if n > 0:  # the recent part reached recent + block tokens: compact its oldest block
            self._compact(n)
        self._refresh_views(middle=n > 0)
        self._announce(prefill)
        return self.keys, self.values

    def _compact(self, n: int) -> None:
        """Move the ``n`` oldest recent tokens into the middle store and shift the rest of the recent part left."""
        s, kv = self.sink, self._kv_full
        self._to_middle(kv[0, :, :, s : s + n], kv[1, :, :, s : s + n])
        kv[:, :, :, s : self.n_full - n] = kv[:, :, :, s + n : self.n_full].clone()
        self.n_full -= n

    # -- static decoding: fixed shapes, so a decode step can be captured as a CUDA graph --------------------------
    def _static_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write the new token at slot ``lengths[0]`` and count it, all on the device; return the whole buffers.

        Compaction (once per ``block`` tokens) happens before the step, in :meth:`begin_step`, outside any graph:
        the recent part then never exceeds the buffer, exactly as the dynamic cache compacts after its append.
        """
        if not self.driven:
            self.begin_step()
        slot = self.lengths[:1].long()  # [1]: the first free full-window slot
        self._kv_full.index_copy_(3, slot, torch.stack([key_states, value_states]))
        self.lengths.add_(self._one_more)
        if not self.driven:
            self.end_step()
        self._announce(False)
        return self.keys, self.values

    def begin_step(self) -> None:
        """Static: compact a block if the next token makes the recent part reach ``recent + block`` tokens."""
        n = middle_length(self.length + 1, self.sink, self.recent, self.block) - self.middle
        if n > 0:
            self._compact(n)
            self._refresh_views()

    def end_step(self) -> None:
        """Static: count the token a decode step appended (its device side already counted it in ``lengths``)."""
        self.length += 1
        self.n_full += 1

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, list[MiddleGroup]]:
        """Views of the stored tokens only: full-window K, V [B, G, n_full, D] and each group's middle tokens."""
        m = self.middle
        groups = [
            MiddleGroup(h, c, k[:, :, :m], v[:, :, :m])
            for h, c, k, v in zip(self._heads, self._channels, self._mid_k, self._mid_v)
        ]
        return self._kv_full[0, :, :, : self.n_full], self._kv_full[1, :, :, : self.n_full], groups

    def _announce(self, prefill: bool) -> None:
        """Hand this layer to its LeanK attention and route the model's next attention call to it."""
        self.attention.pending = (self, prefill)
        _route(self, self.config)

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt k, v [B, G, P, D]: its middle blocks straight into the middle store, the rest in full."""
        p, s = k.shape[2], self.sink
        nm = middle_length(p, s, self.recent, self.block)
        if nm:
            self._to_middle(k[:, :, s : s + nm], v[:, :, s : s + nm])
        head, tail = min(s, p), p - min(s, p) - nm  # sink tokens, then the recent ones
        self._kv_full[0, :, :, :head] = k[:, :, :head]
        self._kv_full[1, :, :, :head] = v[:, :, :head]
        self._kv_full[0, :, :, head : head + tail] = k[:, :, p - tail :]
        self._kv_full[1, :, :, head : head + tail] = v[:, :, p - tail :]
        self.n_full, self.length = head + tail, p
        self._refresh_views()

    def get_seq_length(self) -> int:
        """Tokens seen, compacted ones included (the position of the next token)."""
        return self.length

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        """(kv_length, kv_offset) for mask creation; ``query`` is a length (5.1x-5.2x) or a cache_position tensor."""
        q_len = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.length + q_len, 0

    def get_max_length(self) -> int:
        """No maximum length (-1), like a dynamic cache."""
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (negative count, or a positive final length); only uncompacted recent tokens."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else self.length - tokens_to_remove
        if remove <= 0 or not self.is_initialized:
            return
        removable = self.n_full - self.sink if self.middle else self.n_full  # sink stays once the middle began
        if remove > removable:
            raise NotImplementedError(
                f"cannot crop {remove} tokens: only the {removable} uncompacted recent tokens can be removed from "
                "a LeanKCache (compacted tokens lost their pruned channels)."
            )
        self.n_full -= remove
        self.length -= remove
        self._refresh_views()

    def _map(self, fn) -> None:
        """Apply ``fn`` to the batch dimension of every stored buffer."""
        if not self.is_initialized:
            return
        self._kv_full = torch.stack([fn(self._kv_full[0]), fn(self._kv_full[1])])
        self._mid_k = [fn(t) for t in self._mid_k]
        self._mid_v = [fn(t) for t in self._mid_v]
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` of the batch."""
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence ``repeats`` times along the batch."""
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        """Offloading is not supported (the buffers are not the ``keys``/``values`` views)."""
        raise NotImplementedError("LeanKCache does not support offloading: keep it on one device.")

    prefetch = offload

    def reset(self) -> None:
        """Forget every token (the next update is a prefill again) and free the buffers."""
        self.keys = self.values = None
        self.groups = []
        self.length = self.middle = self.n_full = 0
        self.is_initialized = False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LeanKCache(Cache):
    """A transformers ``Cache`` that prunes K channels of middle tokens: ``model.generate(ids, past_key_values=cache)``.

    ``model``: the model the cache serves (or its config; only shapes and the attention setting are read).
    ``mask`` [L, G, D]: 0/1 kept K channels, counts multiples of ``align`` (default head_dim // 4). ``sink``,
    ``recent``, ``block``: the windows (SmolLM2 defaults; the authors deploy 128, 768, 128). ``backend``:
    ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA). ``max_tokens`` (prompt + new tokens) reserves the
    middle store up front, so it never grows while decoding. One cache serves one sequence batch; start a new
    one for the next prompt.

    ``static=True`` (needs ``max_tokens``) preallocates everything and keeps the filled lengths on the device, so
    a decode step has fixed shapes and addresses and can be captured once as a CUDA graph and replayed: see
    :func:`leank_ref.static_decode.greedy_decode`. It decodes the same tokens as the default cache.
    """

    def __init__(
        self,
        model,
        mask: torch.Tensor,
        sink: int = 16,
        recent: int = 64,
        block: int = 32,
        *,
        align: int | None = None,
        backend: str = "auto",
        max_tokens: int | None = None,
        static: bool = False,
    ):
        config = getattr(model, "config", model)
        check_supported(config)
        if getattr(config, "use_sliding_window", False):
            raise ValueError("models with sliding-window attention are not supported by the LeanK cache; disable it.")
        if config._attn_implementation not in ATTENTIONS:
            raise ValueError(
                f"the model's attention is '{config._attn_implementation}'; the LeanK cache reads the masks of "
                "'sdpa' or 'eager': call model.set_attn_implementation('sdpa') (load_model does)."
            )
        facts = model_facts(config)
        align = facts.head_dim // 4 if align is None else align
        check_align(align, facts.head_dim)
        check_windows(sink, recent, block)
        if static and (max_tokens is None or max_tokens < 1):
            raise ValueError("static=True preallocates the cache: give max_tokens (prompt + new tokens).")
        self.attention = LeanKAttention(backend)
        self.static, self.max_tokens = static, max_tokens
        if backend == "triton" and align % MIN_KEPT:
            raise ValueError(f"backend='triton' needs align to be a multiple of {MIN_KEPT}; got align={align}.")
        mask = validate_mask(torch.as_tensor(mask), facts.mask_shape, align).cpu()
        self.mask, self.sink, self.recent, self.block, self.align = mask, sink, recent, block, align
        layers = [
            LeanKLayer(
                i, HeadGroups.from_mask(mask[i]), sink, recent, block, self.attention, config, max_tokens, static
            )
            for i in range(mask.shape[0])
        ]
        super().__init__(layers=layers)

    @property
    def driven(self) -> bool:
        """Static: whether a decode loop calls :meth:`begin_step` / :meth:`end_step` (a CUDA graph runs no Python)."""
        return self.layers[0].driven

    @driven.setter
    def driven(self, value: bool) -> None:
        for layer in self.layers:
            layer.driven = value

    def begin_step(self) -> None:
        """Static: the host work before a decode step (a compaction once per ``block`` tokens)."""
        for layer in self.layers:
            layer.begin_step()

    def end_step(self) -> None:
        """Static: count the token the decode step just appended."""
        for layer in self.layers:
            layer.end_step()

    def memory_report(self) -> MemoryReport:
        """Bytes held by the stored tokens' tensors, summed over layers, beside a dense cache of the same length."""
        live = [layer for layer in self.layers if layer.is_initialized]
        if not live:
            raise ValueError("the cache is empty: run a prefill (or generate) before asking for its memory.")
        stored = [layer.stored() for layer in live]
        full_k = sum(_nbytes(k) for k, _, _ in stored)
        full_v = sum(_nbytes(v) for _, v, _ in stored)
        middle_k = sum(_nbytes(g.k) for _, _, groups in stored for g in groups)
        middle_v = sum(_nbytes(g.v) for _, _, groups in stored for g in groups)
        allocated = sum(
            _nbytes(layer._kv_full) + sum(_nbytes(t) for t in layer._mid_k + layer._mid_v) for layer in live
        )
        b, g, _, d = live[0].keys.shape
        per_token = len(live) * b * g * d * live[0].keys.element_size()  # bytes of K (or V) per dense token
        tokens, middle = live[0].length, live[0].middle
        return MemoryReport(
            tokens,
            middle,
            full_k,
            full_v,
            middle_k,
            middle_v,
            tokens * per_token,
            tokens * per_token,
            middle * per_token,
            middle * per_token,
            allocated,
        )


_ACTIVE: weakref.WeakKeyDictionary[object, list[LeanKHandle]] = weakref.WeakKeyDictionary()  # model -> handles


def _cache_given(kwargs: dict) -> tuple[str | None, object]:
    """(keyword, cache) of the cache a caller passed, by either of transformers' names (None, None if none)."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def _check_leank(cache, where: str) -> None:
    if not isinstance(cache, LeanKCache):
        raise ValueError(
            f"{where} got a {type(cache).__name__} inside apply_leank: it would run dense attention. Pass no cache "
            "(a LeanK cache is made for you) or a LeanKCache, or leave the `with apply_leank(...)` block first."
        )


@dataclass(eq=False)  # handles compare by identity
class LeanKHandle:
    """LeanK for a model, active inside ``with``: ``with apply_leank(model, mask) as lk: model.generate(...)``.

    Inside the block ``model.generate`` and every forward pass that would start a new cache (``use_cache`` on, no
    cache given) get a fresh :class:`LeanKCache` with this handle's settings; ``lk.cache`` is the last one (for
    :meth:`LeanKCache.memory_report`). Passing another kind of cache raises, and so does ``generate`` with
    ``use_cache=False``: nothing inside the block decodes densely by accident. A forward pass without any cache
    is ordinary attention, which is also what LeanK does for a prompt.

    Creating the handle changes nothing; entering installs a ``generate`` wrapper on the model and a forward
    pre-hook on its base model, leaving removes both, so the model is exactly the original again. Handles
    nest: the innermost active handle of a model makes the caches, and leaving it hands back to the outer one.
    Entering a handle that is already active raises. ``install()`` / ``remove()`` do what ``with`` does.
    """

    model: object = field(repr=False)
    mask: torch.Tensor = field(repr=False)
    sink: int
    recent: int
    block: int
    align: int
    backend: str
    cache: LeanKCache | None = field(default=None, init=False, repr=False)
    _hooks: tuple | None = field(default=None, init=False, repr=False)  # (pre-hook handle, the model's own generate)

    def new_cache(self, max_tokens: int | None = None, static: bool = False) -> LeanKCache:
        """A fresh, empty LeanK cache with this handle's settings (``max_tokens`` reserves its middle store;
        ``static`` preallocates everything for CUDA-graph decoding, see :class:`LeanKCache`)."""
        return LeanKCache(
            self.model,
            self.mask,
            self.sink,
            self.recent,
            self.block,
            align=self.align,
            backend=self.backend,
            max_tokens=max_tokens,
            static=static,
        )

    @property
    def active(self) -> bool:
        """Whether the handle is entered (its model's ``generate`` and forward passes use LeanK caches)."""
        return self._hooks is not None

    def install(self) -> LeanKHandle:
        """Make the model's ``generate`` and new-cache forward passes use LeanK caches (what ``with`` does)."""
        if self.active:
            raise RuntimeError("this LeanK handle is already active on its model; enter it once (no re-entry).")
        stack = _ACTIVE.setdefault(self.model, [])
        if stack:  # the outer handle's hooks stay; the innermost handle is read from the stack at call time
            self._hooks = ()
        else:
            pre = self.model.base_model.register_forward_pre_hook(_forward_pre_hook(self.model), with_kwargs=True)
            own = vars(self.model).get("generate")  # a generate someone set on this model object, kept for exit
            self.model.generate = _generate_wrapper(self.model, own)  # an instance attribute: removed on exit
            self._hooks = (pre, own)
        stack.append(self)
        return self

    def remove(self) -> None:
        """Undo :meth:`install` (a no-op if not active); the last handle to leave restores the model."""
        if not self.active:
            return
        stack = _ACTIVE[self.model]
        stack.remove(self)
        if self._hooks:  # this handle installed the hooks: hand them to the next one, or remove them
            if stack:
                stack[0]._hooks, self._hooks = self._hooks, ()
            else:
                pre, own = self._hooks
                pre.remove()
                del self.model.generate
                if own is not None:
                    self.model.generate = own
                del _ACTIVE[self.model]
        self._hooks = None

    def __enter__(self) -> LeanKHandle:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def _innermost(model) -> LeanKHandle:
    return _ACTIVE[model][-1]


def _generate_wrapper(model, own=None):
    """``model.generate`` inside apply_leank: a fresh LeanK cache (reserved when the length is known) unless given."""
    original = own if own is not None else type(model).generate.__get__(model)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        handle = _innermost(model)
        name, cache = _cache_given(kwargs)
        if cache is not None:
            _check_leank(cache, "generate")
        else:
            if kwargs.get("use_cache") is False:
                raise ValueError("generate(use_cache=False) inside apply_leank would decode densely: drop it.")
            ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
            new = kwargs.get("max_new_tokens")
            total = ids.shape[-1] + new if isinstance(ids, torch.Tensor) and new is not None else None
            cache = handle.new_cache(total)
            kwargs[cache_argument(model)] = cache
        handle.cache = cache
        return original(*args, **kwargs)

    return generate


def _forward_pre_hook(model):
    """Base-model pre-hook inside apply_leank: a new cache is a LeanK cache; any other cache given raises."""

    def hook(module, args, kwargs):
        handle = _innermost(model)
        name, cache = _cache_given(kwargs)
        if cache is not None:
            _check_leank(cache, "the forward pass")
            return None
        use_cache = kwargs.get("use_cache")
        if not (module.config.use_cache if use_cache is None else use_cache):
            return None  # no cache at all: ordinary attention over the input, as LeanK's prefill
        handle.cache = handle.new_cache()
        kwargs[cache_argument(module)] = handle.cache
        return args, kwargs

    return hook


def apply_leank(
    model,
    mask: torch.Tensor,
    sink: int = 16,
    recent: int = 64,
    block: int = 32,
    align: int | None = None,
    backend: str = "auto",
) -> LeanKHandle:
    """LeanK decoding for ``model`` and ``mask`` [L, G, D], active inside ``with``; see :class:`LeanKHandle`.

    Defaults are scaled for SmolLM2 at 0.5-4K tokens (the authors deploy sink=128, recent=768, block=128).
    ``align``: the alignment the mask's per-head counts must respect (default head_dim // 4: 16 for D=64,
    the authors' 32 for D=128). ``backend``: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA).
    Everything is checked here, so a bad mask or window raises before the ``with`` starts.
    """
    template = LeanKCache(model, mask, sink, recent, block, align=align, backend=backend)
    return LeanKHandle(model, template.mask, sink, recent, block, template.align, backend)
