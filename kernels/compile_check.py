"""Compile the decode kernels for an NVIDIA GPU on a machine without one, and report their resources.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on a CPU but accepts code the GPU compiler
rejects, and says nothing about registers or shared memory. Triton's wheel ships ``ptxas``, so the real
compiler can run anywhere: this module compiles each kernel for a given architecture (default sm_90, the
H100) and reads the registers per thread, spill stack and shared memory of the cubin. Run it in a process
where the kernels were *not* defined by the interpreter::

    python -m leank_ref.kernels.compile_check          # prints one line per kernel variant
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import decode_dense, leank_decoder, leank_kernel
from .launch import DecodeConfig

_POINTERS = {
    "Q": "*bf16",
    "K": "*bf16",
    "V": "*bf16",
    "KF": "*bf16",
    "VF": "*bf16",
    "O_PART": "*fp32",
    "LSE_PART": "*fp32",
    "OUT": "*bf16",
    "COUNT": "*i32",
    "META": "*i32",
    "CHAN": "*i32",
    "LENGTHS": "*i32",
}


@dataclass
class Resources:
    """What one compiled kernel variant needs per program."""

    name: str
    registers: int  # per thread
    stack_bytes: int  # per thread; > 0 means registers spilled
    shared_bytes: int  # dynamic shared memory per program

    def programs_per_sm(self, num_warps: int, regs_per_sm: int = 65536, shared_per_sm: int = 228 * 1024) -> int:
        """Programs that fit on one SM by registers and shared memory (H100 limits; 256-register warp granules)."""
        per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = regs_per_sm // (per_warp * num_warps)
        by_shared = shared_per_sm // max(self.shared_bytes, 1)
        return min(by_regs, by_shared)


def compile_kernel(
    kernel, constexprs: dict, arch: int = 90, num_warps: int = 4, num_stages: int = 3, groups: int = 0
) -> Resources:
    """Compile one variant of a @triton.jit kernel (bf16 tensors, int32 scalars) for sm_<arch>; return its resources.

    ``groups``: the length of the LeanK kernel's tuple arguments ``MID_K`` and ``MID_V`` (one pointer per group).
    """
    if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were defined by Triton's interpreter: run this without TRITON_INTERPRET set")
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name in ("MID_K", "MID_V"):
            signature[name] = ("*bf16",) * groups
            attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(groups)})
        else:
            signature[name] = _POINTERS.get(name, "i32")
            # What a real launch specializes on: 16-byte aligned tensors and strides that are multiples of 16.
            if name in _POINTERS or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    regs = re.search(r"REG:(\d+)", usage.stdout)
    stack = re.search(r"STACK:(\d+)", usage.stdout)
    if regs is None or stack is None:
        raise RuntimeError(f"could not read the resource usage of {kernel.__name__}: {usage.stdout[:200]}")
    return Resources(kernel.__name__, int(regs.group(1)), int(stack.group(1)), int(compiled.metadata.shared))


def default_variants(config: DecodeConfig = DecodeConfig()) -> dict:
    """Kernel variants of a Llama-3.1-8B decode (H/G = 4, D = 128): name -> (kernel, constexprs, groups)."""
    base = dict(GROUP=4, BLOCK_H=16, BLOCK_N=config.block_n, D=128, DOT_PRECISION="tf32")
    counts = (32, 64, 96)
    layer = dict(
        base,
        COUNTS=counts,
        COUNTS_PAD=tuple(triton.next_power_of_2(c) for c in counts),
        GP=4,
        BLOCK_S=leank_decoder._merge_block_s(4),
        LENGTHS_ON_DEVICE=True,
    )
    return {
        "dense partials": (decode_dense._dense_partial_kernel, base, 0),
        "merge": (decode_dense._merge_kernel, dict(BLOCK_S=64, BLOCK_D=32, D=128), 0),
        "LeanK layer, 3 groups": (leank_kernel.leank_layer_kernel, layer, len(counts)),
    }


def main() -> None:
    """Compile the default variants for sm_90 and print their resources."""
    config = DecodeConfig()
    for label, (kernel, constexprs, groups) in default_variants(config).items():
        r = compile_kernel(kernel, constexprs, num_warps=config.num_warps, num_stages=config.num_stages, groups=groups)
        print(
            f"{label:>30}: {r.registers} registers/thread, spill stack {r.stack_bytes} B, shared {r.shared_bytes} B, "
            f"{r.programs_per_sm(config.num_warps)} programs/SM"
        )


if __name__ == "__main__":
    main()
