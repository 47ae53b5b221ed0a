"""What a trial holds and whether its worker lives: the point it claims, counts per point,
stale trials, and the heartbeat thread."""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ddsweep.config.points import id_of
from ddsweep.scheduler.storage import uses_rdb_heartbeat
from ddsweep.scheduler.writes import has_heartbeat_row

HEARTBEAT_ATTR = "heartbeat"  # how many times the trial's worker has beaten
INTERRUPTED_ATTR = "interrupted"  # a FAIL trial ended by Ctrl-C or SIGTERM, not by its point


# --- what a trial holds ------------------------------------------------------------------------


def trial_params(t: FrozenTrial) -> dict[str, Any]:
    """The params a trial holds, or the fixed params of an enqueued one."""
    return dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})


def trial_point(
    t: FrozenTrial,
    legacy: Mapping[str, str] | None = None,
    key_of: Callable[[Mapping[str, Any]], str] | None = None,
) -> str | None:
    """The id of the point a trial holds, None when it holds none (yet): `key_of` its params
    (`Grid.key_of`), else the params' id. A trial of ddsweep 0.1 holds one opaque `point` param
    and its id as attribute: `legacy` maps those ids."""
    params = trial_params(t)
    if "point" in params:
        return (legacy or {}).get(str(t.user_attrs.get("point_id")))
    if not params:
        return None
    return key_of(params) if key_of is not None else _id(tuple(params.items()))


@functools.lru_cache(maxsize=2**20)
def _id(params: tuple[tuple[str, Any], ...]) -> str:
    # Every scan of a study names each trial's point: cached, a scan of 100,000 trials costs
    # ~0.05 s instead of ~1 s (measured here: 0.46 us per cached name, 9.9 us per id_of).
    return id_of(dict(params))


class Liveness:
    """Which RUNNING trials have a live worker, judged without comparing one machine's clock
    with stamps written by another (their clocks may differ by an hour either way).

    With Optuna's own heartbeat (RDB storage) the database's clock stamps and judges every
    beat. Otherwise each worker counts its beats into the trial, and this observer, on its
    own monotonic clock, calls a trial stale once its count has not moved for the grace
    period. An observer that has just started gives every trial the benefit of the doubt for
    one grace period: a dead trial is judged late, a live one never wrongly."""

    def __init__(self, study: optuna.Study, grace: float) -> None:
        self.study, self.grace = study, grace
        self._seen: dict[int, tuple[Any, float]] = {}  # trial id -> (beat, when first seen)
        self._asked = (float("-inf"), frozenset[int]())  # RDB: (when, stale ids) last read

    def stale_ids(self, running: list[FrozenTrial]) -> set[int]:
        """The ids of the trials among `running` whose worker has shown no life for `grace`."""
        storage = self.study._storage
        if uses_rdb_heartbeat(storage):
            # Asked at most every grace / 10 (a second at most): two queries each, and the
            # hand-out asks on every claim. A trial is judged stale that much later.
            now = time.monotonic()
            if now - self._asked[0] >= min(1.0, self.grace / 10):
                sid = self.study._study_id
                ids = storage._get_stale_trial_ids(sid)  # type: ignore[attr-defined]
                self._asked = (now, frozenset(ids))
            return set(self._asked[1]) & {t._trial_id for t in running}
        now = time.monotonic()
        stale = set()
        for t in running:
            beat = t.user_attrs.get(HEARTBEAT_ATTR)
            seen = self._seen.get(t._trial_id)
            if seen is None or seen[0] != beat:
                self._seen[t._trial_id] = seen = (beat, now)
            if now - seen[1] > self.grace:
                stale.add(t._trial_id)
        return stale


@dataclass
class Tally:
    """What the storage says about every point."""

    complete: set[str]
    running: set[str]
    waiting: set[str]
    failures: Counter[str]
    visited: set[str]  # points with a trial in any state
    last_error: dict[str, str]  # point -> error of its latest FAIL trial

    def left(self, ids: list[str]) -> list[str]:
        """Points with no COMPLETE trial."""
        return [p for p in ids if p not in self.complete]

    def state(self, pid: str) -> str:
        """complete, running, failed or left."""
        if pid in self.complete:
            return "complete"
        if pid in self.running:
            return "running"
        return "failed" if self.failures[pid] else "left"


def interrupted(t: FrozenTrial) -> bool:
    """A FAIL trial that Ctrl-C or SIGTERM ended: its point is retried whatever the budget."""
    return bool(t.user_attrs.get(INTERRUPTED_ATTR))


