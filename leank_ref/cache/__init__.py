"""The LeanK cache and how a model uses it (Zhang et al., EMNLP 2025: decoding with the pruned K cache).

One concern per module:

* :mod:`~leank_ref.cache.layer`: one layer's storage (sink + recent at full width, the middle store compacted to
  the kept K channels, block by block);
* :mod:`~leank_ref.cache.leank_cache`: :class:`LeanKCache`, the transformers ``Cache`` of those layers, with its
  measured :meth:`~LeanKCache.memory_report`;
* :mod:`~leank_ref.cache.hook`: :class:`LeanKAttention`, the attention that reads the cache (bound to the model's
  attention modules with :func:`leank_ref.attention.use_hook`);
* :mod:`~leank_ref.cache.press`: :class:`LeanKPress` and :func:`apply_leank`, the ``with press(model):`` API.

Quick use: ``with apply_leank(model, mask) as lk: model.generate(ids, max_new_tokens=64)``, then
``lk.cache.memory_report()``.
"""

from .hook import LeanKAttention
from .layer import LeanKLayer
from .leank_cache import LeanKCache
from .press import LeanKHandle, LeanKPress, apply_leank

__all__ = ["LeanKAttention", "LeanKCache", "LeanKHandle", "LeanKLayer", "LeanKPress", "apply_leank"]
