"""Data parallelism over examples with ``torch.distributed``: ``torchrun --nproc-per-node N -m leank_ref train``.

Why DDP on the factors, and not FSDP on the model: LeanK freezes every model weight and trains only the
factors [L, G, D] (262,144 numbers for Llama-3.1-8B). Each process holds the whole frozen model (an 8B model
in bf16 is 16 GB and, with the prefill-once loss, trains at 96K tokens on one 80 GB GPU), runs its share of
each step's examples, and :class:`~torch.nn.parallel.DistributedDataParallel` averages the factors' gradient
across processes during the backward pass. Every process then takes the same AdamW step, so the factors stay
identical everywhere without any other communication. FSDP would shard the frozen weights, which only pays
when the model does not fit one device, and would all-gather every layer's weights in every forward pass.

Only rank 0 writes files and shows progress bars; every rank reads a checkpoint when resuming.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from leank_ref.train.loss import straight_through


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0)."""
        return self.rank == 0


def current_world() -> World:
    """The initialised process group's rank and size, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (which sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def torchrun_device(device: str) -> str:
    """The device of this torchrun process: ``cuda:LOCAL_RANK`` for ``cuda``, else ``device`` unchanged.

    Raises before any work when there are fewer GPUs than processes on this machine.
    """
    if not device.startswith("cuda"):
        return device
    local, per_node = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.device_count() < per_node:
        raise RuntimeError(
            f"torchrun started {per_node} processes on this machine but it has {torch.cuda.device_count()} GPU(s); "
            "pass --nproc-per-node at most the GPU count, or --device cpu."
        )
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def init_from_torchrun(device: str) -> World:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on the CPU) and return this process's world."""
    if not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return current_world()


class Factors(torch.nn.Module):
    """The trainable factors [L, G, D] as a module, so that DDP can average their gradient.

    ``forward()`` returns the scale the student runs with: the factors (stage 1), or with ``mask`` the stage-2
    straight-through scale (``hard``: the 0/1 mask itself, the deployed forward pass).
    """

    def __init__(self, factors: torch.Tensor):
        super().__init__()
        self.factors = torch.nn.Parameter(factors)

    def forward(self, mask: torch.Tensor | None = None, hard: bool = False) -> torch.Tensor:
        if mask is None:
            return self.factors * 1.0  # a fresh tensor per call (DDP hooks the parameter, not its output)
        return straight_through(self.factors, mask, hard)


def data_parallel(module: Factors, world: World) -> torch.nn.Module:
    """``module`` wrapped in DDP when several processes train together, else ``module`` itself."""
    if world.size == 1:
        return module
    device = module.factors.device
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a detached scalar over all processes (for the log; gradients are averaged by DDP)."""
    if world.size == 1:
        return value
    total = value.detach().clone().float()
    dist.all_reduce(total)
    return total / world.size


def barrier(world: World) -> None:
    """Wait for every process (e.g. until rank 0 has written a checkpoint)."""
    if world.size > 1:
        dist.barrier()
