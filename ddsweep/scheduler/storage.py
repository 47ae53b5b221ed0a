"""Where a study lives: a journal file for workers on one machine, an RDB URL (with Optuna's
heartbeat) for several."""

from __future__ import annotations

import time
from pathlib import Path

import optuna

from ddsweep.config import paths
from ddsweep.errors import UserError, first_line, migration_race, redact
from ddsweep.scheduler.types import Policy

# --- storage --------------------------------------------------------------------------------


def default_storage_path(study: str) -> Path:
    """The local journal file of a study: <DDSWEEP_HOME or .ddsweep>/optuna/NAME.journal."""
    return paths.optuna_dir() / f"{study}.journal"


def make_storage(study: str, policy: Policy) -> optuna.storages.BaseStorage:
    """Journal file storage by default (several processes on one machine), or an RDB URL with
    Optuna's heartbeat (several machines)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = policy.storage
    if url is None or url.endswith(".journal") or url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")) if url else default_storage_path(study)
        paths.make_folder(path.parent, "the Optuna journal folder (DDSWEEP_HOME or --storage)")
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:") and "mlflow.db" in url:
        raise UserError(
            "--storage must not be MLflow's database: both keep an alembic_version table; "
            "use another file or the default journal"
        )
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=policy.heartbeat_interval, grace_period=policy.grace_period
            )
        except Exception as err:  # bad URL, server down, missing driver: all the user's to fix
            # Workers started together on a new database race to create its tables: the
            # loser's next attempt finds them made.
            if migration_race(err) and attempt + 1 < _CREATE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise UserError(
                f"cannot open Optuna storage {redact(url)}: {first_line(err, url)}"
            ) from err
    raise AssertionError("unreachable")


_CREATE_ATTEMPTS = 5


def uses_rdb_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether Optuna's own heartbeat is on (RDBStorage with heartbeat_interval).

    A study holds its RDBStorage wrapped in Optuna's `_CachedStorage`, which forwards the
    heartbeat: ask the storage, not its class."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None
