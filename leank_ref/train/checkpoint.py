"""Factor files and training checkpoints: what a run reads and writes, checked against the model it runs on.

Factors are a float32 [L, G, D] tensor in [0, 1] (``torch.save``, like a mask). A checkpoint is a dict
(:data:`CHECKPOINT_FORMAT`) holding everything a resumed run needs to continue exactly: factors, optimizer,
schedule, RNG, data position, log, plus the model's fingerprint and the run's settings, so that resuming
with another model or other settings fails with an error that says what differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from leank_ref.masks import check_shape
from leank_ref.models import model_facts
from leank_ref.train.settings import TrainSettings

CHECKPOINT_FORMAT = "leank_ref.training/2"  # 2: settings stored as TrainSettings fields (windows nested)


def save_factors(factors: torch.Tensor, path: str | Path) -> None:
    """Save stage-1 factors as a float32 [L, G, D] tensor (``torch.save``, like a mask)."""
    check_shape(factors, None, "factors")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(factors.detach().float().contiguous().cpu(), path)


def load_factors(path: str | Path, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Load factors [L, G, D] (``weights_only=True``), checking the model's shape and that they lie in [0, 1]."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a [L, G, D] factor tensor.")
    check_factors(obj, shape)
    return obj.float()


def check_factors(factors: torch.Tensor, shape: tuple[int, int, int] | None) -> None:
    """Raise unless ``factors`` is [L, G, D] of the model's shape with finite values in [0, 1]."""
    check_shape(factors, shape, "factors")
    f = factors.detach().float()
    if not bool(torch.isfinite(f).all()) or float(f.min()) < 0 or float(f.max()) > 1:
        raise ValueError(
            f"factors must be finite and lie in [0, 1] (found min {float(f.min()):.3g}, max {float(f.max()):.3g}); "
            "pass the stage-1 output of this project (training clamps factors into [0, 1])."
        )


def model_fingerprint(model) -> dict:
    """What identifies the model a checkpoint belongs to: architecture, shape and a checksum of its embeddings."""
    facts = model_facts(model)
    emb = model.get_input_embeddings().weight
    return {
        "model_type": facts.model_type,
        "mask_shape": list(facts.mask_shape),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "embedding_checksum": round(float(emb[:256].double().abs().sum()), 2),
    }


def save_atomically(state: dict, path: str | Path) -> None:
    """``torch.save`` to ``path`` via a temporary file, so a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint_state(path: str | Path, model, settings: TrainSettings) -> dict:
    """Read a checkpoint (``weights_only=True``) and check it belongs to this model and these settings."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a leank_ref training checkpoint; start a fresh run without --resume.")
    ours = model_fingerprint(model)
    if state["model"] != ours:
        raise ValueError(
            f"checkpoint {path} was made for another model ({state['model']}), not this one ({ours}); "
            "resume with the model it was trained on, or start a fresh run (another checkpoint path, no --resume)."
        )
    saved, current = TrainSettings(**state["settings"]).as_dict(), settings.as_dict()
    differ = [k for k in current if k != "threads" and saved.get(k) != current[k]]
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differ)
        raise ValueError(
            f"checkpoint {path} was made with other settings ({pairs}); resume with the same settings "
            "or start a fresh run."
        )
    factors = state["factors"]
    if list(factors.shape) != ours["mask_shape"]:
        raise ValueError(f"checkpoint {path} holds factors of shape {list(factors.shape)}, not {ours['mask_shape']}.")
    return state
