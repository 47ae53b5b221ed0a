"""Handing out the points of a grid exactly once: the grid sampler and the study loop."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ddsweep.config.points import id_of
from ddsweep.errors import UserError, first_line
from ddsweep.scheduler.storage import make_storage
from ddsweep.scheduler.trials import (
    INTERRUPTED_ATTR,
    Heartbeat,
    Liveness,
    Tally,
    fail_stale,
    tally,
    trial_params,
    trial_point,
)
from ddsweep.scheduler.types import Evaluator, Grid, Outcome, Policy

CREATED_ATTR = "created_at"
CHOICES_ATTR = "choices"  # the categorical params' choices, fixed when the study is created
# Int params hold epochs, steps, k, and the 48-bit digest of a point's other settings (a retry
# of such a point warned "out of range" with 2**31 - 1); 2**48 - 1 stays exact in an RDB's
# float column, and Optuna accepts the wider range beside trials of the narrower one.
INT_HIGH = 2**48 - 1
Direction = Literal["minimize", "maximize"]


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
        self.liveness = Liveness(study, policy.grace_period)

    # study-wide attributes: pinned backbones, the MLflow parent run, ...
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.study.user_attrs)

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def name_metric(self, name: str) -> None:
        """Name the trial value (Optuna's `set_metric_names`), once: the dashboard shows it."""
        if self.study.metric_names != [name]:
            with warnings.catch_warnings():  # experimental since Optuna 3.2, and still there
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names([name])

    def age(self) -> float:
        """Seconds since the study was created."""
        return time.time() - float(self.study.user_attrs.get(CREATED_ATTR, 0.0))

    def tally(self) -> Tally:
        return tally(self.study, self.liveness, self.grid.legacy)

    def has_legacy_trials(self) -> bool:
        """Whether ddsweep 0.1 ran trials of this study (one opaque `point` param each)."""
        return any("point" in trial_params(t) for t in self.study.get_trials(deepcopy=False))

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
        with Heartbeat(self.study, trial._trial_id, self.policy.heartbeat_interval) as beat:
            try:
                return self._run_claimed(trial, evaluator, on_point, beat)
            except (KeyboardInterrupt, SystemExit) as stop:
                # Ctrl-C or SIGTERM says nothing about the point: FAIL, but marked so that it
                # is retried whatever --max-retries says (a point is never lost to a Ctrl-C).
                with contextlib.suppress(UpdateFinishedTrialError):
                    trial.set_user_attr(INTERRUPTED_ATTR, True)
                    trial.set_user_attr("error", f"interrupted ({type(stop).__name__})")
                self._tell(trial, state=TrialState.FAIL)
                raise

    def _claim(self, trial: optuna.Trial) -> str | None:
        """Write the point's params into the trial (the claim, visible before we read)."""
        # An enqueued retry's params (Optuna keeps no public accessor for them before the
        # trial suggests them).
        params = dict(getattr(trial, "_fixed_params", None) or {})
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
        # The point is what the storage now holds for the trial, whatever handed it out.
        return id_of(trial.params)

    def _run_claimed(
        self,
        trial: optuna.Trial,
        evaluator: Evaluator,
        on_point: Callable[[str], None] | None,
        beat: Heartbeat,
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
            result = evaluator.compute(pid)
            # A worker paused past the grace period (SIGSTOP, a suspended machine) finds its
            # trial judged stale and its point handed on: it records nothing (the beat is a
            # write that fails on an ended trial). And a result recorded meanwhile by a worker
            # judged stale just after its own check is adopted, not recorded twice.
            if not beat.beat():
                return "superseded"
            adopted = evaluator.adopt(pid)
            if adopted is not None:
                self._finish(trial, adopted)
                return "adopted"
            outcome = evaluator.record(pid, trial.number, result)
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
        trials = self.study.get_trials(deepcopy=False)
        stale = self.liveness.stale_ids([t for t in trials if t.state == TrialState.RUNNING])
        for t in trials:
            if t.number == trial.number or trial_point(t, self.grid.legacy) != pid:
                continue
            if t.state == TrialState.COMPLETE:
                return f"complete in trial {t.number}"
            if t.state == TrialState.RUNNING and t._trial_id not in stale:
                return f"running in trial {t.number}"
        return None

    # the loop
    def work(
        self, evaluator: Evaluator, on_point: Callable[[str], None] | None = None
    ) -> Counter[str]:
        """Run trials until every point is complete, given up on, or running elsewhere."""
        outcomes: Counter[str] = Counter()
        live = self.liveness
        fail_stale(self.study, live)
        self._enqueue_retries(include_failed=True, evaluator=evaluator)
        sampler = self.study.sampler
        assert isinstance(sampler, GridSampler)
        while True:
            while self._waiting() or not sampler.is_exhausted(self.study):
                outcomes[self.run_trial(evaluator, on_point)] += 1
                fail_stale(self.study, live)
            # Points left by races or by dead workers, within this same run:
            if self._enqueue_retries(include_failed=False) or self._retry_stale(evaluator):
                continue
            t = self.tally()
            if not [p for p in t.left(self.grid.ids) if p in t.running]:
                return outcomes
            time.sleep(min(2.0, self.policy.heartbeat_interval))  # wait for other workers
            fail_stale(self.study, live)

    def _waiting(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _enqueue(self, pid: str) -> None:
        self.study.enqueue_trial(self.grid.params[pid], skip_if_exists=False)

    def _enqueue_retries(self, *, include_failed: bool, evaluator: Evaluator | None = None) -> int:
        """Enqueue points that have no COMPLETE, RUNNING or WAITING trial: failed ones (up to
        max_retries, or beyond when `evaluator` holds a recorded result to adopt) when
        `include_failed`, those left without a trial by a stepped-back race, and interrupted
        ones (a Ctrl-C is no failure of the point)."""
        t = self.tally()
        n = 0
        for pid in t.left(self.grid.ids):
            if pid in t.running or pid in t.waiting:
                continue
            fails = t.failures[pid]
            if fails and not include_failed:
                continue
            if fails > self.policy.max_retries and not self._recorded(pid, evaluator):
                continue
            if not fails and pid not in t.visited:
                continue  # the grid sampler still owes it a trial
            self._enqueue(pid)
            n += 1
        return n

    def _retry_stale(self, evaluator: Evaluator) -> int:
        """Enqueue points whose last failure was a dead worker (not an error), within limits
        or with a result recorded before the worker died (adopted whatever the budget)."""
        t = self.tally()
        n = 0
        for pid in t.left(self.grid.ids):
            if pid in t.running or pid in t.waiting or pid not in t.last_error:
                continue
            if not t.last_error[pid].startswith("stale"):
                continue
            if t.failures[pid] > self.policy.max_retries and not self._recorded(pid, evaluator):
                continue
            self._enqueue(pid)
            n += 1
        return n

    @staticmethod
    def _recorded(pid: str, evaluator: Evaluator | None) -> bool:
        """Whether a result of `pid` was recorded (a worker died before telling Optuna):
        adopting it costs nothing, so it is done whatever the retry budget."""
        return evaluator is not None and evaluator.adopt(pid) is not None


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
