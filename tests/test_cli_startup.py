"""A CLI that starts in a second: help, the version and every argument error answer without
importing torch, MLflow, Optuna, diffusers or torchvision (checked in `sys.modules` of a fresh
process after the command has answered)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlflow", "optuna", "diffusers", "torchvision")
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


def _heavy_after(*argv: str) -> tuple[list[str], object]:
    out = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{_RUN}", *argv],
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
