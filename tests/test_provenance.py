"""Provenance names this project's commit: its own checkout's, never that of a repository around a copy of it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import leank_ref
from leank_ref.provenance import COMMIT_ENV, git_state

GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="needs git")


def _git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()


def _state_of_copy(project: Path) -> str:
    """git_state() as seen by a Python that imports leank_ref from the copy in ``project``."""
    env = {k: v for k, v in os.environ.items() if k != COMMIT_ENV} | {"PYTHONPATH": str(project)}
    code = "from leank_ref.provenance import git_state; print(git_state())"
    run = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def _copy_project(dest: Path) -> None:
    dest.mkdir(parents=True)
    source = Path(leank_ref.__file__).resolve().parent
    shutil.copytree(source, dest / "leank_ref", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "pyproject.toml").write_text('[project]\nname = "leank_ref"\n')


def test_copy_inside_another_repository_names_no_commit(tmp_path):
    outer = tmp_path / "outer"
    _copy_project(outer / "vendored" / "project")
    _git("init", "-q", cwd=outer)
    _git("add", "-A", cwd=outer)
    _git("commit", "-qm", "outer", cwd=outer)
    assert _state_of_copy(outer / "vendored" / "project") == "('unknown', None)"


def test_own_checkout_names_its_head_and_whether_it_is_dirty(tmp_path):
    project = tmp_path / "project"
    _copy_project(project)
    _git("init", "-q", cwd=project)
    _git("add", "-A", cwd=project)
    _git("commit", "-qm", "project", cwd=project)
    head = _git("rev-parse", "HEAD", cwd=project)
    assert _state_of_copy(project) == f"('{head}', False)"
    (project / "pyproject.toml").write_text('[project]\nname = "leank_ref"\nversion = "0"\n')
    assert _state_of_copy(project) == f"('{head}', True)"


def test_the_environment_variable_wins(monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "0123abc")
    assert git_state() == ("0123abc", None)


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    from leank_ref.provenance import file_sha256

    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")  # FIPS 180-2's test vector
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
