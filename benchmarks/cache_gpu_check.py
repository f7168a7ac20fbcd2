"""The LeanK cache on a GPU: do the Triton and torch decode paths compute the same logits, in bf16 and fp32?

Greedy agreement cannot tell rounding from a bug: in bf16 two correct implementations drift apart after the
first near-tie and then see different tokens. So this check **teacher-forces**: every path is fed the same
tokens (a ~1K-token prompt, then the text's true next 64 tokens, one decode step each, a batch of 4 equal-length
prompts) and the logits of every step are compared.

Paths (SmolLM2-135M-Instruct, the shipped r=0.7 mask, windows sink 16 / recent 64 / block 32):

* ``dense_flash`` / ``dense_math``: the dense model, SDPA pinned to two backends (flash, or in float32, which
  flash does not run, SDPA's own choice; and math). Their difference is the rounding spread of two correct dense
  attention implementations in this dtype: the **noise floor** (in float32 both may be the math backend, and the
  floor 1e-4 of the logits' standard deviation applies);
* ``leank_triton`` / ``leank_torch``: the LeanK cache with the Triton kernel and with the torch decode path
  (the same attention, different kernels);
* ``ones_triton``: the LeanK cache with an all-ones mask (every channel kept): LeanK's layout and kernel
  computing dense attention, compared with ``dense_flash``.

Tolerance, per dtype: the largest per-step logit difference of a pair of LeanK paths must stay within
``TOLERANCE_FACTOR`` times the dense noise floor measured in the same run (and in fp32, where products are
exact in the kernels, both are ~1e-5 of the logit scale). Reported per pair: max and mean absolute logit
difference over all steps, the same relative to the logits' standard deviation, and the share of steps whose
argmax agrees.

    python benchmarks/cache_gpu_check.py --out $OUT/cache_gpu_check.json       # on the GPU
    TRITON_INTERPRET=1 python benchmarks/cache_gpu_check.py --cpu-check        # logic only, fp32, CPU
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from leank_ref.attention import use_hook
from leank_ref.cache import LeanKAttention, LeanKCache
from leank_ref.data import continuation_example
from leank_ref.masks import load_mask
from leank_ref.models import cache_argument, load_model, model_facts
from leank_ref.provenance import provenance
from leank_ref.windows import Windows

ROOT = Path(__file__).resolve().parent.parent
MASK = ROOT / "masks" / "smollm2-135m_r0.7.pth"
WINDOWS = (16, 64, 32)  # sink, recent, block: the SmolLM2 defaults
TOLERANCE_FACTOR = 4.0  # a LeanK pair may differ by at most this many times the dense implementations' spread


def teacher_forced_logits(model, ids: torch.Tensor, prompt: int, cache, sdpa: str | None) -> torch.Tensor:
    """Prefill ``ids[:, :prompt]``, then feed each following token: logits [B, steps, vocab] (float32)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    key = cache_argument(model)
    pin = sdpa_kernel(getattr(SDPBackend, sdpa)) if sdpa else nullcontext()
    bind = use_hook(model, LeanKAttention(cache)) if isinstance(cache, LeanKCache) else nullcontext()
    logits = []
    with pin, bind, torch.no_grad():
        out = model(input_ids=ids[:, :prompt], use_cache=True, logits_to_keep=1, **{key: cache})
        logits.append(out.logits[:, -1].float())
        for t in range(prompt, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, logits_to_keep=1, **{key: cache})
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Differences between two [B, steps, vocab] logit tensors."""
    diff = (a - b).abs()
    scale = float(a.std())
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel_to_logit_std": float(diff.max()) / scale,
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def run_dtype(device: str, dtype: torch.dtype, prompt: int, steps: int, batch: int) -> dict:
    """All paths in one dtype; the verdict against the dense noise floor."""
    model, tokenizer = load_model(dtype=dtype, device=device)
    facts = model_facts(model)
    examples = [continuation_example(tokenizer, prompt, answer_length=steps, seed=s) for s in range(batch)]
    ids = torch.stack([ex.input_ids for ex in examples]).to(device)
    mask = load_mask(MASK, facts.mask_shape, 16)
    sink, recent, block = WINDOWS
    total = ids.shape[1] + 1

    def leank(layer_mask, backend):
        return LeanKCache(model, layer_mask, Windows(sink, recent, block), backend=backend, max_tokens=total)

    from transformers import DynamicCache

    # Flash runs only in 16-bit types, and the memory-efficient backend refuses grouped KV heads: in float32 (and on
    # a CPU) the first dense path takes SDPA's own choice.
    fast = "FLASH_ATTENTION" if device == "cuda" and dtype != torch.float32 else None
    paths = {
        "dense_flash": (DynamicCache(), fast),
        "dense_math": (DynamicCache(), "MATH"),
        "leank_triton": (leank(mask, "triton"), None),
        "leank_torch": (leank(mask, "torch"), None),
        "ones_triton": (leank(torch.ones(facts.mask_shape), "triton"), None),
    }
    logits = {name: teacher_forced_logits(model, ids, prompt, cache, sdpa) for name, (cache, sdpa) in paths.items()}
    pairs = {
        "dense_flash_vs_dense_math": compare(logits["dense_flash"], logits["dense_math"]),
        "leank_triton_vs_leank_torch": compare(logits["leank_triton"], logits["leank_torch"]),
        "ones_triton_vs_dense_flash": compare(logits["ones_triton"], logits["dense_flash"]),
        "leank_triton_vs_dense_flash": compare(logits["leank_triton"], logits["dense_flash"]),
    }
    floor = pairs["dense_flash_vs_dense_math"]["max_abs"]
    tolerance = max(TOLERANCE_FACTOR * floor, 1e-4 * float(logits["dense_flash"].std()))
    checked = ("leank_triton_vs_leank_torch", "ones_triton_vs_dense_flash")
    row = {
        "dtype": str(dtype),
        "batch": batch,
        "prompt": prompt,
        "steps": steps,
        "windows": dict(zip(("sink", "recent", "block"), WINDOWS)),
        "middle_tokens_at_end": paths["leank_triton"][0].layers[0].middle,
        "pairs": pairs,
        "noise_floor_max_abs": floor,
        "tolerance_max_abs": tolerance,
        "tolerance_rule": f"max(|a - b|) over all steps <= max({TOLERANCE_FACTOR} x dense flash-vs-math spread, "
        "1e-4 x logit std)",
        "passed": {name: pairs[name]["max_abs"] <= tolerance for name in checked},
        "note": "leank_triton_vs_dense_flash is the effect of pruning, not an error: no tolerance applies",
    }
    print(json.dumps({k: v for k, v in row.items() if k != "pairs"}), flush=True)
    for name, p in pairs.items():
        print(
            f"  {name:>30}: max {p['max_abs']:.3e}  mean {p['mean_abs']:.3e}  argmax agree {p['argmax_agreement']:.3f}"
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-check", action="store_true", help="tiny shapes on CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_gpu_check.json")
    args = parser.parse_args()
    if args.cpu_check:
        device, dtypes, prompt, steps, batch = "cpu", [torch.float32], 120, 3, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU, or use --cpu-check with TRITON_INTERPRET=1")
        device, dtypes, prompt, steps, batch = "cuda", [torch.float32, torch.bfloat16], 1024, 64, 4
    rows = [run_dtype(device, dtype, prompt, steps, batch) for dtype in dtypes]
    result = {
        "benchmark": "cache_gpu_check",
        "provenance": provenance(device),
        "what": "teacher-forced per-step logits of LeanK's Triton and torch decode paths and of dense attention",
        "mask": str(MASK.relative_to(ROOT)),
        "results": rows,
        "passed": all(all(r["passed"].values()) for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"passed: {result['passed']} -> {args.out}")


if __name__ == "__main__":
    main()
