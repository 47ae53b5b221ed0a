"""Where a study lives: a journal file for workers on one machine, an RDB URL (with Optuna's
heartbeat) for several."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import optuna

from ddsweep.config import paths
from ddsweep.errors import UserError, first_line, migration_race, redact
from ddsweep.scheduler.types import Policy

# --- storage --------------------------------------------------------------------------------


def default_storage_path(study: str) -> Path:
    """The local journal file of a study: <DDSWEEP_HOME or .ddsweep>/optuna/NAME.journal."""
    return paths.journal_file(study)


def journal_path(study: str, policy: Policy) -> Path | None:
    """The journal file a study's storage is, or None for an RDB URL."""
    url = policy.storage
    if url is None or url.endswith(".journal") or url.startswith("journal:"):
        return Path(url.removeprefix("journal:")) if url else default_storage_path(study)
    return None


def make_storage(study: str, policy: Policy) -> optuna.storages.BaseStorage:
    """Journal file storage by default (several processes on one machine), or an RDB URL with
    Optuna's heartbeat (several machines)."""
    from optuna.storages.journal import JournalStorage

    path = journal_path(study, policy)
    if path is not None:
        paths.make_folder(path.parent, "the Optuna journal folder (DDSWEEP_HOME or --storage)")
        return JournalStorage(_journal_file(str(path)))
    url = str(policy.storage)
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


# Journal operations that change a study or end a trial (Optuna's JournalOperation codes); the
# others (a claim, params, attributes, heartbeats) are fsync'd with the next of these.
_DURABLE_OPS = {0, 1, 2, 3, 10}
_CREATE_TRIAL, _SET_TRIAL_STATE = 4, 6


def _durable(log: dict[str, Any]) -> bool:
    op = log.get("op_code")
    if op in _DURABLE_OPS:
        return True
    if op in (_CREATE_TRIAL, _SET_TRIAL_STATE):
        return int(log.get("state", 0)) != 0  # 0: RUNNING
    return False


def _journal_file(path: str) -> Any:
    """Optuna's journal file, fsync'd when a trial ends or the study changes only.

    Optuna's JournalFileBackend fsyncs every append (it has no option): six to fourteen a trial,
    5-37 ms each under load here, most of a trial's bookkeeping. Every append is still written
    and flushed under the file lock, so every process sees it at once (and a killed process
    loses nothing); an fsync makes every earlier append durable too. What a power cut can lose
    is the claims, attributes and heartbeats since the last trial ended: those trials vanish,
    their points are handed out again, and a result already logged to MLflow is adopted."""
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file

    class JournalFile(JournalFileBackend):
        def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
            # Optuna opens and reads the file on every storage call, several a trial; when the
            # file ends where the last read did, one stat says there is nothing new.
            end = self._log_number_offset.get(log_number_from)
            if end is not None and os.stat(self._file_path).st_size == end:
                return
            yield from super().read_logs(log_number_from)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with get_lock_file(self._lock), open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                if any(_durable(log) for log in logs):
                    os.fsync(f.fileno())

    return JournalFile(path)


def uses_rdb_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether Optuna's own heartbeat is on (RDBStorage with heartbeat_interval).

    A study holds its RDBStorage wrapped in Optuna's `_CachedStorage`, which forwards the
    heartbeat: ask the storage, not its class."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None
