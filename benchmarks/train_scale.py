"""Training at the paper's scale on one GPU: seconds per step and peak memory for 8B-class shapes at 8K-96K tokens.

    python benchmarks/train_scale.py                       # one GPU; writes benchmarks/results/train_scale.json
    python benchmarks/train_scale.py --models qwen2.5-7b-shape  # one model; the file keeps the other's rows
    python benchmarks/train_scale.py --cpu-check --out build/train_scale_cpu.json   # tiny configs, seconds, CPU
    python benchmarks/train_scale.py --smollm2      # real SmolLM2-135M (float32), 2K-8K: train_scale_smollm2.json

The models are Llama-3.1-8B and Qwen2.5-7B *shapes*: their published configurations (written out below) with
random bf16 weights, since no 8B weights are available offline. Time and memory depend on the shapes only, so
the figures hold for the real checkpoints; the losses do not mean anything. The examples are random token ids:
a context of N tokens and ``--answer`` answer tokens, all labelled.

Each step is what ``Trainer.step`` runs, timed in parts (CUDA-synchronised): the no-grad prefill of the context,
the teacher's answer pass, the student's answer pass (with grad), its backward pass and the optimizer step;
stage 2 adds the binarization. The whole ``Trainer.step`` is timed too. Peak memory is
``torch.cuda.max_memory_allocated`` over one step, weights included. Settings are the authors': windows
``AUTHORS_TRAIN`` (sink 128, recent 1024), alignment 32, ratio 0.7 in stage 2.

``--smollm2`` times the embedded SmolLM2-135M-Instruct itself (real weights, float32 as ``train`` loads it) at
2K, 4K and 8K tokens, its longest context: the cost of the paper-window masks this repository trains.

The authors' recipe (Zhang et al., 2025, App. B) is 2000 stage-1 steps and 200 stage-2 steps on contexts of
4K-96K tokens. Its projected wall time is the step count times the mean step time over that range, with the
step time interpolated linearly between the measured lengths (and held at the 8K value below 8K).
The step time used is the whole ``Trainer.step``.
A part that runs out of memory is recorded as such with its length, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from leank_ref.data import Example
from leank_ref.masks import binarize
from leank_ref.models import model_facts
from leank_ref.provenance import provenance
from leank_ref.shapes import LLAMA_3_1_8B, QWEN_2_5_7B, TINY, random_model
from leank_ref.train.loss import Prefilled, answer_hidden_states, prefill_context, straight_through, student_loss
from leank_ref.train.settings import TrainSettings
from leank_ref.train.trainer import Trainer
from leank_ref.windows import AUTHORS_TRAIN, Windows

MODELS = {"llama-3.1-8b-shape": ("llama", LLAMA_3_1_8B), "qwen2.5-7b-shape": ("qwen2", QWEN_2_5_7B)}
CPU_MODELS = {
    "tiny-llama": ("llama", {**LLAMA_3_1_8B, **TINY, "vocab_size": 512}),
    "tiny-qwen2": ("qwen2", {**QWEN_2_5_7B, **TINY, "vocab_size": 512}),
}
SMOLLM2 = "smollm2-135m"  # the embedded model, real weights (--smollm2)
RECIPE = {"stage1_steps": 2000, "stage2_steps": 200, "context_min": 4000, "context_max": 96000}


def random_example(vocab: int, context: int, answer: int) -> Example:
    ids = torch.randint(0, vocab, (context + answer,), generator=torch.Generator().manual_seed(context))
    labels = ids.clone()
    labels[:context] = -100
    return Example(ids, context, labels, answer="", task="random")


class Clock:
    """Wall seconds between marks, synchronising CUDA first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        lap, self.last = now - self.last, now
        return lap


def step_parts(trainer: Trainer, example: Example, chunk: int) -> dict[str, float]:
    """One step of ``trainer`` on ``example``, run part by part in the order ``Trainer.step`` runs them."""
    s, model, device = trainer.settings, trainer.model, trainer.factors.device
    clock = Clock(device)
    cache = prefill_context(model, example, chunk)
    parts = {"prefill": clock.lap()}
    with torch.no_grad():
        ready = Prefilled(example, cache, answer_hidden_states(model, cache, example))
    parts["teacher_answer"] = clock.lap()
    mask = None
    if s.stage == 2:
        mask = binarize(trainer.factors.detach(), s.ratio, s.align)
        parts["binarize"] = clock.lap()
    trainer.optimizer.zero_grad(set_to_none=True)
    scale = trainer.factors if mask is None else straight_through(trainer.factors, mask, hard=True)
    loss = student_loss(model, ready, scale, s) + s.reg_weight * trainer.factors.abs().mean()
    parts["student_answer"] = clock.lap()
    loss.backward()
    parts["backward"] = clock.lap()
    trainer.optimizer.step()
    with torch.no_grad():
        trainer.factors.clamp_(0.0, 1.0)
    parts["optimizer"] = clock.lap()
    return parts


