"""``python -m leank_ref train``: train one stage and write the factors (stage 1) or the mask (stage 2).

Every option but the run's files is a field of :class:`~leank_ref.train.settings.TrainSettings` of the same
name; unset options take the stage's defaults, or the ``--preset``'s. Under ``torchrun --nproc-per-node N``
the processes share each step's ``--batch`` examples (:mod:`leank_ref.train.distributed`). Heavy modules are
imported inside :func:`run_command`, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

_SETTINGS_OPTIONS = (  # TrainSettings fields the command line sets directly (windows come from sink/recent/block)
    "steps", "lr", "reg_weight", "ratio", "budget", "align", "context_min", "context_max", "tasks", "init", "warmup",
    "decay", "lr_floor", "variant", "empty_head_gradient", "seed", "batch", "pool", "prefill_chunk", "threads",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` command's options."""
    add = parser.add_argument
    add("--stage", type=int, choices=(1, 2), required=True, help="1: learn factors; 2: fine-tune them under a mask")
    add("--out", required=True, help="output .pth: factors (stage 1) or mask (stage 2); <out>.json, .log.jsonl beside")
    add("--factors", help="stage-1 factors .pth (stage 2 starts from them; stage 1 may too)")
    add(
        "--preset",
        help="named settings that fill the options left unset: 'laptop' (both stages on 2 CPU cores in about 6 "
        "minutes: a pool of 48 prefilled examples, 300 + 100 steps, 256-1024-token contexts)",
    )
    add("--ratio", type=float, help="stage 2: share of K channels to prune, in (0, 1)")
    add(
        "--budget",
        choices=("k", "kv"),
        help="stage 2: what --ratio prunes: 'k' (default; K channels) or 'kv' (the middle's K + V bytes, so an "
        "emptied head's V counts)",
    )
    add("--align", type=int, help="kept count per head is a multiple of this (default 16; authors 32)")
    add("--steps", type=int, help="default 2000 (stage 1) / 200 (stage 2), the authors' values")
    add("--lr", type=float, help="default 0.02 (stage 1) / 0.01 (stage 2), the authors' values")
    add("--reg-weight", type=float, help="L1 weight lambda; default 0.06 (stage 1) / 0 (stage 2)")
    add("--sink", type=int, help="sink tokens (default 16; authors 128)")
    add("--recent", type=int, help="recent window in training (default 64; authors 1024)")
    add("--block", type=int, help="block the mask is deployed with, recorded only (default 32; authors 128)")
    add("--context-min", type=int, help="shortest context in tokens (default 512; authors 4000)")
    add("--context-max", type=int, help="longest context in tokens (default 2048; authors 96000)")
    add("--tasks", nargs="+", help="training mixture: passkey kv_retrieval continuation (default: all three)")
    add("--init", type=float, help="starting factor for stage 1 (default 1.0)")
    add("--warmup", type=float, help="share of steps warming up (default 0.2)")
    add("--decay", type=float, help="share of steps decaying at the end (default 0.2)")
    add("--lr-floor", type=float, help="the schedule's lowest share of lr (default 0.1)")
    add(
        "--variant",
        choices=("deployed", "authors"),
        help="stage 2's forward pass: 'deployed' (default; the cache's exact attention) or 'authors' "
        "(where(mask, s, 0), zero-count heads' middle keys at logit 0)",
    )
    add(
        "--empty-head-gradient",
        choices=("none", "top"),
        help="deployed stage 2: 'top' gives emptied heads the gradient of reading their middle through their best "
        "align channels (forward unchanged), so they can come back; default 'none'",
    )
    add("--seed", type=int, help="data and RNG seed (default 0)")
    add("--batch", type=int, help="examples per step, shared by the torchrun processes (default 1)")
    add("--pool", type=int, help="examples prefilled once and cycled through (default 0: a fresh one per step)")
    add("--prefill-chunk", type=int, help="context tokens per prefill forward, to bound memory (default 0: all)")
    add("--threads", type=int, help="torch threads per process (default: torch's own)")
    add("--model", help="local Llama/Qwen2 checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    add("--device", help="cpu, cuda (default: cuda when available); under torchrun, cuda means cuda:LOCAL_RANK")
    add("--dtype", choices=("float32", "bfloat16"), default="float32", help="model weights' dtype")
    add("--checkpoint", help="checkpoint file (default <out>.ckpt when --checkpoint-every or --resume)")
    add("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps")
    add("--resume", action="store_true", help="continue from --checkpoint if it exists")
    add("--until", type=int, help="stop after this many steps (resume later with --resume)")
    add("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace):
    """The run's :class:`TrainSettings`: the stage's defaults (or the preset's), then the options given."""
    from leank_ref.train.settings import TrainSettings, preset_settings
    from leank_ref.windows import Windows

    given = {name: getattr(args, name, None) for name in _SETTINGS_OPTIONS}
    base = TrainSettings.for_stage(args.stage) if args.preset is None else preset_settings(args.preset, args.stage)
    w = base.windows
    sink, recent, block = (getattr(args, k, None) for k in ("sink", "recent", "block"))
    windows = Windows(
        w.sink if sink is None else sink, w.recent if recent is None else recent, w.block if block is None else block
    )
    return base.replace(**given, windows=windows)


def run_command(args: argparse.Namespace) -> int:
    """Train one LeanK stage: write factors (stage 1) or a mask (stage 2), metadata JSON and a JSON-lines log."""
    import os
    import time
    from pathlib import Path

    import torch

    from leank_ref.models import load_model, model_facts
    from leank_ref.train import distributed
    from leank_ref.train.checkpoint import load_checkpoint_state, load_factors
    from leank_ref.train.data import check_world
    from leank_ref.train.outputs import write_outputs
    from leank_ref.train.trainer import Trainer

    begun = time.perf_counter()
    settings = settings_from_args(args)  # bad settings fail here, before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} needs a CUDA GPU and torch sees none; pass --device cpu.")
    torchrun = distributed.launched_by_torchrun()
    world = distributed.World()
    if torchrun:
        device = distributed.torchrun_device(device)
        world = distributed.World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    check_world(settings, world.size)  # before any process group or model exists
    if torchrun:
        world = distributed.init_from_torchrun(device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        shape = model_facts(model).mask_shape
        factors = load_factors(args.factors, shape) if args.factors else None
        checkpoint = args.checkpoint or (str(args.out) + ".ckpt" if args.checkpoint_every or args.resume else None)
        if args.resume and checkpoint and Path(checkpoint).exists():
            load_checkpoint_state(checkpoint, model, settings)  # a wrong model or settings fail before any work
        trainer = Trainer(model, tokenizer, settings, factors)
        result = trainer.run(
            checkpoint,
            every=args.checkpoint_every,
            resume=args.resume,
            until=args.until,
            progress=not args.no_progress,
        )
        if world.main:
            write_outputs(args, settings, model, trainer, result, checkpoint, device, time.perf_counter() - begun)
        distributed.barrier(world)
    finally:
        if torchrun and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
