"""A study's trials as they change, read incrementally: what each point holds, and which point a
worker claims next (grouped by feature pass).

A finished trial never changes again, so the view folds it into per-point counts once and from
then on reads only trials that are new or still unfinished. A trial costs the scheduler the same
at the 50th and at the 50,000th point (measured: benchmarks/bench_scheduler.py).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ddsweep.scheduler.trials import Liveness, Tally, interrupted, trial_point
from ddsweep.scheduler.types import Grid

WORKER_ATTR = "worker"  # host:pid of the process that claimed a trial


class View:
    """What the storage says about every point, kept current by reading what changed only."""

    def __init__(
        self,
        study: optuna.Study,
        liveness: Liveness,
        legacy: Mapping[str, str],
        known: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """`known`: {point id: params} of the grid, to name trials without building ids
        (measured: 0.65 ms an id under load, 33 s for a study of 50,000 trials)."""
        self.study, self.liveness, self.legacy = study, liveness, legacy
        self._known = {_key(p): pid for pid, p in (known or {}).items()}
        self._read = _reader(study)
        self.open: dict[int, FrozenTrial] = {}  # trial id -> latest copy, RUNNING or WAITING
        self._open_pid: dict[int, str | None] = {}
        self.holding: dict[str, set[int]] = {}  # point -> ids of its open trials
        self.complete: set[str] = set()
        self.complete_in: dict[str, int] = {}  # point -> number of a COMPLETE trial
        self.failures: Counter[str] = Counter()
        self.last_error: dict[str, str] = {}
        self._error_number: dict[str, int] = {}
        self.visited: set[str] = set()
        self.visits: list[str] = []  # points in the order they were first seen (append only)
        # A progress thread reads the tally while the worker's loop refreshes.
        self.lock = threading.RLock()

    def refresh(self) -> None:
        """Read the trials that are new or were unfinished, and fold them in."""
        with self.lock:
            for t in self._read({tid: t.state for tid, t in self.open.items()}):
                self._fold(t)

    def _point(self, t: FrozenTrial) -> str | None:
        params = t.params
        if params:
            found = self._known.get(_key(params))
            if found is not None:
                return found
        return trial_point(t, self.legacy)

    def _fold(self, t: FrozenTrial) -> None:
        pid = self._point(t)
        tid = t._trial_id
        old = self._open_pid.pop(tid, None)
        if old is not None:
            self.holding.get(old, set()).discard(tid)
        self.open.pop(tid, None)
        if not t.state.is_finished():
            self.open[tid] = t
            self._open_pid[tid] = pid
            if pid is not None:
                self.holding.setdefault(pid, set()).add(tid)
        if pid is None:
            return
        if pid not in self.visited:
            self.visited.add(pid)
            self.visits.append(pid)
        if t.state == TrialState.COMPLETE:
            self.complete.add(pid)
            self.complete_in.setdefault(pid, t.number)
        elif t.state == TrialState.FAIL and not interrupted(t):
            self.failures[pid] += 1
            if t.number >= self._error_number.get(pid, -1):  # the latest error wins
                self._error_number[pid] = t.number
                self.last_error[pid] = str(t.user_attrs.get("error", "stale"))

    def running(self) -> list[FrozenTrial]:
        return [t for t in self.open.values() if t.state == TrialState.RUNNING]

    def waiting(self) -> int:
        return sum(t.state == TrialState.WAITING for t in self.open.values())

    def stale_ids(self) -> set[int]:
        return self.liveness.stale_ids(self.running())

    def live_holders(self, pid: str, stale: set[int]) -> list[FrozenTrial]:
        """The RUNNING trials with a live worker that hold `pid`."""
        return [
            self.open[i]
            for i in sorted(self.holding.get(pid, ()))
            if self.open[i].state == TrialState.RUNNING and i not in stale
        ]

    def tally(self) -> Tally:
        """The counts of `trials.tally`, from the view (copies: the loop goes on folding)."""
        self.refresh()
        with self.lock:
            return self._tally()

    def _tally(self) -> Tally:
        stale = self.stale_ids()
        running, waiting = set(), set()
        for tid, t in self.open.items():
            pid = self._open_pid.get(tid)
            if pid is None:
                continue
            if t.state == TrialState.RUNNING and tid not in stale:
                running.add(pid)
            elif t.state == TrialState.WAITING:
                waiting.add(pid)
        return Tally(
            set(self.complete),
            running,
            waiting,
            Counter(self.failures),
            set(self.visited),
            dict(self.last_error),
        )


def _key(params: Mapping[str, Any]) -> tuple[tuple[str, Any, type], ...]:
    return tuple(sorted((n, v, type(v)) for n, v in params.items()))


# Given the open trials ({trial id: state as last read}), the trials to fold in again.
Reader = Callable[[dict[int, TrialState]], list[FrozenTrial]]


def _reader(study: optuna.Study) -> Reader:
    """A function giving the trials created since its last call plus the given (unfinished)
    ones (on an RDB: those whose state changed), in the cheapest way the storage allows."""
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalStorage

    storage, study_id = study._storage, study._study_id
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, RDBStorage):
        return _rdb_reader(backend, study_id)
    if isinstance(storage, JournalStorage):
        nxt = [0]

        def journal(open_ids: dict[int, TrialState]) -> list[FrozenTrial]:
            # One sync with the file, then the replayed trials as they are (Optuna's get_trial
            # syncs on every call: one file read per open trial and per new one).
            with storage._thread_lock:
                storage._sync_with_backend()
                replay = storage._replay_result
                ids = replay._study_id_to_trial_ids.get(study_id, [])
                new, nxt[0] = ids[nxt[0] :], len(ids)
                return [replay._trials[i] for i in sorted(open_ids)] + [
                    replay._trials[i] for i in new
                ]

        return journal
    seen = [0]

    def whole(open_ids: dict[int, TrialState]) -> list[FrozenTrial]:  # any other: read it all
        trials = storage.get_all_trials(study_id, deepcopy=False)
        out = [t for t in trials[: seen[0]] if t._trial_id in open_ids] + trials[seen[0] :]
        seen[0] = len(trials)
        return out

    return whole


def _rdb_reader(backend: Any, study_id: int) -> Reader:
    """The RDB's reader: in one transaction, the open trials' states (one query), then the
    trials that are new or changed state, as Optuna's own cache reads them (`_CachedStorage`).
    An open trial's attributes are not read again until its state changes: on an RDB its
    worker's liveness is Optuna's heartbeat table, not the trial's beat count. Re-reading every
    open trial whole was ~1,000 rows a refresh with 64 workers."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import or_
    from sqlalchemy.orm import selectinload

    trial = models.TrialModel
    last = [-1]

    def rdb(open_ids: dict[int, TrialState]) -> list[FrozenTrial]:
        # Trials of a study are created under a lock on its row, so ids grow in commit order:
        # no trial can appear later below an id already read.
        with _create_scoped_session(backend.scoped_session) as session:
            changed: list[int] = []
            if open_ids:
                rows = session.query(trial.trial_id, trial.state).filter(
                    trial.trial_id.in_(list(open_ids))
                )
                changed = [i for i, state in rows if state != open_ids[i]]
            query = (
                session.query(trial)
                .options(
                    selectinload(trial.params),
                    selectinload(trial.values),
                    selectinload(trial.user_attributes),
                    selectinload(trial.system_attributes),
                    selectinload(trial.intermediate_values),
                )
                .filter(trial.study_id == study_id)
                .filter(or_(trial.trial_id.in_(changed), trial.trial_id > last[0]))
            )
            found = [backend._build_frozen_trial_from_trial_model(m) for m in query]
        last[0] = max([last[0], *(t._trial_id for t in found)])
        return sorted(found, key=lambda t: t.number)

    return rdb


