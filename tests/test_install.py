"""A regular (not editable) install works like a library: the wheel carries the package, its kernels and the shipped
masks, and an installed copy, imported away from the checkout, finds and loads those masks."""

import re
import shutil
import subprocess
import sys
import textwrap
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


def test_requires_python_matches_the_readme():
    required = re.findall(r'^requires-python = "(.*)"$', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert required == [">=3.11"]
    assert "Python 3.11 or newer" in (ROOT / "README.md").read_text()
    assert sys.version_info >= (3, 11)


def test_installed_wheel_finds_its_masks(wheel, tmp_path):
    """Install into a fresh venv (dependencies borrowed from this environment by a path file) and load the masks."""
    venv = tmp_path / "venv"
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
    check = textwrap.dedent(
        """
        from pathlib import Path
        import leank_ref
        from leank_ref import masks_dir, shipped_mask
        from leank_ref.cache import LeanKCache
        from leank_ref.models import shipped_mask_path
        assert Path(leank_ref.__file__).parent == masks_dir().parent, (leank_ref.__file__, masks_dir())
        print(masks_dir())
        llama = shipped_mask("reference/llama3.1-8b-instruct")
        print(tuple(shipped_mask("smollm2-135m_r0.7").shape), tuple(llama.shape))
        print(shipped_mask_path("smollm2-135m_r0.5").name)
        """
    )
    out = subprocess.run([python, "-c", check], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    where, shapes, name = out.strip().splitlines()
    assert Path(where).is_relative_to(venv) and Path(where).name == "_masks"
    assert shapes == "(30, 3, 64) (32, 8, 128)" and name == "smollm2-135m_r0.5.pth"
