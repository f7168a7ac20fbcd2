"""Where a number came from: git commit, package versions, machine and device, date (for result JSON files)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

import leank_ref

COMMIT_ENV = "LEANK_REF_GIT_COMMIT"  # set it where the code runs from a copy without its own .git (e.g. a remote GPU)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes: which mask or factors file a result is about."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git(args: list[str], cwd: Path) -> str:
    """Output of one git command in ``cwd`` (raises OSError or CalledProcessError when git or the repo is missing)."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def project_checkout() -> Path | None:
    """The git checkout this project's package was imported from, or None (an installed wheel, a bare copy).

    The package must sit at the top of the repository that holds it, beside that repository's ``pyproject.toml``:
    a copy of the project inside some other repository is not that repository's commit.
    """
    package = Path(leank_ref.__file__).resolve().parent
    try:
        top = Path(_git(["rev-parse", "--show-toplevel"], package)).resolve()
    except (OSError, subprocess.CalledProcessError):
        return None
    return top if top == package.parent and (top / "pyproject.toml").is_file() else None


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty): ``$LEANK_REF_GIT_COMMIT`` when set (dirty unknown: None), else the project checkout's HEAD
    and whether its tracked files differ from it, else ('unknown', None)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV], None
    root = project_checkout()
    if root is None:
        return "unknown", None
    try:
        head = _git(["rev-parse", "HEAD"], root)
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], root))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return head, dirty


def device_name(device: str | torch.device) -> str:
    """A readable name of the device a run used: the GPU's model, or the CPU's with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def provenance(device: str | torch.device = "cpu") -> dict:
    """Versions, commit (and whether the checkout was dirty), machine, device and UTC date, beside every number."""
    import transformers

    commit, dirty = git_state()
    return {
        "leank_ref": leank_ref.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": device_name(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
