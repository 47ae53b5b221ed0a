"""Every MLflow call of a study: its parent run, one child run per evaluated point (with the
point's real start and end), adoption of a child logged by a worker that died before telling
Optuna, failure runs, and closing the parent when the grid is complete.

The client API with explicit run ids throughout: workers are threads and processes, and the
fluent API's active-run stack is neither.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ddsweep import predictions
from ddsweep.tracking import KIND_TAG, code_version, project_run_id

if TYPE_CHECKING:
    from ddsweep.objectives import Record

STUDY_TAG = "ddsweep.study"
POINT_TAG = "ddsweep.point"
TRIAL_TAG = "optuna.trial_number"
GRID_TAG = "ddsweep.grid_points"  # on the parent: points of the grid last run
DONE_TAG = "ddsweep.points_complete"  # on the parent: how many of them are complete
MAX_PARAM = 6000  # MLflow's limit on a param value


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class StudyRecorder:
    """The MLflow side of one study in one experiment."""

    def __init__(self, experiment_id: str, study: str) -> None:
        self.experiment_id, self.study = experiment_id, study
        self.client = MlflowClient()
        self.parent_id = ""

    # --- the parent run
    def _oldest_parent(self) -> str | None:
        query = f"tags.`{KIND_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{self.study}'"
        found = self.client.search_runs(
            [self.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=5
        )
        runs = sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))
        return str(runs[0].info.run_id) if runs else None

    def open_parent(
        self, tags: Mapping[str, str], params: Mapping[str, str], *, wait_s: float = 0.0
    ) -> str:
        """The study's parent run, created once and found again on every re-run.

        Workers started together would each create one: a worker that did not create the
        Optuna study (exactly one does) waits up to `wait_s` for the creator's parent run first.
        Without the wait, a worker whose create_run was held up by the database lock could keep
        its own run after another had kept its own too, and children would split between two
        parents.
        """
        found = self._oldest_parent()
        deadline = time.monotonic() + wait_s
        while found is None and time.monotonic() < deadline:
            time.sleep(0.2)
            found = self._oldest_parent()
        if found is None:
            all_tags = {KIND_TAG: "study", STUDY_TAG: self.study, "code_version": code_version()}
            run = self.client.create_run(
                self.experiment_id, tags={**all_tags, **tags}, run_name=self.study
            )
            self.client.log_batch(
                run.info.run_id, params=[Param(k, v[:MAX_PARAM]) for k, v in params.items()]
            )
            found = self._oldest_parent()
            if found and found != run.info.run_id:  # two workers raced: keep the oldest only
                self.client.delete_run(run.info.run_id)
            found = found or run.info.run_id
        self.parent_id = found
        return found

    def close(self, done: int, total: int) -> None:
        """The parent run is FINISHED once every point is complete, RUNNING while work is left;
        its tags say how far the grid of this run got (the report's first line reads them)."""
        self.client.set_tag(self.parent_id, GRID_TAG, str(total))
        self.client.set_tag(self.parent_id, DONE_TAG, str(done))
        if done == total:
            self.client.set_terminated(self.parent_id, "FINISHED")
        elif self.client.get_run(self.parent_id).info.status != "RUNNING":
            self.client.update_run(self.parent_id, status="RUNNING")

    def link_project_run(self) -> None:
        """Under `mlflow run`, point the project's run at the study's parent run."""
        project = project_run_id()
        if project and project != self.parent_id:
            self.client.set_tag(project, "ddsweep.study_parent_run", self.parent_id)

    # --- child runs
    def adopted(self, pid: str) -> tuple[str, dict[str, float]] | None:
        """(run id, metrics) of a FINISHED child already logged for point `pid`, if any."""
        if "'" in pid:  # only a positional id of ddsweep 0.1 can hold one; no filter can
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{POINT_TAG}` = '{pid}' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
        )
        return (runs[0].info.run_id, dict(runs[0].data.metrics)) if runs else None

    def _child(self, pid: str, trial: int, name: str, kind: str, start: float, **tags: str) -> str:
        all_tags = {
            KIND_TAG: kind,
            STUDY_TAG: self.study,
            POINT_TAG: pid,
            TRIAL_TAG: str(trial),
            MLFLOW_PARENT_RUN_ID: self.parent_id,
            **tags,
        }
        run = self.client.create_run(
            self.experiment_id, start_time=_ms(start), tags=all_tags, run_name=name
        )
        return str(run.info.run_id)

    def log_trial(self, pid: str, trial: int, record: Record) -> str:
        """One FINISHED child run for an evaluated point; returns its id."""
        run_id = self._child(pid, trial, record.name, record.kind, record.start)
        end = _ms(record.end)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), end, 0) for k, v in record.metrics.items()],
            params=[Param(k, v) for k, v in record.params.items()],
        )
        if record.predictions:
            with tempfile.TemporaryDirectory(prefix="ddsweep-pred-") as tmp:
                path = predictions.save(Path(tmp) / predictions.FILE, record.predictions)
                self.client.log_artifact(run_id, str(path))
        # FINISHED last: an adopted child has everything, predictions included.
        self.client.set_terminated(run_id, "FINISHED", end_time=end)
        return run_id

    def log_failure(
        self, pid: str, trial: int, name: str, kind: str, params: Mapping[str, Any], error: str
    ) -> str:
        """A FAILED child run that carries the error, so `mlflow ui` shows what went wrong."""
        run_id = self._child(pid, trial, name, kind, time.time(), error=error[:5000])
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run_id, "FAILED")
        return run_id
