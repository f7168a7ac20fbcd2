"""Where the LeanK decode time goes: whole decoding steps, eager and as CUDA graphs, and a kernel profile.

Run on a CUDA machine from the repository root (about 2 minutes on an H100):

    python benchmarks/decode_profile.py --out DIR [--shapes 8x32768 1x131072]

``benchmarks/decode_kernels.py`` times each layer's call alone after an L2 flush. There LeanK loses a
roughly fixed 60-120 us per layer to something other than bytes, and its wrapper needs ~400 us of host time
per layer against ~150 us for dense. This script separates the two causes. For each shape it builds one
decoding step's attention over all 32 layers of Llama-3.1-8B (H=32, G=8, D=128, bf16), each layer with its
own cache (dense) and its own compact cache (LeanK, the authors' released mask, sink 128, recent 768), and
times the whole step (the L2 is flushed once before each step, as the 32 layers' caches do not fit in it):

1. eager, layers back to back: what a plain PyTorch decode loop gets (host time can hide behind the GPU);
2. as a CUDA graph: no host work at all, only the GPU's time (what serving engines run);
3. the same for LeanK's full part alone (``leank_decode`` with no middle groups): the cost of the sink +
   recent launch and the merge; LeanK runs with the default configuration (``leank_single_launch``: the full
   part and all groups of a layer in one launch, no -inf fill, 2 launches per layer) and with one launch per
   part (``leank_triton_per_part``: 4-6 launches per layer), both checked against the torch reference first;
4. a ``torch.profiler`` trace of eager LeanK steps (both variants): GPU time per kernel (full part, middle,
   merge, the -inf fill of the scratch), and the GPU's busy share of the step's wall time.

Everything goes to DIR/decode_profile.json with leank_ref.provenance. ``--cpu-check`` runs the step functions
once at tiny shapes in Triton's interpreter (no timing) to check the script's logic on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

if "--cpu-check" in sys.argv:  # the interpreter must be chosen before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The shapes, windows and mask of the kernel benchmark (benchmarks/ is on sys.path when a script there runs).
from decode_kernels import FLUSH_BYTES, MASK, N_RECENT, N_SINK, D, G, H  # noqa: E402
from leank_ref.kernels import (  # noqa: E402
    DecodeConfig,
    dense_decode,
    leank_decode,
    leank_decode_reference,
    leank_layout_from_dense,
)

from leank_ref.masks import load_mask  # noqa: E402
from leank_ref.provenance import provenance  # noqa: E402


def build_step(B: int, N: int, keep: torch.Tensor, device: str, dtype: torch.dtype):
    """q [B, H, D], per-layer dense caches and per-layer LeanK layouts (one decoding step's attention)."""
    q = torch.randn(B, H, D, device=device, dtype=dtype)
    dense, leank = [], []
    for layer in range(keep.shape[0]):
        k = torch.randn(B, G, N, D, device=device, dtype=dtype)
        v = torch.randn(B, G, N, D, device=device, dtype=dtype)
        leank.append(leank_layout_from_dense(k, v, keep[layer], N_SINK, N_RECENT))
        dense.append((k, v))
    return q, dense, leank


def step_functions(q, dense, leank, sdpa_backend=None) -> dict:
    """Callables that run one decoding step's attention (all layers) with each method."""

    def sdpa():
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backend) if sdpa_backend is not None else nullcontext():
            return [F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0] for k, v in dense]

    per_part = DecodeConfig(leank_single_launch=False)
    return {
        "sdpa": sdpa,
        "dense_triton": lambda: [dense_decode(q, k, v) for k, v in dense],
        "leank_triton": lambda: [leank_decode(q, kf, vf, groups) for kf, vf, groups in leank],
        "leank_triton_per_part": lambda: [leank_decode(q, kf, vf, groups, config=per_part) for kf, vf, groups in leank],
        "leank_full_part_only": lambda: [leank_decode(q, kf, vf, []) for kf, vf, _ in leank],
    }


def check_outputs(q, leank, fns: dict) -> dict:
    """Largest relative error of each LeanK variant against the torch reference, over all layers."""
    refs = [leank_decode_reference(q, kf, vf, groups).float() for kf, vf, groups in leank]
    errors = {}
    for name in ("leank_triton", "leank_triton_per_part"):
        outs = fns[name]()
        errors[name] = max(float((o.float() - r).norm() / r.norm()) for o, r in zip(outs, refs))
    return errors


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


