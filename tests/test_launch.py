"""Workers as a submitit job array: a tiny digits study end to end on submitit's local executor
(real job processes, real MLflow store and Optuna journal), and the preemption path of a job."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ddsweep import launch, scheduler
from ddsweep.cli import app
from ddsweep.config.run import Launch
from ddsweep.errors import UserError

PIX = ["--dataset", "digits", "--resolution", "8", "--block", "pixels", "--probe", "knn"]


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.mark.slow  # two job processes import torch, MLflow and Optuna (about a minute here)
def test_a_job_array_on_submitits_local_executor_runs_the_grid_once(workdir: str) -> None:
    result = cli(
        "study", "probe-grid", "--study", "arr", *PIX, "--k", "3", "--k", "5", "--k", "7",
        "--launcher", "local-submitit", "--workers", "2", "--gpus-per-worker", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 workers submitted as job array" in result.stdout
    assert "3/3 points complete (3 evaluated now" in result.stdout
    client = MlflowClient()
    exp = client.get_experiment_by_name("ddsweep")
    assert exp is not None
    children = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    trials = [r for r in children if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 3 and {r.data.tags["device"] for r in trials} == {"cpu"}
    points = Counter(r.data.tags["ddsweep.point"] for r in trials)
    assert set(points.values()) == {1}  # every point once, by whichever job took it
    board = scheduler.open_study("arr", scheduler.Policy(), "maximize", create=False)
    assert board is not None
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "arr"]
    assert parent and parent[0].info.status == "FINISHED"
    assert len(list(launch.submitit_folder("arr").glob("*/*_result.pkl"))) == 2


def test_a_preempted_job_ends_its_trial_as_interrupted_then_asks_submitit_to_requeue(
    tmp_path: Path,
) -> None:
    requeued: list[int] = []
    saved = signal.signal(signal.SIGUSR2, lambda signum, _frame: requeued.append(signum))
    interrupted: list[str] = []

    def body() -> Counter[str]:
        try:
            os.kill(os.getpid(), signal.SIGUSR2)  # Slurm's preemption warning, via submitit
            signal.pause()
        except KeyboardInterrupt:  # what the scheduler catches: trial FAIL, interrupted
            interrupted.append("trial")
            raise
        return Counter()

    try:
        job = launch.Job(str(tmp_path), [(body, ())])
        with pytest.raises(KeyboardInterrupt):
            job(0)
    finally:
        signal.signal(signal.SIGUSR2, saved)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert interrupted == ["trial"] and requeued == [signal.SIGUSR2]
    assert Path.cwd() == tmp_path
    again = job.checkpoint(0)  # what submitit resubmits: the same task
    assert again.function is job and again.args == (0,)


def test_launch_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad, match in (
        (Launch(launcher="pbs"), "unknown --launcher 'pbs'"),
        (Launch(timeout_min=0), "--timeout-min positive"),
        (Launch(gpus_per_worker=-1), "--gpus-per-worker"),
    ):
        with pytest.raises(UserError, match=match):
            launch.check_launch(bad)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="sbatch is not on this machine's PATH"):
        launch.check_launch(Launch(launcher="slurm"))
