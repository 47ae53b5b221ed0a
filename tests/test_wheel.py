"""ddsweep as a built wheel: the shipped studies travel as package data, and an installed (not
editable) ddsweep finds them from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from ddsweep.config import sweep

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_SWEEPS = ROOT / "ddsweep" / "sweeps"
PIP = (sys.executable, "-m", "pip")
# Run state and caches of a working checkout: never part of a build.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "mlruns", "mlartifacts",
    "mlflow.db", ".ddsweep", "data", "reports", "outputs",
)  # fmt: skip


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH (a checkout on it would pass for an installed
    ddsweep) and without ddsweep's own variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DDSWEEP_"))}


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of this checkout (pip in-tree builds write build/ into the source)."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("no source tree to build (tests run from an installed copy)")
    source = out / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    subprocess.run(
        [
            *PIP,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-qw",
            out / "dist",
            source,
        ],
        check=True,
        capture_output=True,
        timeout=120,
        env=clean_env(),
    )
    (wheel,) = (out / "dist").glob("ddsweep-*.whl")
    return wheel


def test_shipped_sweeps_are_package_data(tmp_path, monkeypatch):
    """importlib.resources finds the shipped studies inside the package, from any folder; the
    checkout's top-level sweeps/ is the same folder, not a copy."""
    shipped = sweep.shipped_sweep_dir()
    assert shipped.resolve() == PACKAGE_SWEEPS.resolve()
    assert (shipped / "digits_blocks.yaml").is_file()
    if (ROOT / "sweeps").exists():
        assert (ROOT / "sweeps").resolve() == PACKAGE_SWEEPS.resolve()
    monkeypatch.chdir(tmp_path)  # no ./sweeps here
    path = sweep.find_sweep_file("digits_blocks")
    assert path is not None and path.resolve() == (PACKAGE_SWEEPS / "digits_blocks.yaml").resolve()


def test_wheel_holds_every_shipped_sweep(tmp_path):
    """Every *.yaml of ddsweep/sweeps/ is in the wheel (package data), next to the code."""
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in PACKAGE_SWEEPS.glob("*.yaml"))
    assert shipped, "no shipped sweep files"
    assert {f"ddsweep/sweeps/{name}" for name in shipped} <= names
    assert "ddsweep/cli/__init__.py" in names
    assert not any(n.startswith("sweeps/") for n in names)  # not a top-level package


def venv_with_wheel(folder: Path, wheel: Path) -> Path:
    """A fresh venv with `wheel` installed, which sees this environment's packages (the wheel's
    dependencies) through a plain path entry: editable installs found here (a .pth hook) stay
    invisible to it. The path goes in after the install, so pip never sees (nor uninstalls) the
    ddsweep of this environment."""
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(folder)
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run(
        [*PIP, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
        env=clean_env(),
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "zz_this_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow  # ~25 s on the 2-core CPU: two fresh interpreters import torch and MLflow
def test_installed_wheel_finds_the_shipped_studies(tmp_path):
    """`pip install` of the built wheel into a fresh venv, then `ddsweep study status --study
    digits_blocks` and the quickstart's study lookup from an empty folder."""
    wheel = build_wheel(tmp_path)
    python = venv_with_wheel(tmp_path / "venv", wheel)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = clean_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{empty / 'mlflow.db'}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=empty, env=env, capture_output=True, text=True, timeout=300, check=False
        )

    lookup = run(
        str(python),
        "-c",
        "import ddsweep; from ddsweep import quickstart; "
        "print(ddsweep.__file__); print(quickstart.study_config().source)",
    )
    assert lookup.returncode == 0, lookup.stderr
    package, source = lookup.stdout.split()
    venv_root = (tmp_path / "venv").resolve()
    assert Path(package).resolve().is_relative_to(venv_root)  # the wheel, not this checkout
    assert Path(source).resolve().is_relative_to(venv_root)
    assert Path(source).name == "digits_blocks.yaml"

    script = python.parent / ("ddsweep.exe" if os.name == "nt" else "ddsweep")
    status = run(str(script), "study", "status", "--study", "digits_blocks")
    # Found, never run: the line that says how to start it (a missing file says "no sweep file").
    assert "no sweep file" not in status.stderr
    assert "study 'digits_blocks' has not been started" in status.stderr, status.stderr
    assert status.returncode == 2
    assert "Traceback" not in status.stderr
