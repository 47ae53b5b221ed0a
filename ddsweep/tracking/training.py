"""The record of one training run: every MLflow call `train.train` makes goes through a
`TrainingTracker`; the non-main processes of a torchrun job get a `NullTracker` instead. Also
MLflow's system metrics for training runs, and a finished run's last checkpoint registered as a
model version."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ddsweep import checkpoints
from ddsweep.errors import UserError
from ddsweep.tracking import DataInput, log_inputs, runs

if TYPE_CHECKING:
    import numpy as np


class Tracker(Protocol):
    """What `train.train` records, and the resume state it reads back."""

    # False: nothing logged is kept, so train skips making checkpoints, grids and FIDs.
    records: bool

    def start(self, name: str | None, resume_run_id: str | None = None) -> str: ...
    def log_config(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None: ...
    def log_inputs(self, inputs: list[DataInput]) -> None: ...
    def log_loss(self, step: int, loss: float) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_samples(self, grid: np.ndarray, epoch: int) -> None: ...
    def log_checkpoint(self, folder: Path, epoch: int) -> None: ...
    def log_resume_state(self, folder: Path) -> None: ...
    def finish(self, last_epoch: int) -> None: ...
    def fail(self) -> None: ...
    def download_resume_state(self, run_id: str, dst: Path) -> Path: ...
    def download_checkpoint(self, run_id: str, epoch: int, dst: Path) -> Path: ...


def download_resume_state(run_id: str, dst: Path) -> Path:
    """The resume/ folder of training run `run_id`, copied under `dst`."""
    try:
        return runs.download(run_id, checkpoints.RESUME, dst)
    except Exception as err:
        raise UserError(
            f"run {run_id} has no resume state (artifact {checkpoints.RESUME}/): "
            "only runs started by `ddsweep train` can be resumed"
        ) from err


def download_resumed_checkpoint(run_id: str, epoch: int, dst: Path) -> Path:
    """The checkpoint of `epoch` that the resume state of run `run_id` names, under `dst`."""
    try:
        return runs.download_checkpoint(run_id, epoch, dst)
    except Exception as err:
        raise UserError(
            f"run {run_id} has resume state for epoch {epoch} but no "
            f"{checkpoints.epoch_dir(epoch)}/ artifact to resume from"
        ) from err


SAMPLE_MIN_PX = 256  # a sample grid's smaller side in `mlflow ui`, at least


def upscaled(grid: np.ndarray, at_least: int = SAMPLE_MIN_PX) -> np.ndarray:
    """An HxWx3 grid enlarged by a whole factor (nearest neighbour: each pixel a square) until
    its smaller side is at least `at_least` pixels; digits' 4x4 grid of 16 px is 64 px."""
    import numpy as np

    factor = -(-at_least // max(1, min(grid.shape[:2])))
    if factor <= 1:
        return grid
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def training_description(params: Mapping[str, str], last_epoch: int, loss: float | None) -> str:
    """A training run's description in `mlflow ui`: dataset, architecture, epochs, final loss."""
    p = params.get
    attention = {"True": "attention", "False": "no attention"}.get(str(p("attention")), "")
    arch = ", ".join(
        x
        for x in (
            f"{p('resolution')} px" if p("resolution") else "",
            f"channels {p('channels')}" if p("channels") else "",
            attention,
        )
        if x
    )
    head = f"**{p('dataset', '?')}** backbone ({arch})" if arch else f"**{p('dataset', '?')}**"
    final = "" if loss is None else f"; final epoch loss {loss:.4f}"
    return f"{head}: {last_epoch} of {p('epochs', '?')} epochs trained{final}"


# How often a trainer tells its run it lives (the scheduler's trials beat as often); a follower
# judges it dead once the count has not moved for its --grace-period.
TRAINER_BEAT_S = 10.0


class TrainerBeat:
    """A thread that moves the training run's HEARTBEAT_TAG every `interval` seconds while the
    trainer lives: a count, not a time, so a follower on another machine judges it on its own
    clock (as the scheduler's Liveness does trials). A SIGKILL, a lost machine or a run left
    RUNNING stops the count."""

    def __init__(self, run_id: str, interval: float = TRAINER_BEAT_S) -> None:
        import threading

        self.run_id, self.interval = run_id, interval
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def beat(self) -> None:
        from mlflow.tracking import MlflowClient

        from ddsweep.tracking.schema import HEARTBEAT_TAG

        self.beats += 1
        try:
            MlflowClient().set_tag(self.run_id, HEARTBEAT_TAG, str(self.beats))
        except Exception:  # a busy or lost store: the next beat tries again
            return

    def start(self) -> TrainerBeat:
        self.beat()  # at once: a follower never waits a whole interval for the first
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


class TrainingTracker:
    """One MLflow run per training: config as params, tags to find it again, the loss of every
    step (sent `log_every` at a time), epoch metrics, sample grids, checkpoints, resume state."""

    records = True

    def __init__(self, log_every: int = 10) -> None:
        self.log_every = log_every
        self.run_id = ""
        self._pending: list[Any] = []  # mlflow Metric rows not yet sent
        self._params: dict[str, str] = {}
        self._loss: float | None = None  # the last epoch's loss, for the description
        self._beat: TrainerBeat | None = None

    def start(self, name: str | None, resume_run_id: str | None = None) -> str:
        """Start run `name` (or continue `resume_run_id`) as MLflow's active run; its id.
        Under `mlflow run` a new run is the project's own run (MLFLOW_RUN_ID)."""
        import mlflow

        from ddsweep.tracking import context_tags, project_run_id

        # A new run gets what start_run would give it, plus ddsweep's git commit when the
        # command's main file (a console script) is in no checkout.
        new = resume_run_id is None and project_run_id() is None
        run = mlflow.start_run(
            run_id=resume_run_id, run_name=name, tags=context_tags() if new else None
        )
        self.run_id = str(run.info.run_id)
        self._beat = TrainerBeat(self.run_id).start()
        return self.run_id

    def log_config(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        """What makes the run reproducible (params) and what finds it again (tags)."""
        import mlflow

        mlflow.log_params(dict(params))
        mlflow.set_tags(dict(tags))
        self._params = dict(params)

    def log_inputs(self, inputs: list[DataInput]) -> None:
        """The datasets the run trains on (see `tracking.log_inputs`)."""
        log_inputs(self.run_id, inputs)

    def log_loss(self, step: int, loss: float) -> None:
        """The loss of one optimizer step; sent in batches, one request per `log_every`."""
        from mlflow.entities import Metric

        self._pending.append(Metric("loss", loss, int(time.time() * 1000), step))
        if len(self._pending) >= self.log_every:
            self._flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics at `step` (the epoch for epoch_loss, images_per_s, FIDs); losses first."""
        import mlflow

        self._flush()
        mlflow.log_metrics(dict(metrics), step=step)
        if "epoch_loss" in metrics:
            self._loss = float(metrics["epoch_loss"])

    def log_samples(self, grid: np.ndarray, epoch: int) -> None:
        """An HxWx3 uint8 sample grid, as the `samples` image series at `epoch`."""
        import mlflow

        mlflow.log_image(upscaled(grid), key="samples", step=epoch)

    def log_checkpoint(self, folder: Path, epoch: int) -> None:
        """The checkpoint folder of `epoch`, as checkpoints/epoch_NNNN."""
        import mlflow

        mlflow.log_artifacts(str(folder), checkpoints.epoch_dir(epoch))

    def log_resume_state(self, folder: Path) -> None:
        """The resume/ folder, its state file last: once resume/state.json names an epoch,
        that epoch's checkpoint, optimizer and RNG files are complete, even if the process is
        killed while logging (so log the checkpoint before this)."""
        import mlflow

        for path in sorted(folder.iterdir(), key=lambda p: p.name == checkpoints.STATE):
            mlflow.log_artifact(str(path), checkpoints.RESUME)

    def finish(self, last_epoch: int) -> None:
        """Tag the last epoch trained and end the run as FINISHED."""
        import mlflow

        self._flush()
        mlflow.set_tag("last_epoch", str(last_epoch))
        note = training_description(self._params, last_epoch, self._loss)
        mlflow.set_tag("mlflow.note.content", note)
        self._end("FINISHED")

    def fail(self) -> None:
        """End the run as FAILED (training raised); losses already sent stay."""
        self._end("FAILED")

    def download_resume_state(self, run_id: str, dst: Path) -> Path:
        """The resume/ folder of run `run_id` under `dst`; UserError when it has none."""
        return download_resume_state(run_id, dst)

    def download_checkpoint(self, run_id: str, epoch: int, dst: Path) -> Path:
        """The checkpoint of `epoch` of run `run_id` under `dst`; UserError when missing."""
        return download_resumed_checkpoint(run_id, epoch, dst)

    def _flush(self) -> None:
        if self._pending:
            from mlflow.tracking import MlflowClient

            MlflowClient().log_batch(self.run_id, metrics=self._pending)
            self._pending = []

    def _end(self, status: str) -> None:
        import mlflow

        if self._beat is not None:
            self._beat.stop()
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)


class NullTracker:
    """Records nothing: the tracker of torchrun's non-main processes (rank 0 records the
    run), or of a training nobody wants in MLflow. It still reads the resume state, which
    every process must load to resume the same weights."""

    records = False

    def start(self, name: str | None, resume_run_id: str | None = None) -> str:
        """No run: ""."""
        return ""

    def log_config(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        """Nothing."""

    def log_inputs(self, inputs: list[DataInput]) -> None:
        """Nothing."""

    def log_loss(self, step: int, loss: float) -> None:
        """Nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Nothing."""

    def log_samples(self, grid: np.ndarray, epoch: int) -> None:
        """Nothing."""

    def log_checkpoint(self, folder: Path, epoch: int) -> None:
        """Nothing."""

    def log_resume_state(self, folder: Path) -> None:
        """Nothing."""

    def finish(self, last_epoch: int) -> None:
        """Nothing."""

    def fail(self) -> None:
        """Nothing."""

    def download_resume_state(self, run_id: str, dst: Path) -> Path:
        """The resume/ folder of run `run_id` under `dst`, as rank 0 reads it."""
        return download_resume_state(run_id, dst)

    def download_checkpoint(self, run_id: str, epoch: int, dst: Path) -> Path:
        """The checkpoint of `epoch` of run `run_id` under `dst`, as rank 0 reads it."""
        return download_resumed_checkpoint(run_id, epoch, dst)


def enable_system_metrics() -> None:
    """Record MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) on the
    training runs this process starts; UserError when psutil, which MLflow reads them with, is
    missing."""
    import importlib.util
    import logging

    import mlflow

    if importlib.util.find_spec("psutil") is None:
        raise UserError(
            "--system-metrics needs psutil: `pip install 'ddsweep[system]'` (or psutil)"
        )
    mlflow.enable_system_metrics_logging()
    # Its INFO lines (started, stopping, terminated) would land among the progress bar's.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


LOADER = """The EMA weights of {run} at epoch {epoch}, a diffusers folder (safetensors):

    import mlflow
    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained(mlflow.artifacts.download_artifacts("{uri}"))

