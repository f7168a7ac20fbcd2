"""LeanK's two training stages (Zhang et al., 2025, section 3): learn channel factors, then fine-tune them under a mask.

Stage 1 learns one factor per K channel, ``s`` [L, G, D], all model weights frozen. The student is the model
whose decode queries see ``K * s`` for middle keys (:class:`~leank_ref.attention.SimulatedLeanK`); the
teacher is the unmodified model. Loss = mean over answer positions of the MSE between the two models' final
hidden states (after the last norm, fp32) + ``reg_weight * mean(|s|)``. AdamW, trapezoid learning rate,
``s`` clamped into [0, 1] after every step.

Stage 2 starts from the stage-1 factors: every step binarizes them (:func:`~leank_ref.masks.binarize`,
alignment-aware) and the forward pass runs under that mask through a straight-through estimator, so a pruned
channel still gets a gradient and can come back. ``reg_weight`` 0, lr 0.01, 200 steps. The shipped mask is
the binarization of the final factors. Two variants of the forward pass (``TrainConfig.variant``):

* ``"deployed"`` (the default) trains exactly what the LeanK cache computes: kept channels enter the logits
  unscaled (the hard 0/1 mask), and a head with no kept channel skips its middle tokens (logit -inf, see
  :func:`~leank_ref.attention.zero_head_rule`). The gradient reaches the factors straight through the mask.
  Such a head's factors get no gradient (the loss does not depend on them); it regains channels only when
  other factors fall below its own.
* ``"authors"``: the authors' code, ``where(mask, s, 0)`` (kept channels scaled by their factor) and a zero
  head's middle keys at logit 0. What it trains differs from what the cache deploys in both ways.

The shared prefill: context queries attend normally in both passes, so the context's K/V cache does not
depend on ``s``. One no-grad prefill serves the teacher and the student; only the answer tokens run twice.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from leank_ref.attention import SimulatedLeanK, use_hook
from leank_ref.data import IGNORE_INDEX, TASKS, Example, make_example
from leank_ref.layout import check_windows
from leank_ref.masks import binarize, check_align, check_ratio, check_shape
from leank_ref.memory import mask_stats
from leank_ref.models import cache_argument, model_facts
from leank_ref.windows import Windows

CHECKPOINT_FORMAT = "leank_ref.training/1"
LOW_FACTOR = 0.1  # the log reports the share of factors below this
STAGE2_VARIANTS = ("deployed", "authors")  # see the module docstring


@dataclass
class TrainConfig:
    """Everything that decides a training run; defaults are scaled for SmolLM2, the authors' values beside them."""

    stage: int = 1
    steps: int = 2000  # authors: 2000 (stage 1), 200 (stage 2)
    lr: float = 0.02  # authors: 0.02 (stage 1), 0.01 (stage 2)
    reg_weight: float = 0.06  # authors: 0.06 (stage 1), 0 (stage 2)
    ratio: float | None = None  # stage 2: share of K channels pruned; authors ship 0.7
    align: int = 16  # authors: 32 for head_dim 128; SmolLM2's head_dim is 64
    sink: int = 16  # authors: 128
    recent: int = 64  # authors: 1024 in training, 768 deployed
    context_min: int = 512  # authors: 4000 tokens
    context_max: int = 2048  # authors: 96000 tokens
    tasks: tuple[str, ...] = ("passkey", "kv_retrieval", "continuation")  # authors: passkey + mixed retrieval
    init: float = 1.0  # stage-1 starting factor (authors: 1.0)
    warmup: float = 0.2  # share of steps warming up (authors: steps // 5)
    decay: float = 0.2  # share of steps decaying at the end (authors: steps // 5)
    lr_floor: float = 0.1  # the schedule never goes below this share of lr (authors: 0.1)
    variant: str = "deployed"  # stage 2's forward pass: "deployed" (exact cache attention) or "authors"
    seed: int = 0

    @classmethod
    def for_stage(cls, stage: int, **overrides) -> TrainConfig:
        """The defaults of ``stage`` (1 or 2), with ``overrides`` applied (``None`` values are ignored)."""
        if stage not in (1, 2):
            raise ValueError(f"stage={stage}: choose 1 (learn factors) or 2 (fine-tune under a binary mask).")
        base = {"stage": stage} if stage == 1 else {"stage": 2, "steps": 200, "lr": 0.01, "reg_weight": 0.0}
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "tasks" in base:
            base["tasks"] = tuple(base["tasks"])
        return cls(**base)

    def check(self, head_dim: int) -> None:
        """Raise a clear error for settings that cannot work with a model of this ``head_dim``."""
        if self.stage not in (1, 2):
            raise ValueError(f"stage={self.stage}: choose 1 or 2.")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1.")
        if self.stage == 2:
            if self.ratio is None:
                raise ValueError("stage 2 needs ratio= (the share of K channels to prune, e.g. 0.7).")
            check_ratio(self.ratio)
        check_align(self.align, head_dim)
        check_windows(self.sink, self.recent)
        if not 0 < self.context_min <= self.context_max:
            raise ValueError(f"context_min={self.context_min} and context_max={self.context_max} need 0 < min <= max.")
        if self.variant not in STAGE2_VARIANTS:
            raise ValueError(f"variant={self.variant!r}: choose one of {list(STAGE2_VARIANTS)}.")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks={list(self.tasks)}: choose one or more of {sorted(TASKS)}.")


