"""The training data: example ``i`` of a run is a pure function of (seed, i), so a resumed run sees the same data.

Step ``s`` of a run with ``batch`` examples per step uses examples ``s * batch .. s * batch + batch - 1``
(with a pool, their indices modulo ``pool``: the same few examples cycle). Under data parallelism rank ``r``
of ``world`` takes the ``r``-th equal share of them, so the union over ranks is the single-process batch.
"""

from __future__ import annotations

import random

from leank_ref.data import Example, make_example
from leank_ref.train.settings import TrainSettings


def training_example(
    tokenizer, settings: TrainSettings, index: int, split: str = "train", source: str = "pydoc"
) -> Example:
    """Example ``index`` of a run: a task from ``settings.tasks`` and a context length in [min, max], seeded.

    ``source`` is the haystack text (training uses ``"pydoc"``; ``"stdlib"`` is text no training run sees).
    """
    rng = random.Random(f"leank-{split}-{settings.seed}-{index}")
    task = settings.tasks[rng.randrange(len(settings.tasks))]
    length = rng.randint(settings.context_min, settings.context_max)
    extra = {} if source == "pydoc" else {"source": source}
    return make_example(task, tokenizer, length, seed=rng.randrange(2**31), **extra)


def held_out_examples(tokenizer, settings: TrainSettings, count: int, source: str = "pydoc") -> list[Example]:
    """``count`` examples drawn like the training data but from a separate stream (for evaluation); with
    ``source="stdlib"`` their haystacks also come from text the training data never uses."""
    return [training_example(tokenizer, settings, i, split="eval", source=source) for i in range(count)]


def check_world(settings: TrainSettings, world: int) -> None:
    """Raise unless ``world`` data-parallel ranks can share each step's ``batch`` examples evenly."""
    if world < 1 or settings.batch % world:
        raise ValueError(
            f"batch={settings.batch} examples per step cannot be split evenly over {world} processes; "
            f"choose a batch that is a multiple of the process count (e.g. --batch {max(world, 1)})."
        )


def step_examples(settings: TrainSettings, step: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of the examples rank ``rank`` of ``world`` trains on at ``step`` (pool-wrapped)."""
    check_world(settings, world)
    share = settings.batch // world
    first = step * settings.batch + rank * share
    indices = range(first, first + share)
    return [i % settings.pool for i in indices] if settings.pool else list(indices)
