"""Whole-model decoding at Llama-3.1-8B size: dense transformers vs the LeanK cache + Triton kernel (issue 8).

Run on a CUDA machine from the repository root (about 4 minutes on an H100):

    python benchmarks/end_to_end.py --out DIR

The model is ``LlamaForCausalLM`` built from Llama-3.1-8B's configuration with random bf16 weights: no
checkpoint is reachable offline, and the cost of attention, of the MLPs and the size of the cache do not
depend on the weights' values (Llama-3's RoPE scaling is left out for the same reason). LeanK uses the
authors' released Llama-3.1-8B mask with their deployment windows (sink 128, recent 768, block 128).

What it does, in one process:

1. correctness: after a real 1K-token prefill, LeanK with an all-ones mask must pick the same greedy tokens
   as dense for 32 steps; with the real mask, one layer's Triton decode must match the torch reference path
   (bf16 tolerance) on the cache that prefill built;
2. prefill: one sequence of 8K and 32K tokens through the model (dense cache and LeanK cache), timed;
3. decode throughput: for B x N in {1, 8, 32} x {8K, 32K} (what fits), each cache is filled with random K/V
   of N tokens through the cache's own ``update`` (what prefill does; decode cost does not depend on the
   values), then timed over greedy decode steps: new tokens/s = B / step time. Three variants: dense
   (SDPA + transformers' default ``DynamicCache``), LeanK (released mask), and LeanK with an all-ones mask
   (the same cache and kernel keeping every channel: separates the gain of pruning from the gain or loss of
   the cache implementation). Peak GPU memory of each is recorded;
4. largest batch in a fixed memory budget at 4K and 32K: peak memory is measured at two batch sizes, the
   line through them gives the largest batch under the budget, and a run at that batch checks it fits;
5. where the time goes: a ``torch.profiler`` trace of a few decode steps at B8 N32K, GPU time by kernel
   family (attention, matmuls, cache copies, other) against the step's wall time.

Everything goes to DIR/end_to_end.json with leank_ref.provenance. ``--cpu-check`` runs every part at tiny
shapes on the CPU (torch decode path and Triton's interpreter) to check the script, without timing claims.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--cpu-check" in sys.argv:  # the interpreter must be chosen before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from leank_ref.cache import apply_leank, cache_argument, memory_formula  # noqa: E402
from leank_ref.decode import leank_decode_torch, leank_decode_triton  # noqa: E402
from leank_ref.masks import load_mask, mask_stats  # noqa: E402
from leank_ref.provenance import provenance  # noqa: E402

LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
MASK = "masks/reference/llama3.1-8b-instruct.pth"
SINK, RECENT, BLOCK = 128, 768, 128
GIB = 1 << 30


def build_model(config: dict, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """A Llama model of ``config`` with random weights (transformers' own initialisation), in eval mode."""
    cfg = LlamaConfig(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One greedy decode step [B, 1] -> [B, 1] on ``cache`` (the logits of the new token only)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


def prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt [B, P] into ``cache``; returns the first new token [B, 1]."""
    return step(model, ids, cache)


def fill(cache, model, batch: int, tokens: int, handle=None) -> None:
    """Put ``tokens`` random K/V tokens into every layer of ``cache`` through its ``update`` (as prefill does)."""
    cfg = model.config
    dtype, device = model.dtype, model.device
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in range(cfg.num_hidden_layers):
        shape = (batch, cfg.num_key_value_heads, tokens, cfg.head_dim)
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        cache.update(k, v, layer)
        del k, v
    if handle is not None:
        handle.attention.pending = None  # no attention call follows these updates


def new_cache(kind: str, handles: dict, max_tokens: int):
    return DynamicCache() if kind == "dense" else handles[kind].new_cache(max_tokens)


def time_decode(model, kind: str, handles: dict, batch: int, tokens: int, steps: int, warmup: int, device: str):
    """Fill a cache of ``kind`` with ``tokens`` tokens, then time ``steps`` greedy decode steps."""
    handle = handles.get(kind)
    _activate(handles, kind)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = new_cache(kind, handles, tokens + warmup + steps + 1)
    fill(cache, model, batch, tokens, handle)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    for _ in range(warmup):
        ids = step(model, ids, cache)
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ids = step(model, ids, cache)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    median = statistics.median(times)
    del cache
    return {
        "step_ms": 1e3 * median,
        "tokens_per_s": batch / median,
        "peak_gib": peak / GIB,
        "steps": steps,
        "warmup": warmup,
    }


def _activate(handles: dict, kind: str) -> None:
    """Install the hook of ``kind`` (LeanK variants) or none (dense)."""
    for name, handle in handles.items():
        if name != kind:
            handle.remove()
    if kind in handles:
        handles[kind].install()


def check_correctness(model, handles: dict, device: str, prompt: int, steps: int) -> dict:
    """All-ones LeanK greedy tokens vs dense; real-mask Triton vs torch decode on one layer."""
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)
    out = {}
    tokens = {}
    for kind in ("dense", "leank_ones"):
        _activate(handles, kind)
        cache = new_cache(kind, handles, prompt + steps + 1)
        nxt = prefill(model, ids, cache)
        seq = [nxt]
        for _ in range(steps - 1):
            nxt = step(model, nxt, cache)
            seq.append(nxt)
        tokens[kind] = torch.cat(seq, 1)[0].tolist()
    same = sum(a == b for a, b in zip(tokens["dense"], tokens["leank_ones"]))
    out["first_step_logits"] = first_step_logit_gap(model, handles, ids)
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens["dense"], tokens["leank_ones"])) if a != b), None)
    out["all_ones_greedy"] = {
        "steps": steps,
        "same_tokens": same,
        "first_difference": first_diff,
        "dense": tokens["dense"],
        "leank_ones": tokens["leank_ones"],
    }
    # Real mask: the cache after a prefill of `prompt` tokens plus a few decode steps, one layer, both paths.
    _activate(handles, "leank")
    cache = new_cache("leank", handles, prompt + 8)
    nxt = prefill(model, ids, cache)
    for _ in range(3):
        nxt = step(model, nxt, cache)
    handles["leank"].attention.pending = None
    errors = []
    for layer in cache.layers:
        q = torch.randn(1, model.config.num_attention_heads, model.config.head_dim, device=device, dtype=model.dtype)
        scaling = model.config.head_dim**-0.5
        ref = leank_decode_torch(q, layer.keys, layer.values, layer.groups, scaling).float()
        got = leank_decode_triton(q, layer.keys, layer.values, layer.groups, scaling).float()
        errors.append(float((ref - got).abs().max()))
    out["real_mask_triton_vs_torch"] = {
        "max_abs_error_per_layer": errors,
        "max_abs_error": max(errors),
        "middle_tokens": cache.layers[0].middle,
        "tolerance": 2e-2,
    }
    out["passed"] = same == steps and max(errors) <= 2e-2
    return out


def first_step_logit_gap(model, handles: dict, ids: torch.Tensor) -> dict:
    """Logits of the first decode step (dense vs all-ones LeanK): largest difference, and dense's top-1 margin."""
    logits = {}
    for kind in ("dense", "leank_ones"):
        _activate(handles, kind)
        cache = new_cache(kind, handles, ids.shape[1] + 2)
        nxt = prefill(model, ids, cache)
        out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        logits[kind] = out.logits[0, -1].float()
    top2 = logits["dense"].topk(2).values
    return {
        "max_abs_difference": float((logits["dense"] - logits["leank_ones"]).abs().max()),
        "dense_logit_std": float(logits["dense"].std()),
        "dense_top1_margin": float(top2[0] - top2[1]),
        "same_argmax": bool(logits["dense"].argmax() == logits["leank_ones"].argmax()),
    }


def time_prefill(model, handles: dict, tokens: int, device: str, repeats: int) -> dict:
    """Seconds to prefill one sequence of ``tokens`` tokens into each kind of cache (median of ``repeats``)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    result = {}
    for kind in ("dense", "leank"):
        _activate(handles, kind)
        times = []
        for _ in range(repeats):
            cache = new_cache(kind, handles, tokens + 1)
            sync(device)
            start = time.perf_counter()
            prefill(model, ids, cache)
            sync(device)
            times.append(time.perf_counter() - start)
            del cache
        result[kind] = {"seconds": statistics.median(times), "tokens": tokens}
    return result


def fits(model, kind, handles, batch, tokens, device) -> tuple[bool, float]:
    """Whether a cache of ``batch`` x ``tokens`` plus two decode steps fits; and its peak memory (GiB)."""
    try:
        r = time_decode(model, kind, handles, batch, tokens, steps=1, warmup=1, device=device)
        ok, peak = True, r["peak_gib"]
    except torch.OutOfMemoryError:
        ok, peak = False, float("nan")
    free_memory(device)  # outside the except block: the traceback no longer holds the cache
    return ok, peak


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def cache_gib(model, mask: torch.Tensor, batch: int, tokens: int, sink: int, recent: int, block: int) -> float:
    """GiB a cache of ``batch`` x ``tokens`` needs: dense for an all-ones mask, else LeanK's (memory_formula)."""
    cfg = model.config
    if bool(mask.all()):
        return (
            2
            * batch
            * tokens
            * cfg.num_hidden_layers
            * cfg.num_key_value_heads
            * cfg.head_dim
            * model.dtype.itemsize
            / GIB
        )
    return memory_formula(mask, tokens, sink, recent, block, batch, model.dtype.itemsize).total / GIB


def largest_batch(model, handles, tokens: int, budget_gib: float, probe: tuple[int, int], device: str) -> dict:
    """Largest batch under ``budget_gib``: a line through peak memory at two batches, then checked by a run."""
    result = {}
    for kind in ("dense", "leank"):
        (b1, b2) = probe
        ok1, m1 = fits(model, kind, handles, b1, tokens, device)
        ok2, m2 = fits(model, kind, handles, b2, tokens, device)
        if not (ok1 and ok2):
            result[kind] = {"error": f"probe batches {probe} do not fit"}
            continue
        per_seq = (m2 - m1) / (b2 - b1)
        fixed = m1 - per_seq * b1
        predicted = int((budget_gib - fixed) // per_seq)
        ok, peak = fits(model, kind, handles, predicted, tokens, device)
        while not ok and predicted > 1:  # the line was optimistic: step down until it fits
            predicted -= 1
            ok, peak = fits(model, kind, handles, predicted, tokens, device)
        result[kind] = {
            "probe_batches": list(probe),
            "probe_peak_gib": [m1, m2],
            "gib_per_sequence": per_seq,
            "fixed_gib": fixed,
            "largest_batch": predicted,
            "checked_peak_gib": peak,
            "checked_fits": ok and peak <= budget_gib + 0.5,
        }
    if "largest_batch" in result.get("dense", {}) and "largest_batch" in result.get("leank", {}):
        result["ratio"] = result["leank"]["largest_batch"] / result["dense"]["largest_batch"]
    return result


def profile_steps(model, handles: dict, batch: int, tokens: int, steps: int, device: str) -> dict:
    """GPU time per kernel family over ``steps`` decode steps, for dense and LeanK."""
    from torch.profiler import ProfilerActivity, profile

    families = {
        "attention": ("flash", "fmha", "attention", "decode", "_merge", "sdpa", "cudnn", "leank", "_dense_partial"),
        "matmul": ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul"),
        "cache_copy": ("cat", "copy", "index", "gather", "scatter", "fill"),
    }
    result = {}
    for kind in ("dense", "leank"):
        _activate(handles, kind)
        cache = new_cache(kind, handles, tokens + steps + 4)
        fill(cache, model, batch, tokens, handles.get(kind))
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        ids = step(model, ids, cache)
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                ids = step(model, ids, cache)
            sync(device)
            wall = time.perf_counter() - start
        by_family = {name: 0.0 for name in (*families, "other")}
        kernels = {}
        for event in prof.key_averages():
            gpu_us = getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
            if not gpu_us or event.device_type.name != "CUDA":
                continue
            name = event.key.lower()
            family = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
            by_family[family] += gpu_us / 1e3 / steps
            kernels[event.key[:90]] = kernels.get(event.key[:90], 0.0) + gpu_us / 1e3 / steps
        top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
        result[kind] = {
            "wall_ms_per_step": 1e3 * wall / steps,
            "gpu_ms_per_step": by_family,
            "gpu_busy_ms_per_step": sum(by_family.values()),
            "top_kernels_ms_per_step": top,
        }
        del cache
    return result


def setup(cpu: bool, dtype: torch.dtype):
    """The model, its mask, windows and the LeanK handles (real mask, all-ones) for a run."""
    device = "cpu" if cpu else "cuda"
    model = build_model(TINY if cpu else LLAMA_31_8B, dtype, device)
    cfg = model.config
    if cpu:
        gen = torch.Generator().manual_seed(0)
        scores = torch.rand(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, generator=gen)
        counts = torch.tensor([[0, 16], [32, 64]])[: cfg.num_hidden_layers]
        mask = torch.zeros_like(scores)
        for l in range(cfg.num_hidden_layers):
            for g in range(cfg.num_key_value_heads):
                mask[l, g, scores[l, g].topk(int(counts[l, g])).indices] = 1
        windows = (4, 16, 8, 16)
    else:
        mask = load_mask(MASK)
        windows = (SINK, RECENT, BLOCK, 32)
    sink, recent, block, align = windows
    handles = {
        "leank": apply_leank(model, mask, sink, recent, block, align=align, backend="triton"),
        "leank_ones": apply_leank(model, torch.ones_like(mask), sink, recent, block, align=align, backend="triton"),
    }
    for h in handles.values():
        h.remove()
    return model, mask, windows, handles


def correctness_only(args) -> int:
    """The correctness checks in float32 (exact products in the kernels) and in bfloat16, one model at a time."""
    cpu = args.cpu_check
    device = "cpu" if cpu else "cuda"
    result = {
        "benchmark": "end_to_end_correctness",
        "provenance": provenance(device),
        "cpu_check": cpu,
        "model": "tiny (cpu check)" if cpu else "Llama-3.1-8B config, random weights",
        "windows": dict(
            zip(("sink", "recent", "block", "align"), (4, 16, 8, 16) if cpu else (SINK, RECENT, BLOCK, 32))
        ),
    }
    dtypes = (torch.float32,) if cpu else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        model, mask, windows, handles = setup(cpu, dtype)
        check = check_correctness(model, handles, device, prompt=64 if cpu else 1024, steps=8 if cpu else 32)
        result[str(dtype).removeprefix("torch.")] = check
        print(
            dtype,
            json.dumps({k: v for k, v in check.items() if k != "all_ones_greedy"}),
            "same tokens",
            check["all_ones_greedy"]["same_tokens"],
            flush=True,
        )
        del model, handles
        free_memory(device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "end_to_end_correctness.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for end_to_end.json")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--budget-gib", type=float, default=70.0, help="memory budget for the largest-batch search")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per configuration")
    parser.add_argument("--cpu-check", action="store_true", help="tiny shapes on the CPU, to check the script")
    parser.add_argument(
        "--correctness-only",
        action="store_true",
        help="only the correctness checks, in float32 and bfloat16 -> end_to_end_correctness.json",
    )
    args = parser.parse_args()
    if args.correctness_only:
        return correctness_only(args)

    cpu = args.cpu_check
    device = "cpu" if cpu else "cuda"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or pass --cpu-check for a logic check on CPU")
    dtype = torch.float32 if cpu else torch.bfloat16
    model, mask, (sink, recent, block, _), handles = setup(cpu, dtype)
    backend = "triton"
    result = {
        "benchmark": "end_to_end",
        "provenance": provenance(device),
        "model": {
            "config": "Llama-3.1-8B (random bf16 weights)" if not cpu else "tiny (cpu check)",
            **{k: v for k, v in (TINY if cpu else LLAMA_31_8B).items()},
        },
        "mask": {"path": None if cpu else MASK, **mask_stats(mask, 32768, sink, recent).__dict__},
        "windows": {"sink": sink, "recent": recent, "block": block},
        "backend": backend,
        "cpu_check": cpu,
    }
    result["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB if not cpu else 0.0
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    result["weights_gib"] = weights_gib

    def save():
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "end_to_end.json").write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.perf_counter()
    result["correctness"] = check_correctness(
        model, handles, device, prompt=64 if cpu else 1024, steps=8 if cpu else 32
    )
    print(
        "correctness",
        json.dumps({k: v for k, v in result["correctness"].items() if k != "all_ones_greedy"}),
        "same tokens",
        result["correctness"]["all_ones_greedy"]["same_tokens"],
        flush=True,
    )
    save()
    result["prefill"] = {
        str(n): time_prefill(model, handles, n, device, repeats=1 if cpu else 2)
        for n in ([48] if cpu else [8192, 32768])
    }
    print("prefill", result["prefill"], flush=True)
    save()

    batches = [1, 2] if cpu else args.batches
    contexts = [40, 72] if cpu else args.contexts
    decode = []
    for n in contexts:
        for b in batches:
            row = {"batch": b, "context": n}
            for kind in ("dense", "leank", "leank_ones"):
                need = cache_gib(model, mask if kind == "leank" else torch.ones_like(mask), b, n, sink, recent, block)
                if not cpu and need + weights_gib > result["gpu_total_gib"]:
                    row[kind] = {"skipped": f"cache {need:.0f} GiB + weights {weights_gib:.0f} GiB exceed the GPU"}
                    continue
                try:
                    row[kind] = time_decode(
                        model,
                        kind,
                        handles,
                        b,
                        n,
                        steps=2 if cpu else args.steps,
                        warmup=1 if cpu else 3,
                        device=device,
                    )
                except torch.OutOfMemoryError:
                    row[kind] = {"error": "out of memory"}
                free_memory(device)
            if "step_ms" in row["dense"] and "step_ms" in row["leank"]:
                row["leank_speedup"] = row["dense"]["step_ms"] / row["leank"]["step_ms"]
            if "step_ms" in row["leank_ones"] and "step_ms" in row["leank"]:
                row["leank_speedup_vs_ones"] = row["leank_ones"]["step_ms"] / row["leank"]["step_ms"]
            decode.append(row)
            print("decode", json.dumps(row), flush=True)
            result["decode"] = decode
            save()

    if not cpu:
        result["largest_batch"] = {
            "budget_gib": args.budget_gib,
            "4096": largest_batch(model, handles, 4096, args.budget_gib, (8, 32), device),
            "32768": largest_batch(model, handles, 32768, args.budget_gib, (1, 4), device),
        }
        print("largest batch", json.dumps(result["largest_batch"]), flush=True)
        save()
    result["profile"] = {
        "batch": 2 if cpu else 8,
        "context": 72 if cpu else 32768,
        **profile_steps(model, handles, 2 if cpu else 8, 72 if cpu else 32768, 2 if cpu else 5, device),
    }
    print("profile", json.dumps(result["profile"]), flush=True)
    result["seconds"] = time.perf_counter() - t0
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
