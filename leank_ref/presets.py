"""Named recipes for ``python -m leank_ref train --recipe NAME``; ``laptop`` runs both stages on 2 CPU cores.

The shipped SmolLM2 masks come from one GPU: 2000 stage-1 steps and 200 stage-2 steps, each on a fresh
example of 512-2048 tokens. On a CPU that recipe takes hours, and a profile of one stage-1 step says why: the
no-grad prefill of the context costs several times the rest of the step (the teacher's and the student's pass
over the ~10-30 answer tokens and the backward pass). The laptop recipe changes three things:

* **A pool of examples, prefilled once.** :class:`PooledTrainer` prefills ``pool`` examples and runs the
  teacher on their answers once, keeps both, and cycles through them. A step then costs only the student's
  pass over the answer tokens and its backward pass. The prefill does not depend on the factors (the context's
  queries attend normally), so reusing it changes nothing but the data's variety.
* **Fewer steps, the same schedule shape.** Stage 1's loss and mean factor settle within the first ~400 of the
  GPU recipe's 2000 steps; 300 steps at the same learning rate, with the trapezoid scaled to them, move the
  factors as far. Stage 2 gets 100 steps.
* **One thread per process.** On a machine whose cores are busy, torch's two OpenMP threads wait on each other
  at every operation and a step runs several times slower than on one thread. The two stage-2 runs
  (r = 0.5 and 0.7) are independent, so they run side by side, one core each.

``benchmarks/laptop_recipe.py`` times the whole recipe and compares its masks with the GPU's.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from leank_ref.data import Example
from leank_ref.training import (
    TrainConfig,
    Trainer,
    answer_hidden_states,
    prefill_context,
    student_hook,
    training_example,
)

# TrainConfig fields a preset may set, and the ``train`` option that carries each one
_OPTION = {
    "steps": "steps",
    "lr": "lr",
    "reg_weight": "reg_weight",
    "sink": "sink",
    "recent": "recent",
    "context_min": "context_min",
    "context_max": "context_max",
    "tasks": "tasks",
    "align": "align",
    "variant": "stage2_variant",
}


@dataclass(frozen=True)
class Preset:
    """A named set of ``train`` options per stage, plus how the run uses the machine (example pool, threads)."""

    name: str
    stage1: dict = field(default_factory=dict)  # TrainConfig overrides for stage 1
    stage2: dict = field(default_factory=dict)  # ... for stage 2
    pool: int = 0  # examples prefilled once and cycled through; 0: a fresh example every step
    threads: int = 0  # torch intra-op threads per process; 0: leave torch's default

    def __post_init__(self) -> None:
        for stage in (self.stage1, self.stage2):
            unknown = sorted(set(stage) - set(_OPTION))
            if unknown:
                raise ValueError(f"preset {self.name!r} sets {unknown}; a preset may set {sorted(_OPTION)}.")
        if self.pool < 0 or self.threads < 0:
            raise ValueError(f"pool={self.pool} and threads={self.threads} must be >= 0.")

    def overrides(self, stage: int) -> dict:
        """The TrainConfig values this preset gives ``stage`` (1 or 2)."""
        if stage not in (1, 2):
            raise ValueError(f"stage={stage}: choose 1 or 2.")
        return dict(self.stage1 if stage == 1 else self.stage2)

    def config(self, stage: int, **overrides) -> TrainConfig:
        """The stage's TrainConfig: its defaults, then this preset, then ``overrides`` (``None`` values ignored)."""
        values = self.overrides(stage)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig.for_stage(stage, **values)

    def trainer(self, model, tokenizer, config: TrainConfig, factors: torch.Tensor | None = None) -> Trainer:
        """A :class:`PooledTrainer` over ``pool`` examples (a plain :class:`Trainer` when ``pool`` is 0)."""
        if self.pool:
            return PooledTrainer(model, tokenizer, config, factors, pool=self.pool)
        return Trainer(model, tokenizer, config, factors)

    def use_threads(self) -> None:
        """Set torch's intra-op thread count for this process (when the preset names one)."""
        if self.threads:
            torch.set_num_threads(self.threads)

    def as_dict(self) -> dict:
        """All fields, for the run's metadata."""
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "laptop": Preset(
        name="laptop",
        stage1={"steps": 300, "context_min": 256, "context_max": 1024},
        stage2={"steps": 100, "context_min": 256, "context_max": 1024},
        pool=48,
        threads=1,
    ),
}


