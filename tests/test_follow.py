"""`ddsweep study probe-grid --follow`: checkpoints probed as a training run writes them, each
exactly once, also when the follower is killed and started again; the follower ends with the
training. A tiny digits U-Net (8 px) on the real MLflow store and Optuna journal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ddsweep import backbones, scheduler, tracking
from ddsweep.cli import app
from ddsweep.config.model import ModelConfig
from ddsweep.config.train import TrainConfig
from ddsweep.tracking import runs
from ddsweep.tracking.schema import POINT_TAG, STUDY_TAG
from ddsweep.train import train

pytestmark = pytest.mark.usefixtures("workdir", "one_torch_thread")

STUDY = "fol"
BLOCKS = ("mid", "up4")
AXES = ["--dataset", "digits", "--resolution", "8", "--probe", "knn", "--k", "5"]
FAST = ["--heartbeat-interval", "1", "--grace-period", "3", "--follow-interval", "0.5"]


def tiny(epochs: int, **change: object) -> TrainConfig:
    return TrainConfig(
        dataset="digits",
        model=ModelConfig(resolution=8, channels=(32, 32, 64, 64)),
        epochs=epochs,
        batch_size=512,
        checkpoint_every=1,
        sample_every=0,
        sample_count=0,
        device="cpu",
        **change,  # type: ignore[arg-type]
    )


def follow_args(*extra: str) -> list[str]:
    blocks = [a for b in BLOCKS for a in ("--block", b)]
    return ["study", "probe-grid", "--study", STUDY, *AXES, *blocks, "--follow", *FAST, *extra]


def finished_children() -> Counter[str]:
    """FINISHED child runs of the study, counted per point."""
    found = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        f"tags.`{STUDY_TAG}` = '{STUDY}' and attributes.status = 'FINISHED'",
    )
    return Counter(r.data.tags[POINT_TAG] for r in found if POINT_TAG in r.data.tags)


def assert_every_checkpoint_once(run_id: str) -> None:
    epochs = runs.saved_epochs(run_id)
    expected = {
        f"dataset=digits&resolution=8&attention=true&epoch={e}&block={b}&probe=knn&k=5"
        for e in epochs
        for b in BLOCKS
    }
    done = finished_children()
    assert set(done) == expected
    assert set(done.values()) == {1}, done
    board = scheduler.open_study(STUDY, scheduler.Policy(None), "maximize", create=False)
    assert board is not None
    assert len(board.tally().complete) == len(expected)


# --- in-process: a training that has ended ------------------------------------------------------


def test_only_checkpoints_the_resume_state_vouches_for_are_ready(tmp_path: Path) -> None:
    tracking.setup()
    run_id = train(tiny(2, max_steps=1), data_dir=tmp_path / "data")  # saves epochs 0 and 1
    assert backbones.ready_epochs(run_id) == ((0, 1), True)
    # A checkpoint folder being uploaded (no resume state names it yet) is not ready.
    stray = tmp_path / "partial.json"
    stray.write_text("{}")
    runs.log_artifact(run_id, stray, "checkpoints/epoch_0009")
    assert runs.saved_epochs(run_id) == [0, 1, 9]
    assert backbones.ready_epochs(run_id) == ((0, 1), True)
    assert backbones.followed_run("digits", 8, True) == run_id


def test_follow_of_an_ended_training_does_every_checkpoint_once_then_ends(tmp_path: Path) -> None:
    tracking.setup()
    run_id = train(tiny(2, max_steps=1), data_dir=tmp_path / "data")
    first = CliRunner().invoke(app, follow_args())
    assert first.exit_code == 0, first.output
    assert_every_checkpoint_once(run_id)
    again = CliRunner().invoke(app, follow_args())
    assert again.exit_code == 0, again.output
    assert "already complete" in again.output
    assert_every_checkpoint_once(run_id)
    # An epoch asked for that the ended run never saved: the rest is done, then one line.
    missing = CliRunner().invoke(app, follow_args("--epoch", "0", "--epoch", "5"))
    assert missing.exit_code == 2, missing.output
    assert "ended without epochs 5" in missing.output
    assert_every_checkpoint_once(run_id)


# --- subprocesses: a follower started before the training ----------------------------------------


def start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """`python -m ddsweep ARGS` in the test's folder, output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ddsweep", *args], env=env, stdout=out, stderr=out
        )


def train_args(epochs: int) -> list[str]:
    return [
        "train", "digits", "--resolution", "8", "--channels", "32,32,64,64", "--epochs",
        str(epochs), "--checkpoint-every", "1", "--batch-size", "512", "--sample-every", "0",
        "--sample-count", "0", "--device", "cpu",
    ]  # fmt: skip


def wait(proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running after {timeout} s: {log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow  # two fresh Python processes importing torch, MLflow and Optuna
def test_a_follower_started_before_training_probes_each_checkpoint_once(tmp_path: Path) -> None:
    follower = start(*follow_args(), log=tmp_path / "follow.log")
    time.sleep(2)  # it is waiting for a training run when the training starts
    trainer = start(*train_args(3), log=tmp_path / "train.log")
    wait(trainer, tmp_path / "train.log")
    t_end = time.time()
    wait(follower, tmp_path / "follow.log")
    ended = time.time() - t_end
    (run,) = tracking.training_runs("digits", 8, True)
    assert_every_checkpoint_once(run.run_id)
    print(f"the follower ended {ended:.1f} s after the training")


@pytest.mark.slow
def test_a_killed_follower_started_again_loses_and_doubles_nothing(tmp_path: Path) -> None:
    victim = start(*follow_args(), log=tmp_path / "victim.log")
    trainer = start(*train_args(4), log=tmp_path / "train.log")
    deadline = time.time() + 300
    while sum(finished_children().values()) < 2:  # killed mid-way, checkpoints still coming
        assert time.time() < deadline and victim.poll() is None, (
            tmp_path / "victim.log"
        ).read_text()[-3000:]
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    follower = start(*follow_args(), log=tmp_path / "follow.log")
    wait(trainer, tmp_path / "train.log")
    wait(follower, tmp_path / "follow.log")
    (run,) = tracking.training_runs("digits", 8, True)
    assert_every_checkpoint_once(run.run_id)
