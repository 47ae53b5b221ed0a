"""`ddsweep train` end to end through the CLI: what one run records in MLflow, resuming a run
killed with SIGKILL, and the one-line errors (exit 2, no run) for every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import mlflow
import pytest
import torch
from diffusers import UNet2DModel
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner, Result

from ddsweep import __version__, checkpoints, tracking
from ddsweep.cli import app

IsolatedStore = Callable[[Path], AbstractContextManager[str]]  # conftest's isolated_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A 3-level, 32-wide U-Net at 8 px: the digits run takes seconds on one CPU thread.
TINY = ["--resolution", "8", "--channels", "32,32,32", "--device", "cpu"]
DIGITS_TRAIN_IMAGES = 1437  # the 80 % split of scikit-learn's 1,797 digits
BATCH = 64
EPOCHS = 3
STEPS_PER_EPOCH = DIGITS_TRAIN_IMAGES // BATCH  # drop_last: 22 steps an epoch
STEPS = EPOCHS * STEPS_PER_EPOCH
LR = 1e-3  # high enough that ~60 steps visibly lower the loss
# The `trained` fixture's run, which the resume test repeats with a kill in the middle.
TRAIN_ARGS = ["train", "digits", "--epochs", str(EPOCHS), "--checkpoint-every", "1"]
TRAIN_ARGS += ["--batch-size", str(BATCH), "--lr", str(LR), *TINY]


@dataclass(frozen=True)
class Trained:
    uri: str
    run: Run
    output: str
    folder: Path

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def download(self, artifact_path: str) -> Path:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=self.run.info.run_id,
                artifact_path=artifact_path,
                dst_path=str(self.folder / "downloads"),
                tracking_uri=self.uri,
            )
        )


def runs(client: MlflowClient | None = None) -> list[Run]:
    client = client or MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, isolated_store: IsolatedStore, one_torch_thread: None
) -> Trained:
    """One `ddsweep train digits` run of 3 epochs with a checkpoint after each."""
    folder = tmp_path_factory.mktemp("cli-train")
    with isolated_store(folder) as uri:
        result = CliRunner().invoke(app, TRAIN_ARGS)
        assert result.exit_code == 0, result.output
        (run,) = runs()
    return Trained(uri, run, result.output, folder)


def test_train_leaves_one_finished_run_with_its_config_as_params(trained: Trained) -> None:
    run = trained.run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "digits-8px-attn"
    assert f"training run {run.info.run_id} finished" in trained.output
    params = run.data.params
    assert params["dataset"] == "digits"
    assert params["epochs"] == str(EPOCHS)
    assert float(params["lr"]) == LR
    assert params["channels"] == "32,32,32"
    assert params["resolution"] == "8"
    assert params["attention"] == "True"
    assert params["batch_size"] == str(BATCH)
    assert params["seed"] == "0"
    assert params["checkpoint_every"] == "1"


def test_train_tags_the_run_for_finding_it_again(trained: Trained) -> None:
    tags = trained.run.data.tags
    assert tags[tracking.KIND_TAG] == "train"
    assert tags["dataset"] == "digits"
    assert tags["resolution"] == "8"
    assert tags["attention"] == "True"
    assert tags["code_version"].startswith(__version__)
    assert tags["train_images"] == str(DIGITS_TRAIN_IMAGES)
    assert tags["last_epoch"] == str(EPOCHS)


def test_loss_is_logged_once_per_step_and_epoch_loss_once_per_epoch(trained: Trained) -> None:
    loss = trained.client.get_metric_history(trained.run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    epoch_loss = trained.client.get_metric_history(trained.run.info.run_id, "epoch_loss")
    assert sorted(m.step for m in epoch_loss) == list(range(1, EPOCHS + 1))
    assert all(0 < m.value < 2 for m in loss + epoch_loss)


def test_the_loss_goes_down(trained: Trained) -> None:
    history = trained.client.get_metric_history(trained.run.info.run_id, "loss")
    loss = [m.value for m in sorted(history, key=lambda m: m.step)]
    # An untrained net predicts noise of variance 1 poorly; 66 AdamW steps at lr 1e-3 cut the
    # error by far more than the batch-to-batch scatter of random noise steps.
    first, last = mean(loss[:5]), mean(loss[-10:])
    assert last < 0.5 * first, (first, last)
    epoch_loss = trained.client.get_metric_history(trained.run.info.run_id, "epoch_loss")
    by_epoch = [m.value for m in sorted(epoch_loss, key=lambda m: m.step)]
    assert by_epoch[-1] < by_epoch[0]


def test_a_sample_grid_is_logged(trained: Trained) -> None:
    images = trained.client.list_artifacts(trained.run.info.run_id, "images")
    pngs = [a.path for a in images if a.path.endswith(".png") and "samples" in a.path]
    assert pngs, [a.path for a in images]
    grid = Image.open(trained.download(pngs[0]))
    # 16 samples of 8 px in a 4x4 grid with 2 px padding (42 px), upscaled by a whole factor
    # to at least SAMPLE_MIN_PX a side so it reads in `mlflow ui`.
    from ddsweep.tracking.training import SAMPLE_MIN_PX

    side = 4 * 10 + 2
    factor = -(-SAMPLE_MIN_PX // side)
    assert grid.size == (side * factor, side * factor)
    assert grid.mode == "RGB"


def test_every_epoch_has_a_checkpoint_that_diffusers_loads(trained: Trained) -> None:
    listed = trained.client.list_artifacts(trained.run.info.run_id, checkpoints.CHECKPOINTS)
    expected = [checkpoints.epoch_dir(e) for e in range(EPOCHS + 1)]
    assert sorted(a.path for a in listed) == expected
    weights = {}
    for epoch in (0, EPOCHS):
        folder = trained.download(checkpoints.epoch_dir(epoch))
        ema = UNet2DModel.from_pretrained(folder)
        # Not subfolder="raw": diffusers then finds the top-level (EMA) weights file first.
        raw = UNet2DModel.from_pretrained(folder / checkpoints.RAW)
        assert tuple(ema.config.block_out_channels) == (32, 32, 32)
        assert ema.config.sample_size == 8
        assert checkpoints.read_meta(folder)["epoch"] == epoch
        assert checkpoints.read_meta(folder)["step"] == (0 if epoch == 0 else STEPS)
        weights[epoch] = (ema.state_dict(), raw.state_dict())
    (ema0, raw0), (ema3, raw3) = weights[0], weights[EPOCHS]
    assert all(torch.equal(ema0[k], raw0[k]) for k in ema0)  # untrained: EMA is the net
    assert not all(torch.equal(raw0[k], raw3[k]) for k in raw0)  # training moved the weights
    assert not all(torch.equal(ema0[k], ema3[k]) for k in ema0)
    assert not all(torch.equal(ema3[k], raw3[k]) for k in ema3)  # EMA lags the raw weights
    # The latest epoch also carries what resume needs.
    state = json.loads((trained.download(checkpoints.RESUME) / "state.json").read_text())
    assert state == {"epoch": EPOCHS, "step": STEPS, "ema_step": STEPS}


# --- resume after SIGKILL -------------------------------------------------------------------


def resume_state(folder: Path) -> dict[str, int] | None:
    """The resume/state.json of the only run under folder/mlruns."""
    for path in folder.glob("mlruns/*/*/artifacts/resume/state.json"):
        return dict(json.loads(path.read_text()))
    return None


# `python -c KILL_AT_STEP N ARGS...` runs `ddsweep ARGS...` and SIGKILLs itself (no clean-up
# runs) just before training step N: a fixed point in the middle of an epoch, however fast or
# loaded the machine is.
KILL_AT_STEP = r"""
import os, signal, sys
from ddsweep import cli, train
stop, real, steps = int(sys.argv.pop(1)), train.batch_step, [0]
def batch_step(job, x0):
    steps[0] += 1
    if steps[0] == stop:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(job, x0)
