"""Decode-attention benchmark at Llama-3.1-8B shapes: torch SDPA backends, dense Triton, LeanK Triton.

Run on a CUDA machine from the repository root:

    python benchmarks/decode_kernels.py --out DIR [--sweep]

What it measures, in one process:
1. the device-to-device copy bandwidth (bytes read + written), the ceiling for memory-bound code;
2. correctness on the GPU: dense Triton against SDPA and the fp32 reference, LeanK Triton against its
   torch reference and against dense attention with the pruned middle channels zeroed, in bf16 and
   fp16, head_dim 64 and 128, with kept counts 0, a, 3a and D;
3. optionally (--sweep) a few launch configurations of the two Triton kernels;
4. for B in {1, 8, 32} x N in {4K, 32K, 128K}: the time of one decode step's attention over all 32
   layers of Llama-3.1-8B (H=32, G=8, D=128, bf16), LeanK using each layer's kept counts from the
   authors' released mask (sink 128, recent 768), through one ``LeanKDecoder`` per layer (built once).
   Each call is timed alone with CUDA events after the L2 cache is flushed (every layer's cache is cold
   in a real decode step); the median of many calls is reported, with the bytes the kernel must read and
   the achieved bandwidth. The 1 GiB flush before each call lets the host run ahead, so these are **GPU
   kernel times** (host excluded); ``host_enqueue_us`` is each call's host time, measured apart.
   ``benchmarks/decode_profile.py`` times whole 32-layer steps eager (host included) and as CUDA graphs.
Everything is written to DIR/decode_kernels.json; a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from leank_ref.kernels import (
    DecodeConfig,
    LeanKDecoder,
    dense_decode,
    dense_decode_reference,
    leank_decode,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from leank_ref.attention import simulate_newest_query
from leank_ref.decode import leank_decode_torch
from leank_ref.layout import HeadGroups, leank_layout_from_dense
from leank_ref.provenance import provenance
from leank_ref.windows import Windows

H, G, D = 32, 8, 128  # Llama-3.1-8B attention
N_SINK, N_RECENT = 128, 768
WINDOWS = Windows(N_SINK, N_RECENT, 1)  # the authors' sink and recent windows, every middle token compacted
MASK = "masks/reference/llama3.1-8b-instruct.pth"
BATCHES = (1, 8, 32)
CONTEXTS = (4096, 32768, 131072)
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
FLUSH_BYTES = 1 << 30  # zeroed before every timed call: evicts L2 and lets the host run ahead
TARGET_SECONDS = 0.3  # per measurement
DEVICE = "cuda"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
_flush = None


def time_ms(fn, max_iters: int = 100, min_iters: int = 10) -> dict:
    """Median time (ms) of fn over many calls, each alone between CUDA events after an L2 flush."""
    global _flush
    if _flush is None:
        _flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
    fn()  # compile / warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - t0) / 3
    iters = int(max(min_iters, min(max_iters, TARGET_SECONDS / max(estimate, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        _flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    # Host time to enqueue one call (no flush, no sync): what CUDA graphs would remove.
    n_host = min(10, iters)
    t0 = time.perf_counter()
    for _ in range(n_host):
        fn()
    host_us = (time.perf_counter() - t0) / n_host * 1e6
    torch.cuda.synchronize()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[len(times) // 10],
        "p90_ms": times[(9 * len(times)) // 10],
        "iters": iters,
        "host_enqueue_us": host_us,
    }


def copy_bandwidth(n_bytes: int = 4 << 30) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (GB/s)."""
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), max_iters=50)
    return {"bytes_moved": 2 * n_bytes, "median_ms": t["median_ms"], "GBps": 2 * n_bytes / t["median_ms"] / 1e6}


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def sdpa_gqa(q, k, v):  # q [B, H, D], k/v [B, G, N, D]
    """SDPA with enable_gqa: query head h reads KV head h // (H/G)."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def sdpa_packed(q, k, v):
    """SDPA with the H/G query heads of a KV head packed as H/G query positions (no K/V copies)."""
    B = q.shape[0]
    return F.scaled_dot_product_attention(q.view(B, G, H // G, D), k, v).reshape(B, H, D)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def leank_bytes(q: torch.Tensor, k_full: torch.Tensor, groups) -> int:
    """Bytes LeanK must move: q, the full part's K and V, each group's middle K (c wide) and V, the output."""
    e = k_full.element_size()
    total = 2 * q.numel() * e + 2 * k_full.numel() * e
    return total + sum((g.k.numel() + g.v.numel()) * g.k.element_size() for g in groups)


def dense_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    """Bytes dense decoding must move: q, K, V, the output."""
    return (2 * q.numel() + 2 * k.numel()) * k.element_size()


# ---------------------------------------------------------------------------------------------
# Correctness on the GPU
# ---------------------------------------------------------------------------------------------
def gpu_checks(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)) -> list[dict]:
    """Dense and LeanK kernels against references at small odd shapes, both dtypes, D = 64 and 128."""
    checks = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for dtype in dtypes:
        for Dh, a in ((64, 16), (128, 32)):
            for B, Hq, Gk, N in ((1, 8, 4, 77), (3, 32, 8, 1000), (2, 12, 4, 3001)):
                q = torch.randn(B, Hq, Dh, device=DEVICE, dtype=dtype, generator=gen)
                k = torch.randn(B, Gk, N, Dh, device=DEVICE, dtype=dtype, generator=gen)
                v = torch.randn(B, Gk, N, Dh, device=DEVICE, dtype=dtype, generator=gen)
                ref = dense_decode_reference(q.double(), k.double(), v.double())
                R = Hq // Gk
                sd = F.scaled_dot_product_attention(
                    q[:, :, None], k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
                )[:, :, 0]
                for splits in (None, 1, 5):
                    out = dense_decode(q, k, v, num_splits=splits)
                    checks.append(
                        {
                            "kernel": "dense",
                            "dtype": str(dtype),
                            "B": B,
                            "H": Hq,
                            "G": Gk,
                            "N": N,
                            "D": Dh,
                            "splits": splits,
                            "rel_err_vs_fp64": rel_err(out, ref),
                            "rel_err_vs_sdpa": rel_err(out, sd),
                        }
                    )
                counts = [0, a, 3 * a, Dh] * (Gk // 4)  # absent, a, a non-power-of-two, all channels
                keep = torch.zeros(Gk, Dh, dtype=torch.bool, device=DEVICE)
                for g in range(Gk):
                    keep[g, torch.randperm(Dh, device=DEVICE, generator=gen)[: counts[g]]] = True
                n_sink, n_recent = 16, 40
                k_full, v_full, groups = leank_layout_from_dense(k, v, keep, Windows(n_sink, n_recent, 1))
                out = leank_decode(q, k_full, v_full, groups)
                checks.append(
                    {
                        "kernel": "leank",
                        "dtype": str(dtype),
                        "B": B,
                        "H": Hq,
                        "G": Gk,
                        "N": N,
                        "D": Dh,
                        "counts": counts,
                        "rel_err_vs_reference": rel_err(out, leank_decode_torch(q, k_full, v_full, groups, Dh**-0.5)),
                        "rel_err_vs_masked_dense": rel_err(out, simulate_newest_query(q, k, v, keep, n_sink, n_recent)),
                    }
                )
    worst = max(max(v for key, v in c.items() if key.startswith("rel_err")) for c in checks)
    print(f"GPU checks: {len(checks)} cases, worst relative error {worst:.2e}")
    if not worst < 2e-2:
        raise SystemExit("GPU correctness checks failed: see the checks in the JSON")
    return checks


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------
def make_cache(B: int, N: int, dtype: torch.dtype = torch.bfloat16):
    """Random q [B, H, D] and a dense cache k, v [B, G, N, D] (never zeros: they can time faster)."""
    q = torch.randn(B, H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, G, N, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, G, N, D, device=DEVICE, dtype=dtype)
    return q, k, v


def measure(fn, n_bytes: int, copy_gbps: float, **kw) -> dict:
    """Time fn; add bytes, bandwidth and its share of the copy bandwidth. Errors are recorded, not raised."""
    try:
        t = time_ms(fn, **kw)
    except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that refuses the shape, or no memory
        torch.cuda.empty_cache()
        return {"error": str(e).splitlines()[0][:200]}
    gbps = n_bytes / t["median_ms"] / 1e6
    return {**t, "bytes": n_bytes, "GBps": gbps, "share_of_copy_bw": gbps / copy_gbps}


def bench_shape(B: int, N: int, keep: torch.Tensor, copy_gbps: float, config: DecodeConfig) -> dict:
    """All methods at one (B, N): one decode step's attention over all layers of the mask."""
    L = keep.shape[0]
    q, k, v = make_cache(B, N)
    nbytes = dense_bytes(q, k)
    per_layer = {}
    for bname, backend in BACKENDS.items():
        for vname, fn in (("gqa", sdpa_gqa), ("packed", sdpa_packed)):

            def run(fn=fn, backend=backend):
                with sdpa_kernel(backend):
                    return fn(q, k, v)

            per_layer[f"sdpa_{bname}_{vname}"] = measure(run, nbytes, copy_gbps)
    per_layer["dense_triton"] = measure(lambda: dense_decode(q, k, v, config=config), nbytes, copy_gbps)
    ok = {m: r for m, r in per_layer.items() if "error" not in r and m.startswith("sdpa")}
    best = min(ok, key=lambda m: ok[m]["median_ms"])
    with sdpa_kernel(BACKENDS[best.split("_")[1]]):
        sd_out = (sdpa_gqa if best.endswith("gqa") else sdpa_packed)(q, k, v)
    dense_err = rel_err(dense_decode(q, k, v, config=config), sd_out)
    del sd_out

    # LeanK: build each layer's compact cache from the same dense cache, time it, free it.
    # Each layer's LeanKDecoder is built once (as a cache builds it) and then timed: one launch per call.
    leank_layers, leank_errs, lbytes = [], [], []
    for layer in range(L):
        k_full, v_full, groups = leank_layout_from_dense(k, v, keep[layer], WINDOWS)
        nb = leank_bytes(q, k_full, groups)
        lbytes.append(nb)
        nm = groups[0].k.shape[2] if groups else 0
        dec = LeanKDecoder(
            HeadGroups.from_mask(keep[layer]), B, H, q.dtype, q.device, k_full.shape[2], nm, config=config
        )
        mid_k, mid_v = [g.k for g in groups], [g.v for g in groups]
        leank_layers.append(measure(lambda: dec(q, k_full, v_full, mid_k, mid_v, (k_full.shape[2], nm)), nb, copy_gbps))
        if layer % 8 == 0:  # the torch reference is slow at long contexts: check every 8th layer
            try:
                leank_errs.append(
                    rel_err(
                        dec(q, k_full, v_full, mid_k, mid_v, (k_full.shape[2], nm)),
                        leank_decode_torch(q, k_full, v_full, groups, D**-0.5),
                    )
                )
            except torch.OutOfMemoryError:
                leank_errs.append(None)
        k_full = v_full = groups = dec = mid_k = mid_v = None  # free the layout before the next shape
        torch.cuda.empty_cache()
    q = k = v = None
    torch.cuda.empty_cache()

    # Totals over the L layers of one decode step.
    methods = {}
    for m, r in per_layer.items():
        methods[m] = r if "error" in r else {**r, "total_ms": L * r["median_ms"], "total_bytes": L * r["bytes"]}
    for m, rows in (("leank_triton", leank_layers),):
        if any("error" in r for r in rows):
            methods[m] = {"error": next(r["error"] for r in rows if "error" in r)}
            continue
        total = sum(r["median_ms"] for r in rows)
        gbps = sum(lbytes) / total / 1e6
        methods[m] = {
            "total_ms": total,
            "total_bytes": sum(lbytes),
            "GBps": gbps,
            "share_of_copy_bw": gbps / copy_gbps,
            "per_layer_ms": [r["median_ms"] for r in rows],
            "host_enqueue_us_mean": statistics.mean(r["host_enqueue_us"] for r in rows),
        }
    best_total = methods[best]["total_ms"]
    for r in methods.values():
        if "error" not in r:
            r["speedup_vs_best_sdpa"] = best_total / r["total_ms"]
    return {
        "B": B,
        "N": N,
        "layers": L,
        "best_sdpa": best,
        "dense_bytes_total": L * nbytes,
        "leank_bytes_total": sum(lbytes),
        "byte_roofline_speedup": L * nbytes / sum(lbytes),
        "dense_triton_rel_err_vs_best_sdpa": dense_err,
        "leank_triton_max_rel_err_vs_reference": max((e for e in leank_errs if e is not None), default=None),
        "methods": methods,
    }


