"""Cost of one stage-1 training step against one no-grad prefill of the same context.

Run from the repository root (CPU by default; ``--device cuda`` on a GPU):

    python benchmarks/training_step.py [--context 1024] [--repeats 7] [--threads 1] \
        [--out benchmarks/results/training_step_cpu.json]

A stage-1 step (``Trainer.step``) = one no-grad prefill of the context (its K/V cache is shared by both
passes: context queries never see pruned keys) + the teacher's answer tokens (no grad) + the student's answer
tokens under the student's attention (with grad) + backward + AdamW + clamp. Only the answer tokens (8-32 of them)
run twice, so the step should cost little more than the prefill; the target is <= 2.5x.

For each task of the training mixture, one example with exactly ``--context`` context tokens is built; the
prefill and the step are timed alternately, ``--repeats`` times each after a warm-up, so both see the same
machine load; medians are reported. On a loaded machine the alternating timings are noisy; the step's parts,
timed inside one step, also give a paired ratio (whole step / its own prefill) that is less exposed to load.
The step's parts are timed separately too (prefill, teacher, student
forward, backward, optimizer), and one step is profiled with ``torch.profiler`` (top operators by self time),
to say where the time goes. Everything goes to one JSON file with :func:`leank_ref.provenance.provenance`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from leank_ref.data import TASKS, make_example
from leank_ref.models import load_model
from leank_ref.provenance import provenance
from leank_ref.train.loss import answer_hidden_states, prefill_context, student_hook
from leank_ref.train.settings import TrainSettings
from leank_ref.train.trainer import Trainer

TARGET = 2.5  # a stage-1 step costs at most this many no-grad prefills of the same context


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of one call of ``fn`` (synchronised on CUDA)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def step_parts(trainer: Trainer, example, device: torch.device) -> dict[str, float]:
    """Seconds of each part of one stage-1 step, run by hand in the order ``Trainer.step`` runs them."""
    model, cfg, factors = trainer.model, trainer.settings, trainer.factors
    parts: dict[str, float] = {}
    _sync(device)
    t0 = time.perf_counter()
    cache = prefill_context(model, example)
    _sync(device)
    t1 = time.perf_counter()
    with torch.no_grad():
        teacher = answer_hidden_states(model, cache, example)
    _sync(device)
    t2 = time.perf_counter()
    student = answer_hidden_states(model, cache, example, student_hook(factors, example, cfg))
    loss = (student - teacher).pow(2).mean(-1).mean() + cfg.reg_weight * factors.abs().mean()
    _sync(device)
    t3 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _sync(device)
    t4 = time.perf_counter()
    trainer.optimizer.step()
    with torch.no_grad():
        factors.clamp_(0.0, 1.0)
    _sync(device)
    t5 = time.perf_counter()
    parts.update(prefill=t1 - t0, teacher_answer=t2 - t1, student_answer=t3 - t2, backward=t4 - t3, optimizer=t5 - t4)
    return parts


def profile_step(trainer: Trainer, example, top: int = 12) -> list[dict]:
    """The ``top`` operators of one stage-1 step by self CPU time (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trainer.step(example)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "share_of_self_cpu": e.self_cpu_time_total / total,
        }
        for e in rows
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="context tokens of every example (default 1024)")
    parser.add_argument("--repeats", type=int, default=7, help="timed prefills and steps per task (default 7)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a shared machine)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_step_cpu.json"))
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = load_model(device=device)
    config = TrainSettings.for_stage(1, context_min=args.context, context_max=args.context)
    trainer = Trainer(model, tokenizer, config)
    examples = {task: make_example(task, tokenizer, args.context, seed=0) for task in args.tasks}

    for example in examples.values():  # warm-up: allocator, autograd graph, tokenizer caches
        prefill_context(model, example)
        trainer.step(example)

    per_task = {}
    for task, example in examples.items():
        prefills, steps = [], []
        for _ in range(args.repeats):  # alternate, so both see the same load
            prefills.append(timed(lambda: prefill_context(model, example), device))
            steps.append(timed(lambda: trainer.step(example), device))
        parts = [step_parts(trainer, example, device) for _ in range(max(3, args.repeats // 2))]
        median_parts = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        # paired: the whole step over its own prefill, within one call (less exposed to load changes)
        paired = statistics.median(sum(p.values()) / p["prefill"] for p in parts)
        per_task[task] = {
            "context_tokens": example.length_context,
            "answer_tokens": len(example.input_ids) - example.length_context,
            "prefill_seconds": prefills,
            "step_seconds": steps,
            "prefill_median_s": statistics.median(prefills),
            "step_median_s": statistics.median(steps),
            "ratio_step_to_prefill": statistics.median(steps) / statistics.median(prefills),
            "step_parts_median_s": median_parts,
            "ratio_step_to_own_prefill_paired": paired,
        }
        print(
            f"{task:>13}: prefill {per_task[task]['prefill_median_s'] * 1e3:7.1f} ms, step "
            f"{per_task[task]['step_median_s'] * 1e3:7.1f} ms, ratio {per_task[task]['ratio_step_to_prefill']:.2f} "
            f"(paired within a step: {paired:.2f}; {per_task[task]['answer_tokens']} answer tokens)"
        )

    ratios = [r["ratio_step_to_prefill"] for r in per_task.values()]
    worst_task = max(per_task, key=lambda t: per_task[t]["ratio_step_to_prefill"])
    report = {
        "benchmark": "training_step",
        "what": "one stage-1 Trainer.step vs one no-grad prefill of the same context, same process, alternating",
        "target_max_ratio": TARGET,
        "context_tokens": args.context,
        "repeats": args.repeats,
        "per_task": per_task,
        "ratio_mean_over_tasks": sum(ratios) / len(ratios),
        "ratio_worst_task": per_task[worst_task]["ratio_step_to_prefill"],
        "worst_task": worst_task,
        "meets_target": max(ratios) <= TARGET,
        "profile_one_step_top_ops": profile_step(trainer, examples[worst_task]),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "config": {
            "sink": config.windows.sink,
            "recent": config.windows.recent,
            "reg_weight": config.reg_weight,
            "lr": config.lr,
        },
        "provenance": provenance(device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"step / prefill: mean over tasks {report['ratio_mean_over_tasks']:.2f}, worst "
        f"{report['ratio_worst_task']:.2f} ({worst_task}); target <= {TARGET}: "
        f"{'met' if report['meets_target'] else 'not met'}. Wrote {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
