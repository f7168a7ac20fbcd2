"""Nsight Compute counters for one decoding step's attention: where the LeanK kernel's time goes, per layer.

Run on a CUDA machine with Nsight Compute (``ncu``) from the repository root:

    python benchmarks/ncu_decode.py --out DIR [--shapes 1x4096 8x32768 1x131072] [--layers 32]

For each shape it builds the step of ``decode_profile.py`` (32 layers of Llama-3.1-8B, bf16, the authors' released
mask, sink 128 / recent 768) and runs it once per method (cuDNN SDPA, the dense Triton kernel, LeanK, the all-ones
control) in that order inside a profiled range, under ``ncu`` (caches flushed before every kernel, clocks as they
run normally). Per kernel it reads the duration, the DRAM bytes read and the DRAM throughput as a share of the peak,
the SM throughput, the achieved occupancy, the grid size and the registers per thread. DIR/ncu_decode.json holds
every kernel's counters and, per shape and method, their sums over the step: time, bytes and the step's achieved
read bandwidth. These are single profiled runs (kernel replay), so the durations are close to, not equal to, the
CUDA-graph timings of ``decode_profile.py``; the counters say why a kernel takes the time it does.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

METRICS = {
    "gpu__time_duration.sum": "duration_ns",
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_of_peak",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct_of_peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__grid_size": "grid_size",
    "launch__registers_per_thread": "registers_per_thread",
}
METHODS = ("sdpa_cudnn", "dense_triton", "leank_triton", "leank_all_ones")
UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1, "usecond": 1e3, "msecond": 1e6}


def run_methods(shapes: list[str], layers: int = 32) -> None:
    """The profiled program: each shape's step (its first ``layers`` layers), once per method, between
    cudaProfilerStart and Stop."""
    import torch
    from decode_kernels import MASK
    from decode_profile import build_step, step_functions

    from leank_ref.masks import load_mask

    keep = (load_mask(MASK) > 0.5)[:layers]  # ncu replays every kernel: fewer layers, a shorter profile
    for shape in shapes:
        B, N = (int(x) for x in shape.split("x"))
        q, dense, leank = build_step(B, N, keep, "cuda", torch.bfloat16)
        fns = step_functions(q, dense, leank, keep)
        for name in METHODS:
            fns[name]()  # compile and warm up outside the profiled range
        torch.cuda.synchronize()
        for name in METHODS:
            torch.cuda.cudart().cudaProfilerStart()
            fns[name]()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        del q, dense, leank, fns
        torch.cuda.empty_cache()


def parse(text: str) -> list[dict]:
    """ncu's ``--csv --page raw`` output -> one dict per kernel, in launch order (kernel name, named counters)."""
    if '"ID"' not in text:
        return []
    rows = list(csv.reader(io.StringIO(text[text.index('"ID"') :])))
    header, units, body = rows[0], dict(zip(rows[0], rows[1])), rows[2:]
    out = []
    for row in body:
        rec = dict(zip(header, row))
        kernel = {"kernel": rec.get("Kernel Name", "")}
        for metric, key in METRICS.items():
            raw = rec.get(metric, "").replace(",", "")
            value = float(raw) if raw not in ("", "n/a") else None
            kernel[key] = value * UNITS[units[metric]] if value is not None and units.get(metric) in UNITS else value
        out.append(kernel)
    return out


def label(kernels: list[dict], shapes: list[str], layers: int = 32) -> None:
    """Name each kernel's shape and method from the launch order of :func:`run_methods`: per shape, SDPA's kernels
    until the dense Triton kernel's first launch, the dense kernels until LeanK's first, then ``layers`` LeanK
    launches (the learned mask) and ``layers`` more (the all-ones control)."""
    i = 0
    for shape in shapes:
        for method in METHODS:
            leank_seen = 0
            while i < len(kernels):
                name = kernels[i]["kernel"]
                if method == "sdpa_cudnn" and "dense_partial" in name:
                    break
                if method == "dense_triton" and "leank_layer" in name:
                    break
                if method.startswith("leank") and "leank_layer" in name:
                    if leank_seen == layers:
                        break
                    leank_seen += 1
                if method == "leank_all_ones" and leank_seen == layers and "leank_layer" not in name:
                    break
                kernels[i]["range"] = f"{shape}/{method}"
                i += 1


def summarize(kernels: list[dict]) -> dict:
    """Per range (shape/method): kernels, summed duration and DRAM bytes, and the step's read bandwidth."""
    sums: dict = defaultdict(lambda: {"kernels": 0, "duration_us": 0.0, "dram_read_gb": 0.0})
    for k in kernels:
        s = sums[k.get("range", "unlabelled")]
        s["kernels"] += 1
        s["duration_us"] += (k["duration_ns"] or 0) / 1e3
        s["dram_read_gb"] += (k["dram_read_bytes"] or 0) / 1e9
    for s in sums.values():
        s["read_GBps"] = s["dram_read_gb"] / (s["duration_us"] / 1e6) if s["duration_us"] else None
    return dict(sums)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for ncu_decode.json and ncu_decode.log")
    parser.add_argument("--shapes", nargs="*", default=["1x4096", "8x32768", "1x131072"])
    parser.add_argument("--ncu", default="ncu", help="the Nsight Compute command")
    parser.add_argument(
        "--layers",
        type=int,
        default=32,
        help="profile the first N layers of the mask (a 32-layer step at 128K tokens "
        "takes ncu minutes: 4 layers keep each kind of layer and a short run)",
    )
    parser.add_argument("--profiled-run", action="store_true", help=argparse.SUPPRESS)  # what ncu runs
    args = parser.parse_args()
    if args.profiled_run:
        run_methods(args.shapes, args.layers)
        return
    if args.out is None:
        raise SystemExit("--out DIR is required")
    if not 1 <= args.layers <= 32:
        raise SystemExit(f"--layers must be 1-32 (the mask's layers); got {args.layers}")
    import torch

    from leank_ref.provenance import provenance

    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU and Nsight Compute (ncu)")
    ncu = [
        args.ncu, "--profile-from-start", "off", "--clock-control", "none",
        "--cache-control", "all", "--csv", "--page", "raw", "--metrics", ",".join(METRICS),
    ]  # fmt: skip
    program = ["benchmarks/ncu_decode.py", "--profiled-run", "--layers", str(args.layers), "--shapes", *args.shapes]
    done = subprocess.run([*ncu, sys.executable, *program], capture_output=True, text=True, check=False)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ncu_decode.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"ncu failed ({done.returncode}); see {args.out / 'ncu_decode.log'}")
    kernels = parse(done.stdout)
    label(kernels, args.shapes, args.layers)
    report = {
        **provenance("cuda"),
        "benchmark": "ncu_decode",
        "command": " ".join([*ncu, "python", *program]),
        "shapes": args.shapes,
        "layers": args.layers,
        "metrics": METRICS,
        "summary": summarize(kernels),
        "kernels": kernels,
    }
    (args.out / "ncu_decode.json").write_text(json.dumps(report, indent=1))
    for name, s in report["summary"].items():
        print(f"{name:>28}: {s['kernels']:3d} kernels {s['duration_us']:9.1f} us {s['dram_read_gb']:7.3f} GB "
              f"{(s['read_GBps'] or 0):7.0f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
