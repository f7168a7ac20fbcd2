"""CPU decode-step time of SmolLM2 with the LeanK cache against a dense cache, at a 2K-token context.

One prompt of ``--context`` tokens is prefilled once into each cache (a transformers ``DynamicCache``, the
dense default of ``generate``; and a :class:`~leank_ref.cache.LeanKCache` with the shipped r=0.7 mask), then
both decode ``--steps`` tokens in alternating blocks, so a load change on a shared machine hits both alike.
A step is one ``model(...)`` call with one new token: the whole model, not only attention. The LeanK cache routes
only its own layers' attention calls, so dense steps run the unmodified model. Target: LeanK step
<= 1.2x dense step. A short ``torch.profiler`` run of each says where the time goes.

    python benchmarks/cache_decode_cpu.py                 # writes benchmarks/results/cache_decode_cpu.json
    python benchmarks/cache_decode_cpu.py --threads 2 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from leank_ref.attention import use_hook
from leank_ref.cache import LeanKAttention, LeanKCache
from leank_ref.data import continuation_example
from leank_ref.masks import load_mask
from leank_ref.models import cache_argument, load_model, model_facts
from leank_ref.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.2


def step(model, token: torch.Tensor, cache, name: str) -> tuple[float, torch.Tensor]:
    """One decode step (seconds, next greedy token [1, 1])."""
    start = time.perf_counter()
    logits = model(token, **{name: cache}).logits
    return time.perf_counter() - start, logits[:, -1:].argmax(-1)


def top_ops(prof, n: int = 12) -> list[dict]:
    """The ``n`` operators with the most self CPU time in a profile, per profiled step."""
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60, help="decode steps timed per cache")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--mask", type=Path, default=ROOT / "masks" / "smollm2-135m_r0.7.pth")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_decode_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model()
    facts = model_facts(model)
    mask = load_mask(args.mask, facts.mask_shape, 16)
    ids = continuation_example(tokenizer, args.context, seed=0).context_ids[None]  # [1, context]
    name = cache_argument(model)

    # SmolLM2 defaults: sink 16, recent 64, block 32
    leank_cache = LeanKCache(model, mask, backend="torch", max_tokens=args.context + args.steps + 12)
    # Its attention stays bound for the whole run; a DynamicCache step passes through it to SDPA (one call more)
    with torch.no_grad(), use_hook(model, LeanKAttention(leank_cache)):
        dense_cache = DynamicCache(config=model.config)
        next_dense = model(ids, **{name: dense_cache}).logits[:, -1:].argmax(-1)
        next_leank = model(ids, **{name: leank_cache}).logits[:, -1:].argmax(-1)
        times = {"dense": [], "leank": []}
        for _ in range(2):  # warm-up, untimed
            step(model, next_dense, dense_cache, name)
            step(model, next_leank, leank_cache, name)
        while len(times["leank"]) < args.steps:
            for _ in range(args.block):
                t, next_dense = step(model, next_dense, dense_cache, name)
                times["dense"].append(t)
            for _ in range(args.block):
                t, next_leank = step(model, next_leank, leank_cache, name)
                times["leank"].append(t)

        profiles = {}
        for label, cache, token in (("dense", dense_cache, next_dense), ("leank", leank_cache, next_leank)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    _, token = step(model, token, cache, name)
            profiles[label] = {"steps": 5, "top_ops": top_ops(prof)}

    dense_ms = statistics.median(times["dense"]) * 1e3
    leank_ms = statistics.median(times["leank"]) * 1e3
    report = leank_cache.memory_report()
    result = {
        "benchmark": "cache_decode_cpu",
        "what": "one decode step (whole SmolLM2 forward, 1 token) at a ~2K context, LeanK cache vs dense DynamicCache",
        "provenance": provenance("cpu"),
        "config": {
            "context": args.context,
            "steps": args.steps,
            "block": args.block,
            "threads": args.threads,
            "mask": str(args.mask.relative_to(ROOT)) if args.mask.is_relative_to(ROOT) else str(args.mask),
            "sink": leank_cache.sink,
            "recent": leank_cache.recent,
            "compaction_block": leank_cache.block,
            "backend": "torch",
            "dtype": str(next(model.parameters()).dtype),
        },
        "dense_step_ms_median": dense_ms,
        "leank_step_ms_median": leank_ms,
        "ratio_leank_over_dense": leank_ms / dense_ms,
        "target_ratio_max": TARGET,
        "target_met": leank_ms / dense_ms <= TARGET,
        "dense_step_ms": [t * 1e3 for t in times["dense"]],
        "leank_step_ms": [t * 1e3 for t in times["leank"]],
        "memory": {
            "tokens": report.tokens,
            "leank_kv_bytes": report.total,
            "dense_kv_bytes": report.dense_total,
            "leank_k_bytes": report.k,
            "dense_k_bytes": report.dense_k,
        },
        "profiles": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"dense {dense_ms:.1f} ms/step, LeanK {leank_ms:.1f} ms/step: {leank_ms / dense_ms:.2f}x "
        f"(target <= {TARGET}x: {'met' if result['target_met'] else 'not met'}); KV bytes "
        f"{report.total / 1e6:.1f} MB vs {report.dense_total / 1e6:.1f} MB dense -> {args.out}"
    )


if __name__ == "__main__":
    main()
