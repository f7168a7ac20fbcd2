"""What the dense and LeanK decode kernels share on the host: launch parameters, split planning, input checks.

Triton decides between compiling and interpreting when a kernel is *defined* (at import): on a machine without
CUDA, set ``TRITON_INTERPRET=1`` before importing ``leank_ref.kernels`` and pass CPU tensors (float32 or float16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

# Triton chooses between compiling and interpreting when a kernel is defined (at import), reading
# TRITON_INTERPRET its own way ("1", "true", "on"...): its decision when leank_ref.kernels was imported.
INTERPRETED = bool(triton.knobs.runtime.interpret)
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters shared by the dense and LeanK decode kernels."""

    block_n: int = 64  # tokens per step of a program's inner loop
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of the K/V loads (compiled mode only)
    programs_per_sm: int = 4  # automatic split count aims at this many programs per SM
    min_tokens_per_split: int = 256  # automatic splits never get fewer tokens than this


def interpreter_env_set() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter *now* (Triton's own parsing of the variable)."""
    return bool(triton.knobs.runtime.interpret)


def check_runnable(*tensors: torch.Tensor, interpret: bool | None = None) -> None:
    """Raise if the tensors are on different devices, or on a CPU without Triton's interpreter, or bf16 there.

    ``interpret`` says whether the kernels were defined in Triton's interpreter (default: what this module
    recorded at import; only tests pass it).
    """
    interpret = INTERPRETED if interpret is None else interpret
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"all tensors must be on one device, got {sorted(map(str, devices))}: move them with .to(device)"
        )
    device = devices.pop()
    if device.type != "cuda" and not interpret:
        late = (
            " (TRITON_INTERPRET is set now, but was not when leank_ref.kernels was imported: restart the "
            "process with it set)"
            if interpreter_env_set()
            else ""
        )
        raise RuntimeError(
            f"tensors are on {device} but there is no CUDA and TRITON_INTERPRET is not set{late}: move the "
            "tensors to a CUDA device, or set TRITON_INTERPRET=1 before importing triton and leank_ref.kernels"
        )
    if interpret and any(t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError("Triton's interpreter computes tl.dot wrongly on bfloat16: use float32 or float16 on CPU")


def check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    """Raise unless every named tensor has unit stride in its last dimension."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension: pass {name}.contiguous()")


def check_head_dim(D: int) -> None:
    """Raise unless head_dim is a power of two the kernels handle."""
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {D}")


def check_dtypes(**tensors: torch.Tensor) -> torch.dtype:
    """Raise unless all tensors share one of the supported float dtypes; return it."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in tensors.items())
        raise TypeError(f"q, k and v must share one dtype, got {got}: cast them with .to(q.dtype)")
    dtype = dtypes.pop()
    if dtype not in _DTYPES:
        raise TypeError(f"dtype {dtype} is not supported: use torch.bfloat16 or torch.float16 (float32 for tests)")
    return dtype


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs (tf32 would cost accuracy); bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # the interpreter: a few "multiprocessors" keep CPU runs short
        return 2
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (2 for the interpreter on a CPU: a few programs keep CPU runs short)."""
    return _sm_count(device.index if device.type == "cuda" else None)


def plan_splits(
    n_tokens: int, rows: int, device: torch.device, config: DecodeConfig, num_splits: int | None = None
) -> tuple[int, int]:
    """Return (splits, tokens_per_split) for `rows` (sequence, head) pairs; no split is empty."""
    if num_splits is None:
        sms = sm_count(device)
        want = max(1, -(-config.programs_per_sm * sms // rows))
        want = min(want, max(1, -(-n_tokens // config.min_tokens_per_split)))
        per_split = -(-n_tokens // want)
        per_split = -(-per_split // config.block_n) * config.block_n  # whole blocks per split
    else:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        per_split = -(-n_tokens // num_splits)
    return -(-n_tokens // per_split), per_split


def block_h(group: int) -> int:
    """Query rows per program: the GQA group, padded to a power of two >= 16 for tl.dot."""
    return max(16, triton.next_power_of_2(group))
