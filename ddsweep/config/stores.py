"""Where a study's stores would be, read from the file system alone, and what a command about a
study says when they are not there: `study status` and `report` of a study that has never run
answer in a fraction of a second, without opening (or importing) Optuna or MLflow."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ddsweep.config import paths, sweep
from ddsweep.errors import UserError

DEFAULT_MLFLOW_DB = "mlflow.db"  # MLflow 3's default store: sqlite:///mlflow.db
MLFLOW_FILE_STORE = "mlruns"  # MLflow's older default, still used where this folder exists


def not_started(cfg: sweep.StudyConfig) -> UserError:
    """'study X has not been started: run ...' with the commands that start it."""
    steps = (
        sweep.study_steps(cfg.study)
        if cfg.kind == "probe-grid"
        else f"`ddsweep study {cfg.kind} --study {cfg.study}`"
    )
    return UserError(f"study {cfg.study!r} has not been started: run {steps}")


def unstarted_study(
    study: str, overrides: Mapping[str, list[str]], storage: str | None
) -> UserError | None:
    """`study status`'s answer when the study has no journal in the default local storage
    (None: there is one, or another storage is given: Optuna must be asked)."""
    if storage is not None:
        return None
    sweep.check_study_arg(study)
    base = sweep.load_study(study)
    if paths.journal_file(base.study if base is not None else study).exists():
        return None  # started, or a study defined on the command line and stored with it
    return not_started(sweep.with_overrides(base, study, overrides))


def missing_mlflow_db(tracking_uri: str | None) -> Path | None:
    """The sqlite file the tracking URI (`tracking_uri`, else MLFLOW_TRACKING_URI, else
    MLflow's default) names when it does not exist; None when it exists or the store is
    another kind (a server, MLflow's file store): only MLflow can say then."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        if Path(MLFLOW_FILE_STORE).exists():
            return None
        path = Path(DEFAULT_MLFLOW_DB).absolute()
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    else:
        return None
    return None if path.exists() else path


def no_study(study: str, where: str, also: Iterable[str] = ()) -> UserError:
    """'no study X at URI: run ...' with the commands that run it, or a did-you-mean when no
    sweep file names it (`also`: other studies the tracking store knows)."""
    if sweep.find_sweep_file(study) is not None:
        return UserError(f"no study {study!r} {where}: to run it, {sweep.study_steps(study)}")
    return UserError(
        f"no study {study!r} {where}{sweep.unknown_study_hint(study, also)} (or check "
        "--tracking-uri)"
    )


def unreported_study(study: str, tracking_uri: str | None) -> UserError | None:
    """`report`'s answer when the tracking store is a sqlite file not created yet (reading it
    would create it); None when MLflow must be asked."""
    path = missing_mlflow_db(tracking_uri)
    return None if path is None else no_study(study, f"here ({path} does not exist)")
