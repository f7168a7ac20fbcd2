"""The LeanK cache: full K/V for sink + recent tokens, only the kept K channels for the middle (SPEC section 5).

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
``[sink, sink + Nm)`` with ``Nm = block * floor((t + 1 - sink - recent) / block)``: the attention of
SPEC section 3 with the *effective* recent window ``recent + (t + 1 - sink - recent) mod block``
(exactly ``recent`` when ``block = 1``). The tests compare against ``SimulatedLeanK`` with that window.

No weight is touched: the kept channels are gathered from the post-RoPE keys at compaction, and from
the query at decode, so RoPE needs no permutation. :func:`apply_leank` installs the decode hook
(undoable) and hands out caches for ``model.generate``.

Storage is preallocated, never concatenated per token: the full window lives in a buffer of
``sink + recent + block`` tokens (a new token is one copy; a compaction shifts the recent part once per
``block`` tokens), and each middle group in a buffer that grows geometrically (or is reserved up front
with ``max_tokens``). ``keys``, ``values`` and ``groups`` are views of the filled part.
Batches: prompts of equal length only; padded batches raise ``NotImplementedError``.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import use_hook, zero_head_rule
from .decode import LeanKAttention
from .layout import MiddleGroup
from .masks import check_align, kept_counts, validate_mask
from .models import check_supported, model_facts

MIN_TRITON_KEPT = 16  # the Triton kernel's tl.dot needs kept counts in multiples of 16


def check_windows(sink: int, recent: int, block: int) -> None:
    """Raise unless sink >= 0, recent >= 1 (a query always sees itself) and block >= 1."""
    if sink < 0 or recent < 1 or block < 1:
        raise ValueError(
            f"sink={sink}, recent={recent}, block={block}: need sink >= 0, recent >= 1 (the query's own token is "
            "recent) and block >= 1 (tokens compacted at a time); SmolLM2 defaults are sink=16, recent=64, block=32."
        )


def middle_length(tokens: int, sink: int, recent: int, block: int) -> int:
    """Tokens held in the middle store once ``tokens`` are cached: whole blocks leaving the recent window."""
    return max(tokens - sink - recent, 0) // block * block


def effective_recent(tokens: int, sink: int, recent: int, block: int) -> int:
    """The recent window (full-K tokens after the sink) the newest of ``tokens`` cached tokens sees."""
    return tokens - min(tokens, sink) - middle_length(tokens, sink, recent, block)


@dataclass(frozen=True)
class HeadGroups:
    """One layer's heads grouped by kept count ``c > 0``: KV heads [Gc] and their kept channels [Gc, c]."""

    kv_heads: tuple[torch.Tensor, ...]
    channels: tuple[torch.Tensor, ...]

    @classmethod
    def from_mask(cls, layer_mask: torch.Tensor) -> HeadGroups:
        """Group the heads of a 0/1 layer mask [G, D]; zero-count heads (deployed rule) get no group."""
        counts = kept_counts(layer_mask)  # [G]
        stores_middle = ~zero_head_rule(layer_mask)  # [G]
        heads, channels = [], []
        for c in sorted({int(n) for n in counts[stores_middle]}):
            idx = torch.nonzero(stores_middle & (counts == c)).flatten()  # [Gc]
            heads.append(idx)
            channels.append(torch.stack([torch.nonzero(layer_mask[g] > 0).flatten() for g in idx.tolist()]))
        return cls(tuple(heads), tuple(channels))


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
        max_tokens: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = heads
        self.sink, self.recent, self.block = sink, recent, block
        self.attention = attention
        self.max_tokens = max_tokens
        self.groups: list[MiddleGroup] = []
        self.length = 0  # tokens seen (sink + middle + recent, including the compacted ones)
        self.middle = 0  # tokens compacted into the middle store
        self.n_full = 0  # tokens in the full window (sink + recent)

    # -- storage ------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate the full-window buffer and the (reserved) middle buffers on the keys' device and dtype."""
        b, g, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self._kv_full = key_states.new_empty(2, b, g, self.sink + self.recent + self.block, d)  # K and V
        self._heads = [h.to(self.device) for h in self.heads.kv_heads]
        self._channels = [c.to(self.device) for c in self.heads.channels]
        reserve = middle_length(self.max_tokens, self.sink, self.recent, self.block) if self.max_tokens else 0
        self._mid_k = [
            key_states.new_empty(b, len(h), reserve, c.shape[1]) for h, c in zip(self._heads, self._channels)
        ]
        self._mid_v = [key_states.new_empty(b, len(h), reserve, d) for h in self._heads]
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self, middle: bool = True) -> None:
        """Point ``keys``, ``values`` (and ``groups``) at the filled part of the buffers (views, no copies)."""
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
            index = channels[None, :, None, :].expand(k.shape[0], -1, n, -1)  # [B, Gc, n, c]
            mk[:, :, m : m + n] = torch.gather(k.index_select(1, heads), -1, index)
            mv[:, :, m : m + n] = v.index_select(1, heads)
        self.middle += n

    # -- the Cache protocol ---------------------------------------------------------------------------
    def _check_bound(self) -> None:
        if not self.attention.active:
            raise RuntimeError(
                "This LeanKCache is not attached to an active model: get it from apply_leank(model, mask) and use it "
                "while that handle is installed (its decode steps need the LeanK attention hook)."
            )

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
                "non-empty cache. Decode one token at a time, or start a new cache (handle.new_cache())."
            )
        if key_states.shape[0] != self._kv_full.shape[1]:
            raise ValueError(
                f"batch size {key_states.shape[0]} does not match the cache's {self._kv_full.shape[1]}: "
                "use a new cache."
            )
        self._check_bound()
        self.attention.pending = (self, prefill)
        if prefill:
            self._prefill(key_states, value_states)
            return key_states, value_states
        self._kv_full[0, :, :, self.n_full] = key_states[:, :, 0]
        self._kv_full[1, :, :, self.n_full] = value_states[:, :, 0]
        self.n_full += 1
        self.length += 1
        n = middle_length(self.length, self.sink, self.recent, self.block) - self.middle
        if n > 0:  # the recent part reached recent + block tokens: compact its oldest block
            s, kv = self.sink, self._kv_full
            self._to_middle(kv[0, :, :, s : s + n], kv[1, :, :, s : s + n])
            kv[:, :, :, s : self.n_full - n] = kv[:, :, :, s + n : self.n_full].clone()  # shift the recent part
            self.n_full -= n
        self._refresh_views(middle=n > 0)
        return self.keys, self.values

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


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of K and V in a LeanK cache (full window, middle store) beside a dense cache of the same length."""

    tokens: int  # tokens cached per sequence
    middle_tokens: int  # of which compacted into the middle store
    full_k: int
    full_v: int
    middle_k: int
    middle_v: int
    dense_k: int  # a dense cache of `tokens` tokens
    dense_v: int
    dense_middle_k: int  # the dense cache's K (and V) for the middle tokens alone
    dense_middle_v: int
    allocated: int = field(
        default=0, compare=False
    )  # bytes of the buffers behind them (reserved, growth slack included)

    @property
    def k(self) -> int:
        """LeanK K bytes (full window + middle)."""
        return self.full_k + self.middle_k

    @property
    def v(self) -> int:
        """LeanK V bytes (full window + middle)."""
        return self.full_v + self.middle_v

    @property
    def total(self) -> int:
        """LeanK K + V bytes."""
        return self.k + self.v

    @property
    def dense_total(self) -> int:
        """Dense K + V bytes."""
        return self.dense_k + self.dense_v

    @property
    def k_saved(self) -> float:
        """Share of the dense K bytes saved."""
        return 1.0 - self.k / self.dense_k if self.dense_k else 0.0

    @property
    def v_saved(self) -> float:
        """Share of the dense V bytes saved."""
        return 1.0 - self.v / self.dense_v if self.dense_v else 0.0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LeanKCache(Cache):
    """A transformers ``Cache`` of :class:`LeanKLayer` objects for ``generate`` (see :meth:`LeanKHandle.generate`).

    ``max_tokens`` (prompt + new tokens) reserves the middle store up front, so it never grows during decoding.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        sink: int,
        recent: int,
        block: int,
        attention: LeanKAttention,
        max_tokens: int | None = None,
    ):
        check_windows(sink, recent, block)
        mask = validate_mask(mask)
        self.mask, self.sink, self.recent, self.block = mask, sink, recent, block
        layers = [
            LeanKLayer(i, HeadGroups.from_mask(mask[i]), sink, recent, block, attention, max_tokens)
            for i in range(mask.shape[0])
        ]
        super().__init__(layers=layers)

    def memory_report(self) -> MemoryReport:
        """Bytes held by the stored tokens' tensors, summed over layers, beside a dense cache of the same length."""
        live = [layer for layer in self.layers if layer.is_initialized]
        if not live:
            raise ValueError("the cache is empty: run a prefill (or generate) before asking for its memory.")
        full_k = sum(_nbytes(layer.keys) for layer in live)
        full_v = sum(_nbytes(layer.values) for layer in live)
        middle_k = sum(_nbytes(g.k) for layer in live for g in layer.groups)
        middle_v = sum(_nbytes(g.v) for layer in live for g in layer.groups)
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


