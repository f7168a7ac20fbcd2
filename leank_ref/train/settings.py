"""The settings of one training run (:class:`TrainSettings`), its named presets, and its scaling to any model.

One dataclass decides a run of either stage. Its defaults are the authors' recipe (Zhang et al., 2025, Sec. 3
and App. B) scaled to SmolLM2; the authors' own values sit beside each field. :meth:`TrainSettings.for_model`
scales them to another Llama/Qwen2 model from two facts, its head_dim (alignment = head_dim / 4) and the
longest training context you can afford (windows grow with it); for SmolLM2 at 2048 tokens it gives exactly
the defaults. :data:`PRESETS` holds named settings (``python -m leank_ref train --preset laptop``).

The windows: ``windows.sink`` and ``windows.recent`` decide which keys a decode query sees through the pruned
K in training. Training simulates block 1 (every answer query sees exactly ``recent`` full-K tokens, as the
authors' training does, see :data:`~leank_ref.windows.AUTHORS_TRAIN`); ``windows.block`` is the block the
mask is deployed with (:meth:`cache_settings`), recorded with the run but not used by the loss.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from leank_ref.data import TASKS
from leank_ref.masks import binarize, binarize_kv, check_align, check_ratio
from leank_ref.models import model_facts
from leank_ref.windows import SMOLLM2, Windows, check_windows

BUDGETS = ("k", "kv")  # stage 2: what the ratio prunes, K channels or the middle's K + V bytes (masks.binarize_kv)
EMPTY_HEAD_GRADIENTS = ("none", "top")  # stage 2 deployed: emptied heads' backward pass, see leank_ref.train.surrogate

STAGE2_VARIANTS = ("deployed", "authors")  # stage 2's forward pass, see leank_ref.train.loss
STAGE_DEFAULTS = {  # the authors' per-stage values of the fields that differ between the stages
    1: {"stage": 1, "steps": 2000, "lr": 0.02, "reg_weight": 0.06},
    2: {"stage": 2, "steps": 200, "lr": 0.01, "reg_weight": 0.0},
}
DEFAULT_CONTEXT = 2048  # longest training context of the shipped SmolLM2 run


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run of one stage; defaults are scaled for SmolLM2."""

    stage: int = 1  # 1: learn factors; 2: fine-tune them under their binarization
    steps: int = 2000  # authors: 2000 (stage 1), 200 (stage 2)
    lr: float = 0.02  # authors: 0.02 (stage 1), 0.01 (stage 2)
    reg_weight: float = 0.06  # L1 weight lambda; authors: 0.06 (stage 1), 0 (stage 2)
    ratio: float | None = None  # stage 2: share of K channels pruned (budget "kv": of middle K+V); authors 0.7
    budget: str = "k"  # stage 2: "k" (the ratio counts K channels) or "kv" (it counts the middle's K + V bytes)
    align: int = 16  # kept channels per head are a multiple of this; authors: 32 for head_dim 128
    windows: Windows = SMOLLM2  # authors: sink 128, recent 1024 in training (768 deployed, block 128)
    context_min: int = 512  # shortest training context, tokens; authors: 4000
    context_max: int = 2048  # longest training context, tokens; authors: 96000
    tasks: tuple[str, ...] = ("passkey", "kv_retrieval", "continuation")  # authors: passkey + mixed retrieval
    init: float = 1.0  # stage-1 starting factor (authors: 1.0)
    warmup: float = 0.2  # share of steps warming up (authors: steps // 5)
    decay: float = 0.2  # share of steps decaying at the end (authors: steps // 5)
    lr_floor: float = 0.1  # the schedule never goes below this share of lr (authors: 0.1)
    variant: str = "deployed"  # stage 2's forward pass: "deployed" (exact cache attention) or "authors"
    empty_head_gradient: str = "none"  # deployed stage 2: "top" lets emptied heads' factors get a gradient
    seed: int = 0  # data and RNG seed
    batch: int = 1  # examples per optimizer step, split evenly over the data-parallel ranks
    pool: int = 0  # examples prefilled once and cycled through; 0: a fresh example every step
    prefill_chunk: int = 0  # context tokens per prefill forward (bounds activation memory); 0: all at once
    threads: int = 0  # torch intra-op threads per process; 0: leave torch's default

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.windows, dict):  # read back from a checkpoint or JSON
            object.__setattr__(self, "windows", Windows(**self.windows))

    # -- constructors ---------------------------------------------------------------------------------------

    @classmethod
    def for_stage(cls, stage: int, **overrides) -> TrainSettings:
        """The defaults of ``stage`` (1 or 2), with ``overrides`` applied (``None`` values are ignored)."""
        return cls().with_stage(stage, **overrides)

    def with_stage(self, stage: int, **overrides) -> TrainSettings:
        """These settings for ``stage``: its own steps, lr and reg_weight, everything else kept, then ``overrides``.

        ``stage1.with_stage(2, ratio=0.7)`` is the stage-2 run that follows ``stage1`` (same windows, contexts,
        alignment and data).
        """
        if stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage={stage}: choose 1 (learn factors) or 2 (fine-tune under a binary mask).")
        return self.replace(**STAGE_DEFAULTS[stage]).replace(**overrides)

    def replace(self, **overrides) -> TrainSettings:
        """A copy with ``overrides`` applied (``None`` values ignored; unknown names raise a clear error)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; choose among {sorted(known)}.")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def for_model(
        cls,
        model_or_config,
        stage: int = 1,
        context_max: int | None = None,
        context_min: int | None = None,
        **overrides,
    ) -> TrainSettings:
        """Settings for a model: align = head_dim/4, contexts [context_max/4, context_max], windows from them.

        ``context_max`` defaults to 2048 tokens (or the model's limit if shorter). recent = context_min / 8 (at
        least 8), sink = recent / 4 (at least 4), block = recent / 2; any field can be overridden by keyword
        (``ratio=0.5``, ``steps=300``).
        """
        facts = model_facts(model_or_config)
        context_max = min(DEFAULT_CONTEXT, facts.max_position_embeddings) if context_max is None else context_max
        if facts.head_dim % 4:
            raise ValueError(
                f"head_dim={facts.head_dim} is not a multiple of 4; pass align= explicitly (a divisor of head_dim)."
            )
        if context_max > facts.max_position_embeddings:
            raise ValueError(
                f"context_max={context_max} exceeds the model's max_position_embeddings="
                f"{facts.max_position_embeddings}; choose context_max <= {facts.max_position_embeddings}."
            )
        context_min = context_max // 4 if context_min is None else context_min
        recent = max(8, context_min // 8)
        windows = Windows(sink=max(4, recent // 4), recent=recent, block=max(1, recent // 2))
        scaled = dict(align=facts.head_dim // 4, windows=windows, context_min=context_min, context_max=context_max)
        settings = cls.for_stage(stage, **{**scaled, **overrides})
        settings.check(facts.head_dim)
        return settings

    # -- checks and views -----------------------------------------------------------------------------------

    def check(self, head_dim: int) -> None:
        """Raise a clear error for settings that cannot work with a model of this ``head_dim``."""
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage={self.stage}: choose 1 or 2.")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1.")
        if self.stage == 2:
            if self.ratio is None:
                raise ValueError("stage 2 needs ratio= (the share of K channels to prune, e.g. 0.7).")
            check_ratio(self.ratio)
        elif self.ratio is not None:
            check_ratio(self.ratio)
        check_align(self.align, head_dim)
        check_windows(self.windows)
        if not 0 < self.context_min <= self.context_max:
            raise ValueError(f"context_min={self.context_min} and context_max={self.context_max} need 0 < min <= max.")
        if self.windows.full >= self.context_min:
            raise ValueError(
                f"sink + recent = {self.windows.full} leaves no middle tokens in a {self.context_min}-token "
                "context; raise context_min or lower sink/recent."
            )
        if self.variant not in STAGE2_VARIANTS:
            raise ValueError(f"variant={self.variant!r}: choose one of {list(STAGE2_VARIANTS)}.")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r}: choose one of {list(BUDGETS)}.")
        if self.empty_head_gradient not in EMPTY_HEAD_GRADIENTS:
            raise ValueError(
                f"empty_head_gradient={self.empty_head_gradient!r}: choose one of {list(EMPTY_HEAD_GRADIENTS)}."
            )
        if self.empty_head_gradient != "none" and not self.excludes_zero_heads:
            raise ValueError(
                f"empty_head_gradient={self.empty_head_gradient!r} is for stage 2's deployed variant (the only one "
                "that empties heads); use --stage 2 --variant deployed, or leave it at 'none'."
            )
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks={list(self.tasks)}: choose one or more of {sorted(TASKS)}.")
        for name in ("batch",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        for name in ("pool", "prefill_chunk", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: off).")

    @property
    def training_windows(self) -> Windows:
        """The windows the loss simulates: sink and recent with block 1 (an exact recent window)."""
        return replace(self.windows, block=1)

    @property
    def excludes_zero_heads(self) -> bool:
        """Whether the student skips a zero-count head's middle tokens: stage 2's deployed variant only.

        Stage 1 and the authors' stage 2 give them logit 0, as the authors' training does.
        """
        return self.stage == 2 and self.variant == "deployed"

    def binarize(self, factors: torch.Tensor) -> torch.Tensor:
        """Stage 2's 0/1 mask of ``factors`` at ``ratio``: :func:`~leank_ref.masks.binarize` (budget "k") or
        :func:`~leank_ref.masks.binarize_kv` (budget "kv", V bytes charged too)."""
        if self.ratio is None:
            raise ValueError("binarizing needs ratio= (the share to prune, e.g. 0.7).")
        rule = binarize_kv if self.budget == "kv" else binarize
        return rule(factors, self.ratio, self.align)

    def cache_settings(self) -> dict:
        """The keywords :func:`leank_ref.cache.apply_leank` takes from these settings (windows, align)."""
        return {"windows": self.windows, "align": self.align}

    def as_dict(self) -> dict:
        """All fields (windows as a nested dict), for printing or a JSON file."""
        return asdict(self)

    # -- the command line that runs these settings ----------------------------------------------------------

    def argv(self, model: str | Path, out: str | Path, factors: str | Path | None = None) -> list[str]:
        """Arguments of ``python -m leank_ref train`` that run these settings on the model folder.

        Every field that differs from the stage's defaults becomes an option (the options are the field names).
        """
        if self.stage == 2 and factors is None:
            raise ValueError("stage 2 starts from stage-1 factors: pass factors= (the stage-1 output .pth).")
        argv = ["train", "--stage", str(self.stage), "--model", str(model), "--out", str(out)]
        if factors is not None:
            argv += ["--factors", str(factors)]
        default = TrainSettings.for_stage(self.stage)
        for f in fields(self):
            value, base = getattr(self, f.name), getattr(default, f.name)
            if f.name == "stage" or value == base:
                continue
            if f.name == "windows":
                argv += [x for k in ("sink", "recent", "block") for x in (f"--{k}", str(getattr(value, k)))]
            elif f.name == "tasks":
                argv += ["--tasks", *value]
            else:
                argv += [f"--{f.name.replace('_', '-')}", str(value)]
        return argv

    def command(self, *args, **kwargs) -> str:
        """:meth:`argv` as the shell command a reader would type."""
        return shlex.join(["python", "-m", "leank_ref", *self.argv(*args, **kwargs)])


_LAPTOP = TrainSettings(context_min=256, context_max=1024, pool=48, threads=1)
PRESETS: dict[str, dict[int, TrainSettings]] = {  # name -> {stage: settings}
    # both stages on 2 CPU cores in about 6 minutes (benchmarks/laptop_recipe.py): a pool of 48 examples
    # prefilled once, 300 + 100 steps on 256-1024-token contexts, one torch thread per process
    "laptop": {1: _LAPTOP.with_stage(1, steps=300), 2: _LAPTOP.with_stage(2, steps=100)},
}


def preset_settings(name: str, stage: int, **overrides) -> TrainSettings:
    """The preset ``name``'s settings for ``stage``, with ``overrides`` applied (``None`` values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: choose one of {sorted(PRESETS)}.")
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"stage={stage}: choose 1 or 2.")
    return PRESETS[name][stage].replace(**overrides)
