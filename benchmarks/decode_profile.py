"""Whole decoding steps of attention (32 layers), eager and as CUDA graphs: kernel time and host time.

Run on a CUDA machine from the repository root (a few minutes on an H200):

    python benchmarks/decode_profile.py --out DIR [--shapes 1x4096 8x32768 1x131072]

For each shape it builds one decoding step's attention over all 32 layers of Llama-3.1-8B (H=32, G=8,
D=128, bf16), each layer with its own dense cache and its own compact LeanK cache (the authors' released
mask, sink 128, recent 768), and times the whole step (the L2 is flushed once before each step, as the 32
layers' caches do not fit in it) for torch SDPA (flash, memory-efficient and cuDNN backends), the dense
Triton kernel and LeanK (one ``LeanKDecoder`` per layer, built once, one launch per layer per step):

1. **eager**: layers back to back from Python, as ``generate`` runs them; the time includes whatever host
   work the GPU cannot hide (``host_enqueue_us_per_layer`` is the host's own time per layer);
2. **graph**: the same step captured once as a CUDA graph and replayed: only the GPU's time (kernel time);
3. a ``torch.profiler`` trace of eager LeanK steps: GPU time and launches per kernel, the GPU's busy share.

``kernel_speedup_graph`` / ``kernel_speedup_eager`` are the best SDPA backend's step time over LeanK's, in
each mode. Everything goes to DIR/decode_profile.json with leank_ref.provenance. ``--cpu-check`` runs the
step functions once at tiny shapes in Triton's interpreter (no timing) to check the logic without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

if "--cpu-check" in sys.argv:  # the interpreter must be chosen before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The shapes, windows and mask of the kernel benchmark (benchmarks/ is on sys.path when a script there runs).
from decode_kernels import FLUSH_BYTES, MASK, N_RECENT, N_SINK, WINDOWS, H  # noqa: E402
from leank_ref.kernels import (  # noqa: E402
    LeanKDecoder,
    dense_decode,
)

from leank_ref.decode import leank_decode_torch  # noqa: E402
from leank_ref.layout import HeadGroups, leank_layout_from_dense  # noqa: E402
from leank_ref.masks import load_mask  # noqa: E402
from leank_ref.provenance import provenance  # noqa: E402
from leank_ref.static_decode import capture_graph  # noqa: E402

MODELS = {  # --model: released mask, query heads, result file
    "llama": (MASK, H, "decode_profile.json"),
    "qwen": ("masks/reference/qwen2.5-7b-instruct.pth", 28, "decode_profile_qwen.json"),
}


def build_step(B: int, N: int, keep: torch.Tensor, device: str, dtype: torch.dtype, heads: int = H):
    """q [B, H, D], per-layer dense caches and per-layer LeanK layouts (one decoding step's attention)."""
    _, G, D = keep.shape
    q = torch.randn(B, heads, D, device=device, dtype=dtype)
    dense, leank = [], []
    for layer in range(keep.shape[0]):
        k = torch.randn(B, G, N, D, device=device, dtype=dtype)
        v = torch.randn(B, G, N, D, device=device, dtype=dtype)
        leank.append(leank_layout_from_dense(k, v, keep[layer], WINDOWS))
        dense.append((k, v))
    return q, dense, leank


def layer_decoders(q: torch.Tensor, keep: torch.Tensor, leank, full_only: bool = False) -> list:
    """One LeanKDecoder per layer (built once, as a cache does), bound to that layer's compact cache."""
    B, H_, _ = q.shape
    calls = []
    for layer, (kf, vf, groups) in enumerate(leank):
        heads = HeadGroups((), (), *keep.shape[1:]) if full_only else HeadGroups.from_mask(keep[layer])
        groups = [] if full_only else groups
        nm = groups[0].k.shape[2] if groups else 0
        dec = LeanKDecoder(heads, B, H_, q.dtype, q.device, kf.shape[2], nm)
        calls.append((dec, kf, vf, [g.k for g in groups], [g.v for g in groups], (kf.shape[2], nm)))
    return calls


def all_ones_decoders(q: torch.Tensor, dense) -> list:
    """The all-ones control: LeanK's decoder with every channel of every head kept (one middle group of width D).

    The full window is copied out (sink + recent tokens); the middle store is a view of the dense cache, so the
    control reads exactly the dense bytes without a second copy of the cache.
    """
    B, heads_q, _ = q.shape
    calls = []
    for k, v in dense:
        _, g, n, d = k.shape
        nm = WINDOWS.middle_length(n)
        s = WINDOWS.sink
        full = torch.cat([torch.arange(s), torch.arange(s + nm, n)]).to(k.device)
        kf, vf = k[:, :, full].contiguous(), v[:, :, full].contiguous()
        dec = LeanKDecoder(HeadGroups.from_mask(torch.ones(g, d)), B, heads_q, q.dtype, q.device, kf.shape[2], nm)
        calls.append((dec, kf, vf, [k[:, :, s : s + nm]], [v[:, :, s : s + nm]], (kf.shape[2], nm)))
    return calls


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def step_functions(q, dense, leank, keep) -> dict:
    """Callables that run one decoding step's attention (all layers) with each method."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run():
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return [F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0] for k, v in dense]

        return run

    decoders = layer_decoders(q, keep, leank)
    full_only = layer_decoders(q, keep, leank, full_only=True)
    fns = {f"sdpa_{b.split('_')[0].lower()}": sdpa(b) for b in SDPA_BACKENDS if q.is_cuda}
    fns["dense_triton"] = lambda: [dense_decode(q, k, v) for k, v in dense]
    fns["leank_triton"] = lambda: [dec(q, *rest) for dec, *rest in decoders]
    fns["leank_full_part_only"] = lambda: [dec(q, *rest) for dec, *rest in full_only]
    ones = all_ones_decoders(q, dense)
    fns["leank_all_ones"] = lambda: [dec(q, *rest) for dec, *rest in ones]
    return fns


def check_outputs(q, leank, fns: dict) -> dict:
    """Largest relative error of LeanK against the torch reference, over all layers."""
    scale = q.shape[-1] ** -0.5
    refs = [leank_decode_torch(q, kf, vf, groups, scale).float() for kf, vf, groups in leank]
    outs = [o.clone() for o in fns["leank_triton"]()]  # each decoder reuses its output buffer
    dense = [o.float() for o in fns["dense_triton"]()]  # every channel: what the all-ones control must give
    ones = [o.clone().float() for o in fns["leank_all_ones"]()]
    return {
        "leank_triton": max(float((o.float() - r).norm() / r.norm()) for o, r in zip(outs, refs)),
        "leank_all_ones_vs_dense": max(float((o - r).norm() / r.norm()) for o, r in zip(ones, dense)),
    }


def time_step(fn, flush: torch.Tensor, reps: int) -> dict:
    """Median GPU-clock time of fn (a whole step) over reps runs, each after an L2 flush, plus host enqueue time."""
    import time

    fn()
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "host_enqueue_ms": statistics.median(host)}


def kernel_profile(fn, steps: int = 3) -> dict:
    """GPU time per kernel name (us per step) and the GPU's busy share of the wall time, from torch.profiler."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6 / steps
    per_kernel = defaultdict(lambda: {"us_per_step": 0.0, "calls_per_step": 0.0})
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0.0)
        on_device = getattr(evt, "device_type", None) == DeviceType.CUDA or evt.cpu_time_total == 0
        if device_us and on_device:  # a kernel (device-only event), not a CPU operator
            per_kernel[evt.key]["us_per_step"] += device_us / steps
            per_kernel[evt.key]["calls_per_step"] += evt.count / steps
    busy = sum(v["us_per_step"] for v in per_kernel.values())
    rows = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]["us_per_step"]))
    return {
        "wall_us_per_step": wall_us,
        "gpu_busy_us_per_step": busy,
        "gpu_busy_share": busy / wall_us,
        "kernels": rows,
    }


