"""Time the laptop recipe (both stages, r = 0.5 and 0.7) on this CPU and compare its masks with the GPU's.

Paths (``--out``, ``--masks``) are relative to the repository root, wherever it is run from:

    python benchmarks/laptop_recipe.py                     # profile + the whole recipe (~6 min on 2 idle cores)
    python benchmarks/laptop_recipe.py --compare-only      # only the comparison, from masks already trained
    python benchmarks/laptop_recipe.py --fast --out build/laptop_fast.json --masks build/laptop_fast

1. **Profile.** The parts of one stage-1 step (prefill of a 512-token context, the teacher's answer pass, the
   student's answer pass, the backward pass), CPU and wall seconds, with 1 and with 2 torch threads; then one
   step of the recipe's pooled trainer, whose prefill and teacher pass were done once.
2. **The recipe.** ``python -m leank_ref train --preset laptop`` for stage 1, then both stage-2 runs side by side
   (two processes, one thread each), exactly as a reader would type them. Wall minutes per stage and in total;
   the machine's load average is sampled every 5 s while they run (other people's jobs on a shared machine
   inflate every timing: the load says by how much).
3. **The comparison.** The laptop masks against the shipped GPU masks at the same ratio, on the evaluation's
   held-out samples (:func:`leank_ref.evaluate.sample.evaluate_sample`, deployed meaning: a zero-count head skips its
   middle tokens): per sample the KL to dense and the needle log-likelihood, and the paired bootstrap interval
   of the laptop-minus-GPU difference (:func:`leank_ref.stats.paired_bootstrap`).

Everything goes to one JSON file with :func:`leank_ref.provenance.provenance`; the masks go to ``--masks``
(metadata beside each file, written by the ``train`` command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from leank_ref.provenance import file_sha256, provenance
from leank_ref.train.settings import PRESETS

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.5, 0.7)
TARGET_MINUTES = 30.0
TAG = "smollm2-135m"


def machine() -> dict:
    """CPU model, core count and memory of this machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in x)
    except (OSError, StopIteration):
        mem_kb = 0
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1)}


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a background thread."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "max": round(max(s), 2), "samples": len(s)}


