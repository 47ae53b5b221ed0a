"""`mlflow run .`: one environment file that every environment manager reads, and entry points
that keep ddsweep's state in the caller's folder, so a run of the project from a temporary copy
and a plain `ddsweep` run share one study."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.projects import _project_spec
from mlflow.tracking import MlflowClient
from mlflow.utils.environment import _PythonEnv
from typer.testing import CliRunner

from ddsweep import evaluate
from ddsweep.cli import app
from ddsweep.scheduler.storage import default_storage_path

ROOT = Path(__file__).resolve().parents[1]
STUDY = "mlproject_tiny"
MLFLOW_RUN = (sys.executable, "-m", "mlflow", "run")
GRID = 1 + 2  # pixels once, up4 at epochs 0 and 1


def test_one_environment_file_for_every_manager():
    """conda_env (python_env cannot run under conda); virtualenv and uv take python and the
    project itself from the same file, installed from a copy, so not editable."""
    project = _project_spec.load_project(str(ROOT))
    assert project.env_type == "conda_env"
    assert Path(project.env_config_path).name == "conda.yaml"
    spec = yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert "python=3.11" in spec["dependencies"]
    assert {"pip": ["."]} in spec["dependencies"]
    env = _PythonEnv.from_conda_yaml(project.env_config_path)  # what virtualenv and uv install
    assert env.python == "3.11"
    assert env.dependencies == ["."]
    assert not (ROOT / "python_env.yaml").exists()  # one file, not two that drift


def test_every_entry_point_works_in_the_callers_folder(tmp_path, monkeypatch):
    """`workdir` is a path parameter: MLflow makes "." absolute against the caller's folder."""
    project = _project_spec.load_project(str(ROOT))
    monkeypatch.chdir(tmp_path)
    for name, entry in project._entry_points.items():
        assert entry.parameters["workdir"].type == "path", name
        command = entry.compute_command({}, str(tmp_path / f"storage-{name}"))
        assert command.startswith(f"cd {tmp_path} && ddsweep "), command


@pytest.mark.skipif(shutil.which("conda") is not None, reason="would build the conda env")
def test_conda_manager_is_accepted(workdir):
    """Under --env-manager conda MLflow goes on to look for conda (absent here) instead of
    refusing the project, as it refuses a python_env project."""
    import mlflow.projects
    from mlflow.exceptions import ExecutionException, MlflowException

    with pytest.raises((ExecutionException, MlflowException)) as err:
        mlflow.projects.run(str(ROOT), "report", env_manager="conda", synchronous=True)
    assert "python_env" not in str(err.value)
    assert "conda" in str(err.value).lower()


def project_copy(folder: Path) -> Path:
    """The project as `mlflow run` of a git URI sees it: a copy of its files elsewhere."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "mlruns", "mlflow.db",
        ".ddsweep", "data", "reports", "tests", "benchmarks", "docs",
    )  # fmt: skip
    shutil.copytree(ROOT, folder, symlinks=True, ignore=ignore)
    return folder


def tiny_backbone() -> str:
    """A tiny digits U-Net (8 px) trained for one step by `ddsweep train`: checkpoints of epochs
    0 and 1; its run id."""
    tiny = ["--resolution", "8", "--channels", "32,32,64,64", "--epochs", "2", "--batch-size", "32"]
    once = [
        "--checkpoint-every",
        "1",
        "--max-steps",
        "1",
        "--sample-every",
        "0",
        "--sample-count",
        "0",
    ]
    done = CliRunner().invoke(app, ["train", "digits", *tiny, *once])
    assert done.exit_code == 0, done.output
    (run,) = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "params.dataset = 'digits'"
    )
    assert evaluate.saved_epochs(run.info.run_id) == [0, 1]
    return str(run.info.run_id)


def tiny_sweep(study: str, blocks: list[str], ks: list[int]) -> str:
    """A k-NN study of the tiny backbone."""
    axes = {"dataset": ["digits"], "resolution": [8], "attention": [True], "block": blocks}
    doc = {"study": study, "axes": {**axes, "probe": ["knn"], "k": ks}}
    return yaml.safe_dump(doc)


def finished_trials() -> list[Any]:
    """The study's FINISHED child runs (one per evaluated point)."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'FINISHED'", max_results=1000)
    return [r for r in runs if "block" in r.data.params and "mlflow.parentRunId" in r.data.tags]


@pytest.mark.slow  # 14 s on the idle 2-core CPU, 30+ s when busy: mlflow and ddsweep start anew
@pytest.mark.usefixtures("one_torch_thread")
def test_mlflow_run_from_a_copy_shares_the_study_with_a_plain_run(tmp_path, isolated_store):
    """`mlflow run COPY -e study --env-manager local`, called from the user's folder, keeps the
    Optuna journal in that folder: a plain `ddsweep study probe-grid` there finds the grid done."""
    home = tmp_path / "home"
    home.mkdir()
    copy = project_copy(tmp_path / "copy")
    with isolated_store(home) as uri:
        tiny_backbone()
        (home / "sweeps").mkdir()
        (home / "sweeps" / f"{STUDY}.yaml").write_text(tiny_sweep(STUDY, ["pixels", "up4"], [5]))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DDSWEEP_")}
        env["MLFLOW_TRACKING_URI"] = uri
        env["PYTHONPATH"] = str(ROOT)  # the `ddsweep` command runs this checkout's code
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        env["OMP_NUM_THREADS"] = "1"
        done = subprocess.run(
            [
                *MLFLOW_RUN,
                str(copy),
                "-e",
                "study",
                "--env-manager",
                "local",
                "-P",
                f"study={STUDY}",
            ],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert (home / default_storage_path(STUDY)).is_file()
        assert not (copy / ".ddsweep").exists()
        assert not (copy / "mlflow.db").exists()
        assert len(finished_trials()) == GRID

        again = CliRunner().invoke(app, ["study", "probe-grid", "--study", STUDY])
        assert again.exit_code == 0, again.output
        assert len(finished_trials()) == GRID  # nothing evaluated twice
