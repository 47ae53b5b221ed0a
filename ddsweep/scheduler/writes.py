"""A trial's storage writes, each in one round trip where Optuna's public calls take several.

Measured with benchmarks/bench_scheduler.py: on PostgreSQL, Optuna's `create_new_trial` with a
template of 8 params and 3 attributes ran 30 statements (each param: the trial read again, the
study's first trial with that param read to check its distribution, then the insert), and a
trial of ddsweep's ~65 in all. On the journal, each Optuna call is one append under the file
lock and one read of the file. Here:

- `claim`: the RUNNING trial with its params, attributes and (RDB) heartbeat row, in one
  transaction of ~7 statements. Distributions are not checked against earlier trials: a
  study's categorical choices are fixed when it is created (`grid.CHOICES_ATTR`) and an int
  param's range may change, which Optuna allows.
- `is_running`: whether nobody ended the trial (judged its worker stale) meanwhile: one read.
- `finish`: a trial's result attributes, value and end in one append or one transaction.

Each uses Optuna's storage internals (the RDB models and session, the journal's replay); what
they write is what Optuna's own calls write, so Optuna, optuna-dashboard and older ddsweep
read it unchanged.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState


def _rdb(storage: optuna.storages.BaseStorage) -> Any:
    """The RDBStorage under a study's storage (Optuna wraps it in `_CachedStorage`), or None."""
    from optuna.storages import RDBStorage

    for s in (storage, getattr(storage, "_backend", None)):
        if isinstance(s, RDBStorage):
            return s
    return None


def _journal(storage: optuna.storages.BaseStorage) -> Any:
    from optuna.storages.journal import JournalStorage

    return storage if isinstance(storage, JournalStorage) else None


def claim(
    storage: optuna.storages.BaseStorage, study_id: int, template: FrozenTrial
) -> tuple[int, int]:
    """Create the RUNNING trial `template` (params, distributions, user attributes); its id and
    number."""
    rdb = _rdb(storage)
    if rdb is None:  # the journal: Optuna's create is already one append
        tid = storage.create_new_trial(study_id, template)
        return tid, storage.get_trial(tid).number
    for attempt in range(_CLAIM_ATTEMPTS):
        try:
            return _rdb_claim(rdb, study_id, template)
        except optuna.exceptions.StorageInternalError:
            # A deadlock between servers' transactions, as Optuna's create retries it.
            if attempt + 1 == _CLAIM_ATTEMPTS:
                raise
            time.sleep(random.random() * 2.0)
    raise AssertionError("unreachable")


_CLAIM_ATTEMPTS = 5


def _rdb_claim(rdb: Any, study_id: int, template: FrozenTrial) -> tuple[int, int]:
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        # Trial numbers are counted under a lock on the study's row, as Optuna does.
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        trial = models.TrialModel(
            study_id=study_id,
            number=None,
            state=TrialState.RUNNING,
            datetime_start=template.datetime_start or datetime.now(),
        )
        session.add(trial)
        session.flush()
        tid = int(trial.trial_id)
        dists = template.distributions
        rows: list[Any] = [
            models.TrialParamModel(
                trial_id=tid,
                param_name=name,
                param_value=dists[name].to_internal_repr(value),
                distribution_json=distribution_to_json(dists[name]),
            )
            for name, value in template.params.items()
        ]
        rows += [
            models.TrialUserAttributeModel(trial_id=tid, key=k, value_json=json.dumps(v))
            for k, v in template.user_attrs.items()
        ]
        if rdb.heartbeat_interval is not None:  # the first beat (Optuna's stale check)
            rows.append(models.TrialHeartbeatModel(trial_id=tid))
        session.add_all(rows)
        trial.number = number = int(trial.count_past_trials(session))
    return tid, number


def has_heartbeat_row(storage: optuna.storages.BaseStorage) -> bool:
    """Whether `claim` wrote the trial's first Optuna heartbeat (RDB with a heartbeat)."""
    rdb = _rdb(storage)
    return rdb is not None and rdb.heartbeat_interval is not None


