"""Every MLflow call of a study: its parent run, one child run per evaluated point (with the
point's real start and end, MLflow's context tags and its datasets), adoption of a child logged
by a worker that died before telling Optuna, failure runs, the answer so far on the parent, and
closing the parent when the grid is complete. Under `mlflow run` the project's run is the parent.

The client API with explicit run ids throughout: workers are threads and processes, and the
fluent API's active-run stack is neither.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from ddsweep import predictions
from ddsweep.tracking import code_version, context_tags, log_inputs, project_run_id
from ddsweep.tracking.records import trial_run
from ddsweep.tracking.schema import (
    DONE_TAG,
    GRID_TAG,
    KIND_TAG,
    POINT_TAG,
    PROJECT_TAG,
    STUDY_TAG,
    TRIAL_TAG,
)

if TYPE_CHECKING:
    from ddsweep.objectives import Record

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
            all_tags.update(tags)
            mine = self._adopt_project_run(all_tags)
            if mine is None:
                all_tags = {**context_tags(), **all_tags}
                mine = self.client.create_run(
                    self.experiment_id, tags=all_tags, run_name=self.study
                ).info.run_id
            self.client.log_batch(mine, params=[Param(k, v[:MAX_PARAM]) for k, v in params.items()])
            found = self._oldest_parent()
            if found and found != mine:  # two workers raced: keep the oldest only
                if mine == project_run_id():
                    self.client.delete_tag(mine, KIND_TAG)  # mlflow run's own: keep it
                else:
                    self.client.delete_run(mine)
            found = found or mine
        self.parent_id = found
        return found

    def _adopt_project_run(self, tags: Mapping[str, str]) -> str | None:
        """Under `mlflow run`, the project's run becomes the study's parent (its trials nest
        under it in `mlflow ui`), when it is in the study's experiment; else None."""
        project = project_run_id()
        if project is None:
            return None
        run = self.client.get_run(project)
        if run.info.experiment_id != self.experiment_id:
            return None
        self.client.log_batch(project, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.update_run(project, name=self.study)  # named after the study, as any parent
        return project

    def mark_progress(self, done: int, total: int) -> None:
        """Say on the parent run that `done` of the `total` points of this run's grid are
        complete."""
        self.client.set_tag(self.parent_id, GRID_TAG, str(total))
        self.client.set_tag(self.parent_id, DONE_TAG, str(done))

    def close(self, done: int, total: int) -> None:
        """The parent run is FINISHED once every point is complete, RUNNING while work is left;
        its tags say how far the grid of this run got (the report's first line reads them)."""
        self.mark_progress(done, total)
        if done == total:
            self.client.set_terminated(self.parent_id, "FINISHED")
        elif self.client.get_run(self.parent_id).info.status != "RUNNING":
            self.client.update_run(self.parent_id, status="RUNNING")

    def describe(self, text: str) -> None:
        """The parent run's description in `mlflow ui` (Markdown): the study's answer."""
        self.client.set_tag(self.parent_id, MLFLOW_RUN_NOTE, text)

    def link_project_run(self) -> None:
        """Under `mlflow run` of a study begun before (its parent run exists already), point
        the project's run at the study's parent run, where the trials are."""
        project = project_run_id()
        if project and project != self.parent_id:
            self.client.set_tag(project, PROJECT_TAG, self.parent_id)

    def log_answer(
        self,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        tables: Mapping[str, Mapping[str, Sequence[Any]]],
        step: int,
        *,
        note: str = "",
        files: Mapping[str, str] | None = None,
    ) -> None:
        """The study's answer so far on its parent run: metrics at `step` (points complete),
        so their history shows how the answer moved; tags; its description (`note`, shown
        by `mlflow ui` on the run's page); tables (artifact path: columns) shown by the UI's
        artifact view, each replaced by its latest version; and text files {name: text} at
        the artifacts' top level (the methods card)."""
        now = _ms(time.time())
        all_tags = {**tags, **({MLFLOW_RUN_NOTE: note} if note else {})}
        self.client.log_batch(
            self.parent_id,
            metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in all_tags.items()],
        )
        for path, columns in tables.items():
            self._log_table(path, columns)
        for name, text in (files or {}).items():
            self.client.log_text(self.parent_id, text, name)

    def _log_table(self, path: str, columns: Mapping[str, Sequence[Any]]) -> None:
        import pandas as pd

        frame = pd.DataFrame({k: list(v) for k, v in columns.items()})
        folder = path.rpartition("/")[0] or None
        if path not in {a.path for a in self.client.list_artifacts(self.parent_id, folder)}:
            self.client.log_table(self.parent_id, frame, path)
            return
        # MLflow's log_table appends to a table logged before; the answer replaces it (in the
        # file format log_table writes, so the UI still shows it as a table).
        with tempfile.TemporaryDirectory(prefix="ddsweep-table-") as tmp:
            file = Path(tmp) / path.rpartition("/")[2]
            frame.to_json(file, orient="split", index=False, date_format="iso")
            self.client.log_artifact(self.parent_id, str(file), folder)

    def log_definition(self, sweep_file: Path | None, document: Mapping[str, Any]) -> None:
        """The study's sweep file (when it came from one) and the definition this run used
        (with command-line axes applied) under sweep/ of the parent run."""
        import yaml

        if sweep_file is not None and sweep_file.is_file():
            self.client.log_artifact(self.parent_id, str(sweep_file), "sweep")
        with tempfile.TemporaryDirectory(prefix="ddsweep-sweep-") as tmp:
            file = Path(tmp) / "as_run.yaml"
            plain = json.loads(json.dumps(document))  # tuples as lists: safe_dump refuses tuples
            file.write_text(yaml.safe_dump(plain, sort_keys=False))
            self.client.log_artifact(self.parent_id, str(file), "sweep")

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
        if not runs:
            return None
        trial = trial_run(runs[0])
        return trial.run_id, dict(trial.metrics)

    def _child(self, pid: str, trial: int, name: str, kind: str, start: float, **tags: str) -> str:
        all_tags = {
            **context_tags(),
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

    def log_trial(
        self,
        pid: str,
        trial: int,
        record: Record,
        tags: Mapping[str, str] | None = None,
        *,
        description: str = "",
    ) -> str:
        """One FINISHED child run for an evaluated point (with `tags`, e.g. its device, and
        `description` as the run's description in `mlflow ui`); returns its id."""
        notes = {MLFLOW_RUN_NOTE: description} if description else {}
        # A trial of this point that died inside this method (SIGKILL) left its child RUNNING,
        # half written: it is no result (it never reached FINISHED) and goes before ours.
        self._remove_partial(pid)
        run_id = self._child(
            pid, trial, record.name, record.kind, record.start, **(tags or {}), **notes
        )
        end = _ms(record.end)
        try:
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), end, 0) for k, v in record.metrics.items()],
                params=[Param(k, v) for k, v in record.params.items()],
            )
            log_inputs(run_id, record.inputs)
            if record.predictions:
                with tempfile.TemporaryDirectory(prefix="ddsweep-pred-") as tmp:
                    path = predictions.save(Path(tmp) / predictions.FILE, record.predictions)
                    self.client.log_artifact(run_id, str(path))
        except BaseException:  # Ctrl-C, SIGTERM or an error half way: no half-written child
            with contextlib.suppress(Exception):
                self.client.delete_run(run_id)
            raise
        # FINISHED last: an adopted child has everything, predictions included.
        self.client.set_terminated(run_id, "FINISHED", end_time=end)
        return run_id

    def _remove_partial(self, pid: str) -> None:
        """Delete the RUNNING children of point `pid`: each was left by a trial killed while it
        logged (a live trial of the point is this one, which has not created its child yet)."""
        if "'" in pid:  # only a positional id of ddsweep 0.1 can hold one; no filter can
            return
        left = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{POINT_TAG}` = '{pid}' "
            "and attributes.status = 'RUNNING'",
        )
        for run in left:
            self.client.delete_run(run.info.run_id)

    def log_failure(
        self, pid: str, trial: int, name: str, kind: str, params: Mapping[str, Any], error: str
    ) -> str:
        """A FAILED child run that carries the error, so `mlflow ui` shows what went wrong."""
        run_id = self._child(pid, trial, name, kind, time.time(), error=error[:5000])
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run_id, "FAILED")
        return run_id
