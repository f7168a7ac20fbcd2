"""What an evaluation run measures, fixed before any result is seen: tasks, texts, lengths, ratios, windows, seeds.

Samples are fixed by seeds: passkey 10_000+, kv_retrieval 11_000+, continuation 12_000+, the dense length scan
13_000+, greedy passkey 14_000+ (training draws its example seeds from its own generator over 2^31 and uses the
pydoc text only; static-importance calibration uses 20_000+). Nothing is tuned on them: windows, lengths,
tolerance and the budget rule were set before the grid ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from leank_ref.data import SOURCES, Example, make_example
from leank_ref.windows import SMOLLM2, Windows, check_windows

SEED_BASE = {
    "passkey": 10_000,
    "kv_retrieval": 11_000,
    "continuation": 12_000,
    "scan": 13_000,
    "passkey_greedy": 14_000,
}
ALL_METHODS = ("leank", "leank_authors", "leank_factors", "think", "knorm", "static_qk", "rope", "random")
HEURISTICS = ("think", "knorm", "static_qk", "rope", "random")  # the channel choices that learn nothing
TEACHER_FORCED_TASKS = ("passkey", "kv_retrieval", "continuation")
TOLERANCE = 0.05  # nats per token, for ll and kl: a loss this large must be excluded for a method to hold


@dataclass
class EvalGrid:
    """Everything that defines an evaluation run; fixed before looking at any result. Defaults: the full grid.

    ``windows`` are the deployed cache's windows: the simulation gives decode queries full K for the ``sink``
    first and the ``recent`` newest keys (the least a deployed cache guarantees: it compacts ``block`` tokens at
    a time, so its recent part holds ``recent`` to ``recent + block - 1``), and the memory columns count bytes
    with the block, as the cache stores them (:func:`leank_ref.memory.memory_formula`).
    """

    methods: tuple[str, ...] = ALL_METHODS
    ratios: tuple[float, ...] = (0.5, 0.7, 0.8)
    tasks: tuple[str, ...] = TEACHER_FORCED_TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    sources: tuple[str, ...] = SOURCES
    samples: int = 8  # per (task, source, length)
    kv_pairs: int = 4
    answer_length: int = 32  # continuation tokens teacher-forced (ll/kl over the last answer_length - 1)
    greedy_lengths: tuple[int, ...] = ()  # passkey_greedy: lengths where dense >= 0.8 (scan.accuracy_lengths)
    greedy_samples: int = 20  # per greedy length
    max_new_tokens: int = 16  # greedy passkey: "The pass key is 12345." is ~11 tokens (digits are single tokens)
    windows: Windows = SMOLLM2
    align: int = 16
    uniform_ablation: bool = True  # also run the heuristics at uniform counts where LeanK's counts are the budget
    think_window: int = 32
    calibration_prompts: int = 4
    calibration_length: int = 1024
    random_seed: int = 0
    tolerance: float = TOLERANCE

    def __post_init__(self) -> None:
        check_windows(self.windows)
        unknown = set(self.methods) - set(ALL_METHODS) - {"dense"}
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {sorted(ALL_METHODS)}.")
        short = [n for n in self.lengths + self.greedy_lengths if n <= self.windows.full]
        if short:
            raise ValueError(
                f"lengths {short} leave no middle tokens with {self.windows} (sink + recent = {self.windows.full}): "
                "every method would equal dense there; use longer contexts or smaller windows."
            )

    def specs(self) -> list[dict]:
        """The fixed list of sample specs (task, source, length, seed) of the whole grid, in evaluation order."""
        out = []
        for task in self.tasks:
            for source in self.sources:
                for length in self.lengths:
                    out += [
                        {"task": task, "source": source, "length": length, "seed": SEED_BASE[task] + i}
                        for i in range(self.samples)
                    ]
        for length in self.greedy_lengths:
            out += [
                {"task": "passkey_greedy", "source": "pydoc", "length": length, "seed": SEED_BASE["passkey_greedy"] + i}
                for i in range(self.greedy_samples)
            ]
        return out


def tiny_grid(**overrides) -> EvalGrid:
    """A grid that runs in about a minute on a CPU: tests and the notebook's live check."""
    values = dict(
        ratios=(0.5, 0.8),
        lengths=(256,),
        samples=1,
        answer_length=8,
        greedy_lengths=(256,),
        greedy_samples=1,
        calibration_prompts=1,
        calibration_length=256,
    )
    values.update(overrides)
    return EvalGrid(**values)


def example_for(tokenizer, spec: dict, grid: EvalGrid) -> Example:
    """Build the :class:`~leank_ref.data.Example` a sample spec describes (passkey depth: uniform, from the seed)."""
    task = "passkey" if spec["task"] == "passkey_greedy" else spec["task"]
    extra = {"source": spec.get("source", "pydoc")}
    if task == "kv_retrieval":
        extra["num_pairs"] = grid.kv_pairs
    elif task == "continuation":
        extra["answer_length"] = grid.answer_length
    return make_example(task, tokenizer, spec["length"], seed=spec["seed"], **extra)