def measure(model, context: int, stage: int, args, device: torch.device, windows: Windows, align: int) -> dict:
    """Median part times, the whole ``Trainer.step`` and the peak memory of one stage at one context length."""
    vocab = model.config.vocab_size
    example = random_example(vocab, context, args.answer)
    settings = TrainSettings.for_stage(
        stage, windows=windows, align=align, context_min=context, context_max=context, prefill_chunk=args.prefill_chunk
    )
    shape = model_facts(model).mask_shape  # [L, G, D]
    if stage == 2:
        settings = settings.replace(ratio=0.7)
        factors = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    else:
        factors = None
    trainer = Trainer(model, None, settings, factors)
    row: dict = {"context": context, "stage": stage}
    try:
        step_parts(trainer, example, args.prefill_chunk)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [step_parts(trainer, example, args.prefill_chunk) for _ in range(args.repeats)]
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["seconds"] = {k: round(sorted(r[k] for r in runs)[len(runs) // 2], 4) for k in runs[0]}
        clock = Clock(device)
        trainer.step(example)
        row["trainer_step_seconds"] = round(clock.lap(), 4)
    except torch.cuda.OutOfMemoryError as error:
        row["out_of_memory"] = str(error).splitlines()[0]
    finally:
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def projected_hours(
    rows: list[dict], stage: int, steps: int, span: tuple[int, int] = (RECIPE["context_min"], RECIPE["context_max"])
) -> float | None:
    """Steps x mean step time over uniform contexts in ``span`` (linear between measured lengths)."""
    points = sorted((r["context"], r["trainer_step_seconds"]) for r in rows if r["stage"] == stage and "seconds" in r)
    if len(points) < 2 or any(r["stage"] == stage and "out_of_memory" in r for r in rows):
        return None
    lengths = range(span[0], span[1] + 1, 1000)

    def at(n: float) -> float:  # linear between measured lengths, held at the nearest one outside them
        for (a, ta), (b, tb) in zip(points, points[1:]):
            if n <= b:
                return ta + (tb - ta) * (min(max(n, a), b) - a) / (b - a)
        return points[-1][1]

    return round(steps * sum(at(n) for n in lengths) / len(lengths) / 3600, 3)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 8192 32768 65536 98304)")
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--answer", type=int, default=32, help="answer tokens per example (default 32)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per setting after a warm-up (default 2)")
    parser.add_argument("--prefill-chunk", type=int, default=0, help="context tokens per prefill forward (0: all)")
    parser.add_argument("--cpu-check", action="store_true", help="tiny configs on the CPU: checks the script runs")
    parser.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M at 2K-8K")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/train_scale[_smollm2].json")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(f"benchmarks/results/train_scale{'_smollm2' if args.smollm2 else ''}.json")

    if args.smollm2:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU.")
        device, dtype, models = torch.device("cuda"), torch.float32, {SMOLLM2: ("llama", None)}
        contexts, windows, align = args.contexts or [2048, 4096, 8192], AUTHORS_TRAIN, 32
    elif args.cpu_check:
        device, dtype, models = torch.device("cpu"), torch.float32, CPU_MODELS
        contexts, windows, align = args.contexts or [256, 512], Windows(8, 32, 1), 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU; run it with --cpu-check to check it on the CPU.")
        device, dtype, models = torch.device("cuda"), torch.bfloat16, MODELS
        contexts, windows, align = args.contexts or [8192, 32768, 65536, 98304], AUTHORS_TRAIN, 32
    chosen = args.models or list(models)
    unknown = [m for m in chosen if m not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose among {list(models)}.")

    result: dict = {
        "benchmark": "train_scale",
        "what": "one training step per stage (prefill-once student), parts timed, peak GPU memory; one GPU",
        "weights": "the embedded SmolLM2-135M-Instruct (real weights)"
        if args.smollm2
        else "random, built from the published configurations (no 8B weights offline): times and memory "
        "depend on the shapes only",
        "data": f"random token ids, {args.answer} answer tokens per example",
        "dtype": str(dtype).removeprefix("torch."),
        "settings": {
            "windows": vars(windows),
            "align": align,
            "stage2_ratio": 0.7,
            "prefill_chunk": args.prefill_chunk,
        },
        "recipe": RECIPE,
        "cpu_check": args.cpu_check,
        "models": {},
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if previous.get("cpu_check") == args.cpu_check and not args.smollm2:  # keep other models' rows (--models)
        result["models"] = {k: v for k, v in previous.get("models", {}).items() if k not in chosen}
    span = (min(contexts), max(contexts)) if args.smollm2 else (RECIPE["context_min"], RECIPE["context_max"])
    for name in chosen:
        model_type, values = models[name]
        if values is None:  # the real embedded model
            from leank_ref.models import load_model

            model = load_model(None, dtype=dtype, device=device)[0]
            keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")
            values = {k: getattr(model.config, k) for k in keys}
        else:
            model = random_model(model_type, values, device, dtype)
        rows = []
        for context in contexts:
            for stage in (1, 2):
                rows.append(measure(model, context, stage, args, device, windows, align))
                print(name, json.dumps(rows[-1]), flush=True)
        result["models"][name] = {
            "config": values,
            "parameters_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "rows": rows,
            "projected_recipe_hours": {
                "contexts": list(span),
                "stage1": projected_hours(rows, 1, RECIPE["stage1_steps"], span),
                "stage2": projected_hours(rows, 2, RECIPE["stage2_steps"], span),
            },
            "provenance": provenance(device),
        }
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["provenance"] = provenance(device)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after each model: a cut-short run keeps it
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