def is_running(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    """Whether the trial is still RUNNING (no other worker ended it)."""
    rdb = _rdb(storage)
    if rdb is None:
        return storage.get_trial(trial_id).state == TrialState.RUNNING
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        return bool(trial.state == TrialState.RUNNING)


def finish(
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    state: TrialState,
    values: Sequence[float] | None,
    attrs: Mapping[str, Any],
) -> None:
    """Write `attrs`, then end the trial in `state` with `values`; UpdateFinishedTrialError
    when another worker ended it first (nothing of ours is then kept)."""
    journal, rdb = _journal(storage), _rdb(storage)
    if journal is not None:
        _journal_finish(journal, trial_id, state, values, attrs)
    elif rdb is not None:
        _rdb_finish(rdb, trial_id, state, values, attrs)
    else:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        storage.set_trial_state_values(trial_id, state, values)


def _journal_finish(
    storage: Any,
    trial_id: int,
    state: TrialState,
    values: Sequence[float] | None,
    attrs: Mapping[str, Any],
) -> None:
    from optuna.storages.journal._storage import JournalOperation

    worker = storage._replay_result.worker_id
    logs: list[dict[str, Any]] = [
        {
            "op_code": JournalOperation.SET_TRIAL_USER_ATTR,
            "worker_id": worker,
            "trial_id": trial_id,
            "user_attr": {key: value},  # Optuna's replay takes one attribute a log
        }
        for key, value in attrs.items()
    ]
    logs.append(
        {
            "op_code": JournalOperation.SET_TRIAL_STATE_VALUES,
            "worker_id": worker,
            "trial_id": trial_id,
            "state": state,
            "values": list(values) if values is not None else None,
            "datetime_complete": datetime.now(tz=timezone.utc).isoformat(timespec="microseconds"),
        }
    )
    with storage._thread_lock:
        storage._sync_with_backend()
        trial = storage._replay_result.get_trial(trial_id)
        if trial.state.is_finished():
            raise UpdateFinishedTrialError(f"trial {trial.number} has already ended")
        storage._backend.append_logs(logs)  # one append, one fsync (the end is durable)
        # Replaying a log of ours on a trial that another worker ended in between raises, one
        # log at a time: read them all, so that no later read raises instead.
        ended = False
        for _ in logs:
            try:
                storage._sync_with_backend()
                break
            except UpdateFinishedTrialError:
                ended = True
        if ended:
            raise UpdateFinishedTrialError(f"trial {trial.number} was ended by another worker")


def _rdb_finish(
    rdb: Any,
    trial_id: int,
    state: TrialState,
    values: Sequence[float] | None,
    attrs: Mapping[str, Any],
) -> None:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        rdb.check_trial_is_updatable(trial_id, trial.state)  # UpdateFinishedTrialError
        if attrs:
            _upsert_attrs(rdb, session, trial_id, attrs)
        for objective, v in enumerate(values or ()):
            # A RUNNING trial holds no value yet (its value comes with its end): no read first.
            stored, kind = models.TrialValueModel.value_to_stored_repr(v)
            session.add(
                models.TrialValueModel(
                    trial_id=trial_id, objective=objective, value=stored, value_type=kind
                )
            )
        trial.state = state
        trial.datetime_complete = datetime.now()


def _upsert_attrs(rdb: Any, session: Any, trial_id: int, attrs: Mapping[str, Any]) -> None:
    """Set the trial's user attributes, in one statement on PostgreSQL and SQLite."""
    from optuna.storages._rdb import models

    model = models.TrialUserAttributeModel
    rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    if rdb.engine.name in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        dialect: Any = postgresql if rdb.engine.name == "postgresql" else sqlite
        stmt = dialect.insert(model).values(rows)
        keys = [model.trial_id, model.key]
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=keys, set_={"value_json": stmt.excluded.value_json}
            )
        )
        return
    have: dict[str, Any] = {
        str(a.key): a
        for a in session.query(model).filter(model.trial_id == trial_id, model.key.in_(list(attrs)))
    }
    for row in rows:
        if row["key"] in have:
            have[row["key"]].value_json = row["value_json"]
        else:
            session.add(model(**row))