def profile_shape(B: int, N: int, keep: torch.Tensor, flush: torch.Tensor, reps: int, heads: int = H) -> dict:
    """Eager and graph step times of every method at one shape, and LeanK's kernel profile."""
    q, dense, leank = build_step(B, N, keep, "cuda", torch.bfloat16, heads)
    fns = step_functions(q, dense, leank, keep.cpu())
    L = keep.shape[0]
    result = {"B": B, "N": N, "layers": L, "eager": {}, "graph": {}}
    result["rel_err_vs_reference"] = check_outputs(q, leank, fns)
    print(f"B{B} N{N}: LeanK relative error against the torch reference {result['rel_err_vs_reference']}", flush=True)
    if not max(result["rel_err_vs_reference"].values()) < 2e-2:
        raise SystemExit(f"LeanK outputs are wrong at B{B} N{N}: {result['rel_err_vs_reference']}")
    for name, fn in fns.items():
        try:
            result["eager"][name] = time_step(fn, flush, reps)
            result["eager"][name]["host_enqueue_us_per_layer"] = result["eager"][name]["host_enqueue_ms"] * 1e3 / L
        except RuntimeError as e:  # a backend that refuses the shape
            result["eager"][name] = {"error": str(e).splitlines()[0][:200]}
            result["graph"][name] = {"error": "not run"}
            continue
        try:
            result["graph"][name] = time_step(capture_graph(fn), flush, reps)
        except RuntimeError as e:  # a backend that cannot be captured
            result["graph"][name] = {"error": str(e).splitlines()[0][:200]}
        print(
            f"B{B} N{N} {name:>22}: eager {result['eager'][name]['median_ms']:8.3f} ms "
            f"(host {result['eager'][name]['host_enqueue_us_per_layer']:6.1f} us/layer), "
            f"graph {result['graph'][name].get('median_ms', float('nan')):8.3f} ms",
            flush=True,
        )
    for mode in ("eager", "graph"):
        sdpa = {k: r for k, r in result[mode].items() if k.startswith("sdpa") and "median_ms" in r}
        best = min(sdpa, key=lambda k: sdpa[k]["median_ms"])
        result[f"best_sdpa_{mode}"] = best
        for r in result[mode].values():
            if "median_ms" in r:
                r["speedup_vs_best_sdpa"] = sdpa[best]["median_ms"] / r["median_ms"]
        result[f"kernel_speedup_{mode}"] = result[mode]["leank_triton"].get("speedup_vs_best_sdpa")
    result["leank_profile"] = kernel_profile(fns["leank_triton"])
    del q, dense, leank, fns
    torch.cuda.empty_cache()
    return result


