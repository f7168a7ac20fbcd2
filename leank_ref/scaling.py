"""LeanK settings scaled for any Llama/Qwen2 model, and the ``train`` command lines that use them (notebook 07).

The authors train a 128K-context model (head_dim 128) on 4K-96K-token contexts with sink 128, recent 1024 and
alignment 32; this project's defaults are that recipe scaled to SmolLM2 (head_dim 64, 512-2048 tokens, sink 16,
recent 64, block 32, alignment 16). :meth:`Recipe.for_model` applies the same scaling to another model from two
facts: its head_dim (alignment = head_dim / 4) and the longest training context you can afford (windows grow
with it). For SmolLM2 at 2048 tokens it gives exactly the shipped defaults.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from leank_ref.models import model_facts
from leank_ref.windows import Windows

DEFAULT_CONTEXT = 2048  # longest training context of the shipped SmolLM2 recipe


@dataclass(frozen=True)
class Recipe:
    """One model's LeanK settings: training contexts, windows, alignment, target ratio and step counts."""

    align: int  # kept channels per head are a multiple of this
    sink: int  # first tokens with full K/V
    recent: int  # newest tokens with full K/V
    block: int  # tokens compacted into the middle store at a time (deployment only)
    context_min: int  # shortest training context, tokens
    context_max: int  # longest training context, tokens
    ratio: float = 0.7  # share of K channels pruned (the authors ship 0.7)
    stage1_steps: int = 2000  # the authors' values
    stage2_steps: int = 200

    @classmethod
    def for_model(
        cls,
        model_or_config,
        context_max: int | None = None,
        context_min: int | None = None,
        **overrides,
    ) -> Recipe:
        """Settings for a model: align = head_dim/4, contexts [context_max/4, context_max], windows from them.

        ``context_max`` defaults to 2048 tokens (or the model's limit if shorter).

        recent = context_min / 8 (at least 8), sink = recent / 4 (at least 4), block = recent / 2; any field can be
        overridden by keyword (``ratio=0.5``, ``stage1_steps=300``).
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
        values = dict(
            align=facts.head_dim // 4,
            sink=max(4, recent // 4),
            recent=recent,
            block=max(1, recent // 2),
            context_min=context_min,
            context_max=context_max,
        )
        values.update(overrides)
        recipe = cls(**values)
        recipe.check(facts.head_dim)
        return recipe

    def check(self, head_dim: int) -> None:
        """Raise a clear error for settings that cannot work with a model of this ``head_dim``."""
        if self.align < 1 or head_dim % self.align:
            raise ValueError(f"align={self.align} must divide head_dim={head_dim}.")
        if not 0 < self.context_min <= self.context_max:
            raise ValueError(f"context_min={self.context_min} and context_max={self.context_max} need 0 < min <= max.")
        if self.sink + self.recent >= self.context_min:
            raise ValueError(
                f"sink + recent = {self.sink + self.recent} leaves no middle tokens in a {self.context_min}-token "
                "context; raise context_min or lower sink/recent."
            )
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must lie strictly between 0 and 1.")
        if self.stage1_steps < 1 or self.stage2_steps < 1:
            raise ValueError("stage1_steps and stage2_steps must be >= 1.")

    def train_argv(
        self, stage: int, model: str | Path, out: str | Path, factors: str | Path | None = None
    ) -> list[str]:
        """Arguments of ``python -m leank_ref train`` for ``stage`` (1 or 2) of this recipe on the model folder."""
        if stage not in (1, 2):
            raise ValueError(f"stage={stage}: choose 1 (learn factors) or 2 (binarize and fine-tune).")
        if stage == 2 and factors is None:
            raise ValueError("stage 2 starts from stage-1 factors: pass factors= (the stage-1 output .pth).")
        argv = ["train", "--stage", str(stage), "--model", str(model), "--out", str(out)]
        argv += ["--steps", str(self.stage1_steps if stage == 1 else self.stage2_steps)]
        argv += ["--align", str(self.align), "--sink", str(self.sink), "--recent", str(self.recent)]
        argv += ["--context-min", str(self.context_min), "--context-max", str(self.context_max)]
        if factors is not None:
            argv += ["--factors", str(factors)]
        if stage == 2:
            argv += ["--ratio", str(self.ratio)]
        return argv

    def command(self, *args, **kwargs) -> str:
        """:meth:`train_argv` as the shell command a reader would type."""
        return shlex.join(["python", "-m", "leank_ref", *self.train_argv(*args, **kwargs)])

    def cache_settings(self) -> dict:
        """The keywords :func:`leank_ref.cache.apply_leank` takes from this recipe (windows, align)."""
        return {"windows": Windows(self.sink, self.recent, self.block), "align": self.align}

    def as_dict(self) -> dict:
        """All fields, for printing or a JSON file."""
        return asdict(self)