# ---------------------------------------------------------------------------------------------------------
# Data: example i of a run is a pure function of (seed, i), so a resumed run sees the same data.


def training_example(
    tokenizer, config: TrainConfig, index: int, split: str = "train", source: str = "pydoc"
) -> Example:
    """Example ``index`` of a run: a task from ``config.tasks`` and a context length in [min, max], seeded.

    ``source`` is the haystack text (training uses ``"pydoc"``; ``"stdlib"`` is text no training run sees).
    """
    rng = random.Random(f"leank-{split}-{config.seed}-{index}")
    task = config.tasks[rng.randrange(len(config.tasks))]
    length = rng.randint(config.context_min, config.context_max)
    extra = {} if source == "pydoc" else {"source": source}
    return make_example(task, tokenizer, length, seed=rng.randrange(2**31), **extra)


def held_out_examples(tokenizer, config: TrainConfig, count: int, source: str = "pydoc") -> list[Example]:
    """``count`` examples drawn like the training data but from a separate stream (for evaluation); with
    ``source="stdlib"`` their haystacks also come from text the training data never uses."""
    return [training_example(tokenizer, config, i, split="eval", source=source) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------
# The shared prefill and the distillation loss.


def _cache_kwarg(model) -> str:
    """Name of the cache argument of the base model's forward (transformers 5.24 renamed it to ``cache``)."""
    return cache_argument(model.base_model)


def _crop(cache: DynamicCache, length: int) -> None:
    """Drop cached tokens past ``length`` (a negative crop means 'remove that many' in every transformers 5)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill_context(model, example: Example) -> DynamicCache:
    """Run the context once with default attention and return its K/V cache (no grad: it never depends on s)."""
    if bool((example.labels[: example.length_context] != IGNORE_INDEX).any()):
        raise ValueError("labels before length_context must be -100: the loss is taken on the answer tokens only.")
    cache = DynamicCache()
    ids = example.context_ids[None].to(_device(model))  # [1, n_context]
    model.base_model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
    return cache


def answer_hidden_states(model, cache: DynamicCache, example: Example, hook=None) -> torch.Tensor:
    """Final hidden states (after the last norm, fp32) [n_labels, hidden] of the answer tokens, run off ``cache``.

    The cache is cropped back to the context afterwards, so the next pass starts from the same prefill.
    """
    n = example.length_context
    ids = example.input_ids[n:][None].to(_device(model))  # [1, T_answer]
    try:
        if hook is None:
            out = model.base_model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
        else:
            with use_hook(model, hook):
                out = model.base_model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
    finally:
        _crop(cache, n)
    keep = (example.labels[n:] != IGNORE_INDEX).to(ids.device)  # [T_answer]
    return out.last_hidden_state[0, keep].float()  # [n_labels, hidden]


def excludes_zero_heads(config: TrainConfig) -> bool:
    """Whether the student skips a zero-count head's middle tokens: stage 2's deployed variant only.

    Stage 1 and the authors' stage 2 give them logit 0, as the authors' training does.
    """
    return config.stage == 2 and config.variant == "deployed"


def student_hook(
    scale: torch.Tensor, example: Example, config: TrainConfig, deployed: bool | None = None
) -> SimulatedLeanK:
    """LeanK's simulated attention for this example: answer queries see ``K * scale`` for middle keys.

    ``deployed`` (default: :func:`excludes_zero_heads` of ``config``) makes a head whose scale is all zero
    skip its middle tokens, as the deployed cache does; with a 0/1 ``scale`` the hook is then exactly the
    deployed attention.
    """
    return SimulatedLeanK(
        scale,
        config.sink,
        config.recent,
        decode_start=example.length_context,
        exclude_zero_heads=excludes_zero_heads(config) if deployed is None else deployed,
    )


def distillation_loss(model, example: Example, scale: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Mean over answer positions of MSE(teacher, student) final hidden states, with one shared prefill."""
    cache = prefill_context(model, example)
    with torch.no_grad():
        teacher = answer_hidden_states(model, cache, example)  # [n_labels, hidden]
    student = answer_hidden_states(model, cache, example, student_hook(scale, example, config))
    return (student - teacher).pow(2).mean(-1).mean()


@torch.no_grad()
def evaluate_scales(
    model,
    examples: list[Example],
    scales: dict[str, torch.Tensor],
    config: TrainConfig,
    progress: bool = False,
    deployed: bool | None = None,
) -> dict[str, list[float]]:
    """Distillation loss of each named scale (factors or 0/1 mask) on each example; one prefill per example.

    ``deployed=True`` scores a 0/1 mask exactly as the LeanK cache runs it (zero-count heads skip their middle
    tokens); ``False`` gives those heads logit 0, as the authors' training does; ``None`` follows ``config``.
    """
    losses: dict[str, list[float]] = {name: [] for name in scales}
    for example in tqdm(examples, desc="evaluate", disable=not progress):
        cache = prefill_context(model, example)
        teacher = answer_hidden_states(model, cache, example)
        for name, scale in scales.items():
            student = answer_hidden_states(model, cache, example, student_hook(scale, example, config, deployed))
            losses[name].append(float((student - teacher).pow(2).mean(-1).mean()))
    return losses


# ---------------------------------------------------------------------------------------------------------
# Stage 2's straight-through estimators and the learning-rate schedule.


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


@dataclass
class TrapezoidSchedule:
    """lr multiplier: ramp up over the first ``warmup`` share, flat at 1, ramp down over the last ``decay``
    share, never below ``floor`` (the authors' ``min(1, max((i+1)/(N//5), .1), max((N-i)/(N//5), .1))``)."""

    steps: int
    warmup: float = 0.2
    decay: float = 0.2
    floor: float = 0.1

    def __call__(self, step: int) -> float:
        up = max(1, int(self.steps * self.warmup))
        down = max(1, int(self.steps * self.decay))
        return min(1.0, max((step + 1) / up, self.floor), max((self.steps - step) / down, self.floor))


# ---------------------------------------------------------------------------------------------------------
# Factor files and checkpoints.


def save_factors(factors: torch.Tensor, path: str | Path) -> None:
    """Save stage-1 factors as a float32 [L, G, D] tensor (``torch.save``, like a mask)."""
    check_shape(factors, None, "factors")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(factors.detach().float().contiguous().cpu(), path)


def load_factors(path: str | Path, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Load factors [L, G, D] (``weights_only=True``), checking the model's shape and that they lie in [0, 1]."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a [L, G, D] factor tensor.")
    check_factors(obj, shape)
    return obj.float()


def check_factors(factors: torch.Tensor, shape: tuple[int, int, int] | None) -> None:
    """Raise unless ``factors`` is [L, G, D] of the model's shape with finite values in [0, 1]."""
    check_shape(factors, shape, "factors")
    f = factors.detach().float()
    if not bool(torch.isfinite(f).all()) or float(f.min()) < 0 or float(f.max()) > 1:
        raise ValueError(
            f"factors must be finite and lie in [0, 1] (found min {float(f.min()):.3g}, max {float(f.max()):.3g}); "
            "pass the stage-1 output of this project (training clamps factors into [0, 1])."
        )


def model_fingerprint(model) -> dict:
    """What identifies the model a checkpoint belongs to: architecture, shape and a checksum of its embeddings."""
    facts = model_facts(model)
    emb = model.get_input_embeddings().weight
    return {
        "model_type": facts.model_type,
        "mask_shape": list(facts.mask_shape),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "embedding_checksum": round(float(emb[:256].double().abs().sum()), 2),
    }


@dataclass
class TrainResult:
    """What a run returns: final factors [L, G, D], the stage-2 mask (or None), and the per-step log."""

    factors: torch.Tensor
    mask: torch.Tensor | None
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this call (a resumed run counts only its own steps)


class Trainer:
    """One training run: the factors being learned, AdamW, the schedule, the log, checkpoints.

    ``step()`` does one step; ``run()`` loops to ``config.steps`` with tqdm, checkpointing and resuming.
    """

    def __init__(self, model, tokenizer, config: TrainConfig, factors: torch.Tensor | None = None):
        facts = model_facts(model)
        config.check(facts.head_dim)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.shape = facts.mask_shape  # (L, G, D)
        model.requires_grad_(False)
        if factors is None and config.stage == 2:
            raise ValueError("stage 2 starts from stage-1 factors: pass factors= (e.g. load_factors(path)).")
        if factors is None:
            factors = torch.full(self.shape, float(config.init))
        check_factors(factors, self.shape)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.factors = torch.nn.Parameter(factors.detach().float().clone().to(_device(model)))  # [L, G, D]
        self.optimizer = torch.optim.AdamW([self.factors], lr=config.lr, weight_decay=0.0)
        schedule = TrapezoidSchedule(config.steps, config.warmup, config.decay, config.lr_floor)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.next_step = 0
        self.log: list[dict] = []
        self._last_mask: torch.Tensor | None = None

    def distillation_loss(self, example: Example, scale: torch.Tensor) -> torch.Tensor:
        """This step's loss, :func:`distillation_loss` (:class:`leank_ref.presets.PooledTrainer` reuses prefills)."""
        return distillation_loss(self.model, example, scale, self.config)

    def current_mask(self) -> torch.Tensor:
        """The binarization of the current factors (stage 2's forward mask) [L, G, D], on CPU."""
        return binarize(self.factors.detach(), self.config.ratio, self.config.align)

    def step(self, example: Example | None = None) -> dict:
        """One optimizer step on ``example`` (default: the run's next example); returns its log record."""
        cfg = self.config
        start = time.perf_counter()
        if example is None:
            example = training_example(self.tokenizer, cfg, self.next_step)
        record = {"step": self.next_step}
        if cfg.stage == 2:
            mask = self.current_mask()  # recomputed from the current factors every step
            scale = straight_through(self.factors, mask, hard=cfg.variant == "deployed")
            record["pruned_ratio"] = 1.0 - float(mask.mean())
            record["mask_changes"] = 0 if self._last_mask is None else int((mask != self._last_mask).sum())
            self._last_mask = mask
        else:
            scale = self.factors
        distill = self.distillation_loss(example, scale)
        reg = self.factors.abs().mean()
        loss = distill + cfg.reg_weight * reg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.factors.clamp_(0.0, 1.0)
        f = self.factors.detach()
        record.update(
            {
                "task": example.task,
                "context": example.length_context,
                "labels": int((example.labels != IGNORE_INDEX).sum()),
                "distill_loss": float(distill.detach()),
                "reg_loss": float(reg.detach()),
                "loss": float(loss.detach()),
                "lr": lr,
                "mean_factor": float(f.mean()),
                "share_below_0.1": float((f < LOW_FACTOR).float().mean()),
                "seconds": time.perf_counter() - start,
            }
        )
        self.log.append(record)
        self.next_step += 1
        return record

    # -- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: factors, optimizer, schedule, RNG, data position."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model_fingerprint(self.model),
            "config": asdict(self.config),
            "next_step": self.next_step,
            "factors": self.factors.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "last_mask": self._last_mask,
            "log": self.log,
        }

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the state to ``path`` atomically (a crash mid-write leaves the previous checkpoint intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint of the same model and configuration, or raise an error that says what differs."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a leank_ref training checkpoint; start a fresh run without --resume.")
        ours = model_fingerprint(self.model)
        if state["model"] != ours:
            raise ValueError(
                f"checkpoint {path} was made for another model ({state['model']}), not this one ({ours}); "
                "resume with the model it was trained on, or start a fresh run (another checkpoint path, no --resume)."
            )
        saved = {k: tuple(v) if k == "tasks" else v for k, v in state["config"].items()}
        differ = [f.name for f in fields(self.config) if saved.get(f.name) != getattr(self.config, f.name)]
        if differ:
            pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in differ)
            raise ValueError(
                f"checkpoint {path} was made with other settings ({pairs}); resume with the same settings "
                "or start a fresh run."
            )
        with torch.no_grad():
            self.factors.copy_(state["factors"].to(self.factors.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._last_mask = state["last_mask"]
        self.next_step = int(state["next_step"])
        self.log = list(state["log"])

    # -- the loop ----------------------------------------------------------------------------------------

    def run(
        self,
        checkpoint: str | Path | None = None,
        every: int = 0,
        resume: bool = False,
        until: int | None = None,
        progress: bool = True,
    ) -> TrainResult:
        """Train to ``config.steps`` (or stop after step ``until``), saving ``checkpoint`` every ``every`` steps
        and at the end; with ``resume`` continue from ``checkpoint`` if it exists."""
        if resume and checkpoint is None:
            raise ValueError("resume=True needs checkpoint= (the file a previous run saved).")
        if resume and Path(checkpoint).exists():
            self.load_checkpoint(checkpoint)
        stop = self.config.steps if until is None else min(until, self.config.steps)
        start = time.perf_counter()
        bar = tqdm(
            range(self.next_step, stop),
            desc=f"stage {self.config.stage}",
            disable=not progress,
            initial=self.next_step,
            total=stop,
        )
        for _ in bar:
            rec = self.step()
            bar.set_postfix(
                distill=f"{rec['distill_loss']:.4f}", mean=f"{rec['mean_factor']:.3f}", lr=f"{rec['lr']:.2e}"
            )
            if checkpoint is not None and every and self.next_step % every == 0:
                self.save_checkpoint(checkpoint)
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        factors = self.factors.detach().cpu().clone()
        mask = binarize(factors, self.config.ratio, self.config.align) if self.config.stage == 2 else None
        return TrainResult(factors, mask, list(self.log), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Command line: ``python -m leank_ref train --stage 1|2 ...`` (registered in ``leank_ref/__main__.py``).


def add_arguments(parser) -> None:
    """The ``train`` subcommand's options; unset options take the stage's defaults (:meth:`TrainConfig.for_stage`)."""
    d = TrainConfig()
    parser.add_argument(
        "--stage",
        type=int,
        choices=(1, 2),
        required=True,
        help="1: learn factors from 1.0; 2: fine-tune stage-1 factors under a binary mask",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output .pth: factors (stage 1) or mask (stage 2); <out>.json and <out>.log.jsonl beside it",
    )
    parser.add_argument("--factors", help="stage-1 factors .pth (stage 2 starts from them; stage 1 may too)")
    parser.add_argument("--ratio", type=float, help="stage 2: share of K channels to prune, in (0, 1)")
    parser.add_argument(
        "--align", type=int, help=f"kept count per head is a multiple of this (default {d.align}; authors 32)"
    )
    parser.add_argument("--steps", type=int, help="default 2000 (stage 1) / 200 (stage 2), the authors' values")
    parser.add_argument("--lr", type=float, help="default 0.02 (stage 1) / 0.01 (stage 2), the authors' values")
    parser.add_argument("--reg-weight", type=float, help="L1 weight lambda; default 0.06 (stage 1) / 0 (stage 2)")
    parser.add_argument("--sink", type=int, help=f"sink tokens (default {d.sink}; authors 128)")
    parser.add_argument("--recent", type=int, help=f"recent window (default {d.recent}; authors 1024)")
    parser.add_argument(
        "--context-min", type=int, help=f"shortest context in tokens (default {d.context_min}; authors 4000)"
    )
    parser.add_argument(
        "--context-max", type=int, help=f"longest context in tokens (default {d.context_max}; authors 96000)"
    )
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="training mixture (default: all three)")
    parser.add_argument("--init", type=float, help="starting factor for stage 1 (default 1.0)")
    parser.add_argument(
        "--stage2-variant",
        choices=STAGE2_VARIANTS,
        help="stage 2's forward pass: 'deployed' (default; the cache's exact attention: 0/1 mask, zero-count heads "
        "skip their middle tokens) or 'authors' (where(mask, s, 0), zero-count heads' middle keys at logit 0)",
    )
    parser.add_argument("--seed", type=int, help="data and RNG seed (default 0)")
    parser.add_argument(
        "--model", help="local Llama/Qwen2 checkpoint folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model weights' dtype")
    parser.add_argument("--checkpoint", help="checkpoint file (default <out>.ckpt when --checkpoint-every or --resume)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    parser.add_argument("--until", type=int, help="stop after this many steps (resume later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    from leank_ref.presets import PRESETS  # presets builds on this module: imported when the parser is built

    parser.add_argument(
        "--recipe",
        choices=sorted(PRESETS),
        help="a named preset that fills the options left unset (laptop: both stages on 2 CPU cores in 30 minutes)",
    )


def _sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_command(args) -> int:
    """Run ``train``: load the model, train one stage, write factors or mask + metadata JSON + JSON-lines log."""
    import json

    from leank_ref.masks import save_mask
    from leank_ref.models import DEFAULT_MODEL_NAME, load_model
    from leank_ref.presets import apply_preset
    from leank_ref.provenance import provenance

    begun = time.perf_counter()
    preset = apply_preset(args)  # None without --recipe; else fills unset options and sets torch's threads
    out = Path(args.out)
    meta_path, log_path = out.with_suffix(".json"), out.with_suffix(".log.jsonl")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    shape = model_facts(model).mask_shape
    config = TrainConfig.for_stage(
        args.stage,
        steps=args.steps,
        lr=args.lr,
        reg_weight=args.reg_weight,
        ratio=args.ratio,
        align=args.align,
        sink=args.sink,
        recent=args.recent,
        context_min=args.context_min,
        context_max=args.context_max,
        tasks=args.tasks,
        init=args.init,
        variant=args.stage2_variant,
        seed=args.seed,
    )
    factors = load_factors(args.factors, shape) if args.factors else None
    checkpoint = args.checkpoint or (str(out) + ".ckpt" if args.checkpoint_every or args.resume else None)
    trainer = (Trainer if preset is None else preset.trainer)(model, tokenizer, config, factors)
    result = trainer.run(
        checkpoint, every=args.checkpoint_every, resume=args.resume, until=args.until, progress=not args.no_progress
    )

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(rec) + "\n" for rec in result.log))
    if trainer.next_step < config.steps:
        print(
            f"stopped after step {trainer.next_step} of {config.steps}; continue with --resume "
            f"(checkpoint {checkpoint}). Log so far: {log_path}"
        )
        return 0

    if config.stage == 1:
        save_factors(result.factors, out)
    else:
        save_mask(result.mask, out)
    last = result.log[-1]
    tail = result.log[-max(1, len(result.log) // 10) :]
    meta = {
        "command": "train",
        "stage": config.stage,
        "arguments": {k: v for k, v in vars(args).items() if k != "run"},
        "config": asdict(config),
        "seed": config.seed,
        "steps": config.steps,
        "model": {"name": args.model or DEFAULT_MODEL_NAME, "dtype": args.dtype, **model_fingerprint(model)},
        "input_factors": None if args.factors is None else {"path": args.factors, "sha256": _sha256(args.factors)},
        "final": {k: last[k] for k in ("distill_loss", "reg_loss", "loss", "mean_factor", "share_below_0.1")},
        "final_tenth_mean_distill_loss": sum(r["distill_loss"] for r in tail) / len(tail),
        "train_seconds": sum(r["seconds"] for r in result.log),
        "wall_seconds": time.perf_counter() - begun,
        "outputs": {"factors" if config.stage == 1 else "mask": str(out), "log": str(log_path)},
        "provenance": provenance(args.device),
        "recipe": None if preset is None else preset.as_dict(),
    }
    if config.stage == 2:
        stats = mask_stats(result.mask, config.context_max, Windows(config.sink, config.recent, 1))
        meta["stage2_variant"] = config.variant
        meta["mask"] = {
            "target_ratio": config.ratio,
            "realised_ratio": stats.pruned_ratio,
            "align": config.align,
            **asdict(stats),
        }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}, {meta_path}, {log_path}")
    return 0
