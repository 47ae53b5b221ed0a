"""The settings layer (`ddsweep.config`) stands alone: reading every shipped sweep file and
building every settings class imports no torch, MLflow, Optuna, diffusers or torchvision, and
config imports no other room of ddsweep."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ddsweep

PACKAGE = Path(ddsweep.__file__).resolve().parent
HEAVY = ("torch", "mlflow", "optuna", "diffusers", "torchvision")

_PROBE = """
import json, sys
from ddsweep.config import sweep
from ddsweep.config.fid import FIDConfig
from ddsweep.config.probe import ProbeConfig
from ddsweep.config.run import RunOptions
from ddsweep.config.train import TrainConfig
for path in sorted(sweep.shipped_sweep_dir().glob("*.yaml")):
    cfg = sweep.parse_study(sweep.read_yaml(path), str(path))
    sweep.expand(cfg.axes, lambda backbone: (0, 1))
TrainConfig(), ProbeConfig().params(), FIDConfig(), RunOptions()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
"""


def test_reading_every_shipped_sweep_file_imports_no_heavy_library() -> None:
    code = f"HEAVY = {HEAVY!r}\n{_PROBE}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_check_sees_a_heavy_import() -> None:
    code = f"HEAVY = {HEAVY!r}\nimport ddsweep.probes.knn\n{_PROBE}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert "torch" in json.loads(out.stdout.strip().splitlines()[-1])


def _ddsweep_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n for n in names if n.startswith("ddsweep."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ddsweep."))
    return found


def test_config_imports_only_config_and_errors() -> None:
    bad = {}
    for path in sorted((PACKAGE / "config").rglob("*.py")):
        outside = {
            m
            for m in _ddsweep_imports(path)
            if not m.startswith(("ddsweep.config", "ddsweep.errors"))
            and path.name != "run.py"  # RunOptions.policy: the scheduler's type, lazily
        }
        if outside:
            bad[path.relative_to(PACKAGE).as_posix()] = sorted(outside)
    assert bad == {}


def test_ddsweep_home_moves_the_journals_the_cache_and_the_checkpoints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ddsweep.config import paths

    for name in paths.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert paths.cache_dir() == Path(".ddsweep/cache")
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path))
    assert (paths.optuna_dir(), paths.cache_dir(), paths.checkpoints_dir()) == (
        tmp_path / "optuna",
        tmp_path / "cache",
        tmp_path / "checkpoints",
    )
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "elsewhere"))  # one part alone
    assert (paths.cache_dir(), paths.checkpoints_dir()) == (
        tmp_path / "elsewhere",
        tmp_path / "checkpoints",
    )
