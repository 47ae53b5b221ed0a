"""Exactly-once grid studies on Optuna: claim a point, step back, adopt, retry, heartbeat,
workers. The only module that imports Optuna; it knows points as ids and params, nothing of
probes, FID or MLflow.

A trial's params are the point's settings (categorical, int or bool), so `optuna-dashboard` and
`optuna.visualization` show the grid by axis. Exactly once, in the order things happen in a trial:
1. The trial takes its point (the grid sampler, or an enqueued retry) and the point becomes
   visible in the storage as the trial's params while the trial is RUNNING.
2. Only then it reads the storage: if another trial holds the same point and is COMPLETE, or
   RUNNING with a fresh heartbeat, this trial steps back (PRUNED, attribute `duplicate_of`).
   Two racing trials each write before they read, so at least one sees the other; both may step
   back, never both run. A point left without a trial that way is enqueued again.
3. Before evaluating, the evaluator may adopt a result already recorded for the point (a worker
   killed after recording, before telling Optuna) instead of evaluating again.
A trial that raises is FAIL with the error as attribute; the next run retries it, up to
`max_retries`. A trial whose heartbeat stops (SIGKILL, lost machine) is marked FAIL after the
grace period and retried by any worker.

Studies begun by ddsweep 0.1 keep working: their trials hold one opaque `point` param and the
point's positional id as attribute, which the grid maps to today's ids (`Grid.legacy`), so their
finished points count as finished and are never run again.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ddsweep.errors import UserError, first_line, redact
from ddsweep.points import id_of

HEARTBEAT_ATTR = "heartbeat"
CREATED_ATTR = "created_at"
CHOICES_ATTR = "choices"  # the categorical params' choices, fixed when the study is created
INT_HIGH = 2**31 - 1
Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class Policy:
    """How a study is run: where it is stored and how trials are retried and watched."""

    storage: str | None = None  # None: a journal file under .ddsweep/optuna/
    max_retries: int = 2
    heartbeat_interval: int = 10
    grace_period: int = 60


@dataclass(frozen=True)
class Grid:
    """The points to run: {point id: trial params} in hand-out order, and for each categorical
    param the values it may take beyond the grid's own (so a grid that grows within them keeps
    one Optuna distribution)."""

    params: dict[str, dict[str, Any]]
    vocabulary: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Ids of ddsweep 0.1's trials, which held one opaque `point` param and the id as attribute.
    legacy: Mapping[str, str] = field(default_factory=dict)
    # How people read a point (the trial attribute `point_id`), when not its params' id.
    names: Mapping[str, str] = field(default_factory=dict)

    def name(self, pid: str) -> str:
        return self.names.get(pid, pid)

    @property
    def ids(self) -> list[str]:
        return list(self.params)


@dataclass(frozen=True)
class Outcome:
    """What evaluating (or adopting) a point gave: the objective value and trial attributes."""

    value: float
    attrs: Mapping[str, Any] = field(default_factory=dict)


class Evaluator(Protocol):
    """What the scheduler asks of the study it runs, one point at a time."""

    def adopt(self, pid: str) -> Outcome | None:
        """The outcome of `pid` already recorded by an earlier worker, if any."""

    def evaluate(self, pid: str, trial_number: int) -> Outcome:
        """Evaluate `pid` and record it; raising marks the trial FAIL."""

    def fail(self, pid: str, trial_number: int, message: str) -> None:
        """Record that evaluating `pid` raised `message`."""


# --- storage --------------------------------------------------------------------------------


def default_storage_path(study: str) -> Path:
    """The local journal file of a study: $DDSWEEP_HOME/optuna/NAME.journal (.ddsweep/...)."""
    root = Path(os.environ.get("DDSWEEP_HOME") or ".ddsweep")
    return root / "optuna" / f"{study}.journal"


def make_storage(study: str, policy: Policy) -> optuna.storages.BaseStorage:
    """Journal file storage by default (several processes on one machine), or an RDB URL with
    Optuna's heartbeat (several machines)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = policy.storage
    if url is None or url.endswith(".journal") or url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")) if url else default_storage_path(study)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:") and "mlflow.db" in url:
        raise UserError(
            "--storage must not be MLflow's database: both keep an alembic_version table; "
            "use another file or the default journal"
        )
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=policy.heartbeat_interval, grace_period=policy.grace_period
        )
    except Exception as err:  # bad URL, server down, missing driver: all the user's to fix
        raise UserError(f"cannot open Optuna storage {redact(url)}: {first_line(err)}") from err


