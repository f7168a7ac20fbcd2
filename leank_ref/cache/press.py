"""LeanK for a model, the way a kvpress user applies a press: ``with LeanKPress(mask)(model): model.generate(...)``.

A :class:`LeanKPress` is a small frozen dataclass (mask, windows, backend, align) made and checked without a model;
what it saves is readable before anything runs (:meth:`LeanKPress.memory`, :meth:`LeanKPress.k_saved`, from
:func:`leank_ref.memory.memory_formula`). Calling it on a model checks the model against it (architecture, shape,
backend vs device) and gives a :class:`LeanKHandle`, active inside ``with``. ``apply_leank(model, mask)`` is the
same thing in one call.

Inside the block, on that model only:

* the LeanK attention (:class:`~leank_ref.cache.LeanKAttention`) is bound to every attention module
  (:func:`leank_ref.attention.use_hook`), pointed at the cache of each forward pass;
* ``model.generate`` and every forward pass that would start a new cache get a fresh
  :class:`~leank_ref.cache.LeanKCache` with the press's settings (``lk.cache`` is the last one); a LeanK cache
  passed by hand is used as given (a follow-up turn appends to it); any other cache, ``use_cache=False`` in
  ``generate``, and assisted decoding raise, so nothing inside the block decodes densely by accident.

Creating a press or a handle changes nothing; leaving the block (also by an exception) restores the model exactly.
Handles of one model nest: the innermost active one makes the caches, and leaving it hands back to the outer one.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from leank_ref.attention import use_hook
from leank_ref.decode import check_backend
from leank_ref.layout import MIN_KEPT
from leank_ref.masks import check_align, validate_mask
from leank_ref.memory import MemoryReport, memory_formula
from leank_ref.models import cache_argument
from leank_ref.windows import SMOLLM2, Windows, check_windows

from .hook import LeanKAttention
from .leank_cache import LeanKCache

__all__ = ["LeanKHandle", "LeanKPress", "apply_leank"]

BINDING = "leank_binding"  # the model attribute that holds its active handles while any is entered
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")  # generate's draft-and-crop modes


@dataclass(frozen=True, eq=False)
class LeanKPress:
    """LeanK decoding settings: ``mask`` [L, G, D] (0/1 kept K channels), ``windows``, ``backend``, ``align``.

    ``align``: the multiple every head's kept count must be (default head_dim // 4: 16 for D=64, the authors' 32
    for D=128). ``backend``: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA). Everything is checked here;
    ``press(model)`` checks the model (shape, architecture, backend vs device) and returns a :class:`LeanKHandle`.
    """

    mask: torch.Tensor = field(repr=False)
    windows: Windows = SMOLLM2
    backend: str = "auto"
    align: int | None = None

    def __post_init__(self) -> None:
        mask = torch.as_tensor(self.mask)
        if mask.ndim != 3:
            raise ValueError(f"mask must be [layers, kv_heads, head_dim]; got shape {list(mask.shape)}.")
        align = mask.shape[-1] // 4 if self.align is None else self.align
        check_align(align, mask.shape[-1])
        check_windows(self.windows)
        check_backend(self.backend)
        if self.backend == "triton" and align % MIN_KEPT:
            raise ValueError(f"backend='triton' needs align to be a multiple of {MIN_KEPT}; got align={align}.")
        object.__setattr__(self, "mask", validate_mask(mask, None, align).cpu())
        object.__setattr__(self, "align", align)

    def memory(self, tokens: int, *, batch: int = 1, bytes_per_value: int = 2) -> MemoryReport:
        """The bytes a LeanK cache of ``tokens`` tokens holds with this press, beside a dense cache (bf16 default)."""
        return memory_formula(self.mask, tokens, self.windows, batch=batch, bytes_per_value=bytes_per_value)

    def k_saved(self, tokens: int) -> float:
        """Share of the dense K cache this press saves at ``tokens`` tokens (windows included)."""
        return self.memory(tokens).k_saved

    def new_cache(self, model, max_tokens: int | None = None, static: bool = False) -> LeanKCache:
        """A fresh, empty :class:`LeanKCache` for ``model`` with this press's settings."""
        return LeanKCache(
            model,
            self.mask,
            self.windows,
            align=self.align,
            backend=self.backend,
            max_tokens=max_tokens,
            static=static,
        )

    def __call__(self, model) -> LeanKHandle:
        """This press on ``model``, active inside ``with``; the model is checked now, and nothing changes yet."""
        self.new_cache(model)  # raises on a model that does not fit the press
        return LeanKHandle(model, self)


