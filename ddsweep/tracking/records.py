"""ddsweep's own records of what MLflow holds: frozen, typed, read once at the tracking edge,
so no other room reads an MLflow run's tags or params by string."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddsweep.tracking.schema import (
    ATTENTION_TAG,
    DATASET_TAG,
    DONE_TAG,
    GRID_TAG,
    HEARTBEAT_TAG,
    KIND_TAG,
    POINT_TAG,
    RESOLUTION_TAG,
    STOP_TAG,
    STUDY_TAG,
    TRAIN_KIND,
    TRIAL_TAG,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

LIVE = ("RUNNING", "SCHEDULED")  # MLflow statuses of a run that may still write


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class TrainingRun:
    """A `ddsweep train` run (or any run asked for as one: `is_training` says)."""

    run_id: str
    status: str  # MLflow's: RUNNING, FINISHED, FAILED, ...
    is_training: bool
    dataset: str | None
    resolution: int | None
    attention: bool | None
    stop_reason: str | None = None
    heartbeat: str | None = None  # a count its trainer moves while it lives (None: never)

    @property
    def live(self) -> bool:
        """Whether the run may still write checkpoints."""
        return self.status in LIVE


@dataclass(frozen=True)
class TrialRun:
    """A study's child run: one point."""

    run_id: str
    status: str
    study: str | None
    point_id: str | None
    trial: int | None
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class StudyParent:
    """A study's parent run."""

    run_id: str
    study: str | None
    points_complete: int | None
    grid_points: int | None


def training_run(run: Run) -> TrainingRun:
    tags = run.data.tags
    attention = tags.get(ATTENTION_TAG)
    return TrainingRun(
        run_id=str(run.info.run_id),
        status=str(run.info.status),
        is_training=tags.get(KIND_TAG) == TRAIN_KIND,
        dataset=tags.get(DATASET_TAG),
        resolution=_int(tags.get(RESOLUTION_TAG)),
        attention=None if attention is None else attention == "True",
        stop_reason=tags.get(STOP_TAG),
        heartbeat=tags.get(HEARTBEAT_TAG),
    )


def trial_run(run: Run) -> TrialRun:
    tags = run.data.tags
    return TrialRun(
        run_id=str(run.info.run_id),
        status=str(run.info.status),
        study=tags.get(STUDY_TAG),
        point_id=tags.get(POINT_TAG),
        trial=_int(tags.get(TRIAL_TAG)),
        metrics=dict(run.data.metrics),
    )


def study_parent(run: Run) -> StudyParent:
    tags = run.data.tags
    return StudyParent(
        run_id=str(run.info.run_id),
        study=tags.get(STUDY_TAG),
        points_complete=_int(tags.get(DONE_TAG)),
        grid_points=_int(tags.get(GRID_TAG)),
    )