def sweep(keep: torch.Tensor, copy_gbps: float) -> list[dict]:
    """A few launch configurations of both Triton kernels at the two target shapes."""
    rows = []
    configs = [
        DecodeConfig(block_n=bn, num_stages=ns, num_warps=nw)
        for bn, ns, nw in (
            (32, 3, 4),
            (64, 2, 4),
            (64, 3, 4),
            (64, 4, 4),
            (128, 2, 4),
            (128, 3, 4),
            (128, 2, 8),
            (64, 3, 8),
        )
    ]
    configs += [replace(DecodeConfig(), programs_per_sm=p) for p in (1, 2, 8)]
    configs += [replace(DecodeConfig(), min_tokens_per_split=t) for t in (128, 512, 1024)]
    for B, N in ((8, 32768), (1, 131072)):
        q, k, v = make_cache(B, N)
        layouts = [leank_layout_from_dense(k, v, keep[layer], WINDOWS) for layer in range(keep.shape[0])]
        nb_dense = dense_bytes(q, k)
        nb_leank = sum(leank_bytes(q, kf, gr) for kf, _, gr in layouts)
        for cfg in configs:
            d = measure(lambda: dense_decode(q, k, v, config=cfg), nb_dense, copy_gbps, max_iters=30)
            total = 0.0
            for kf, vf, gr in layouts:
                total += time_ms(lambda: leank_decode(q, kf, vf, gr, config=cfg), max_iters=20)["median_ms"]
            row = {
                "B": B,
                "N": N,
                "config": asdict(cfg),
                "dense_ms": d.get("median_ms"),
                "dense_share_of_copy_bw": d.get("share_of_copy_bw"),
                "leank_total_ms": total,
                "leank_share_of_copy_bw": nb_leank / total / 1e6 / copy_gbps,
            }
            if cfg == DecodeConfig():  # where the time goes: the full part + merge alone, per layer
                row["leank_full_part_only_total_ms"] = sum(
                    time_ms(lambda: leank_decode(q, kf, vf, [], config=cfg), max_iters=20)["median_ms"]
                    for kf, vf, _ in layouts
                )
            rows.append(row)
            print(
                f"sweep B{B} N{N} {asdict(cfg)}: dense {row['dense_ms']:.3f} ms "
                f"({row['dense_share_of_copy_bw']:.0%}), leank {total:.2f} ms/32 layers "
                f"({row['leank_share_of_copy_bw']:.0%})",
                flush=True,
            )
        q = k = v = layouts = None
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    """Parse arguments, run every phase, write the JSON, print a summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for decode_kernels.json")
    parser.add_argument("--sweep", action="store_true", help="also time a few launch configurations")
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    parser.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    report = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance("cuda"),
        "shapes": {"H": H, "G": G, "D": D, "dtype": "bfloat16", "sink": N_SINK, "recent": N_RECENT},
        "mask": MASK,
        "layers": "all 32 layers of the mask; every method's total is one decode step's attention over 32 layers",
        "timing": "median over >= 10 calls (CUDA events around each call, 1 GiB L2 flush before each), after warm-up",
        "bytes": "bytes the method must move: q, K and V it needs "
        "(LeanK: the full part at D, each middle at c + D), output",
        "config": asdict(DecodeConfig()),
    }
    report["copy_bandwidth"] = copy_bandwidth()
    copy_gbps = report["copy_bandwidth"]["GBps"]
    print(
        f"{report['device']}  torch {report['torch']}  triton {report['triton']}  copy {copy_gbps:.0f} GB/s", flush=True
    )
    report["checks"] = gpu_checks()
    keep = torch.load(MASK, weights_only=True).to(DEVICE) > 0.5  # [L, G, D]
    report["mask_stats"] = {
        "kept_fraction": float(keep.float().mean()),
        "heads_without_middle": int((keep.sum(-1) == 0).sum()),
        "heads": keep.shape[0] * G,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        report["sweep"] = sweep(keep, copy_gbps)
    report["results"] = []
    for B in args.batches:
        for N in args.contexts:
            t0 = time.perf_counter()
            report["results"].append(bench_shape(B, N, keep, copy_gbps, DecodeConfig()))
            r = report["results"][-1]["methods"]
            print(
                f"B{B} N{N}: done in {time.perf_counter() - t0:.0f} s; leank "
                f"{r['leank_triton'].get('speedup_vs_best_sdpa', float('nan')):.2f}x",
                flush=True,
            )
            (args.out / "decode_kernels.json").write_text(json.dumps(report, indent=1))
    report["targets"] = targets(report)
    (args.out / "decode_kernels.json").write_text(json.dumps(report, indent=1))
    print_table(report)


def targets(report: dict) -> dict:
    """The issue's targets, evaluated (reported, not asserted)."""
    res = {(r["B"], r["N"]): r for r in report["results"]}
    out = {}
    for B, N in ((8, 32768), (1, 131072)):
        if (B, N) in res:
            m = res[(B, N)]["methods"]["leank_triton"]
            out[f"leank_speedup_B{B}_N{N}"] = {"value": m.get("speedup_vs_best_sdpa"), "target": 1.5}
            out[f"leank_share_of_copy_bw_B{B}_N{N}"] = {"value": m.get("share_of_copy_bw"), "target": 0.8}
    dense = [r["methods"]["dense_triton"].get("speedup_vs_best_sdpa") for r in report["results"]]
    out["dense_triton_min_speedup_vs_best_sdpa"] = {"value": min(dense), "target": 0.9}
    return out


def print_table(report: dict) -> None:
    """Short summary: per shape, best SDPA, dense Triton and LeanK against it, bandwidth shares."""
    print(
        f"\n{'B':>3} {'N':>7} {'best SDPA':>22} {'ms/32L':>8} {'dense x':>8} {'leank x':>8} "
        f"{'roof x':>7} {'dense bw':>8} {'leank bw':>8}"
    )
    for r in report["results"]:
        m = r["methods"]
        print(
            f"{r['B']:>3} {r['N']:>7} {r['best_sdpa']:>22} {m[r['best_sdpa']]['total_ms']:>8.3f} "
            f"{m['dense_triton'].get('speedup_vs_best_sdpa', 0):>8.2f} "
            f"{m['leank_triton'].get('speedup_vs_best_sdpa', 0):>8.2f} {r['byte_roofline_speedup']:>7.2f} "
            f"{m['dense_triton'].get('share_of_copy_bw', 0):>8.0%} {m['leank_triton'].get('share_of_copy_bw', 0):>8.0%}"
        )
    for name, t in report["targets"].items():
        print(f"target {name}: {t['value']} (target {t['target']})")


if __name__ == "__main__":
    main()
