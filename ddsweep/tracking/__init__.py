"""MLflow at the edge: where runs go, what a run records, and how runs are found again."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep import __version__
from ddsweep.config.run import DEFAULT_EXPERIMENT
from ddsweep.errors import UserError, first_line, redact, scrub
from ddsweep.tracking.records import TrainingRun
from ddsweep.tracking.records import training_run as _training_record
from ddsweep.tracking.schema import ATTENTION_TAG, DATASET_TAG, KIND_TAG, RESOLUTION_TAG, TRAIN_KIND

if TYPE_CHECKING:
    from mlflow.entities import Run

# (dataset, split, fingerprint, size): one dataset a run read, as `mlflow ui` lists its inputs
DataInput = tuple[str, str, str, int]


def setup(
    tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, *, create: bool = True
) -> str:
    """Point MLflow at `tracking_uri` (else MLFLOW_TRACKING_URI, else MLflow's own default
    `sqlite:///mlflow.db`) and select `experiment`; returns the experiment id. With
    `create=False` (non-main torchrun processes) only the URI is set: "" is returned."""
    import mlflow

    # MLflow's per-file download bars would drown ddsweep's own progress output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    check_server(str(mlflow.get_tracking_uri()))
    if not create:
        return ""
    project = project_experiment()
    if project is not None:  # under `mlflow run` its run's experiment is the experiment
        mlflow.set_experiment(experiment_id=project)
        return project
    # MLflow announces at INFO every table and experiment it creates; on a first run that
    # would put lines of its own before ours (and before a one-line error).
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(max(level, logging.WARNING))
    try:
        with first_migration(str(mlflow.get_tracking_uri())):
            exp = mlflow.set_experiment(experiment)
    except Exception as err:  # an unreachable server or a bad URI is the user's to fix
        uri = redact(mlflow.get_tracking_uri())
        raise UserError(
            f"cannot use MLflow tracking at {uri}: {first_line(err, mlflow.get_tracking_uri())} "
            "(check --tracking-uri / MLFLOW_TRACKING_URI)"
        ) from err
    finally:
        mlflow_logger.setLevel(level)
    return str(exp.experiment_id)


@contextlib.contextmanager
def first_migration(uri: str) -> Iterator[None]:
    """Hold a lock named after a SQLite tracking database while MLflow first opens it: MLflow
    creates and migrates a new database's tables on first use, and two commands started
    together on a new folder would race (`table _alembic_tmp_experiments already exists`).
    The lock lives in the temporary folder, not beside the user's database."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import hashlib
    import tempfile

    from filelock import FileLock

    db = os.path.realpath(uri.removeprefix("sqlite:///").split("?")[0])
    name = hashlib.sha256(db.encode()).hexdigest()[:16]
    with FileLock(os.path.join(tempfile.gettempdir(), f"ddsweep-mlflow-{name}.lock")):
        yield


SERVER_TIMEOUT_S = 5.0  # MLflow's own retries take minutes to give up on a dead server


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """UserError, within `timeout` seconds, when an http(s) tracking server does not answer
    (MLflow itself retries for minutes before it says anything)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(_health_request(uri), timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: a server is there (some proxies have no /health)
    except (OSError, ValueError) as err:
        reason = scrub(str(getattr(err, "reason", err)), uri)
        raise UserError(
            f"no MLflow server answers at {redact(uri)} within {timeout:.0f} s ({reason}): "
            "start it, or check --tracking-uri / MLFLOW_TRACKING_URI"
        ) from err


def _health_request(uri: str) -> Any:
    """The GET of the server's /health; user:password@ in the URL (which MLflow's own client
    accepts) becomes basic authentication, as urllib would otherwise read it as the host."""
    import base64
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri.rstrip("/") + "/health")
    if "@" not in parts.netloc:
        return urllib.request.Request(urlunsplit(parts))
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urllib.request.Request(
        urlunsplit(parts._replace(netloc=host)), headers={"Authorization": f"Basic {token}"}
    )


def flat_params(cfg: Any, prefix: str = "") -> dict[str, str]:
    """A (nested) config dataclass as flat MLflow params; tuples are comma-joined."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flat_params(value, prefix))
        elif isinstance(value, tuple):
            out[prefix + f.name] = ",".join(map(str, value))
        else:
            out[prefix + f.name] = str(value)
    return out


def source_checkout() -> Path | None:
    """The root of the ddsweep checkout this code runs from, or None for an installed package
    (whose folders may sit inside some other repository, e.g. a project's .venv: its commit
    is not ddsweep's)."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        project = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"ddsweep"', project, re.M) else None


def code_version() -> str:
    """ddsweep's version plus the git commit of its checkout when it runs from one."""
    root = source_checkout()
    if root is None:
        return __version__
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}{'.dirty' if dirty else ''}" if sha else __version__


def training_run(run_id: str) -> TrainingRun:
    """The record of run `run_id` (check `is_training`), or UserError when there is none."""
    return _training_record(run_entity(run_id))


