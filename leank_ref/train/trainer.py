"""The training loop of both stages: AdamW on the factors, the trapezoid schedule, clamping, logging, checkpoints.

Stage 1 learns one factor per K channel, ``s`` [L, G, D], all model weights frozen: loss = the distillation
loss (:mod:`leank_ref.train.loss`) + ``reg_weight * mean(|s|)``, AdamW, trapezoid learning rate, ``s``
clamped into [0, 1] after every step. Stage 2 starts from the stage-1 factors, binarizes them every step and
trains through the straight-through estimator; the shipped mask is the binarization of the final factors.

A step averages the loss over ``settings.batch`` examples; with a pool their prefill and teacher states are
computed once and kept. Under ``torchrun`` each process takes an equal share of every step's examples
(:mod:`leank_ref.train.distributed`), so N processes train exactly what one process does with the same batch.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leank_ref.data import IGNORE_INDEX, Example
from leank_ref.models import model_facts
from leank_ref.train.checkpoint import (
    CHECKPOINT_FORMAT,
    check_factors,
    load_checkpoint_state,
    model_fingerprint,
    save_atomically,
)
from leank_ref.train.data import check_world, step_examples, training_example
from leank_ref.train.distributed import Factors, barrier, current_world, data_parallel, mean_over_ranks
from leank_ref.train.loss import Prefilled, prefill, student_loss
from leank_ref.train.schedule import TrapezoidSchedule
from leank_ref.train.settings import TrainSettings

LOW_FACTOR = 0.1  # the log reports the share of factors below this


@dataclass
class TrainResult:
    """What a run returns: final factors [L, G, D], the stage-2 mask (or None), and the per-step log."""

    factors: torch.Tensor
    mask: torch.Tensor | None
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this call (a resumed run counts only its own steps)


class Trainer:
    """One training run: the factors being learned, AdamW, the schedule, the log, checkpoints.

    ``step()`` does one step; ``run()`` loops to ``settings.steps`` with tqdm, checkpointing and resuming.
    """

    def __init__(self, model, tokenizer, settings: TrainSettings, factors: torch.Tensor | None = None):
        facts = model_facts(model)
        settings.check(facts.head_dim)
        self.world = current_world()
        check_world(settings, self.world.size)
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.shape = facts.mask_shape  # (L, G, D)
        model.requires_grad_(False)
        if factors is None and settings.stage == 2:
            raise ValueError("stage 2 starts from stage-1 factors: pass factors= (e.g. load_factors(path)).")
        if factors is None:
            factors = torch.full(self.shape, float(settings.init))
        check_factors(factors, self.shape)
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        device = next(model.parameters()).device
        self.module = Factors(factors.detach().float().clone().to(device))
        self.factors = self.module.factors  # [L, G, D], the only trainable tensor
        self.parallel = data_parallel(self.module, self.world)  # DDP under torchrun, else the module
        self.optimizer = torch.optim.AdamW([self.factors], lr=settings.lr, weight_decay=0.0)
        schedule = TrapezoidSchedule(settings.steps, settings.warmup, settings.decay, settings.lr_floor)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.next_step = 0
        self.log: list[dict] = []
        self.pooled: dict[int, Prefilled] = {}  # pool index -> its prefill and teacher states
        self._last_mask: torch.Tensor | None = None

    # -- data ----------------------------------------------------------------------------------------------

    def example(self, index: int) -> Example:
        """Example ``index`` of this run's data stream."""
        return training_example(self.tokenizer, self.settings, index)

    def prefilled(self, index: int) -> Prefilled:
        """Example ``index`` prefilled with its teacher states (kept when the run has a pool)."""
        if index in self.pooled:
            return self.pooled[index]
        ready = prefill(self.model, self.example(index), self.settings.prefill_chunk)
        if self.settings.pool:
            self.pooled[index] = ready
        return ready

    def prepare(self, progress: bool = True) -> None:
        """Prefill every pool example this process will train on (the slow part, done once)."""
        if not self.settings.pool:
            return
        s, w = self.settings, self.world
        todo = sorted({i for step in range(s.steps) for i in step_examples(s, step, w.rank, w.size)})
        todo = [i for i in todo if i not in self.pooled]
        for index in tqdm(todo, desc=f"stage {s.stage} pool", disable=not progress or not todo):
            self.prefilled(index)

    def current_mask(self) -> torch.Tensor:
        """The binarization of the current factors (stage 2's forward mask) [L, G, D], on CPU."""
        return self.settings.binarize(self.factors.detach())

    # -- one step ------------------------------------------------------------------------------------------

    def step(self, example: Example | None = None) -> dict:
        """One optimizer step on this step's examples (or on ``example``); returns its log record."""
        s, w = self.settings, self.world
        start = time.perf_counter()
        if example is None:
            batch = [self.prefilled(i) for i in step_examples(s, self.next_step, w.rank, w.size)]
        else:
            batch = [prefill(self.model, example, s.prefill_chunk)]
        record: dict = {"step": self.next_step}
        mask = None
        if s.stage == 2:
            mask = self.current_mask()  # recomputed from the current factors every step
            record["pruned_ratio"] = 1.0 - float(mask.mean())
            record["mask_changes"] = 0 if self._last_mask is None else int((mask != self._last_mask).sum())
            self._last_mask = mask
        hard = s.variant == "deployed"

        self.optimizer.zero_grad(set_to_none=True)
        distill_sum = torch.zeros(())
        for i, ready in enumerate(batch):  # gradients accumulate; DDP averages them after the last example
            last = i == len(batch) - 1
            with nullcontext() if last or self.parallel is self.module else self.parallel.no_sync():
                scale = self.parallel(mask, hard)
                distill = student_loss(self.model, ready, scale, s, self.factors.detach())
                reg = self.factors.abs().mean()
                ((distill + s.reg_weight * reg) / len(batch)).backward()
            distill_sum = distill_sum + distill.detach().cpu()
        distill = mean_over_ranks(distill_sum / len(batch), w)
        reg = reg.detach().cpu()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.factors.clamp_(0.0, 1.0)
        f = self.factors.detach()
        examples = [ready.example for ready in batch]
        record.update(
            {
                "task": "+".join(ex.task for ex in examples),  # this process's examples
                "context": sum(ex.length_context for ex in examples),
                "labels": sum(int((ex.labels != IGNORE_INDEX).sum()) for ex in examples),
                "distill_loss": float(distill),  # mean over the step's examples, all processes
                "reg_loss": float(reg),
                "loss": float(distill + s.reg_weight * reg),
                "lr": lr,
                "mean_factor": float(f.mean()),
                "share_below_0.1": float((f < LOW_FACTOR).float().mean()),
                "seconds": time.perf_counter() - start,
            }
        )
        self.log.append(record)
        self.next_step += 1
        return record

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: factors, optimizer, schedule, RNG, data position."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model_fingerprint(self.model),
            "settings": self.settings.as_dict(),
            "next_step": self.next_step,
            "factors": self.factors.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "last_mask": self._last_mask,
            "log": self.log,
        }

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the state to ``path`` atomically (rank 0 only; the other processes wait for it)."""
        if self.world.main:
            save_atomically(self.state_dict(), path)
        barrier(self.world)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint of the same model and settings, or raise an error that says what differs."""
        state = load_checkpoint_state(path, self.model, self.settings)
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

    # -- the loop ------------------------------------------------------------------------------------------

    def run(
        self,
        checkpoint: str | Path | None = None,
        every: int = 0,
        resume: bool = False,
        until: int | None = None,
        progress: bool = True,
    ) -> TrainResult:
        """Train to ``settings.steps`` (or stop after step ``until``), saving ``checkpoint`` every ``every`` steps
        and at the end; with ``resume`` continue from ``checkpoint`` if it exists. Progress bars on rank 0 only."""
        if resume and checkpoint is None:
            raise ValueError("resume=True needs checkpoint= (the file a previous run saved).")
        if resume and Path(checkpoint).exists():
            self.load_checkpoint(checkpoint)
        progress = progress and self.world.main
        self.prepare(progress)
        stop = self.settings.steps if until is None else min(until, self.settings.steps)
        start = time.perf_counter()
        bar = tqdm(
            range(self.next_step, stop),
            desc=f"stage {self.settings.stage}",
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
        mask = self.settings.binarize(factors) if self.settings.stage == 2 else None
        return TrainResult(factors, mask, list(self.log), time.perf_counter() - start)
