"""Where a number came from: git commit, package versions, machine and device, date (for result JSON files)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

import leank_ref

COMMIT_ENV = "LEANK_REF_GIT_COMMIT"  # set it where the code runs from a copy without .git (e.g. a remote GPU)


def git_commit() -> str:
    """$LEANK_REF_GIT_COMMIT when set (a copy whose git metadata may be stale), else HEAD (``+dirty`` if tracked
    files changed), else 'unknown'."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    root = Path(leank_ref.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str | torch.device) -> str:
    """A readable name of the device a run used: the GPU's model, or the CPU's with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def provenance(device: str | torch.device = "cpu") -> dict:
    """Versions, commit, machine, device and UTC date, to store beside every measured number."""
    import transformers

    return {
        "leank_ref": leank_ref.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": device_name(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