def as_graph(fn):
    """Capture fn in a CUDA graph after a warm-up on a side stream; return the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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


def profile_shape(B: int, N: int, keep: torch.Tensor, flush: torch.Tensor, reps: int, sdpa_backend) -> dict:
    """Eager and graph step times of every method at one shape, and LeanK's kernel profile."""
    q, dense, leank = build_step(B, N, keep, "cuda", torch.bfloat16)
    fns = step_functions(q, dense, leank, sdpa_backend)
    result = {"B": B, "N": N, "layers": keep.shape[0], "sdpa_backend": str(sdpa_backend), "eager": {}, "graph": {}}
    result["rel_err_vs_reference"] = check_outputs(q, leank, fns)
    print(f"B{B} N{N}: LeanK relative error against the torch reference {result['rel_err_vs_reference']}", flush=True)
    if not max(result["rel_err_vs_reference"].values()) < 2e-2:
        raise SystemExit(f"LeanK outputs are wrong at B{B} N{N}: {result['rel_err_vs_reference']}")
    for name, fn in fns.items():
        result["eager"][name] = time_step(fn, flush, reps)
        try:
            result["graph"][name] = time_step(as_graph(fn), flush, reps)
        except RuntimeError as e:  # a backend that cannot be captured
            result["graph"][name] = {"error": str(e).splitlines()[0][:200]}
        print(
            f"B{B} N{N} {name:>22}: eager {result['eager'][name]['median_ms']:8.3f} ms "
            f"(host {result['eager'][name]['host_enqueue_ms']:7.3f} ms), "
            f"graph {result['graph'][name].get('median_ms', float('nan')):8.3f} ms",
            flush=True,
        )
    for mode in ("eager", "graph"):
        base = result[mode]["sdpa"].get("median_ms")
        for r in result[mode].values():
            if "median_ms" in r and base:
                r["speedup_vs_sdpa"] = base / r["median_ms"]
    result["leank_profile"] = kernel_profile(fns["leank_triton"])
    result["leank_per_part_profile"] = kernel_profile(fns["leank_triton_per_part"])
    result["dense_profile"] = kernel_profile(fns["dense_triton"])
    del q, dense, leank, fns
    torch.cuda.empty_cache()
    return result


def cpu_check() -> None:
    """Run the step functions once at tiny shapes in the interpreter and compare LeanK with its reference."""
    keep = load_mask(MASK).bool()[:2]  # two layers
    q, dense, leank = build_step(1, N_SINK + N_RECENT + 40, keep, "cpu", torch.float32)
    fns = step_functions(q, dense, leank)
    outs = {name: fn() for name, fn in fns.items()}
    print("relative errors against the reference:", check_outputs(q, leank, fns))
    for layer, (kf, vf, groups) in enumerate(leank):
        ref = leank_decode_reference(q, kf, vf, groups)
        for name in ("leank_triton", "leank_triton_per_part"):
            err = (outs[name][layer] - ref).abs().max().item()
            print(f"layer {layer}: {len(groups)} groups, {name} vs reference max |diff| {err:.2e}")
            assert err < 1e-4
    print("step functions run:", {name: len(o) for name, o in outs.items()})


def main() -> None:
    """Parse arguments, profile each shape, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for decode_profile.json")
    parser.add_argument("--shapes", nargs="*", default=["8x32768", "1x131072"], help="BxN, e.g. 8x32768")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cpu-check", action="store_true", help="check the logic at tiny shapes without CUDA")
    args = parser.parse_args()
    if args.cpu_check:
        cpu_check()
        return
    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU (or --cpu-check)")
    if args.out is None:
        raise SystemExit("--out DIR is required")
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    keep = load_mask(MASK).to("cuda") > 0.5  # [L, G, D]
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    report = {
        **provenance("cuda"),
        "shapes": {"H": H, "G": G, "D": D, "dtype": "bfloat16", "sink": N_SINK, "recent": N_RECENT},
        "mask": MASK,
        "timing": "one decoding step = all 32 layers back to back, each with its own cache; L2 flushed before "
        "each step; median over --reps steps; graph = the same step captured as a CUDA graph",
        "results": [],
    }
    backend = SDPBackend.CUDNN_ATTENTION  # the best backend at most shapes in decode_kernels.json
    for shape in args.shapes:
        B, N = (int(x) for x in shape.split("x"))
        try:
            report["results"].append(profile_shape(B, N, keep, flush, args.reps, backend))
        except RuntimeError as e:  # cuDNN refused: fall back to flash
            print(f"B{B} N{N}: {str(e).splitlines()[0][:120]}; retrying with the flash backend")
            torch.cuda.empty_cache()
            report["results"].append(profile_shape(B, N, keep, flush, args.reps, SDPBackend.FLASH_ATTENTION))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_profile.json").write_text(json.dumps(report, indent=1))
    for r, variant in ((r, v) for r in report["results"] for v in ("leank_profile", "leank_per_part_profile")):
        prof = r[variant]
        print(
            f"\nB{r['B']} N{r['N']} {variant}: LeanK eager step {prof['wall_us_per_step'] / 1e3:.3f} ms wall, GPU busy "
            f"{prof['gpu_busy_share']:.0%}; kernels (us per step, calls):"
        )
        for name, k in list(prof["kernels"].items())[:8]:
            print(f"  {k['us_per_step']:9.1f} us  {k['calls_per_step']:5.0f}x  {name[:90]}")


if __name__ == "__main__":
    main()
