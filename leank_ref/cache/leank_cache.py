"""The LeanK cache: a transformers ``Cache`` of :class:`~leank_ref.cache.layer.LeanKLayer`, one per model layer.

It is passive storage, like transformers' own caches: it stores K/V and measures what it holds
(:meth:`LeanKCache.memory_report`, the tensors' real bytes; :func:`leank_ref.memory.memory_formula` predicts the
same numbers from the mask alone). The attention that reads it is bound to the model for a ``with`` block by a
press (:class:`~leank_ref.cache.LeanKPress`, or ``apply_leank``); a cache made for a model refuses a decode step
while its attention is not bound, since the model's own attention would silently skip the middle tokens.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache

from leank_ref.attention import ATTN_NAME, HOOK_ATTRIBUTE, attention_modules
from leank_ref.decode import check_backend
from leank_ref.layout import MIN_KEPT, HeadGroups
from leank_ref.masks import check_align, validate_mask
from leank_ref.memory import MemoryReport
from leank_ref.models import check_supported, model_facts
from leank_ref.windows import SMOLLM2, Windows, check_windows

from .layer import LeanKLayer

__all__ = ["LeanKCache"]

ATTENTIONS = (None, "sdpa", "eager", ATTN_NAME)  # model attention settings whose masks the prefill path reads


def model_device(model) -> torch.device | None:
    """The device of a model's parameters (None for a config, or a model without parameters)."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    first = next(iter(parameters()), None)
    return None if first is None else first.device


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LeanKCache(Cache):
    """A transformers ``Cache`` that prunes K channels of middle tokens.

    ``model``: the model the cache serves (or its config: then only shapes are read, e.g. to fill a cache by hand).
    ``mask`` [L, G, D]: 0/1 kept K channels, counts multiples of ``align`` (default head_dim // 4). ``windows``: the
    sink, recent and block sizes (:class:`~leank_ref.windows.Windows`; SmolLM2 defaults, the authors deploy
    ``AUTHORS_DEPLOY``). ``backend``: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA), checked against the
    model's device here. ``max_tokens`` (prompt + new tokens) reserves the middle store up front, so it never grows
    while decoding. One cache serves one batch of sequences; a follow-up turn appends to it.

    Decode inside a press, which binds the LeanK attention: ``with apply_leank(model, mask) as lk:
    model.generate(ids, cache=lk.new_cache())`` (or no cache at all: the press makes one).

    ``static=True`` (needs ``max_tokens``) preallocates everything and keeps the filled lengths on the device, so
    a decode step has fixed shapes and addresses and can be captured once as a CUDA graph and replayed: see
    :func:`leank_ref.static_decode.greedy_decode`. It decodes the same tokens as the default cache.
    """

    def __init__(
        self,
        model,
        mask: torch.Tensor,
        windows: Windows = SMOLLM2,
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
        self.windows = check_windows(windows)
        if static and (max_tokens is None or max_tokens < 1):
            raise ValueError("static=True preallocates the cache: give max_tokens (prompt + new tokens).")
        check_backend(backend, model_device(model))
        if backend == "triton" and align % MIN_KEPT:
            raise ValueError(f"backend='triton' needs align to be a multiple of {MIN_KEPT}; got align={align}.")
        self.mask = validate_mask(torch.as_tensor(mask), facts.mask_shape, align).cpu()
        self.align, self.backend, self.static, self.max_tokens = align, backend, static, max_tokens
        # The model's attention modules (weakly: the cache must not keep a model alive), to check the binding
        self._modules = [weakref.ref(m) for m in attention_modules(model)] if hasattr(model, "base_model") else None
        layers = [
            LeanKLayer(i, HeadGroups.from_mask(self.mask[i]), self.windows, max_tokens, static)
            for i in range(self.mask.shape[0])
        ]
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store tokens of layer ``layer_idx`` (see :meth:`LeanKLayer.update`); a decode step needs the bound
        LeanK attention when the cache was made for a model."""
        if self.layers[layer_idx].length and self._modules is not None:
            self._check_bound(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_bound(self, layer_idx: int) -> None:
        module = self._modules[layer_idx]()
        if module is None:  # the model is gone
            return
        bound = module.config._attn_implementation == ATTN_NAME
        if not bound or getattr(getattr(module, HOOK_ATTRIBUTE, None), "cache", None) is not self:
            raise RuntimeError(
                "this LeanKCache is decoding without its attention: the model would attend over the full window "
                "only and silently skip the middle tokens. Decode inside a press: `with apply_leank(model, mask) "
                "as lk: model.generate(ids)` (it makes the cache), or pass this cache to generate inside "
                "`with LeanKPress(mask, windows)(model):`."
            )

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