def memory_formula(
    mask: torch.Tensor, tokens: int, sink: int, recent: int, block: int, batch: int = 1, bytes_per_value: int = 2
) -> MemoryReport:
    """The :class:`MemoryReport` a LeanK cache of ``tokens`` tokens would give, computed from the mask's counts alone.

    Per layer: full window ``B*G*(tokens-Nm)*D`` values of K and of V; middle K ``B*Nm*sum(kept counts)``;
    middle V ``B*Nm*D`` per head that keeps a channel. ``bytes_per_value``: 2 for bf16/fp16, 4 for fp32.
    ``allocated`` is left at 0 (it depends on the buffers' growth, not on the mask).
    """
    check_windows(sink, recent, block)
    mask = validate_mask(mask)
    layers, g, d = mask.shape
    counts = kept_counts(mask)  # [L, G]
    middle = middle_length(tokens, sink, recent, block)
    unit = batch * bytes_per_value
    dense = layers * g * d * tokens * unit
    dense_middle = layers * g * d * middle * unit
    full = dense - dense_middle
    middle_k = int(counts.sum()) * middle * unit
    middle_v = int((~zero_head_rule(mask)).sum()) * d * middle * unit
    return MemoryReport(tokens, middle, full, full, middle_k, middle_v, dense, dense, dense_middle, dense_middle)