def cpu_check() -> None:
    """Run the step functions once at tiny shapes in the interpreter and compare LeanK with its reference."""
    keep = load_mask(MASK).bool()[:2]  # two layers
    q, dense, leank = build_step(1, N_SINK + N_RECENT + 40, keep, "cpu", torch.float32)
    fns = step_functions(q, dense, leank, keep)
    outs = {name: [o.clone() for o in fn()] for name, fn in fns.items()}
    print("relative errors against the reference:", check_outputs(q, leank, fns))
    for layer, (kf, vf, groups) in enumerate(leank):
        ref = leank_decode_torch(q, kf, vf, groups, q.shape[-1] ** -0.5)
        err = (outs["leank_triton"][layer] - ref).abs().max().item()
        print(f"layer {layer}: {len(groups)} groups, leank_triton vs reference max |diff| {err:.2e}")
        assert err < 1e-4
    print("step functions run:", {name: len(o) for name, o in outs.items()})


def main() -> None:
    """Parse arguments, profile each shape, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for decode_profile.json")
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=["1x4096", "8x4096", "32x4096", "1x32768", "8x32768", "1x131072"],
        help="BxN, e.g. 8x32768",
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="llama",
        help="whose released mask and attention shape: llama (Llama-3.1-8B: 32 layers, H 32, G 8; writes "
        "decode_profile.json) or qwen (Qwen2.5-7B: 28 layers, H 28, G 4; writes decode_profile_qwen.json)",
    )
    parser.add_argument("--cpu-check", action="store_true", help="check the logic at tiny shapes without CUDA")
    args = parser.parse_args()
    if args.cpu_check:
        cpu_check()
        return
    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU (or --cpu-check)")
    if args.out is None:
        raise SystemExit("--out DIR is required")
    torch.manual_seed(0)
    mask_path, heads, file_name = MODELS[args.model]
    keep = load_mask(mask_path) > 0.5  # [L, G, D]
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    report = {
        **provenance("cuda"),
        "shapes": {
            "H": heads,
            "G": keep.shape[1],
            "D": keep.shape[2],
            "dtype": "bfloat16",
            "sink": N_SINK,
            "recent": N_RECENT,
            "layers": keep.shape[0],
        },
        "mask": mask_path,
        "timing": "one decoding step = all 32 layers back to back, each with its own cache; L2 flushed before "
        "each step; median over --reps steps. eager: launched from Python (host time included where the GPU "
        "cannot hide it); graph: the same step captured once as a CUDA graph and replayed (GPU kernel time). "
        "host_enqueue_us_per_layer: the host's time to enqueue the step, per layer",
        "results": [],
    }
    for shape in args.shapes:
        B, N = (int(x) for x in shape.split("x"))
        report["results"].append(profile_shape(B, N, keep, flush, args.reps, heads))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / file_name).write_text(json.dumps(report, indent=1))
    print(f"\n{'shape':>12} {'best sdpa':>10} {'graph x':>8} {'eager x':>8} {'host us/layer leank':>20} {'sdpa':>6}")
    for r in report["results"]:
        best = r["best_sdpa_eager"]
        label = f"B{r['B']} N{r['N']}"
        print(
            f"{label:>12} {best:>10} {r['kernel_speedup_graph']:8.2f} "
            f"{r['kernel_speedup_eager']:8.2f} {r['eager']['leank_triton']['host_enqueue_us_per_layer']:20.1f} "
            f"{r['eager'][best]['host_enqueue_us_per_layer']:6.1f}"
        )
    for r in report["results"]:
        prof = r["leank_profile"]
        print(
            f"\nB{r['B']} N{r['N']}: LeanK eager step {prof['wall_us_per_step'] / 1e3:.3f} ms wall, GPU busy "
            f"{prof['gpu_busy_share']:.0%}; kernels (us per step, calls):"
        )
        for name, k in list(prof["kernels"].items())[:5]:
            print(f"  {k['us_per_step']:9.1f} us  {k['calls_per_step']:5.0f}x  {name[:90]}")


if __name__ == "__main__":
    main()
