"""A CLI that starts in a second: help, the version and every argument error answer without
importing torch, MLflow, Optuna, diffusers or torchvision (checked in `sys.modules` of a fresh
process after the command has answered)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ddsweep

HEAVY = ("torch", "mlflow", "optuna", "diffusers", "torchvision")
CLEARED = ("MLFLOW_TRACKING_URI", "DDSWEEP_HOME")
# Runs the CLI in-process, then prints the heavy libraries it imported as the last line.
_RUN = """
import json, sys
from ddsweep.cli import app
try:
    app(args=sys.argv[1:], prog_name="ddsweep")
except SystemExit as exit:
    code = exit.code
print("\\nHEAVY=" + json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))))
print("CODE=" + json.dumps(code))
"""


def _heavy_after(*argv: str, cwd: Path | None = None) -> tuple[list[str], object]:
    env = None
    if cwd is not None:  # a fresh folder: no store of the caller's is found
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        env["PYTHONPATH"] = str(Path(ddsweep.__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{_RUN}", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("HEAVY="), out.stdout + out.stderr
    return json.loads(lines[-2].removeprefix("HEAVY=")), json.loads(lines[-1].removeprefix("CODE="))


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (("--help",), 0),
        (("--version",), 0),
        (("study", "--help"), 0),
        (("study", "probe-grid", "--help"), 0),
        (("train", "--help"), 0),
        (("probe", "--help"), 0),
        (("report", "--help"), 0),
        (("--bogus",), 2),
        (("train", "--epochs", "many"), 2),
        (("study", "probe-grid", "--no-such-flag"), 2),
        (("nonsense",), 2),
    ],
)
def test_help_version_and_argument_errors_import_no_heavy_library(
    argv: tuple[str, ...], code: int
) -> None:
    heavy, exit_code = _heavy_after(*argv)
    assert (heavy, exit_code) == ([], code)


def test_the_check_sees_a_command_that_imports_torch() -> None:
    # `train` with a bad option value past parsing reaches the library, which needs torch.
    heavy, _ = _heavy_after("train", "digits", "--epochs", "0", "--max-steps", "1")
    assert "torch" in heavy


@pytest.mark.parametrize(
    "argv",
    [
        ("study", "status", "--study", "digits_blocks"),
        ("study", "status", "--study", "missing"),
        ("study", "status", "--study", "x", "--dataset", "digits"),
        ("report", "--study", "digits_blocks"),
        ("report", "--study", "missing", "--tracking-uri", "sqlite:///other.db"),
    ],
)
def test_status_and_report_of_a_study_never_run_answer_from_the_file_system(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """No journal, no mlflow.db: the one-line answer comes before Optuna or MLflow is imported,
    and nothing is left behind."""
    assert _heavy_after(*argv, cwd=tmp_path) == ([], 2)
    assert list(tmp_path.iterdir()) == []


def test_a_started_study_s_status_still_asks_optuna(tmp_path: Path) -> None:
    journal = tmp_path / ".ddsweep" / "optuna" / "digits_blocks.journal"
    journal.parent.mkdir(parents=True)
    journal.touch()
    heavy, _ = _heavy_after("study", "status", "--study", "digits_blocks", cwd=tmp_path)
    assert "optuna" in heavy