def cache_argument(model) -> str:
    """The keyword ``generate`` takes a cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


_INSTALLED: weakref.WeakKeyDictionary[object, LeanKHandle] = weakref.WeakKeyDictionary()  # model -> its handle


@dataclass
class LeanKHandle:
    """LeanK applied to a model: the decode hook (installed until :meth:`remove`) and caches for ``generate``.

    ``with apply_leank(model, mask) as lk: out = lk.generate(ids, max_new_tokens=64)``; after the block (or
    ``lk.remove()``) the model is dense again. One handle is installed per model at a time: installing another
    removes the previous one (whose caches then refuse to decode until it is reinstalled). ``lk.cache`` is the
    cache of the last :meth:`generate` (for :meth:`LeanKCache.memory_report`); ``lk.new_cache(max_tokens)`` gives
    a fresh one to pass to ``model.generate`` yourself, by the keyword :func:`cache_argument` names.
    """

    model: object
    mask: torch.Tensor
    sink: int
    recent: int
    block: int
    attention: LeanKAttention
    cache: LeanKCache = field(init=False)
    _hook_ctx: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.cache = self.new_cache()
        self.install()

    def new_cache(self, max_tokens: int | None = None) -> LeanKCache:
        """A fresh, empty LeanK cache bound to this handle's hook (``max_tokens`` reserves its middle store)."""
        return LeanKCache(self.mask, self.sink, self.recent, self.block, self.attention, max_tokens)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs):
        """``model.generate`` with a fresh LeanK cache reserved for prompt + ``max_new_tokens`` (kept as ``.cache``)."""
        self.cache = self.new_cache(input_ids.shape[-1] + max_new_tokens)
        kwargs[cache_argument(self.model)] = self.cache
        return self.model.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def install(self) -> LeanKHandle:
        """Route the model's attention through the LeanK hook (done by :func:`apply_leank`; idempotent)."""
        if self._hook_ctx is None:
            previous = _INSTALLED.get(self.model)
            if previous is not None and previous is not self:
                previous.remove()
            self._hook_ctx = use_hook(self.model, self.attention)
            self._hook_ctx.__enter__()
            _INSTALLED[self.model] = self
            self.attention.active = True
        return self

    def remove(self) -> None:
        """Undo :meth:`install`: the model attends densely again (its caches cannot decode until reinstalled)."""
        if self._hook_ctx is not None:
            self.attention.active = False
            self.attention.pending = None
            self._hook_ctx.__exit__(None, None, None)
            self._hook_ctx = None
            if _INSTALLED.get(self.model) is self:
                del _INSTALLED[self.model]

    def __enter__(self) -> LeanKHandle:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_leank(
    model,
    mask: torch.Tensor,
    sink: int = 16,
    recent: int = 64,
    block: int = 32,
    align: int | None = None,
    backend: str = "auto",
) -> LeanKHandle:
    """Make ``model`` decode with LeanK for ``mask`` [L, G, D]; returns an installed, undoable handle.

    Defaults are scaled for SmolLM2 at 0.5-4K tokens (the authors deploy sink=128, recent=768, block=128).
    ``align``: the alignment the mask's per-head counts must respect (default head_dim // 4: 16 for D=64,
    the authors' 32 for D=128). ``backend``: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA).
    """
    check_supported(model.config)
    if getattr(model.config, "use_sliding_window", False):
        raise ValueError("models with sliding-window attention are not supported by the LeanK cache; disable it.")
    facts = model_facts(model)
    align = facts.head_dim // 4 if align is None else align
    check_align(align, facts.head_dim)
    check_windows(sink, recent, block)
    attention = LeanKAttention(backend)
    if backend == "triton" and align % MIN_TRITON_KEPT:
        raise ValueError(f"backend='triton' needs align to be a multiple of {MIN_TRITON_KEPT}; got align={align}.")
    mask = validate_mask(torch.as_tensor(mask), facts.mask_shape, align).cpu()
    return LeanKHandle(model, mask, sink, recent, block, attention)