# --- hand-out ------------------------------------------------------------------------------------


class Handout:
    """Which point a worker claims next. Points sharing a feature pass (`Grid.groups`) go to one
    worker, in grid order: it keeps to its group until the group has no point without a trial,
    then takes a group its cache holds (`holds`, even one another worker sharing the cache is
    on), else a group nobody has begun (drawn at random, each worker by its own generator),
    else one no live worker is in, else (the tail) joins the busy group with the most
    points left. None: no point is without a trial."""

    def __init__(self, grid: Grid, view: View, seed: int = 0, worker: int = 0) -> None:
        self.view = view
        self.group_of = {pid: grid.groups.get(pid, pid) for pid in grid.ids}
        self.members: dict[str, list[str]] = {}  # a group's points in grid order
        for pid in grid.ids:
            self.members.setdefault(self.group_of[pid], []).append(pid)
        self.groups = list(self.members)
        random.Random(seed).shuffle(self.groups)  # the same order in every worker
        self._cursor = dict.fromkeys(self.groups, 0)
        self._touched: set[str] = set()
        self._seen = 0  # how much of view.visits is folded into _touched
        self._rng = random.Random(worker)
        self._pool = list(range(len(self.groups)))  # see _fresh
        self._open_groups = list(self.groups)
        self._dirty = True
        self.current: str | None = None

    def _update(self) -> None:
        visits = self.view.visits
        for pid in visits[self._seen :]:
            group = self.group_of.get(pid)
            if group is not None:
                self._touched.add(group)
        self._seen = len(visits)

    def free(self, group: str) -> str | None:
        """The group's next point without any trial, if any."""
        members, i = self.members[group], self._cursor[group]
        visited = self.view.visited
        while i < len(members) and members[i] in visited:
            i += 1
        self._cursor[group] = i
        return members[i] if i < len(members) else None

    def open_groups(self) -> list[str]:
        """The groups that had a point without any trial when last compacted, in order (some
        may have none now: check `free`). A group leaves for good (points only ever gain
        trials); compacting once per group change keeps a trial's cost flat in the grid size."""
        if self._dirty:
            self._open_groups = [g for g in self._open_groups if self.free(g) is not None]
            self._dirty = False
        return self._open_groups

    def left(self) -> bool:
        """Whether some point has no trial yet."""
        return any(self.free(g) is not None for g in self.open_groups())

    def next(
        self, me: str, holds: Callable[[str], bool] | None = None, *, stale: set[int] | None = None
    ) -> str | None:
        """The point to claim next, or None when every point has a trial."""
        self._update()
        if self.current is not None:
            pid = self.free(self.current)
            if pid is not None:
                return pid
            self._dirty = True  # a group ran out: compact the open list once
        busy = self._busy(me, stale if stale is not None else self.view.stale_ids())
        group = self._held(busy, holds) or self._fresh() or self._idle(busy)
        self.current = group
        return self.free(group) if group is not None else None

    def _busy(self, me: str, stale: set[int]) -> set[str]:
        """Groups in which another worker has a live trial."""
        out = set()
        for tid, t in self.view.open.items():
            if t.state != TrialState.RUNNING or tid in stale:
                continue
            if t.user_attrs.get(WORKER_ATTR) == me:
                continue
            pid = self.view._open_pid.get(tid)
            if pid is not None and pid in self.group_of:
                out.add(self.group_of[pid])
        return out

    def _held(self, busy: set[str], holds: Callable[[str], bool] | None) -> str | None:
        if holds is None or len(self.groups) == len(self.group_of):  # no groups to prefer
            return None
        # Another worker may be on it: one sharing this cache (the same machine) costs no pass.
        held = [g for g in self.open_groups() if self.free(g) is not None and holds(g)]
        idle = [g for g in held if g not in busy]
        chosen = idle or held
        return chosen[0] if chosen else None

    def _fresh(self) -> str | None:
        """A group with no trial yet, drawn at random by this worker's own generator: workers
        that walked one shared order from their own places caught up with each other and then
        raced for the same groups (measured: 409 stepped-back claims for 160 points with 16
        workers on PostgreSQL)."""
        pool = self._pool  # indices of groups that had no trial when last looked at
        while pool:
            j = self._rng.randrange(len(pool))
            g = self.groups[pool[j]]
            if g not in self._touched:
                return g
            pool[j] = pool[-1]  # touched for good: dropped in O(1)
            pool.pop()
        return None

    def _idle(self, busy: set[str]) -> str | None:
        """A begun group no live worker is on, else (the grid's tail) the busy one with the
        most points left: its pass runs twice, but no worker idles while points are left."""
        left = [g for g in self.open_groups() if self.free(g) is not None]
        for g in left:
            if g not in busy:
                return g
        if not left:
            return None
        return max(left, key=lambda g: len(self.members[g]) - self._cursor[g])


def template(
    params: dict[str, Any],
    distributions: dict[str, Any],
    attrs: dict[str, Any],
) -> FrozenTrial:
    """A RUNNING trial holding `params` and `attrs`, created in one storage write (the claim)."""
    from datetime import datetime

    return FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.now(),
        datetime_complete=None,
        params=params,
        distributions=distributions,
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
