"""Channel selectors at equal budget: which K channels each method keeps (notebook 06).

Every selector answers one question with one interface: given the model, a *budget* and optionally the prompt,
which channels? ``select(model, counts, align, prompt_ids=None, capture=None) -> [L, G, D]`` float 0/1 mask,
where the budget ``counts`` is int ``[L, G]``: how many channels each (layer, KV head) keeps, multiples of
``align``.

**Equal budget** means the same kept count *in every head* for every method at a ratio, not only the same total,
so a comparison isolates the choice of channels from their allocation over heads. Where a learned LeanK mask
exists for the ratio, every method gets *its* per-head counts (:func:`equal_budget`; zero-count heads included):
LeanK's allocation is part of what it learned, and handing it to the heuristics makes them stronger, not weaker,
so a LeanK win is a win of channel choice alone. Where there is no learned mask (r=0.8 here), every method gets
:func:`uniform_counts` (as even as the alignment allows). The evaluation can also run the heuristics at uniform
counts beside LeanK's, to show what the learned allocation is worth. The scoring selectors share one rule: keep
each head's top-``count`` channels by score, ties toward the lower channel index.

Static selectors (one mask per model): LeanK's learned mask, its stage-1 factors ranked within each head, the
offline-averaged |q|·|k| importance, lowest-RoPE-frequency channels, random channels. Per-prompt selectors (chosen
at prefill from the prompt's own queries/keys): ThinK and K-norm. :class:`Dense` keeps everything: the reference,
not at the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from leank_ref.attention import QKCapture, capture_prefill
from leank_ref.data import continuation_example
from leank_ref.masks import check_align, check_ratio, kept_counts, load_mask, top_count_mask
from leank_ref.models import masks_dir as shipped_masks_dir
from leank_ref.models import model_facts
from leank_ref.sparsity import capture_importance, rope_frequencies
from leank_ref.windows import SMOLLM2, Windows

MODEL_TAG = "smollm2-135m"  # file-name prefix of the shipped SmolLM2 masks
WINDOWED_MASKS = "paper"  # sub-folder of the masks trained for other windows than SmolLM2's defaults
CALIBRATION_SEED_BASE = 20_000  # static-importance calibration prompts; evaluation uses 10_000-19_999


def mask_stem(windows: Windows = SMOLLM2, model_tag: str = MODEL_TAG) -> str:
    """Path of a mask file without its ending, relative to the masks folder, for masks deployed with ``windows``:
    ``smollm2-135m`` for the default windows (16 / 64), ``paper/smollm2-135m_w128-768`` for sink 128 / recent 768.
    """
    if windows == SMOLLM2:
        return model_tag
    return f"{WINDOWED_MASKS}/{model_tag}_w{windows.sink}-{windows.recent}"


def learned_mask_path(
    ratio: float,
    masks_dir: str | Path | None = None,
    model_tag: str = MODEL_TAG,
    variant: str = "",
    windows: Windows = SMOLLM2,
) -> Path:
    """Where the LeanK mask for ``ratio`` lives: ``<masks_dir>/<stem>_r<ratio>.pth`` (the default, deploy-exact
    stage 2) or ``<stem>_r<ratio>_<variant>.pth`` (e.g. ``variant="authors"``); ``stem`` from :func:`mask_stem`.
    ``masks_dir`` defaults to the shipped masks (:func:`leank_ref.models.masks_dir`)."""
    suffix = f"_{variant}" if variant else ""
    folder = shipped_masks_dir() if masks_dir is None else Path(masks_dir)
    return folder / f"{mask_stem(windows, model_tag)}_r{float(ratio):g}{suffix}.pth"


def stage1_factors_path(
    masks_dir: str | Path | None = None, model_tag: str = MODEL_TAG, windows: Windows = SMOLLM2
) -> Path:
    """Where the stage-1 factors for ``windows`` live: ``<masks_dir>/<stem>_stage1_factors.pth``."""
    folder = shipped_masks_dir() if masks_dir is None else Path(masks_dir)
    return folder / f"{mask_stem(windows, model_tag)}_stage1_factors.pth"


def uniform_counts(shape: tuple[int, int, int], ratio: float, align: int) -> torch.Tensor:
    """Int [L, G]: per-head kept counts as even as ``align`` allows, pruning ``ratio`` of all channels.

    Total kept = round((1 - ratio) * L*G*D / align) blocks of ``align`` channels. Every head gets the floor
    share; the leftover blocks go one each to heads evenly spaced over the flattened (layer, head) order,
    so no depth is favoured. With D=64, align=16: r=0.5 -> 32 everywhere; r=0.7 -> 72 heads keep 16 and 18
    keep 32; r=0.8 -> 72 heads keep 16 and 18 keep 0.
    """
    check_ratio(ratio)
    layers, heads, d = shape
    check_align(align, d)
    n_heads = layers * heads
    blocks = round((1.0 - ratio) * n_heads * d / align)
    base, extra = divmod(blocks, n_heads)
    counts = torch.full((n_heads,), base * align, dtype=torch.long)
    counts[(torch.arange(extra) * n_heads) // extra if extra else torch.arange(0)] += align
    return counts.reshape(layers, heads)


def check_counts(counts: torch.Tensor, shape: tuple[int, int, int], align: int) -> torch.Tensor:
    """Raise unless ``counts`` is int [L, G] with values in {0, align, ..., D}; return it as int64."""
    layers, heads, d = shape
    check_align(align, d)
    if tuple(counts.shape) != (layers, heads):
        raise ValueError(
            f"counts has shape {list(counts.shape)} but the model needs [{layers}, {heads}] (layers, kv_heads)."
        )
    counts = counts.long()
    if bool(((counts < 0) | (counts > d) | (counts % align != 0)).any()):
        raise ValueError(
            f"every count must be a multiple of align={align} in [0, {d}]; got {counts.unique().tolist()}."
        )
    return counts


@dataclass
class Selector:
    """Base: a channel scorer plus the shared top-count rule. Subclasses define ``scores``."""

    name: ClassVar[str] = "selector"
    per_prompt: ClassVar[bool] = False  # True: needs the prompt's queries/keys (a prefill capture)

    def scores(self, model, capture: QKCapture | None) -> torch.Tensor:
        """[L, G, D] float, higher = keep."""
        raise NotImplementedError

    def select(
        self,
        model,
        counts: torch.Tensor,
        align: int,
        prompt_ids: torch.Tensor | None = None,
        capture: QKCapture | None = None,
    ) -> torch.Tensor:
        """[L, G, D] 0/1 mask keeping exactly ``counts`` [L, G] channels per head (a prompt only if per_prompt)."""
        shape = model_facts(model).mask_shape
        counts = check_counts(counts, shape, align)
        if self.per_prompt and capture is None:
            if prompt_ids is None:
                raise ValueError(
                    f"{self.name} chooses channels per prompt: pass prompt_ids (or a QKCapture of its prefill)."
                )
            capture, _ = capture_prefill(model, prompt_ids)
        return top_count_mask(self.scores(model, capture), counts)


@dataclass
class Dense(Selector):
    """No pruning: every channel kept. The reference every method is measured against (ignores the budget)."""

    name: ClassVar[str] = "dense"

    def select(self, model, counts=None, align=None, prompt_ids=None, capture=None) -> torch.Tensor:
        """All-ones [L, G, D]."""
        return torch.ones(model_facts(model).mask_shape)


@dataclass
class LeanKLearned(Selector):
    """LeanK (Zhang et al., EMNLP 2025): the shipped static mask learned by distillation (masks/*.pth)."""

    path: Path
    name: ClassVar[str] = "leank"

    @classmethod
    def for_ratio(cls, ratio: float, masks_dir: str | Path | None = None, windows: Windows = SMOLLM2) -> LeanKLearned:
        """The mask for ``ratio`` (and ``windows``) from ``masks_dir`` (default: the shipped masks, found by
        :func:`leank_ref.models.masks_dir`); FileNotFoundError names the training command if it is missing."""
        path = learned_mask_path(ratio, masks_dir, windows=windows)
        if not path.exists():
            raise FileNotFoundError(
                f"no learned mask at {path}: train it first (python -m leank_ref train --ratio {ratio})."
            )
        return cls(path)

    def mask(self, model, align: int | None = None) -> torch.Tensor:
        """The shipped [L, G, D] mask, validated against the model's shape (and ``align``)."""
        return load_mask(self.path, model_facts(model).mask_shape, align)

    def select(self, model, counts, align, prompt_ids=None, capture=None) -> torch.Tensor:
        """The shipped mask; raises if ``counts`` differs from its own per-head counts (no silent re-budgeting)."""
        mask = self.mask(model, align)
        own = kept_counts(mask)
        if not torch.equal(own, check_counts(counts, tuple(mask.shape), align)):
            raise ValueError(
                f"the learned mask {self.path.name} keeps other per-head counts than the budget; "
                "use kept_counts(mask) as the budget to compare at LeanK's allocation."
            )
        return mask


@dataclass
class ThinK(Selector):
    """ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018), per prompt.

    At prefill, channel j of head i scores ||Q_i[-w:, j] K_i[:, j]^T||_F (their Section 3.2: the observation
    window is the last w = 32 queries of the prompt), which factorises into ||Q_i[-w:, j]||_2 · ||K_i[:, j]||_2
    over those queries and all prompt keys; each head keeps its top channels. GQA: the Frobenius norm runs over
    the stacked H/G query heads that read one KV head, so their squared query norms add. ThinK keeps a fixed
    share per head; here the head's count comes from the budget, like every other selector.
    """

    window: int = 32
    name: ClassVar[str] = "think"
    per_prompt: ClassVar[bool] = True

    def scores(self, model, capture: QKCapture) -> torch.Tensor:
        """[L, G, D]: ||Q[-window:, c]|| * ||K[:, c]|| per (layer, KV head, channel), from the prompt's prefill."""
        out = []
        for layer in sorted(capture.queries):
            q, k = capture.queries[layer][0], capture.keys[layer][0]  # [H, T, D], [G, N, D]
            h, g = q.shape[0], k.shape[0]
            q_sq = q[:, -self.window :].pow(2).sum(1).reshape(g, h // g, -1).sum(1)  # [G, D]
            k_sq = k.pow(2).sum(1)  # [G, D]
            out.append((q_sq * k_sq).sqrt())
        return torch.stack(out)


@dataclass
class KNorm(Selector):
    """Key-norm channels, per prompt: keep the channels whose prompt keys are largest, ||K[:, c]||_2 (no query).

    The query-agnostic half of ThinK's score: it asks whether knowing the queries matters.
    """

    name: ClassVar[str] = "knorm"
    per_prompt: ClassVar[bool] = True

    def scores(self, model, capture: QKCapture) -> torch.Tensor:
        """[L, G, D]: L2 norm of each key channel over the prompt's tokens."""
        return torch.stack([capture.keys[layer][0].norm(dim=1) for layer in sorted(capture.keys)])


@dataclass
class RandomChannels(Selector):
    """Random channels (one seeded draw per selector, the same for every prompt): the floor any method must beat."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def scores(self, model, capture=None) -> torch.Tensor:
        """[L, G, D] uniform random scores from ``torch.Generator().manual_seed(seed)``."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(model_facts(model).mask_shape, generator=generator)


@dataclass
class RopeLowFrequency(Selector):
    """Lowest-RoPE-frequency channels in every head: the slowly rotating pairs that carry position-robust q·k."""

    name: ClassVar[str] = "rope"

    def scores(self, model, capture=None) -> torch.Tensor:
        """[L, G, D]: minus each channel's RoPE frequency (the slowest channels score highest)."""
        facts = model_facts(model)
        freq = rope_frequencies(facts.head_dim, facts.rope_theta)  # [D]
        return (-freq).expand(facts.mask_shape).clone()


@dataclass
class StaticImportance(Selector):
    """Static |q|·|k| importance: :func:`leank_ref.sparsity.channel_importance` averaged over calibration prompts.

    ThinK's idea made static without learning: one mask per model. Build it with :meth:`calibrate` (pydoc
    continuation prompts, seeds from 20_000: disjoint from the evaluation's 10_000-19_999 and from training).
    """

    importance: torch.Tensor  # [L, G, D]
    name: ClassVar[str] = "static_qk"

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model, tokenizer, num_prompts: int = 4, length: int = 1024) -> StaticImportance:
        """Average the importance of ``num_prompts`` calibration prompts of ``length`` tokens."""
        total = torch.zeros(model_facts(model).mask_shape)
        for i in range(num_prompts):
            ids = continuation_example(tokenizer, length, seed=CALIBRATION_SEED_BASE + i).context_ids
            total += capture_importance(model, ids)  # [L, G, D]
        return cls(total / num_prompts)

    def scores(self, model, capture=None) -> torch.Tensor:
        """The calibrated [L, G, D] importance."""
        return self.importance


@dataclass
class LeanKFactors(Selector):
    """LeanK's stage-1 scaling factors (masks/*_stage1_factors.pth), ranked within each head at the given budget.

    Not a shipped mask: it shows what the continuous factors know before stage 2 binarizes and fine-tunes them, and
    gives a learned selector at ratios with no shipped mask.
    """

    factors: torch.Tensor  # [L, G, D]
    name: ClassVar[str] = "leank_factors"

    @classmethod
    def load(cls, path: str | Path) -> LeanKFactors:
        """Read the factors tensor (``weights_only``); FileNotFoundError names the training command."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no stage-1 factors at {path}: train them first (python -m leank_ref train --stage 1)."
            )
        factors = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(factors, torch.Tensor) or factors.ndim != 3:
            raise ValueError(f"{path} must hold a [L, G, D] factors tensor.")
        return cls(factors.float())

    def scores(self, model, capture=None) -> torch.Tensor:
        """The factors themselves, checked against the model's [L, G, D]."""
        shape = model_facts(model).mask_shape
        if tuple(self.factors.shape) != shape:
            raise ValueError(f"factors have shape {list(self.factors.shape)} but the model needs {list(shape)}.")
        return self.factors


def equal_budget(
    model, ratio: float, align: int, masks_dir: str | Path | None = None, windows: Windows = SMOLLM2
) -> tuple[torch.Tensor, str]:
    """The per-head budget every method gets at ``ratio``: (int [L, G] counts, source "leank" or "uniform").

    The LeanK mask's own per-head counts when a mask for ``ratio`` and ``windows`` exists, else
    :func:`uniform_counts` (module docstring).
    """
    shape = model_facts(model).mask_shape
    path = learned_mask_path(ratio, masks_dir, windows=windows)
    if path.exists():
        return kept_counts(load_mask(path, shape, align)), "leank"
    return uniform_counts(shape, ratio, align), "uniform"


SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls
    for cls in (Dense, LeanKLearned, LeanKFactors, ThinK, KNorm, StaticImportance, RopeLowFrequency, RandomChannels)
}