def tally(
    study: optuna.Study, liveness: Liveness, legacy: Mapping[str, str] | None = None
) -> Tally:
    """Count trials per point: complete, running (live), waiting, failed (not interrupted)."""
    t = Tally(set(), set(), set(), Counter(), set(), {})
    trials = study.get_trials(deepcopy=False)
    stale = liveness.stale_ids([tr for tr in trials if tr.state == TrialState.RUNNING])
    for tr in trials:  # in trial-number order: the last error wins
        pid = trial_point(tr, legacy)
        if pid is None:
            continue
        t.visited.add(pid)
        if tr.state == TrialState.COMPLETE:
            t.complete.add(pid)
        elif tr.state == TrialState.RUNNING and tr._trial_id not in stale:
            t.running.add(pid)
        elif tr.state == TrialState.WAITING:
            t.waiting.add(pid)
        elif tr.state == TrialState.FAIL and not interrupted(tr):
            t.failures[pid] += 1
            t.last_error[pid] = str(tr.user_attrs.get("error", "stale"))
    return t


def fail_stale(
    study: optuna.Study, liveness: Liveness, running: list[FrozenTrial] | None = None
) -> int:
    """Mark RUNNING trials whose heartbeat stopped as FAIL (Optuna's own check on RDB).
    `running`: the RUNNING trials when the caller knows them (no scan of every trial)."""
    storage = study._storage
    if running is not None and not liveness.stale_ids(running):
        return 0
    if uses_rdb_heartbeat(storage):
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        optuna.storages.fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    n = 0
    if running is None:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    stale = liveness.stale_ids(running)
    for tr in running:
        if tr._trial_id not in stale:
            continue
        try:
            storage.set_trial_user_attr(
                tr._trial_id,
                "error",
                f"stale: no heartbeat for {liveness.grace:.0f} s (worker died?)",
            )
            if storage.set_trial_state_values(tr._trial_id, TrialState.FAIL):
                n += 1
        except Exception:  # another worker marked it first
            continue
    return n


class Heartbeat:
    """Tells the storage this trial's worker is alive, every `interval` seconds: from its own
    thread, or from `pulse`, a thread that a study's loop keeps for all its trials (a thread
    started and joined per trial cost 5-13 ms a trial under load, measured with
    benchmarks/bench_scheduler.py)."""

    def __init__(
        self,
        study: optuna.Study,
        trial_id: int,
        interval: float,
        *,
        beaten: bool = False,
        pulse: Pulse | None = None,
    ) -> None:
        """`beaten`: the trial was created with its first beat counted (HEARTBEAT_ATTR 1) and,
        on an RDB, its first Optuna heartbeat (`writes.claim`)."""
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self.beats = 1 if beaten else 0
        self._beaten = beaten
        self._stop = threading.Event()
        self.due = 0.0  # monotonic time of the next beat
        self._pulse = pulse or Pulse()

    def beat(self) -> bool:
        """Record one heartbeat; False once the trial has ended."""
        storage = self.study._storage
        try:
            if uses_rdb_heartbeat(storage):
                storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
            # A count, not a time: observers watch it move on their own clocks.
            self.beats += 1
            storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, self.beats)
        except Exception:  # the trial ended meanwhile
            return False
        return True

    def __enter__(self) -> Heartbeat:
        # Beat at once: Optuna's RDB stale check skips a trial that has never beaten, so a
        # worker killed within its first interval would leave a trial RUNNING forever.
        storage = self.study._storage
        if not self._beaten:
            self.beat()
        elif uses_rdb_heartbeat(storage) and not has_heartbeat_row(storage):
            storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
        self._pulse.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pulse.remove(self)


class Pulse:
    """A thread that beats its Heartbeats when they are due (one a study loop: its trials
    run one at a time, so one slow write never delays another study's beats)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: dict[int, Heartbeat] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._until = float("-inf")  # when the thread wakes next (monotonic)

    def add(self, hb: Heartbeat) -> None:
        hb.due = time.monotonic() + hb.interval
        with self._lock:
            self._beats[id(hb)] = hb
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
            # Woken only when this beat is due before the thread would wake anyway: a wake a
            # trial cost a thread switch a trial (~1.7 ms under load, measured).
            wake = hb.due < self._until
        if wake:
            self._wake.set()

    def remove(self, hb: Heartbeat) -> None:
        with self._lock:
            self._beats.pop(id(hb), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                beats = list(self._beats.values())
            now = time.monotonic()
            for hb in beats:
                if hb._stop.is_set() or hb.due > now:
                    continue
                hb.due = now + hb.interval
                if not hb.beat():
                    self.remove(hb)
            with self._lock:
                dues = [hb.due for hb in self._beats.values()]
                wait = max(0.01, min(dues) - time.monotonic()) if dues else 60.0
                self._until = time.monotonic() + wait
            self._wake.wait(wait)
            self._wake.clear()
