"""LeanK launch plans under CUDA graphs (L2 flushed), against torch SDPA, with the authors' Llama and Qwen masks.

Run on a CUDA machine from the repository root:

    python benchmarks/decode_sweep.py --out DIR [--shapes 8x32768 1x131072] [--plans 3 6] [--qwen]

For each shape and each ``programs_per_sm`` in ``--plans`` it times one decoding step's attention over all layers
(one ``LeanKDecoder`` per layer, captured as a CUDA graph, the L2 flushed before each step) beside cuDNN and
flash SDPA at the same shape, checks every 8th layer against ``leank_decode_torch``, and reports the step time,
the speed-up over the faster SDPA backend, the bytes LeanK must move per second and the byte roofline.
``--qwen`` adds the authors' Qwen2.5-7B mask (28 layers, 28 query heads, 4 KV heads). Output: DIR/decode_sweep.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from decode_kernels import FLUSH_BYTES, MASK, WINDOWS, D, copy_bandwidth, dense_bytes, leank_bytes
from decode_profile import time_step
from leank_ref.kernels import LeanKDecoder
from leank_ref.kernels.leank_decoder import LEANK_CONFIG
from torch.nn.attention import SDPBackend, sdpa_kernel

from leank_ref.decode import leank_decode_torch
from leank_ref.layout import HeadGroups, leank_layout_from_dense
from leank_ref.masks import load_mask
from leank_ref.provenance import provenance
from leank_ref.static_decode import capture_graph

MODELS = {  # mask, query heads, KV heads
    "llama3.1-8b": (MASK, 32, 8),
    "qwen2.5-7b": ("masks/reference/qwen2.5-7b-instruct.pth", 28, 4),
}


def sweep_shape(model: str, B: int, N: int, plans: list[int], flush: torch.Tensor) -> dict:
    """SDPA (cuDNN, flash) and LeanK with each plan at one shape: step times over all layers of the mask."""
    path, H, G = MODELS[model]
    keep = load_mask(path) > 0.5  # [L, G, D]
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    dense, leank = [], []
    for layer in range(keep.shape[0]):
        k = torch.randn(B, G, N, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        leank.append(leank_layout_from_dense(k, v, keep[layer].cuda(), WINDOWS))
        dense.append((k, v))
    ms = {}
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):

        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return [F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True) for k, v in dense]

        ms[name] = time_step(capture_graph(sdpa), flush, 10)["median_ms"]
    best = min(ms.values())
    nb_leank = sum(leank_bytes(q, kf, gr) for kf, _, gr in leank)
    nb_dense = sum(dense_bytes(q, k) for k, _ in dense)
    refs = {i: leank_decode_torch(q, *leank[i], D**-0.5).float() for i in range(0, len(leank), 8)}
    rows = []
    for plan in plans:
        config = replace(LEANK_CONFIG, programs_per_sm=plan)
        calls = []
        for layer, (kf, vf, groups) in enumerate(leank):
            nm = groups[0].k.shape[2] if groups else 0
            dec = LeanKDecoder(
                HeadGroups.from_mask(keep[layer]), B, H, q.dtype, q.device, kf.shape[2], nm, config=config
            )
            calls.append((dec, kf, vf, [g.k for g in groups], [g.v for g in groups], (kf.shape[2], nm)))

        def step(calls=calls):
            return [dec(q, *rest) for dec, *rest in calls]

        outs = [o.float() for o in step()]
        err = max(float((outs[i] - r).norm() / r.norm()) for i, r in refs.items())
        t = time_step(capture_graph(step), flush, 10)["median_ms"]
        rows.append(
            {
                "programs_per_sm": plan,
                "config": asdict(config),
                "leank_ms": t,
                "speedup_vs_best_sdpa": best / t,
                "leank_GBps": nb_leank / t / 1e6,
                "rel_err_vs_torch": err,
                "grid_layer0": calls[0][0].grid[0],
                "splits_layer0": [calls[0][0].full_splits, calls[0][0].mid_splits],
            }
        )
        print(
            f"{model} B{B} N{N} plan {plan:>2}: {t:.3f} ms, x{best / t:.3f} over SDPA {best:.3f} ms "
            f"(roofline x{nb_dense / nb_leank:.3f}), {nb_leank / t / 1e6:.0f} GB/s, rel err {err:.1e}",
            flush=True,
        )
        if not err < 2e-2:
            raise SystemExit(f"LeanK outputs are wrong: relative error {err}")
    return {
        "model": model,
        "B": B,
        "N": N,
        "sdpa_ms": ms,
        "dense_bytes": nb_dense,
        "leank_bytes": nb_leank,
        "byte_roofline": nb_dense / nb_leank,
        "plans": rows,
    }


def main() -> None:
    """Parse arguments, sweep, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="*", default=["8x32768", "1x131072"])
    parser.add_argument("--plans", type=int, nargs="*", default=[LEANK_CONFIG.programs_per_sm])
    parser.add_argument("--qwen", action="store_true", help="also the authors' Qwen2.5-7B mask")
    args = parser.parse_args()
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    report = {**provenance("cuda"), "copy_bandwidth": copy_bandwidth(), "windows": str(WINDOWS), "results": []}
    for model in ["llama3.1-8b"] + (["qwen2.5-7b"] if args.qwen else []):
        for shape in args.shapes:
            B, N = (int(x) for x in shape.split("x"))
            report["results"].append(sweep_shape(model, B, N, args.plans, flush))
            torch.cuda.empty_cache()  # the shape's caches are gone with sweep_shape's frame
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "decode_sweep.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
