"""A regular (not editable) install works like a library: the wheel carries the package, its kernels and the shipped
masks, and an installed copy, run away from the checkout, finds and loads those masks, evaluates into the folder it
is given, and builds the scorecard of a checkout named by --root."""

import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "leank_ref", "kernels", "masks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (the checkout stays untouched: no build/ or egg-info written)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
        + ["-w", str(work / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (built,) = (work / "dist").glob("leank_ref-*.whl")
    return built


def test_wheel_holds_the_package_the_kernels_and_every_shipped_mask(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"leank_ref/cache/press.py", "leank_ref/models.py", "leank_ref/kernels/decode_leank.py"} <= names
    shipped = {p.relative_to(ROOT / "masks").as_posix() for p in (ROOT / "masks").rglob("*.pth")}
    assert shipped and {f"leank_ref/_masks/{name}" for name in shipped} <= names
    assert not any(n.startswith(("tests/", "notebooks/", "benchmarks/", "masks/")) for n in names)
    subpackages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "leank_ref").rglob("__init__.py")}
    assert subpackages <= names, f"subpackages missing from the wheel (pyproject's packages): {subpackages - names}"


def test_requires_python_matches_the_readme():
    required = re.findall(r'^requires-python = "(.*)"$', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert required == [">=3.11"]
    assert "Python 3.11 or newer" in (ROOT / "README.md").read_text()
    assert sys.version_info >= (3, 11)


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (dependencies borrowed from this environment by a path file)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip()
    )
    # torch, transformers, ... from this environment; a plain path line, so its editable-install hook is not loaded
    (site / "borrowed_dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    return python


def run_installed(python: Path, args: list[str], cwd: Path) -> str:
    """Run the installed copy in ``cwd`` (away from the checkout); its stdout."""
    done = subprocess.run([python, *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_installed_wheel_finds_its_masks(venv_python, tmp_path):
    check = textwrap.dedent(
        """
        from pathlib import Path
        import leank_ref
        from leank_ref import masks_dir, shipped_mask
        from leank_ref.baselines import LeanKLearned
        from leank_ref.cache import LeanKCache
        from leank_ref.models import shipped_mask_path
        assert Path(leank_ref.__file__).parent == masks_dir().parent, (leank_ref.__file__, masks_dir())
        print(masks_dir())
        llama = shipped_mask("reference/llama3.1-8b-instruct")
        print(tuple(shipped_mask("smollm2-135m_r0.7").shape), tuple(llama.shape))
        print(shipped_mask_path("smollm2-135m_r0.5").name)
        print(LeanKLearned.for_ratio(0.7).path)
        """
    )
    where, shapes, name, learned = run_installed(venv_python, ["-c", check], tmp_path).strip().splitlines()
    assert Path(where).is_relative_to(venv_python.parent.parent) and Path(where).name == "_masks"
    assert shapes == "(30, 3, 64) (32, 8, 128)" and name == "smollm2-135m_r0.5.pth"
    assert Path(learned) == Path(where) / "smollm2-135m_r0.7.pth"


def test_installed_evaluate_writes_under_out(venv_python, tmp_path):
    """The smallest grid that writes every result file, run from an empty folder: files go under --out only."""
    begun = time.perf_counter()
    args = ["-m", "leank_ref", "evaluate", "--tiny", "--method", "leank", "random", "--ratio", "0.7"]
    args += ["--source", "stdlib", "--greedy-lengths", "--out", "out", "--no-progress"]
    printed = run_installed(venv_python, args, tmp_path)
    print(f"evaluate --tiny from the wheel: {time.perf_counter() - begun:.0f} s")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out",
        "out/eval.json",
        "out/eval_samples.csv",
        "out/eval_summary.csv",
    ]
    assert "leank@0.7/leank" in printed and "headline stdlib" in printed


def test_installed_scorecard_reads_the_checkout_given_as_root(venv_python, tmp_path):
    printed = run_installed(
        venv_python, ["-m", "leank_ref", "scorecard", "--root", str(ROOT), "--check", str(ROOT / "README.md")], tmp_path
    )
    assert "out of date" not in printed
    table = run_installed(venv_python, ["-m", "leank_ref", "scorecard", "--root", str(ROOT)], tmp_path)
    assert table.count("| yes |") >= 1 and "not measured" not in table
    assert "not measured" in run_installed(venv_python, ["-m", "leank_ref", "scorecard"], tmp_path)  # no checkout here


def test_help_is_fast_and_plain_text():
    """``python -m leank_ref --help`` imports no command's module (no torch): well under a second, plain text."""
    begun = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "leank_ref", "--help"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - begun
    print(f"python -m leank_ref --help: {seconds:.2f} s")
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("train", "evaluate", "scorecard"))
    assert "``" not in done.stdout and ":func:" not in done.stdout and ":class:" not in done.stdout
    assert seconds < 2.5  # the requirement is 1 s; the margin is for a loaded CI machine
    modules = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from leank_ref.__main__ import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'leank_ref.'))))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert modules.strip() == "['leank_ref.__main__']"


def test_installed_commands_all_load(venv_python, tmp_path):
    """Every command's module imports from the wheel (a subpackage left out of it fails here)."""
    for command in ("train", "evaluate", "scorecard"):
        assert "usage:" in run_installed(venv_python, ["-m", "leank_ref", command, "--help"], tmp_path)