`raw/` holds the raw (non-EMA) weights, `ddsweep.json` the training config."""


def check_model_name(name: str) -> None:
    """UserError for a name MLflow's model registry refuses (empty, '/' or ':'), before any
    training: a typo must not surface only when a long run ends."""
    if not name.strip() or "/" in name or ":" in name:
        raise UserError(f"--register {name!r}: a model name is not empty and has no '/' or ':'")


def register_backbone(run_id: str, name: str) -> tuple[str, int]:
    """Register the last checkpoint of finished training run `run_id` as a new version of
    model `name` in MLflow's model registry: the checkpoint's files as they are (a diffusers
    folder, nothing pickled), loaded with `UNet2DModel.from_pretrained` on the folder that
    `mlflow.artifacts.download_artifacts("models:/NAME/VERSION")` returns. (models:/ URI,
    epoch)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    epoch = int(client.get_run(run_id).data.tags["last_epoch"])
    try:
        client.create_registered_model(
            name, description="ddsweep backbones: diffusers UNet2DModel folders (safetensors)"
        )
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise UserError(f"--register {name!r}: {err.message}") from err
    source = f"runs:/{run_id}/{checkpoints.epoch_dir(epoch)}"
    version = client.create_model_version(
        name, source, run_id=run_id, tags={"epoch": str(epoch), "weights": "ema"}
    )
    uri = f"models:/{name}/{version.version}"
    client.update_model_version(
        name, version.version, LOADER.format(run=run_id, epoch=epoch, uri=uri)
    )
    return uri, epoch