def run_entity(run_id: str) -> Run:
    """The MLflow run `run_id`, or UserError when the tracking store has none (tracking's
    own: other rooms read `training_run`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    missing = missing_store()
    if missing is not None:  # reading would create it, and MLflow would announce its tables
        raise UserError(
            f"no MLflow run {run_id!r} here: {missing} does not exist (check --tracking-uri)"
        )
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise UserError(
            f"no MLflow run {run_id!r} at {redact(_uri())}: check the id "
            "(mlflow ui lists runs) and --tracking-uri"
        ) from err


def training_entities(
    dataset: str, resolution: int, attention: bool, *, finished: bool = False
) -> list[Run]:
    """The MLflow runs of `training_runs` (tracking's own: other rooms read the records).
    Empty when the store is a sqlite file not created yet: reading it would create it."""
    from mlflow.tracking import MlflowClient

    if missing_store() is not None:
        return []
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    query = (
        f"tags.`{KIND_TAG}` = '{TRAIN_KIND}' and tags.{RESOLUTION_TAG} = '{resolution}' "
        f"and tags.{ATTENTION_TAG} = '{attention}'"
    )
    # MLflow's filter strings cannot escape a quote, and a folder dataset's path may hold one:
    # such a name is compared here, not in the filter.
    if "'" not in dataset:
        query += f" and tags.{DATASET_TAG} = '{dataset}'"
    if finished:
        query += " and attributes.status = 'FINISHED'"
    runs = client.search_runs(exps, query, order_by=["attributes.start_time DESC"])
    return [r for r in runs if r.data.tags.get(DATASET_TAG) == dataset]


def training_runs(
    dataset: str, resolution: int, attention: bool, *, finished: bool = False
) -> list[TrainingRun]:
    """`ddsweep train` runs for (dataset, resolution, attention), newest first, in every
    experiment; only FINISHED ones when `finished`; none from a store not created yet."""
    return [
        _training_record(r)
        for r in training_entities(dataset, resolution, attention, finished=finished)
    ]


def latest_training_run(
    dataset: str, resolution: int, attention: bool, *, hint: str | None = None
) -> TrainingRun:
    """The newest FINISHED `ddsweep train` run for (dataset, resolution, attention); `hint`
    says what to run when there is none (default: the `ddsweep train` command)."""
    runs = training_runs(dataset, resolution, attention, finished=True)
    if not runs:
        flag = "--attention" if attention else "--no-attention"
        cmd = f"`ddsweep train {dataset} --resolution {resolution} {flag}` or pass --run RUN_ID"
        raise UserError(
            f"no finished training run for {dataset} at {resolution} px ({flag}) at "
            f"{redact(_uri())}: run {hint or cmd}"
        )
    return runs[0]


def _uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def env_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI when set."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def log_run(
    experiment_id: str,
    name: str,
    params: dict[str, str],
    metrics: dict[str, float],
    tags: dict[str, str],
    *,
    parent_run_id: str | None = None,
    inputs: Iterable[DataInput] = (),
) -> str:
    """Create one finished run with explicit ids (thread- and process-safe), with the
    datasets it read (`log_inputs`); returns its id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient()
    all_tags = {MLFLOW_RUN_NAME: name, **tags}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    project_run = project_run_id()
    if project_run and not parent_run_id:
        # Under `mlflow run`, the project's own run is the run of this command.
        run_id, finish = project_run, False
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
    else:
        run_tags = {**context_tags(), **all_tags}
        run_id = client.create_run(experiment_id, tags=run_tags, run_name=name).info.run_id
        finish = True
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    log_inputs(run_id, inputs)
    if finish:
        client.set_terminated(run_id, "FINISHED")
    return str(run_id)


def project_run_id() -> str | None:
    """The run `mlflow run` started for this command (MLFLOW_RUN_ID), if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def project_experiment() -> str | None:
    """The experiment of the run `mlflow run` started for this command, if any: the study's
    runs go there too, or `mlflow ui` could not show its trials nested under it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id = project_run_id()
    if run_id is None:
        return None
    try:
        return str(MlflowClient().get_run(run_id).info.experiment_id)
    except MlflowException as err:
        raise UserError(
            f"MLFLOW_RUN_ID={run_id} names no run at {redact(_uri())}: unset it "
            "(`mlflow run` sets it for the command it starts)"
        ) from err


def run_experiment(run_id: str) -> str | None:
    """The experiment of run `run_id`; None when the store has no such run (or it is deleted)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else str(run.info.experiment_id)


@functools.cache
def context_tags() -> dict[str, str]:
    """The tags `mlflow.start_run` gives a run (mlflow.user, mlflow.source.name and .type,
    mlflow.source.git.commit, ...) from MLflow's own context registry, for runs created with
    the client. The git commit is ddsweep's own checkout's when the command's main file (e.g.
    a console script in a virtual environment) is in none."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_commit
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = {k: str(v) for k, v in resolve_tags().items()}
    root = source_checkout()
    if MLFLOW_GIT_COMMIT not in tags and root is not None:
        commit = get_git_commit(str(root))
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def missing_store() -> Path | None:
    """The sqlite file the current tracking URI names when it does not exist yet (opening it
    would create it, and MLflow would announce its tables), else None."""
    import mlflow

    uri = str(mlflow.get_tracking_uri())
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    return None if path.exists() else path


def check_reachable() -> None:
    """UserError when the current tracking store cannot be read."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as err:
        raise UserError(
            f"cannot read MLflow tracking at {redact(_uri())}: {first_line(err, _uri())}"
        ) from err


def log_inputs(run_id: str, inputs: Iterable[DataInput]) -> None:
    """Record the datasets run `run_id` read (MLflow's dataset inputs): each named after its
    dataset and split, with the split's fingerprint as source and digest, its size as profile,
    and the split as the input's context (train, test, val)."""
    import hashlib
    import json

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    class SplitDataset(MetaDataset):
        """A split known by its fingerprint and size (the images stay where they are)."""

        def __init__(self, name: str, fingerprint: str, size: int) -> None:
            self.size = size
            digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:8]
            source = CodeDatasetSource({"fingerprint": fingerprint, "size": str(size)})
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self) -> dict[str, int]:
            return {"num_rows": self.size}

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    rows = []
    for dataset, split, fingerprint, size in inputs:
        entity = SplitDataset(f"{dataset}:{split}", fingerprint, size)._to_mlflow_entity()
        rows.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    if rows:
        MlflowClient().log_inputs(run_id, datasets=rows)
