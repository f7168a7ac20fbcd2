"""The student loss of both stages (Zhang et al., 2025, Sec. 3): distill the model's own final hidden states.

The teacher is the unmodified model; the student is the model whose answer queries see ``K * s`` for middle
keys (:mod:`leank_ref.train.student`). Loss = mean over answer positions of the MSE between the two final
hidden states (after the last norm, fp32); the trainer adds ``reg_weight * mean(|s|)``.

**Prefill once.** Context queries attend normally in both models, so the context's hidden states, K and V do
not depend on ``s``: :func:`prefill` runs the context once without gradients and the teacher's answer pass
off that cache; only the student's answer pass (a few dozen tokens) runs with gradients. It equals the
student run over the whole sequence, loss and gradient (``tests/test_train_exact.py``).

**Stage 2** binarizes the factors every step (:func:`~leank_ref.masks.binarize`) and runs the student under
that mask through a straight-through estimator (:func:`straight_through`), so a pruned channel still gets a
gradient and can come back. Two forward passes (``TrainSettings.variant``):

* ``"deployed"`` (the default) trains exactly what the LeanK cache computes: kept channels enter the logits
  unscaled (the hard 0/1 mask), and a head with no kept channel skips its middle tokens (see
  :func:`~leank_ref.masks.zero_head_rule`). The gradient reaches the factors straight through the mask.
  Such a head's factors get no gradient; it regains channels only when other factors fall below its own,
  unless ``TrainSettings.empty_head_gradient="top"`` gives them a surrogate one (:mod:`leank_ref.train.surrogate`).
* ``"authors"``: the authors' code, ``where(mask, s, 0)`` (kept channels scaled by their factor) and a zero
  head's middle keys at logit 0. What it trains differs from what the cache deploys in both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from leank_ref.attention import use_hook
from leank_ref.data import IGNORE_INDEX, Example
from leank_ref.models import cache_argument
from leank_ref.train.settings import TrainSettings
from leank_ref.train.student import StudentAttention
from leank_ref.train.surrogate import EmptyHeadSurrogate, surrogate_channels


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, ids: torch.Tensor, cache: DynamicCache):
    """The base model (no LM head) over ``ids`` [1, T], appending to ``cache``."""
    return model.base_model(input_ids=ids, use_cache=True, **{cache_argument(model.base_model): cache})


def _restore(cache: DynamicCache, length: int) -> None:
    """Crop the cache back to ``length`` tokens and cut any autograd history a student pass left on it."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # a negative crop means 'remove that many' in every transformers 5
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


@torch.no_grad()
def prefill_context(model, example: Example, chunk: int = 0) -> DynamicCache:
    """Run the context once with the model's own attention and return its K/V cache (no grad: it never depends
    on s). ``chunk`` > 0 feeds the context that many tokens at a time, bounding activation memory."""
    if bool((example.labels[: example.length_context] != IGNORE_INDEX).any()):
        raise ValueError("labels before length_context must be -100: the loss is taken on the answer tokens only.")
    cache = DynamicCache()
    ids = example.context_ids[None].to(_device(model))  # [1, n_context]
    step = chunk if chunk > 0 else ids.shape[1]
    for start in range(0, ids.shape[1], step):
        _forward(model, ids[:, start : start + step], cache)
    return cache


def answer_hidden_states(model, cache: DynamicCache, example: Example, hook=None) -> torch.Tensor:
    """Final hidden states (after the last norm, fp32) [n_labels, hidden] of the answer tokens, run off ``cache``.

    The cache is restored to the context afterwards, so the next pass starts from the same prefill.
    """
    n = example.length_context
    ids = example.input_ids[n:][None].to(_device(model))  # [1, T_answer]
    try:
        if hook is None:
            out = _forward(model, ids, cache)
        else:
            with use_hook(model, hook):
                out = _forward(model, ids, cache)
    finally:
        _restore(cache, n)
    keep = (example.labels[n:] != IGNORE_INDEX).to(ids.device)  # [T_answer]
    return out.last_hidden_state[0, keep].float()  # [n_labels, hidden]


