"""One layer of the LeanK cache: full K/V for sink + recent tokens, only the kept K channels for the middle.

Per layer, a token lives in one of three places (B batch, G KV heads, D head_dim):

* **sink**: the first ``sink`` tokens, full K and V, forever;
* **recent**: the newest tokens, full K and V. Sink and recent together are the *full window*
  ``keys, values [B, G, Nf, D]`` (sink first, then the recent tokens in order);
* **middle**: when the recent part reaches ``recent + block`` tokens, its oldest ``block`` tokens are
  compacted into the middle store: per group of heads that keep the same count ``c > 0`` of K channels,
  ``k [B, Gc, Nm, c]`` (those channels only, post-RoPE, original channel order) and ``v [B, Gc, Nm, D]``
  (the :class:`~leank_ref.layout.MiddleGroup` layout the Triton kernel reads). Heads with no kept
  channel keep neither K nor V of middle tokens (:func:`~leank_ref.masks.zero_head_rule`).

So the recent part holds ``recent .. recent + block - 1`` tokens once the cache is long enough, as in
the authors' deployment (``recent .. recent + 127``). The key of the query's own token is appended
before attention, so at query position ``t`` (``t + 1`` tokens cached) the middle tokens are
``[sink, sink + Nm)`` with ``Nm = block * floor((t + 1 - sink - recent) / block)``: LeanK's attention
(:class:`~leank_ref.attention.SimulatedLeanK`) with the *effective* recent window
``recent + (t + 1 - sink - recent) mod block`` (exactly ``recent`` when ``block = 1``).

No weight is touched: the kept channels are gathered from the post-RoPE keys at compaction, and from
the query at decode, so RoPE needs no permutation.

A layer is passive storage, like transformers' cache layers: ``update`` stores tokens and returns what the
attention of this step reads, and records in ``step`` what kind of update it was (``"prefill"``, ``"decode"``
or ``"chunk"``) for the LeanK attention that reads it (:class:`~leank_ref.cache.LeanKAttention`). A chunk (several
tokens appended to a non-empty cache, e.g. a chat's next turn) is kept aside until that attention stores it one
token at a time, computing each token's LeanK attention as if it had been decoded; the next update stores a chunk
no attention read.

Storage is preallocated, never concatenated per token: the full window lives in a buffer of
``sink + recent + block`` tokens (a new token is one copy; a compaction shifts the recent part once per
``block`` tokens), and each middle group in a buffer that grows geometrically (or is reserved up front
with ``max_tokens``). ``keys``, ``values`` and ``groups`` are views of the filled part; a static layer
(``static=True``, for CUDA graphs: :mod:`leank_ref.static_decode`) exposes the whole buffers and ``lengths``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from leank_ref.layout import HeadGroups, MiddleGroup, gather_kept
from leank_ref.windows import Windows

__all__ = ["LeanKLayer"]


class LeanKLayer(CacheLayerMixin):
    """One layer's LeanK cache: full window ``keys, values [B, G, Nf, D]`` and the middle ``groups``."""

    is_sliding = False
    is_compileable = False
    is_croppable = False  # compacted tokens cannot be restored to full width

    def __init__(
        self,
        layer_idx: int,
        heads: HeadGroups,
        windows: Windows,
        max_tokens: int | None = None,
        static: bool = False,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = heads  # HeadGroups.from_mask(mask[layer]): kv_heads [Gc], channels [Gc, c] per kept count c > 0
        self.windows = windows
        self.sink, self.recent, self.block = windows.sink, windows.recent, windows.block
        self.max_tokens = max_tokens
        self.groups: list[MiddleGroup] = []
        self.length = 0  # tokens seen (sink + middle + recent, including the compacted ones)
        self.middle = 0  # tokens compacted into the middle store
        self.n_full = 0  # tokens in the full window (sink + recent)
        self.static = static  # whole buffers, lengths on the device: a decode step has fixed shapes and addresses
        self.driven = False  # static: a decode loop keeps the host counters (begin_step / end_step), not update
        self.lengths: torch.Tensor | None = None  # static: int32 [2] on the device, (n_full, middle)
        self.step: str | None = None  # the last update, until an attention reads it: "prefill", "decode" or "chunk"
        self.chunk: tuple[torch.Tensor, torch.Tensor] | None = None  # a chunk's K, V [B, G, T, D], not yet stored

    # -- storage ------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate the full-window buffer and the (reserved) middle buffers on the keys' device and dtype."""
        b, g, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        new = key_states.new_zeros if self.static else key_states.new_empty  # static: unused slots stay finite
        self._kv_full = new(2, b, g, self.sink + self.recent + self.block, d)  # K and V
        self._heads = [h.to(self.device) for h in self.heads.kv_heads]
        self._channels = [c.to(self.device) for c in self.heads.channels]
        reserve = self.windows.middle_length(self.max_tokens) if self.max_tokens else 0
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
        """Store new tokens [B, G, T, D]; return the K/V the attention of this step sees.

        The first call (prefill) returns the prompt's full K/V, so prefill attention is ordinary. A single token
        returns the full window (the LeanK attention reads the middle store itself). Several tokens on a non-empty
        cache (a chunk) are kept aside and returned as given; the LeanK attention stores them.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store_chunk()
        t = key_states.shape[-2]
        if key_states.shape[0] != self._kv_full.shape[1]:
            raise ValueError(
                f"batch size {key_states.shape[0]} does not match the cache's {self._kv_full.shape[1]}: "
                "use a new cache."
            )
        if self.length == 0:
            if self.static and self.max_tokens < t:
                raise ValueError(
                    f"a {t}-token prompt does not fit a static LeanKCache of max_tokens={self.max_tokens}."
                )
            self._prefill(key_states, value_states)
            self.step = "prefill"
            return key_states, value_states
        if t > 1:
            if self.static:
                raise NotImplementedError(
                    f"a static LeanKCache takes one token per step after its prefill; got {t} tokens. Use the "
                    "default (dynamic) cache for a follow-up turn."
                )
            self.chunk, self.step = (key_states, value_states), "chunk"
            return key_states, value_states
        self.step = "decode"
        if self.static:
            return self._static_update(key_states, value_states)
        self.append(key_states, value_states)
        return self.keys, self.values

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append one token [B, G, 1, D] to the full window, compacting a block when the recent part is full."""
        self._kv_full[0, :, :, self.n_full] = key_states[:, :, 0]
        self._kv_full[1, :, :, self.n_full] = value_states[:, :, 0]
        self.n_full += 1
        self.length += 1
        n = self.windows.middle_length(self.length) - self.middle
        if n > 0:  # the recent part reached recent + block tokens: compact its oldest block
            self._compact(n)
        self._refresh_views(middle=n > 0)

    def store_chunk(self) -> None:
        """Store a chunk that no attention read (an update by hand): one token at a time, as decoding would."""
        if self.chunk is None:
            return
        k, v = self.chunk
        self.chunk = None
        for i in range(k.shape[2]):
            self.append(k[:, :, i : i + 1], v[:, :, i : i + 1])

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
        return self.keys, self.values

    def begin_step(self) -> None:
        """Static: compact a block if the next token makes the recent part reach ``recent + block`` tokens."""
        n = self.windows.middle_length(self.length + 1) - self.middle
        if n > 0:
            self._compact(n)
            self._refresh_views()

    def end_step(self) -> None:
        """Static: count the token a decode step appended (its device side already counted it in ``lengths``)."""
        self.length += 1
        self.n_full += 1

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, list[MiddleGroup]]:
        """Views of the stored tokens only: full-window K, V [B, G, n_full, D] and each group's middle tokens."""
        self.store_chunk()
        m = self.middle
        groups = [
            MiddleGroup(h, c, k[:, :, :m], v[:, :, :m])
            for h, c, k, v in zip(self._heads, self._channels, self._mid_k, self._mid_v)
        ]
        return self._kv_full[0, :, :, : self.n_full], self._kv_full[1, :, :, : self.n_full], groups

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt k, v [B, G, P, D]: its middle blocks straight into the middle store, the rest in full."""
        p, s = k.shape[2], self.sink
        nm = self.windows.middle_length(p)
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
        return self.length + (self.chunk[0].shape[2] if self.chunk is not None else 0)

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        """(kv_length, kv_offset) for mask creation; ``query`` is a length or a cache_position tensor."""
        q_len = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length() + q_len, 0

    def get_max_length(self) -> int:
        """No maximum length (-1), like a dynamic cache."""
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (negative count, or a positive final length); only uncompacted recent tokens."""
        self.store_chunk()
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
        self.store_chunk()
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
        self.chunk = self.step = None
        self.groups = []
        self.length = self.middle = self.n_full = 0
        self.is_initialized = False
