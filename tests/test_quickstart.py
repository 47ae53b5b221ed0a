"""The MLproject's `study` entry point (`ddsweep quickstart` itself, through the command, is in
test_readme_commands.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ddsweep import scheduler

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow  # `mlflow run` of a whole study: ~25 s idle; .ci/run runs it
def test_mlflow_run_study_entry_point(
    workdir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from ddsweep.cli import app

    # `mlflow run` runs the command in the project folder: keep every state folder here.
    for var, sub in [
        ("DDSWEEP_HOME", "home"),
        ("DDSWEEP_CACHE", "cache"),
        ("DDSWEEP_CHECKPOINTS", "checkpoints"),
    ]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the `ddsweep` console script of this environment, as an activated venv would give
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    train = ["train", "digits", "--channels", "32,32,32,32", "--epochs", "1", "--max-steps", "2"]
    result = CliRunner().invoke(app, [*train, "--sample-count", "0"])
    assert result.exit_code == 0, result.output
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "study", "--env-manager"]
    cmd += ["local", "-P", "study=digits_blocks", "-P", "block=up4", "-P", "probe=knn"]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(exps, "tags.`ddsweep.kind` = 'study'")
    kids = client.search_runs(exps, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # epochs 0 and 1 x up4 x noise steps 0 and 50 x knn (k = 10)
    assert len(kids) == 4
    assert {r.data.params["k"] for r in kids} == {"10"}
    assert parent.data.tags["mlflow.project.entryPoint"] == "study"  # the project's run
    assert scheduler.default_storage_path("digits_blocks").is_file()
    assert scheduler.default_storage_path("digits_blocks").is_relative_to(tmp_path)