@dataclass(eq=False)  # handles compare by identity
class LeanKHandle:
    """A :class:`LeanKPress` on one model, active inside ``with``: ``with press(model) as lk: model.generate(...)``.

    ``lk.cache`` is the cache of the last ``generate`` (or of the last forward pass that started one), for
    :meth:`LeanKCache.memory_report`. Entering a handle that is already active raises. ``install()`` /
    ``remove()`` do what ``with`` does; handles may be removed in any order.
    """

    model: object = field(repr=False)
    press: LeanKPress
    cache: LeanKCache | None = field(default=None, init=False, repr=False)
    active: bool = field(default=False, init=False)  # whether the handle is entered

    def new_cache(self, max_tokens: int | None = None, static: bool = False) -> LeanKCache:
        """A fresh, empty LeanK cache with this handle's settings (``max_tokens`` reserves its middle store;
        ``static`` preallocates everything for CUDA-graph decoding, see :class:`LeanKCache`)."""
        return self.press.new_cache(self.model, max_tokens, static)

    def install(self) -> LeanKHandle:
        """Bind the LeanK attention and the cache-making wrappers to the model (what ``with`` does)."""
        if self.active:
            raise RuntimeError("this LeanK handle is already active on its model; enter it once (no re-entry).")
        binding = vars(self.model).get(BINDING) or _Binding(self.model)
        binding.handles.append(self)
        self.active = True
        return self

    def remove(self) -> None:
        """Undo :meth:`install` (a no-op if not active); the last handle to leave restores the model."""
        if not self.active:
            return
        binding = vars(self.model)[BINDING]
        binding.handles.remove(self)
        self.active = False
        if not binding.handles:
            binding.close()

    def __enter__(self) -> LeanKHandle:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_leank(
    model,
    mask: torch.Tensor,
    windows: Windows = SMOLLM2,
    align: int | None = None,
    backend: str = "auto",
) -> LeanKHandle:
    """LeanK decoding for ``model`` and ``mask`` [L, G, D], active inside ``with``: ``LeanKPress(...)(model)``.

    ``windows``: defaults scaled for SmolLM2 at 0.5-4K tokens (the authors deploy ``Windows(128, 768, 128)``).
    Everything is checked here, so a bad mask, window or backend raises before the ``with`` starts.
    """
    return LeanKPress(mask, windows, backend, align)(model)


def _cache_given(kwargs: dict):
    """The cache a caller passed, by either of transformers' names (None if none)."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _check_leank(cache, where: str) -> None:
    if not isinstance(cache, LeanKCache):
        raise ValueError(
            f"{where} got a {type(cache).__name__} inside apply_leank: it would run dense attention. Pass no cache "
            "(a LeanK cache is made for you) or a LeanKCache, or leave the `with apply_leank(...)` block first."
        )


class _Binding:
    """What the active handles of one model installed on it, and those handles (innermost last).

    Lives on the model (``model.leank_binding``) while at least one handle is active: the LeanK attention bound
    to every attention module, a forward pre-hook on the base model and a ``generate`` wrapper.
    """

    def __init__(self, model):
        self.model = model
        self.handles: list[LeanKHandle] = []
        self.attention = LeanKAttention()
        self._undo = ExitStack()
        try:
            self._undo.enter_context(use_hook(model, self.attention))
            pre = model.base_model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            self._undo.callback(pre.remove)
            own = vars(model).get("generate")  # a generate someone set on this model object, kept for exit
            model.generate = self._wrap_generate(own)  # an instance attribute: removed on exit
            self._undo.callback(self._restore_generate, own)
            setattr(model, BINDING, self)
            self._undo.callback(vars(model).pop, BINDING)
        except BaseException:
            self._undo.close()
            raise

    def close(self) -> None:
        self._undo.close()

    def _restore_generate(self, own) -> None:
        vars(self.model).pop("generate", None)
        if own is not None:
            self.model.generate = own

    def _wrap_generate(self, own):
        """``model.generate`` inside the block: a fresh LeanK cache (reserved when the length is known) unless given."""
        model = self.model
        original = own if own is not None else type(model).generate.__get__(model)

        @functools.wraps(original)
        def generate(*args, **kwargs):
            handle = self.handles[-1]
            assisted = [name for name in ASSISTED if kwargs.get(name) is not None]
            if assisted:
                raise ValueError(
                    f"assisted decoding ({assisted[0]}) is not supported inside apply_leank: it crops rejected draft "
                    "tokens from the cache, and a LeanK cache cannot restore tokens whose pruned K channels it "
                    "dropped at compaction. Generate without an assistant."
                )
            cache = _cache_given(kwargs)
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

    def _before_forward(self, module, args, kwargs):
        """Base-model pre-hook: point the LeanK attention at this pass's cache; a new cache is a LeanK cache."""
        cache = _cache_given(kwargs)
        if cache is not None:
            _check_leank(cache, "the forward pass")
            self.attention.cache = cache
            return None
        use_cache = kwargs.get("use_cache")
        if not (module.config.use_cache if use_cache is None else use_cache):
            self.attention.cache = None  # no cache at all: ordinary attention over the input, as LeanK's prefill
            return None
        handle = self.handles[-1]
        handle.cache = self.attention.cache = handle.new_cache()
        kwargs[cache_argument(module)] = handle.cache
        return args, kwargs