def apply_preset(args: argparse.Namespace) -> Preset | None:
    """Fill the ``train`` options left unset from ``args.recipe``'s preset and set torch's threads.

    Options given on the command line win. Returns the preset, or ``None`` when no recipe was asked for.
    """
    name = getattr(args, "recipe", None)
    if name is None:
        return None
    if name not in PRESETS:
        raise ValueError(f"recipe={name!r}: choose one of {sorted(PRESETS)}.")
    preset = PRESETS[name]
    for key, value in preset.overrides(args.stage).items():
        option = _OPTION[key]
        if getattr(args, option, None) is None:
            setattr(args, option, list(value) if key == "tasks" else value)
    preset.use_threads()
    return preset


def _detach(cache) -> None:
    """Cut the autograd history a student pass left on a cropped cache, so the next step can reuse it."""
    for layer in cache.layers:
        layer.keys = layer.keys.detach()
        layer.values = layer.values.detach()


class PooledTrainer(Trainer):
    """A :class:`~leank_ref.training.Trainer` that trains on ``pool`` examples prefilled once, in turn.

    Step ``i`` uses example ``i % pool`` of the run's data stream; its context K/V cache and the teacher's
    answer states are computed the first time (:meth:`prepare` does them all up front, with a progress bar) and
    kept. The loss is the same distillation loss; only the data's variety is smaller.
    """

    def __init__(self, model, tokenizer, config: TrainConfig, factors: torch.Tensor | None = None, pool: int = 48):
        if pool < 1:
            raise ValueError(f"pool={pool} must be >= 1 (use Trainer for a fresh example every step).")
        super().__init__(model, tokenizer, config, factors)
        self.pool = pool
        self._prepared: dict[int, tuple[Example, object, torch.Tensor]] = {}
        self._current: tuple[Example, object, torch.Tensor] | None = None

    def _entry(self, index: int) -> tuple[Example, object, torch.Tensor]:
        if index not in self._prepared:
            example = training_example(self.tokenizer, self.config, index)
            cache = prefill_context(self.model, example)
            with torch.no_grad():
                teacher = answer_hidden_states(self.model, cache, example)  # [n_labels, hidden]
            self._prepared[index] = (example, cache, teacher)
        return self._prepared[index]

    def prepare(self, progress: bool = True) -> None:
        """Prefill every pool example and run the teacher on its answer (the slow part, done once)."""
        todo = [i for i in range(min(self.pool, self.config.steps)) if i not in self._prepared]
        for index in tqdm(todo, desc=f"stage {self.config.stage} pool", disable=not progress or not todo):
            self._entry(index)

    def step(self, example: Example | None = None) -> dict:
        """One optimizer step on the next pool example (or on ``example``, prefilled as usual)."""
        if example is not None:
            return super().step(example)
        self._current = self._entry(self.next_step % self.pool)
        try:
            return super().step(self._current[0])
        finally:
            self._current = None

    def distillation_loss(self, example: Example, scale: torch.Tensor) -> torch.Tensor:
        """The distillation loss from the kept prefill and teacher states (a fresh prefill for other examples)."""
        if self._current is None or self._current[0] is not example:
            return super().distillation_loss(example, scale)
        _, cache, teacher = self._current
        try:
            student = answer_hidden_states(self.model, cache, example, student_hook(scale, example, self.config))
        finally:
            _detach(cache)
        return (student - teacher).pow(2).mean(-1).mean()

    def run(self, *args, progress: bool = True, **kwargs):
        """:meth:`prepare` the pool (its own progress bar), then train as :meth:`Trainer.run` does."""
        self.prepare(progress)
        return super().run(*args, progress=progress, **kwargs)
