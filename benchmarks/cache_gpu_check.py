"""The LeanK cache on a GPU: does it generate correctly on CUDA, and what does its bookkeeping cost per step?

1. **Generation on CUDA** (SmolLM2, fp32 and bf16): greedy tokens with an all-ones mask against the dense model
   (64 tokens after a ~1K prompt), and the shipped r=0.7 mask through both decode backends (Triton kernel, the
   CUDA default, and the torch path) on a batch of 4 equal-length prompts: largest logit difference and token
   agreement.
2. **One Llama-3.1-8B-shaped layer** (H=32, G=8, D=128, bf16, a layer of the authors' mask, their windows
   sink 128 / recent 768 / compaction block 128): time of a whole decode step of the cache (store the new
   token, compact a block when due, attention through the Triton kernel), against a dense cache preallocated
   to the same length (store + SDPA, and store + the project's dense Triton kernel), and against transformers'
   ``DynamicLayer`` (``torch.cat`` of all past K/V per step + SDPA). CUDA-event timing, median of
   ``--steps`` steps after warm-up.

    python benchmarks/cache_gpu_check.py --out $OUT/cache_gpu_check.json       # on the GPU
    TRITON_INTERPRET=1 python benchmarks/cache_gpu_check.py --cpu-check        # logic only, tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from leank_ref.kernels import dense_decode
from transformers.cache_utils import DynamicLayer

from leank_ref.cache import LeanKCache, apply_leank, cache_argument
from leank_ref.data import continuation_example
from leank_ref.decode import LeanKAttention
from leank_ref.masks import load_mask
from leank_ref.models import load_model, model_facts
from leank_ref.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent


def greedy(model, ids, steps, **kwargs):
    """``steps`` greedy tokens with their logits."""
    out = model.generate(
        ids,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1).float()


def generation_checks(device: str, dtypes: list[torch.dtype], prompt: int, steps: int) -> list[dict]:
    """Part 1: all-ones mask = dense tokens; r=0.7 mask, Triton vs torch backend, batch of 4."""
    rows = []
    for dtype in dtypes:
        model, tokenizer = load_model(dtype=dtype, device=device)
        facts = model_facts(model)
        ids = continuation_example(tokenizer, prompt, seed=0).context_ids[None].to(device)
        dense, _ = greedy(model, ids, steps)
        with apply_leank(model, torch.ones(facts.mask_shape), backend="triton") as lk:
            ones, _ = greedy(model, ids, steps, **{cache_argument(model): lk.new_cache(prompt + steps)})
        batch = torch.stack([continuation_example(tokenizer, prompt, seed=s).context_ids for s in range(4)]).to(device)
        mask = load_mask(ROOT / "masks" / "smollm2-135m_r0.7.pth", facts.mask_shape, 16)
        out = {}
        for backend in ("triton", "torch"):
            with apply_leank(model, mask, backend=backend) as lk:
                out[backend] = greedy(
                    model,
                    batch,
                    steps,
                    attention_mask=torch.ones_like(batch),
                    **{cache_argument(model): lk.new_cache(prompt + steps)},
                )
        rows.append(
            {
                "dtype": str(dtype),
                "prompt": prompt,
                "steps": steps,
                "all_ones_tokens_equal_dense": bool(torch.equal(dense, ones)),
                "all_ones_first_difference": int((dense != ones).int().argmax())
                if not torch.equal(dense, ones)
                else None,
                "r07_batch4_max_logit_diff_triton_vs_torch": (out["triton"][1] - out["torch"][1]).abs().max().item(),
                "r07_batch4_token_agreement_triton_vs_torch": (out["triton"][0] == out["torch"][0])
                .float()
                .mean()
                .item(),
            }
        )
        print(rows[-1])
    return rows


def cuda_time(fn, steps: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls (CUDA events on a GPU, perf_counter on CPU)."""
    times = []
    for _ in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_step_times(device: str, dtype, batch: int, context: int, steps: int, windows: tuple, layer: int) -> dict:
    """Part 2: one decode step of one Llama-shaped layer, LeanK cache vs dense caches, at ``context`` tokens."""
    mask = load_mask(ROOT / "masks" / "reference" / "llama3.1-8b-instruct.pth", (32, 8, 128), 32)[layer : layer + 1]
    h, g, d = 32, 8, 128
    sink, recent, block = windows
    total = context + 2 * (steps + 3) + 8  # the two preallocated dense variants share one buffer
    gen = torch.Generator(device).manual_seed(0)
    kv = torch.randn(2, batch, g, context, d, generator=gen, device=device, dtype=dtype)  # the prompt's K, V
    new = torch.randn(2, batch, g, 1, d, generator=gen, device=device, dtype=dtype)  # one new token's K, V
    q = torch.randn(batch, h, 1, d, generator=gen, device=device, dtype=dtype)
    scale = d**-0.5

    attention = LeanKAttention("triton")
    attention.active = True  # as if installed on a model
    cache = LeanKCache(mask, sink, recent, block, attention, max_tokens=total)
    cache.update(kv[0], kv[1], 0)
    lk_layer = cache.layers[0]

    def leank_step():
        cache.update(new[0], new[1], 0)
        attention.pending = None
        return attention.decode(lk_layer, q, scale)

    buf = torch.empty(2, batch, g, total, d, device=device, dtype=dtype)  # dense, preallocated
    buf[:, :, :, :context] = kv
    n = [context]

    def dense_store():
        buf[:, :, :, n[0]] = new[:, :, :, 0]
        n[0] += 1
        return buf[0, :, :, : n[0]], buf[1, :, :, : n[0]]

    def dense_sdpa_step():
        k, v = dense_store()
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def dense_triton_step():
        k, v = dense_store()
        return dense_decode(q[:, :, 0], k, v, scale)

    dyn = DynamicLayer()
    dyn.update(kv[0].clone(), kv[1].clone())

    def dynamic_step():
        k, v = dyn.update(new[0], new[1])
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    del kv
    row = {"batch": batch, "context": context, "layer": layer}
    for name, fn in (
        ("leank_triton", leank_step),
        ("dense_sdpa_prealloc", dense_sdpa_step),
        ("dense_triton_prealloc", dense_triton_step),
        ("dense_sdpa_dynamic_cat", dynamic_step),
    ):
        cuda_time(fn, 3, device)  # warm-up (compilation, autotuning)
        row[f"{name}_ms"] = cuda_time(fn, steps, device) * 1e3
    rep = cache.memory_report()
    row["leank_bytes"], row["dense_bytes"] = rep.total, rep.dense_total
    row["leank_over_dense_sdpa"] = row["leank_triton_ms"] / row["dense_sdpa_prealloc_ms"]
    row["leank_over_dense_triton"] = row["leank_triton_ms"] / row["dense_triton_prealloc_ms"]
    print(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-check", action="store_true", help="tiny shapes on CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--layer", type=int, default=16, help="which layer of the authors' Llama mask")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_gpu_check.json")
    args = parser.parse_args()
    if args.cpu_check:
        device, dtypes, prompt, gen_steps = "cpu", [torch.float32], 120, 3
        shapes, windows, steps, layer_dtype = [(2, 300)], (16, 64, 32), 3, torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU, or use --cpu-check with TRITON_INTERPRET=1")
        device, dtypes, prompt, gen_steps = "cuda", [torch.float32, torch.bfloat16], 1024, 64
        shapes = [(b, n) for b in (1, 8, 32) for n in (4096, 32768)]
        windows, steps, layer_dtype = (128, 768, 128), args.steps, torch.bfloat16
    result = {
        "benchmark": "cache_gpu_check",
        "provenance": provenance(device),
        "generation": generation_checks(device, dtypes, prompt, gen_steps),
        "layer_step": {
            "what": "one decode step of one Llama-3.1-8B-shaped layer (store + attention), medians",
            "dtype": str(layer_dtype),
            "sink_recent_block": windows,
            "steps": steps,
            "rows": [layer_step_times(device, layer_dtype, b, n, steps, windows, args.layer) for b, n in shapes],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
