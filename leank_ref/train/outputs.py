"""What a ``train`` run leaves on disk: the factors or mask, a metadata JSON and a JSON-lines log (rank 0 only)."""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

from leank_ref.masks import save_mask
from leank_ref.memory import mask_stats
from leank_ref.models import DEFAULT_MODEL_NAME
from leank_ref.provenance import file_sha256, provenance
from leank_ref.train.checkpoint import model_fingerprint, save_factors
from leank_ref.train.settings import TrainSettings
from leank_ref.train.trainer import Trainer, TrainResult


def write_outputs(
    args: Namespace,
    settings: TrainSettings,
    model,
    trainer: Trainer,
    result: TrainResult,
    checkpoint: str | None,
    device: str,
    wall_seconds: float,
) -> None:
    """Write the log; when the run is complete also the factors (stage 1) or mask (stage 2) and the metadata."""
    out = Path(args.out)
    meta_path, log_path = out.with_suffix(".json"), out.with_suffix(".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(rec) + "\n" for rec in result.log))
    if trainer.next_step < settings.steps:
        print(
            f"stopped after step {trainer.next_step} of {settings.steps}; continue with --resume "
            f"(checkpoint {checkpoint}). Log so far: {log_path}"
        )
        return

    if settings.stage == 1:
        save_factors(result.factors, out)
    else:
        save_mask(result.mask, out)
    last = result.log[-1]
    tail = result.log[-max(1, len(result.log) // 10) :]
    meta = {
        "command": "train",
        "stage": settings.stage,
        "arguments": {k: v for k, v in vars(args).items() if k != "run"},
        "preset": args.preset,
        "settings": settings.as_dict(),
        "seed": settings.seed,
        "steps": settings.steps,
        "processes": trainer.world.size,
        "model": {"name": args.model or DEFAULT_MODEL_NAME, "dtype": args.dtype, **model_fingerprint(model)},
        "input_factors": None if args.factors is None else {"path": args.factors, "sha256": file_sha256(args.factors)},
        "final": {k: last[k] for k in ("distill_loss", "reg_loss", "loss", "mean_factor", "share_below_0.1")},
        "final_tenth_mean_distill_loss": sum(r["distill_loss"] for r in tail) / len(tail),
        "train_seconds": sum(r["seconds"] for r in result.log),
        "wall_seconds": wall_seconds,
        "outputs": {"factors" if settings.stage == 1 else "mask": str(out), "log": str(log_path)},
        "provenance": provenance(device),
    }
    if settings.stage == 2:
        stats = mask_stats(result.mask, settings.context_max, settings.training_windows)
        meta["stage2_variant"] = settings.variant
        meta["mask"] = {
            "target_ratio": settings.ratio,
            "realised_ratio": stats.pruned_ratio,
            "align": settings.align,
            **asdict(stats),
        }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}, {meta_path}, {log_path}")