def student_hook(
    scale: torch.Tensor,
    example: Example,
    settings: TrainSettings,
    deployed: bool | None = None,
    factors: torch.Tensor | None = None,
) -> StudentAttention:
    """The student's attention for this example: answer queries see ``K * scale`` for middle keys.

    ``deployed`` (default: ``settings.excludes_zero_heads``) makes a head whose scale is all zero skip its middle
    tokens, as the deployed cache does; with a 0/1 ``scale`` the hook is then exactly the deployed attention.
    With ``settings.empty_head_gradient == "top"`` such heads also pass the surrogate gradient of
    :mod:`leank_ref.train.surrogate`, which ranks channels by ``factors`` (the current factors, required then).
    """
    exclude = settings.excludes_zero_heads if deployed is None else deployed
    if exclude and settings.empty_head_gradient == "top":
        if factors is None:
            raise ValueError("empty_head_gradient='top' ranks channels by the current factors: pass factors=.")
        channels = surrogate_channels(factors, settings.align)
        return EmptyHeadSurrogate(scale, channels, settings.training_windows, example.length_context)
    return StudentAttention(scale, settings.training_windows, example.length_context, exclude)


@dataclass
class Prefilled:
    """One example ready for training: its context K/V cache and the teacher's answer states [n_labels, hidden]."""

    example: Example
    cache: DynamicCache
    teacher: torch.Tensor


@torch.no_grad()
def prefill(model, example: Example, chunk: int = 0) -> Prefilled:
    """Prefill the context once and run the teacher's answer pass off it (the part of a step without gradient)."""
    cache = prefill_context(model, example, chunk)
    return Prefilled(example, cache, answer_hidden_states(model, cache, example))


def student_loss(
    model, prefilled: Prefilled, scale: torch.Tensor, settings: TrainSettings, factors: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between the student's and the teacher's answer states, averaged over answer positions (with grad).

    ``factors``: the current factors, needed only by ``settings.empty_head_gradient="top"``."""
    ex = prefilled.example
    student = answer_hidden_states(model, prefilled.cache, ex, student_hook(scale, ex, settings, factors=factors))
    return (student - prefilled.teacher).pow(2).mean(-1).mean()


def distillation_loss(
    model, example: Example, scale: torch.Tensor, settings: TrainSettings, factors: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of one example: one no-grad prefill and teacher pass, then the student's answer pass."""
    return student_loss(model, prefill(model, example, settings.prefill_chunk), scale, settings, factors)


@torch.no_grad()
def evaluate_scales(
    model,
    examples: list[Example],
    scales: dict[str, torch.Tensor],
    settings: TrainSettings,
    progress: bool = False,
    deployed: bool | None = None,
) -> dict[str, list[float]]:
    """Distillation loss of each named scale (factors or 0/1 mask) on each example; one prefill per example.

    ``deployed=True`` scores a 0/1 mask exactly as the LeanK cache runs it (zero-count heads skip their middle
    tokens); ``False`` gives those heads logit 0, as the authors' training does; ``None`` follows ``settings``.
    """
    losses: dict[str, list[float]] = {name: [] for name in scales}
    for example in tqdm(examples, desc="evaluate", disable=not progress):
        ready = prefill(model, example, settings.prefill_chunk)
        for name, scale in scales.items():
            hook = student_hook(scale, example, settings, deployed)
            student = answer_hidden_states(model, ready.cache, example, hook)
            losses[name].append(float((student - ready.teacher).pow(2).mean(-1).mean()))
    return losses


class _StraightThrough(torch.autograd.Function):
    """Forward: ``where(mask == 1, s, 0)`` (``hard=False``) or the mask itself (``hard=True``); backward: the
    gradient passes to ``s`` unchanged."""

    @staticmethod
    def forward(ctx, factors: torch.Tensor, mask: torch.Tensor, hard: bool) -> torch.Tensor:
        if hard:
            return mask.clone()
        return torch.where(mask == 1, factors, torch.zeros_like(factors))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def straight_through(factors: torch.Tensor, mask: torch.Tensor, hard: bool = False) -> torch.Tensor:
    """Stage 2's scale [L, G, D] whose gradient reaches every factor, pruned ones too.

    ``hard=False``: the authors' masked factors ``where(mask, s, 0)``. ``hard=True``: the 0/1 mask itself,
    the deployed forward pass (kept channels unscaled).
    """
    return _StraightThrough.apply(factors, mask.to(factors.device, factors.dtype), hard)
