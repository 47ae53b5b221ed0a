"""Existing runs: which checkpoints a training run holds, copies of them, the run matching a
config, and the few values other commands add to a run afterwards (a sample grid, an FID)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from ddsweep import checkpoints
from ddsweep.errors import UserError
from ddsweep.tracking import training_entities


def saved_epochs(run_id: str) -> list[int]:
    """The checkpoint epochs a training run has logged, ascending."""
    from mlflow.tracking import MlflowClient

    files = MlflowClient().list_artifacts(run_id, checkpoints.CHECKPOINTS)
    out = []
    for f in files:
        name = f.path.rsplit("/", 1)[-1]
        if f.is_dir and name.startswith("epoch_") and name[6:].isdigit():
            out.append(int(name[6:]))
    return sorted(out)


def download(run_id: str, artifact_path: str, dst: Path) -> Path:
    """Copy the artifact folder (or file) `artifact_path` of run `run_id` under `dst`; its
    local path. Raises MLflow's own error when the run has no such artifact."""
    import mlflow

    got = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
    )
    return Path(got)


def download_checkpoint(run_id: str, epoch: int, dst: Path) -> Path:
    """Copy checkpoints/epoch_NNNN of training run `run_id` under `dst`; its local folder."""
    return download(run_id, checkpoints.epoch_dir(epoch), dst)


def matching_training_run(
    dataset: str,
    resolution: int,
    attention: bool,
    params: dict[str, str],
    optional: Mapping[str, str] = MappingProxyType({}),
) -> tuple[str, str] | None:
    """(run id, status) of the newest `ddsweep train` run for (dataset, resolution, attention)
    whose params include exactly `params` (any status but deleted), or None. A key of
    `optional` (with its value in `params`) may also be missing from the run."""
    for run in training_entities(dataset, resolution, attention):
        held = run.data.params
        if all(held.get(k) == v or (k not in held and k in optional) for k, v in params.items()):
            return str(run.info.run_id), str(run.info.status)
    return None


def log_artifact(run_id: str, path: Path, folder: str) -> None:
    """Add the local file `path` to run `run_id` under the artifact folder `folder`."""
    from mlflow.tracking import MlflowClient

    MlflowClient().log_artifact(run_id, str(path), folder)


def log_metric(run_id: str, key: str, value: float, step: int) -> None:
    """Add one metric value at `step` to run `run_id` (e.g. an FID at its epoch)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().log_metric(run_id, key, value, step=step)


def training_params(run_id: str) -> dict[str, str]:
    """The params (the recorded config) of `ddsweep train` run `run_id`; UserError for any
    other run, which cannot be resumed."""
    from ddsweep.tracking import run_entity
    from ddsweep.tracking.schema import KIND_TAG, TRAIN_KIND

    run = run_entity(run_id)
    if run.data.tags.get(KIND_TAG) != TRAIN_KIND:
        raise UserError(f"run {run_id} is not a `ddsweep train` run and cannot be resumed")
    return dict(run.data.params)