# ---------------------------------------------------------------------------------------------------------
# 1. Profile


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def profile(context: int, repeats: int) -> dict:
    """CPU and wall seconds of a stage-1 step's parts with 1 and 2 threads, and of one pooled step."""
    from leank_ref.models import load_model, model_facts
    from leank_ref.train.data import training_example
    from leank_ref.train.loss import answer_hidden_states, prefill_context, student_hook
    from leank_ref.train.settings import TrainSettings
    from leank_ref.train.trainer import Trainer

    model, tokenizer = load_model()
    for p in model.parameters():
        p.requires_grad_(False)
    config = TrainSettings.for_stage(1, context_min=context, context_max=context, tasks=("kv_retrieval",))
    example = training_example(tokenizer, config, 0)
    scale = torch.nn.Parameter(torch.ones(model_facts(model).mask_shape))  # [L, G, D]
    out: dict = {"context_tokens": context, "answer_tokens": int(len(example.input_ids) - context)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        parts: dict[str, list[tuple[float, float]]] = {}
        for _ in range(repeats):
            cache, c1, w1 = _timed(lambda: prefill_context(model, example))
            with torch.no_grad():
                teacher, c2, w2 = _timed(lambda: answer_hidden_states(model, cache, example))
            student, c3, w3 = _timed(
                lambda: answer_hidden_states(model, cache, example, student_hook(scale, example, config))
            )
            _, c4, w4 = _timed(lambda: (student - teacher).pow(2).mean().backward())
            for key, value in {
                "prefill": (c1, w1),
                "teacher_answer": (c2, w2),
                "student_answer": (c3, w3),
                "backward": (c4, w4),
            }.items():
                parts.setdefault(key, []).append(value)
        out[f"threads_{threads}"] = {
            "cpu_seconds_min": {k: round(min(c for c, _ in v), 3) for k, v in parts.items()},
            "wall_seconds_min": {k: round(min(w for _, w in v), 3) for k, v in parts.items()},
            "load_1min": round(os.getloadavg()[0], 2),
        }
    torch.set_num_threads(PRESETS["laptop"][1].threads)
    trainer = Trainer(model, tokenizer, config.replace(pool=1))
    trainer.prepare(progress=False)
    trainer.step()  # warm-up
    _, cpu, wall = _timed(trainer.step)
    out["pooled_step_threads_1"] = {"cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3)}
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. The recipe, through the command line


def train_argv(stage: int, masks: Path, ratio: float | None, fast: bool) -> list[str]:
    """``python -m leank_ref train --preset laptop ...`` for one stage (``fast``: a few steps on short contexts)."""
    factors = masks / f"{TAG}_stage1_factors.pth"
    argv = [sys.executable, "-m", "leank_ref", "train", "--preset", "laptop", "--stage", str(stage)]
    if stage == 1:
        argv += ["--out", str(factors)]
    else:
        argv += ["--factors", str(factors), "--ratio", str(ratio), "--out", str(masks / f"{TAG}_r{ratio:g}.pth")]
    if fast:
        argv += ["--steps", "3", "--context-min", "200", "--context-max", "260"]
    return argv


def run_stage(argvs: list[list[str]]) -> dict:
    """Run the commands side by side; wall minutes of the whole and of each, and the load meanwhile."""
    begun = time.perf_counter()
    with LoadSampler() as load:
        procs = [(subprocess.Popen(a, cwd=ROOT), time.perf_counter()) for a in argvs]
        walls = []
        for proc, start in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"{' '.join(proc.args)} failed with exit code {proc.returncode}.")
            walls.append(time.perf_counter() - start)
    return {
        "wall_minutes": round((time.perf_counter() - begun) / 60, 3),
        "processes": len(argvs),
        "process_wall_minutes": [round(w / 60, 3) for w in walls],
        "commands": [" ".join(["python", *a[1:]]) for a in argvs],
        "load_1min_during": load.summary(),
    }


def run_recipe(masks: Path, fast: bool) -> dict:
    """Stage 1, then stage 2 for both ratios side by side; what each run's metadata says, and the timings."""
    masks.mkdir(parents=True, exist_ok=True)
    stage1 = run_stage([train_argv(1, masks, None, fast)])
    stage2 = run_stage([train_argv(2, masks, r, fast) for r in RATIOS])
    runs = {}
    for name in [f"{TAG}_stage1_factors", *(f"{TAG}_r{r:g}" for r in RATIOS)]:
        meta = json.loads((masks / f"{name}.json").read_text())
        runs[name] = {
            "steps": meta["steps"],
            "wall_seconds": round(meta["wall_seconds"], 1),
            "train_seconds": round(meta["train_seconds"], 1),
            "final_tenth_mean_distill_loss": meta["final_tenth_mean_distill_loss"],
            **({"realised_ratio": meta["mask"]["realised_ratio"]} if "mask" in meta else {}),
        }
    total = stage1["wall_minutes"] + stage2["wall_minutes"]
    return {
        "stages": {"stage1": stage1, "stage2": stage2},
        "runs": runs,
        "wall_minutes_total": round(total, 3),
        "target_minutes": TARGET_MINUTES,
        "within_target": total <= TARGET_MINUTES,
    }


# ---------------------------------------------------------------------------------------------------------
# 3. The comparison with the GPU masks


def compare_masks(masks: Path, lengths: tuple[int, ...], samples: int, workers: int, fast: bool) -> dict:
    """Laptop vs shipped GPU mask at each ratio on the evaluation's held-out samples (deployed meaning).

    Per (task, source) and pooled over all samples: the paired bootstrap of the per-sample difference in KL to
    dense (laptop minus GPU, nats per token; > 0: the laptop mask is further from dense) and in the needle
    log-likelihood (laptop minus GPU; < 0: the laptop mask is less sure of the needle).
    """
    from leank_ref.baselines import Dense, LeanKLearned, learned_mask_path
    from leank_ref.evaluate.configs import Config
    from leank_ref.evaluate.grid import EvalGrid, tiny_grid
    from leank_ref.evaluate.run import evaluate_specs
    from leank_ref.masks import kept_counts, load_mask
    from leank_ref.models import load_model, model_facts
    from leank_ref.stats import compare

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    shape = model_facts(model).mask_shape
    grid = (tiny_grid if fast else EvalGrid)(ratios=RATIOS, lengths=lengths, samples=samples, greedy_lengths=())
    configs = [Config("dense", 0.0, "none", Dense())]
    files = {}
    for ratio in RATIOS:
        for method, path in (
            ("leank", learned_mask_path(ratio, ROOT / "masks")),
            ("leank_laptop", masks / f"{TAG}_r{ratio:g}.pth"),
        ):
            configs.append(Config(method, ratio, "own", LeanKLearned(path), kept_counts(load_mask(path, shape))))
            files[f"{method}@{ratio:g}"] = {"path": str(path.resolve().relative_to(ROOT)), "sha256": file_sha256(path)}
    specs = grid.specs()
    begun = time.perf_counter()
    rows = evaluate_specs(model, tokenizer, specs, configs, grid, workers=workers)
    seconds = time.perf_counter() - begun

    def gap(members: list[dict], ratio: float, metric: str) -> dict:
        laptop, gpu = ("leank_laptop", ratio, "own"), ("leank", ratio, "own")
        c = compare(members, laptop, gpu, metric, grid.tolerance, n_boot=10_000)  # > 0: laptop better
        sign = -1.0 if metric == "kl" else 1.0  # report laptop - gpu of the metric itself
        low, high = sorted((sign * c["low"], sign * c["high"]))
        return {"laptop_minus_gpu": sign * c["mean"], "low": low, "high": high, "n": c["n"], "verdict": c["verdict"]}

    def mean(members: list[dict], method: str, ratio: float, metric: str) -> float:
        values = [
            r[metric] for r in members if r["method"] == method and r["ratio"] == (ratio if method != "dense" else 0)
        ]
        return sum(values) / len(values)

    groups: dict[str, list[dict]] = {"all": rows}
    for r in rows:
        groups.setdefault(f"{r['task']}/{r['source']}", []).append(r)
    out = {"by_ratio": {}}
    for ratio in RATIOS:
        per = {}
        for name, members in groups.items():
            per[name] = {
                "kl": gap(members, ratio, "kl"),
                "ll": gap(members, ratio, "ll"),
                "mean_kl": {m: mean(members, m, ratio, "kl") for m in ("leank", "leank_laptop")},
                "mean_ll": {m: mean(members, m, ratio, "ll") for m in ("leank", "leank_laptop", "dense")},
            }
        out["by_ratio"][f"{ratio:g}"] = per
    out["kl_gap_vs_gpu"] = {f"{r:g}": out["by_ratio"][f"{r:g}"]["all"]["kl"] for r in RATIOS}
    out["needle_ll_gap_vs_gpu"] = {
        f"{r:g}": gap([x for x in rows if x["task"] != "continuation"], r, "ll") for r in RATIOS
    }
    out["samples"] = {"count": len(specs), "tasks": list(grid.tasks), "sources": list(grid.sources)}
    out["samples"].update({"lengths": list(grid.lengths), "per_cell": grid.samples, "seconds": round(seconds, 1)})
    out["masks"] = files
    out["tolerance_nats"] = grid.tolerance
    return out


# ---------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/laptop_recipe.json", help="relative to the root")
    parser.add_argument("--masks", default="masks/laptop", help="where the recipe writes its masks")
    parser.add_argument("--fast", action="store_true", help="a few steps on short contexts (checks the script)")
    parser.add_argument("--compare-only", action="store_true", help="skip the profile and the training")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with the GPU masks")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="comparison context lengths")
    parser.add_argument("--samples", type=int, default=4, help="comparison samples per (task, text, length)")
    parser.add_argument("--workers", type=int, default=2, help="comparison processes (one thread each)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # relative paths, and so the commands and metadata it records, are relative to the root
    out, masks = Path(args.out), Path(args.masks)
    result = json.loads(out.read_text()) if args.compare_only and out.exists() else {}
    result.update(
        {
            "benchmark": "laptop_recipe",
            "what": "python -m leank_ref train --preset laptop: stage 1, then stage 2 at r = 0.5 and 0.7 side by side",
            "fast": args.fast,
            "recipe": {f"stage{stage}": settings.as_dict() for stage, settings in PRESETS["laptop"].items()},
            "threads_per_process": PRESETS["laptop"][1].threads,
            "machine": machine(),
        }
    )
    if not args.compare_only:
        result["load_1min_before"] = round(os.getloadavg()[0], 2)
        if not args.no_profile:
            result["profile"] = profile(context=300 if args.fast else 512, repeats=1 if args.fast else 2)
        result.update(run_recipe(masks, args.fast))
        out.parent.mkdir(parents=True, exist_ok=True)
        result["recipe_provenance"] = provenance("cpu")  # the code and machine the timing comes from
        out.write_text(json.dumps({**result, "provenance": result["recipe_provenance"]}, indent=1) + "\n")
    if not args.no_compare:
        comparison = compare_masks(masks, tuple(args.lengths), args.samples, args.workers, args.fast)
        result["comparison"] = comparison
        result["kl_gap_vs_gpu"] = comparison["kl_gap_vs_gpu"]
        result["needle_ll_gap_vs_gpu"] = comparison["needle_ll_gap_vs_gpu"]
    result["provenance"] = provenance("cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}: total {result.get('wall_minutes_total')} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