def uses_rdb_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether Optuna's own heartbeat is on (RDBStorage with heartbeat_interval).

    A study holds its RDBStorage wrapped in Optuna's `_CachedStorage`, which forwards the
    heartbeat: ask the storage, not its class."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


# --- what a trial holds ------------------------------------------------------------------------


def trial_params(t: FrozenTrial) -> dict[str, Any]:
    """The params a trial holds, or the fixed params of an enqueued one."""
    return dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})


def trial_point(t: FrozenTrial, legacy: Mapping[str, str] | None = None) -> str | None:
    """The id of the point a trial holds, None when it holds none (yet). A trial of ddsweep 0.1
    holds one opaque `point` param and its id as attribute: `legacy` maps those ids."""
    params = trial_params(t)
    if "point" in params:
        return (legacy or {}).get(str(t.user_attrs.get("point_id")))
    return id_of(params) if params else None


def last_beat(t: FrozenTrial) -> float:
    """When a RUNNING trial last showed life (its heartbeat attribute, else its start)."""
    beat = t.user_attrs.get(HEARTBEAT_ATTR)
    start = t.datetime_start.timestamp() if t.datetime_start else time.time()
    return max(float(beat), start) if beat is not None else start


def is_fresh(t: FrozenTrial, grace: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is alive, as far as its heartbeat tells."""
    return (now or time.time()) - last_beat(t) <= grace


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


def tally(study: optuna.Study, grace: float, legacy: Mapping[str, str] | None = None) -> Tally:
    """Count trials per point: complete, running (fresh), waiting, failed."""
    t = Tally(set(), set(), set(), Counter(), set(), {})
    now = time.time()
    for tr in study.get_trials(deepcopy=False):  # in trial-number order: the last error wins
        pid = trial_point(tr, legacy)
        if pid is None:
            continue
        t.visited.add(pid)
        if tr.state == TrialState.COMPLETE:
            t.complete.add(pid)
        elif tr.state == TrialState.RUNNING and is_fresh(tr, grace, now):
            t.running.add(pid)
        elif tr.state == TrialState.WAITING:
            t.waiting.add(pid)
        elif tr.state == TrialState.FAIL:
            t.failures[pid] += 1
            t.last_error[pid] = str(tr.user_attrs.get("error", "stale"))
    return t


def fail_stale(study: optuna.Study, grace: float) -> int:
    """Mark RUNNING trials whose heartbeat stopped as FAIL (Optuna's own check on RDB)."""
    storage = study._storage
    if uses_rdb_heartbeat(storage):
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        optuna.storages.fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    n = 0
    now = time.time()
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_fresh(tr, grace, now):
            continue
        try:
            storage.set_trial_user_attr(
                tr._trial_id, "error", f"stale: no heartbeat for {grace:.0f} s (worker died?)"
            )
            if storage.set_trial_state_values(tr._trial_id, TrialState.FAIL):
                n += 1
        except Exception:  # another worker marked it first
            continue
    return n


class Heartbeat:
    """A thread that tells the storage this trial's worker is alive."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float) -> None:
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def beat(self) -> bool:
        """Record one heartbeat; False once the trial has ended."""
        storage = self.study._storage
        try:
            if uses_rdb_heartbeat(storage):
                storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
            storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
        except Exception:  # the trial ended meanwhile
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and self.beat():
            pass

    def __enter__(self) -> Heartbeat:
        # Beat at once: Optuna's RDB stale check skips a trial that has never beaten, so a
        # worker killed within its first interval would leave a trial RUNNING forever.
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- handing out points ------------------------------------------------------------------------


class GridSampler(BaseSampler):
    """Hands each new trial a point of the grid that no trial holds yet, known by its params.

    Written by hand because Optuna's GridSampler fits a fixed grid only: it stores the whole
    grid in every trial and compares it with every trial's copy on each ask (measured here:
    0.6 s of bookkeeping a trial at 800 points, growing with the cube of the grid), and when
    the grid changes (a sweep gains an epoch) it forgets every point already done and hands
    each out again. Here only points without a trial are handed out.
    """

    def __init__(self, grid: Grid, seed: int = 0) -> None:
        self._grid = grid
        self._order = grid.ids
        random.Random(seed).shuffle(self._order)  # the same order in every worker
        self._chosen: dict[int, dict[str, Any]] = {}

    def unclaimed(self, study: optuna.Study) -> list[str]:
        """Points of the grid with no trial at all (in any state), in hand-out order."""
        held = {trial_point(t, self._grid.legacy) for t in study.get_trials(deepcopy=False)}
        return [p for p in self._order if p not in held]

    def is_exhausted(self, study: optuna.Study) -> bool:
        """Whether every point has a trial; what is left is retries."""
        return not self.unclaimed(study)

    def choose(self, study: optuna.Study, number: int) -> dict[str, Any]:
        """The params of the point trial `number` takes."""
        free = self.unclaimed(study) or self._order  # exhausted: a duplicate that steps back
        # Workers reading the storage at the same moment see the same list; their trial
        # numbers differ, so they take different points.
        params = self._grid.params[free[number % len(free)]]
        self._chosen[number] = params
        return params

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: Any, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._chosen[trial.number][param_name]


def _distribution(name: str, value: Any, choices: Mapping[str, list[Any]]) -> BaseDistribution:
    if isinstance(value, bool):
        return CategoricalDistribution((True, False))
    if isinstance(value, int):
        return IntDistribution(0, INT_HIGH)
    return CategoricalDistribution(tuple(choices[name]))


def _choices(grid: Grid) -> dict[str, list[Any]]:
    """Every categorical (string) param's choices: its vocabulary, then the grid's other values."""
    out: dict[str, list[Any]] = {}
    for params in grid.params.values():
        for name, value in params.items():
            if isinstance(value, str):
                values = out.setdefault(name, list(grid.vocabulary.get(name, ())))
                if value not in values:
                    values.append(value)
    return out


# --- a study of a grid ------------------------------------------------------------------------


class GridStudy:
    """One Optuna study run as an exactly-once grid."""

    def __init__(self, study: optuna.Study, policy: Policy, created: bool) -> None:
        self.study, self.policy, self.created = study, policy, created
        self.grid = Grid({})

    # study-wide attributes: pinned backbones, the MLflow parent run, ...
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.study.user_attrs)

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def age(self) -> float:
        """Seconds since the study was created."""
        return time.time() - float(self.study.user_attrs.get(CREATED_ATTR, 0.0))

    def tally(self) -> Tally:
        return tally(self.study, self.policy.grace_period, self.grid.legacy)

    def watch(self, grid: Grid) -> None:
        """Read the study's progress on `grid` without running it (nothing is written)."""
        self.grid = grid

    def use(self, grid: Grid) -> None:
        """Run `grid` from now on; UserError when the study cannot hold it."""
        if not grid.params:
            raise UserError(f"study {self.study.study_name}: the grid is empty")
        self._fix_choices(grid)
        self.grid = grid
        self.study.sampler = GridSampler(grid)

    def _fix_choices(self, grid: Grid) -> None:
        wanted = _choices(grid)
        fixed = self.study.user_attrs.get(CHOICES_ATTR)
        if fixed is None:  # racing workers of one grid compute the same choices
            self.study.set_user_attr(CHOICES_ATTR, wanted)
            return
        for name, values in wanted.items():
            new = [v for v in values if v not in fixed.get(name, ())]
            if new:
                raise UserError(
                    f"study {self.study.study_name!r} fixed the values of {name} when it was "
                    f"created ({', '.join(map(str, fixed.get(name, ())))}); {new[0]!r} is new "
                    "and Optuna's categorical params cannot grow: run it as a new study "
                    f"(--study {self.study.study_name}-2)"
                )

    # one trial
    def run_trial(self, evaluator: Evaluator, on_point: Callable[[str], None] | None) -> str:
        """Ask for one trial, evaluate it (or step back), tell the result; its final state."""
        trial = self.study.ask()
        # The heartbeat covers the whole trial: a worker killed while it claims a point leaves
        # a trial that goes stale like any other, not one RUNNING forever.
        with Heartbeat(self.study, trial._trial_id, self.policy.heartbeat_interval):
            return self._run_claimed(trial, evaluator, on_point)

    def _claim(self, trial: optuna.Trial) -> str | None:
        """Write the point's params into the trial (the claim, visible before we read)."""
        params = dict(trial._fixed_params)
        if "point" in params:
            return None  # a retry enqueued by ddsweep 0.1
        if not params:
            sampler = self.study.sampler
            assert isinstance(sampler, GridSampler)
            params = sampler.choose(self.study, trial.number)
        choices = self.study.user_attrs.get(CHOICES_ATTR, {})
        for name, value in params.items():
            dist = _distribution(name, value, choices)
            if isinstance(value, str) and value not in dist.choices:  # type: ignore[attr-defined]
                return None  # a retry enqueued by a grid with other values
            if isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
            else:
                trial.suggest_int(name, 0, INT_HIGH)
        return id_of(params)

    def _run_claimed(
        self, trial: optuna.Trial, evaluator: Evaluator, on_point: Callable[[str], None] | None
    ) -> str:
        pid = self._claim(trial)
        if pid not in self.grid.params:
            # A retry enqueued by a run of another grid of this study (say, before an epoch was
            # dropped): not ours to evaluate; a run of that grid enqueues it again.
            trial.set_user_attr("duplicate_of", "not in this grid")
            self._tell(trial, state=TrialState.PRUNED)
            return "duplicate"
        trial.set_user_attr("point_id", self.grid.name(pid))
        reason = self._step_back_reason(trial, pid)
        if reason:
            trial.set_user_attr("duplicate_of", reason)
            self._tell(trial, state=TrialState.PRUNED)
            return "duplicate"
        if on_point:
            on_point(self.grid.name(pid))
        # Which process holds the point: `study status` and operators can tell who died.
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        adopted = evaluator.adopt(pid)
        if adopted is not None:
            self._finish(trial, adopted)
            return "adopted"
        try:
            outcome = evaluator.evaluate(pid, trial.number)
        except (KeyboardInterrupt, SystemExit):
            self._tell(trial, state=TrialState.FAIL)
            raise
        except Exception as err:
            message = f"{type(err).__name__}: {first_line(err)}"
            evaluator.fail(pid, trial.number, message)
            with contextlib.suppress(UpdateFinishedTrialError):  # judged stale meanwhile
                trial.set_user_attr("error", message)
            self._tell(trial, state=TrialState.FAIL)
            return "failed"
        # Another worker may have judged this trial stale meanwhile: the tell is then skipped
        # and the retry adopts the result recorded above instead of evaluating again.
        self._finish(trial, outcome)
        return "complete"

    def _finish(self, trial: optuna.Trial, outcome: Outcome) -> None:
        with contextlib.suppress(UpdateFinishedTrialError):
            for key, value in outcome.attrs.items():
                trial.set_user_attr(key, value)
        self._tell(trial, outcome.value)

    def _tell(self, trial: optuna.Trial, value: float | None = None, **kw: Any) -> None:
        """Tell a trial's end, unless another worker has already ended it (judged it stale)."""
        with contextlib.suppress(UpdateFinishedTrialError):  # ended between check and write
            self.study.tell(trial, value, skip_if_finished=True, **kw)

    def _step_back_reason(self, trial: optuna.Trial, pid: str) -> str | None:
        """Why this trial must not evaluate point `pid` (another trial has it), or None."""
        now = time.time()
        for t in self.study.get_trials(deepcopy=False):
            if t.number == trial.number or trial_point(t, self.grid.legacy) != pid:
                continue
            if t.state == TrialState.COMPLETE:
                return f"complete in trial {t.number}"
            if t.state == TrialState.RUNNING and is_fresh(t, self.policy.grace_period, now):
                return f"running in trial {t.number}"
        return None

    # the loop
    def work(
        self, evaluator: Evaluator, on_point: Callable[[str], None] | None = None
    ) -> Counter[str]:
        """Run trials until every point is complete, given up on, or running elsewhere."""
        outcomes: Counter[str] = Counter()
        grace = self.policy.grace_period
        fail_stale(self.study, grace)
        self._enqueue_retries(include_failed=True)
        sampler = self.study.sampler
        assert isinstance(sampler, GridSampler)
        while True:
            while self._waiting() or not sampler.is_exhausted(self.study):
                outcomes[self.run_trial(evaluator, on_point)] += 1
                fail_stale(self.study, grace)
            # Points left by races or by dead workers, within this same run:
            if self._enqueue_retries(include_failed=False) or self._retry_stale():
                continue
            t = self.tally()
            if not [p for p in t.left(self.grid.ids) if p in t.running]:
                return outcomes
            time.sleep(min(2.0, self.policy.heartbeat_interval))  # wait for other workers
            fail_stale(self.study, grace)

    def _waiting(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _enqueue(self, pid: str) -> None:
        self.study.enqueue_trial(self.grid.params[pid], skip_if_exists=False)

    def _enqueue_retries(self, *, include_failed: bool) -> int:
        """Enqueue points that have no COMPLETE, RUNNING or WAITING trial: failed ones (up to
        max_retries) when `include_failed`, and those left without a trial by a stepped-back
        race."""
        t = self.tally()
        n = 0
        for pid in t.left(self.grid.ids):
            if pid in t.running or pid in t.waiting:
                continue
            fails = t.failures[pid]
            if fails and (not include_failed or fails > self.policy.max_retries):
                continue
            if not fails and pid not in t.visited:
                continue  # the grid sampler still owes it a trial
            self._enqueue(pid)
            n += 1
        return n

    def _retry_stale(self) -> int:
        """Enqueue points whose last failure was a dead worker (not an error), within limits."""
        t = self.tally()
        n = 0
        for pid in t.left(self.grid.ids):
            if pid in t.running or pid in t.waiting or pid not in t.last_error:
                continue
            if not t.last_error[pid].startswith("stale"):
                continue
            if t.failures[pid] > self.policy.max_retries:
                continue
            self._enqueue(pid)
            n += 1
        return n


def open_study(
    name: str, policy: Policy, direction: Direction, *, create: bool = True
) -> GridStudy | None:
    """The grid study `name`: created on first use when `create`, else None when missing."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(name, policy)
    try:
        return GridStudy(optuna.load_study(study_name=name, storage=storage), policy, False)
    except KeyError:
        if not create:
            return None
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it first
        return GridStudy(optuna.load_study(study_name=name, storage=storage), policy, False)
    study.set_user_attr(CREATED_ATTR, time.time())
    return GridStudy(study, policy, True)


# --- workers -------------------------------------------------------------------------------------


def share_cores(workers: int) -> None:
    """Give each of `workers` local processes its share of the cores: torch's intra-op threads
    spin against each other otherwise (measured here: a linear probe 3 s alone, 59-105 s with
    two 2-thread processes on 2 cores)."""
    import torch

    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def spawn_workers(n: int, target: Callable[..., None], args: tuple[Any, ...]) -> list[Any]:
    """Start `n` fresh worker processes running target(*args)."""
    spawn = mp.get_context("spawn")
    procs = []
    for _ in range(max(0, n)):
        p = spawn.Process(target=target, args=args, daemon=False)
        p.start()
        procs.append(p)
    return procs


def stop_workers(procs: list[Any]) -> None:
    """Wait for workers; any still alive (the main worker was interrupted) is terminated."""
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