train.batch_step = batch_step
cli.main()
"""


def final_weights(uri: str, run_id: str, dst: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA and raw weights of the run's last checkpoint (epoch EPOCHS)."""
    folder = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=checkpoints.epoch_dir(EPOCHS),
            dst_path=str(dst),
            tracking_uri=uri,
        )
    )
    ema = UNet2DModel.from_pretrained(folder).state_dict()
    return {"ema": ema, "raw": UNet2DModel.from_pretrained(folder / checkpoints.RAW).state_dict()}


def epoch_losses(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "epoch_loss"))


@pytest.mark.slow  # two trainings and a kill: ~15 s idle; .ci/run runs it
def test_a_training_killed_mid_epoch_resumes_in_the_same_run_to_the_same_weights(
    trained: Trained, workdir: str, tmp_path: Path
) -> None:
    kill_at = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2 + 1  # half way through epoch 2 of 3
    cmd = [sys.executable, "-c", KILL_AT_STEP, str(kill_at), *TRAIN_ARGS]
    # One thread, as the `trained` run had: the same arithmetic, bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert killed_proc.returncode == -signal.SIGKILL, killed_proc.stderr[-2000:]

    (killed,) = runs()
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"  # nobody ended it
    state = resume_state(tmp_path)
    assert state == {"epoch": 1, "step": STEPS_PER_EPOCH, "ema_step": STEPS_PER_EPOCH}
    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert max(logged) < kill_at  # it died before step kill_at, mid-epoch 2

    resumed_at = int(time.time() * 1000)
    result = CliRunner().invoke(app, ["train", "--resume", run_id])
    assert result.exit_code == 0, result.output

    (run,) = runs()  # the same run, no new one
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["last_epoch"] == str(EPOCHS)
    history = client.get_metric_history(run_id, "loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))
    # The resumed process counts on from the checkpoint's step, not from 1. (Steps the killed
    # process logged after that checkpoint are logged again, as they are trained again.)
    after = sorted(m.step for m in history if m.timestamp >= resumed_at)
    assert after == list(range(STEPS_PER_EPOCH + 1, STEPS + 1))
    listed = client.list_artifacts(run_id, checkpoints.CHECKPOINTS)
    assert sorted(a.path for a in listed) == [checkpoints.epoch_dir(e) for e in range(EPOCHS + 1)]
    # What the uninterrupted run reached: the same epoch losses and the same weights, exactly.
    original = trained.run.info.run_id
    assert epoch_losses(client, run_id) == epoch_losses(trained.client, original)
    resumed = final_weights(workdir, run_id, tmp_path / "resumed")
    uninterrupted = final_weights(trained.uri, original, tmp_path / "uninterrupted")
    for kind in ("raw", "ema"):
        assert resumed[kind].keys() == uninterrupted[kind].keys()
        assert all(torch.equal(resumed[kind][k], uninterrupted[kind][k]) for k in resumed[kind])


# --- errors a user can make -----------------------------------------------------------------

BAD_INPUTS = {
    "unknown-dataset": (["train", "mnist"], "unknown dataset 'mnist'"),
    "resolution-30": (["train", "digits", "--resolution", "30"], "--resolution 30"),
    "epochs-0": (["train", "digits", "--epochs", "0"], "--epochs"),
    "epochs-negative": (["train", "digits", "--epochs", "-1"], "--epochs"),
    "batch-size-0": (["train", "digits", "--batch-size", "0"], "--batch-size"),
    "channels-not-numbers": (["train", "digits", "--channels", "a,b"], "--channels 'a,b'"),
    "channels-not-32s": (["train", "digits", "--channels", "32,48"], "multiple of 32"),
    "unknown-resume": (
        ["train", "--resume", "0123456789abcdef0123456789abcdef"],
        "no MLflow run '0123456789abcdef0123456789abcdef'",
    ),
    "no-dataset": (["train"], "missing DATASET"),
    "bad-flag": (["train", "digits", "--no-such-flag"], "--no-such-flag"),
    "bad-int": (["train", "digits", "--epochs", "many"], "Invalid value for '--epochs'"),
    "unknown-device": (["train", "digits", "--device", "tpu"], "--device"),
}


def assert_one_line_error(result: Result, *words: str) -> None:
    # typer's CliRunner (typer vendors click) keeps stdout and stderr apart; output mixes both.
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("ddsweep: error: "), result.output
    assert result.stderr.strip() == lines[0]  # on stderr, nothing on stdout
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(("args", "words"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2_and_no_run(workdir: str, args: list[str], words: str) -> None:
    result = CliRunner().invoke(app, args)
    assert_one_line_error(result, words)
    assert runs() == []


def test_unknown_dataset_lists_the_known_ones(workdir: str) -> None:
    result = CliRunner().invoke(app, ["train", "mnist"])
    assert_one_line_error(result, "cifar10", "stl10", "flowers102", "digits", "folder:PATH")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_no_run(workdir: str) -> None:
    result = CliRunner().invoke(app, ["train", "digits", "--device", "cuda", *TINY[:4]])
    assert_one_line_error(result, "no CUDA device")
    assert runs() == []


def test_only_training_runs_can_be_resumed_and_nothing_changes(workdir: str) -> None:
    client = MlflowClient()
    exp = tracking.setup()
    other = client.create_run(exp, tags={tracking.KIND_TAG: "probe"})
    client.set_terminated(other.info.run_id)
    before = client.get_run(other.info.run_id)
    result = CliRunner().invoke(app, ["train", "--resume", other.info.run_id])
    assert_one_line_error(result, "not a `ddsweep train` run")
    after = client.get_run(other.info.run_id)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert after.data.tags == before.data.tags
    assert len(runs()) == 1


def test_resume_with_another_dataset_is_refused(workdir: str) -> None:
    client = MlflowClient()
    exp = tracking.setup()
    tags = {tracking.KIND_TAG: "train", "dataset": "digits"}
    run = client.create_run(exp, tags=tags)
    client.log_param(run.info.run_id, "dataset", "digits")
    result = CliRunner().invoke(app, ["train", "cifar10", "--resume", run.info.run_id])
    assert_one_line_error(result, "trains digits, not cifar10")
    assert client.get_metric_history(run.info.run_id, "loss") == []
