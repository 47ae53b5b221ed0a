"""Handing out the points of a grid exactly once: the grid sampler and the study loop."""

from __future__ import annotations

import contextlib
import math
import os
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

from ddsweep.errors import UserError, first_line
from ddsweep.scheduler import writes
from ddsweep.scheduler.storage import journal_path, make_storage
from ddsweep.scheduler.trials import (
    HEARTBEAT_ATTR,
    INTERRUPTED_ATTR,
    Heartbeat,
    Liveness,
    Pulse,
    Tally,
    fail_stale,
    trial_params,
)
from ddsweep.scheduler.types import Evaluator, Grid, Outcome, Policy
from ddsweep.scheduler.view import WORKER_ATTR, Handout, View, template

CREATED_ATTR = "created_at"
CHOICES_ATTR = "choices"  # the categorical params' choices, fixed when the study is created
# Int params hold epochs, steps, k, and the 48-bit digest of a point's other settings (a retry
# of such a point warned "out of range" with 2**31 - 1); 2**48 - 1 stays exact in an RDB's
# float column, and Optuna accepts the wider range beside trials of the narrower one.
INT_HIGH = 2**48 - 1
# Studies created since ddsweep 0.1.x: an int param's distribution spans its grid's values
# (optuna-dashboard spreads epochs and noise steps; a constant axis, low == high, is left out
# of its importance ranking). A study created before keeps 0..INT_HIGH: an Optuna study's
# params cannot change distribution mid-study without `optuna-dashboard` misdrawing them.
RANGES_ATTR = "int_ranges"
SPREAD = "grid values"
Direction = Literal["minimize", "maximize"]


# --- handing out points ------------------------------------------------------------------------


class GridSampler(BaseSampler):
    """Gives a trial from Optuna's `ask` the params of the point its claim chose (`_chosen`,
    by trial number): which point that is, the study's `Handout` decides.

    Written by hand because Optuna's GridSampler fits a fixed grid only: it stores the whole
    grid in every trial and compares it with every trial's copy on each ask (measured here:
    0.6 s of bookkeeping a trial at 800 points, growing with the cube of the grid), and when
    the grid changes (a sweep gains an epoch) it forgets every point already done and hands
    each out again.
    """

    def __init__(self) -> None:
        self._chosen: dict[int, dict[str, Any]] = {}

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: Any, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._chosen[trial.number][param_name]


# (lowest, highest, the gcd of every value's distance from the lowest; 0 for a single value)
IntRange = tuple[int, int, int]


def _distribution(
    name: str,
    value: Any,
    choices: Mapping[str, list[Any]],
    ranges: Mapping[str, IntRange] | None = None,
) -> BaseDistribution:
    """The param's distribution: categorical for flags and names; for an int, the span of the
    grid's values on their common step (`ranges`, widened to hold `value`), or 0..INT_HIGH in
    a study that began with that (`ranges` None)."""
    if isinstance(value, bool):
        return CategoricalDistribution((True, False))
    if isinstance(value, int):
        if ranges is None:
            return IntDistribution(0, INT_HIGH)
        low, high, step = ranges.get(name, (value, value, 0))
        lo, hi = min(low, value), max(high, value)
        return IntDistribution(lo, hi, step=math.gcd(step, low - lo, value - lo) or 1)
    return CategoricalDistribution(tuple(choices[name]))


def int_ranges(grid: Grid) -> dict[str, IntRange]:
    """(lowest, highest, common step) of every int param of the grid. The step matters to the
    importance panel of optuna-dashboard (PED-ANOVA, Optuna 5's default evaluator too): on
    the quickstart's study, noise steps 0 and 50 on a step of 1 ranked noise_step 0.97 and the
    probe 0.01, although every trial of its top tenth was k-NN; on their step of 50 (epochs on
    2), 0.44 and 0.24."""
    values: dict[str, set[int]] = {}
    for params in grid.params.values():
        for name, value in params.items():
            if isinstance(value, int) and not isinstance(value, bool):
                values.setdefault(name, set()).add(value)
    out: dict[str, IntRange] = {}
    for name, seen in values.items():
        low = min(seen)
        out[name] = (low, max(seen), math.gcd(*(v - low for v in seen)))
    return out


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


def claimed_trial(study: optuna.Study, frozen: FrozenTrial) -> optuna.Trial:
    """The optuna.Trial of a trial this worker has just created as `frozen` (its id and number
    set): what optuna.Trial() sets, without its read of the whole trial back (six queries on an
    RDB) and with our sampler's no-op `before_trial` skipped."""
    trial = optuna.Trial.__new__(optuna.Trial)
    trial.study, trial.storage, trial._trial_id = study, study._storage, frozen._trial_id
    trial._cached_frozen_trial = frozen
    trial.relative_search_space, trial._relative_params, trial._fixed_params = None, None, {}
    return trial


# --- a study of a grid ------------------------------------------------------------------------


class GridStudy:
    """One Optuna study run as an exactly-once grid."""

    def __init__(self, study: optuna.Study, policy: Policy, created: bool) -> None:
        self.study, self.policy, self.created = study, policy, created
        self.grid = Grid({})
        self.liveness = Liveness(study, policy.grace_period)
        self._view: View | None = None
        self._handout: Handout | None = None
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self._stale_checked = float("-inf")
        self._choices: dict[str, list[Any]] = {}  # CHOICES_ATTR, read once by `use`
        self._pulse = Pulse()  # the heartbeat thread of this study's trials
        self.ranges: dict[str, IntRange] | None = None  # set by `use`

    @property
    def view(self) -> View:
        """The study's trials as of the last refresh (rebuilt when the grid's legacy ids change)."""
        if self._view is None or self._view.legacy is not self.grid.legacy:
            self._view = View(self.study, self.liveness, self.grid.legacy, self.grid.params)
            self._handout = None
        return self._view

    @property
    def handout(self) -> Handout:
        view = self.view
        if self._handout is None or self._handout.view is not view:
            self._handout = Handout(self.grid, view, worker=hash(self.me) & 0xFFFFFFF)
        return self._handout

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
        return self.view.tally()

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
        self._handout = None  # a new grid: a new order
        self.study.sampler = GridSampler()
        if RANGES_ATTR not in self.study.user_attrs and not self.study.get_trials(deepcopy=False):
            self.study.set_user_attr(RANGES_ATTR, SPREAD)  # no trial holds another range yet
        self.ranges = int_ranges(grid) if self.spreads_ints() else None

    def spreads_ints(self) -> bool:
        """Whether the study's int params span their grid's values (studies created since
        this was added), else 0..INT_HIGH (older studies keep what they began with)."""
        return self.study.user_attrs.get(RANGES_ATTR) == SPREAD

    def _fix_choices(self, grid: Grid) -> None:
        wanted = _choices(grid)
        fixed = self.study.user_attrs.get(CHOICES_ATTR)
        if fixed is None:  # racing workers of one grid compute the same choices
            self.study.set_user_attr(CHOICES_ATTR, wanted)
            self._choices = wanted
            return
        self._choices = fixed
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
    def run_trial(
        self, evaluator: Evaluator, on_point: Callable[[str], None] | None, pid: str | None = None
    ) -> str:
        """Claim point `pid` (None: a WAITING retry, through Optuna's ask), evaluate it (or step
        back), tell the result; its final state."""
        trial = self.study.ask() if pid is None else self._create(pid)
        # The heartbeat covers the whole trial: a worker killed while it claims a point leaves
        # a trial that goes stale like any other, not one RUNNING forever.
        interval = self.policy.heartbeat_interval
        beaten = pid is not None
        pulse = self._pulse
        with Heartbeat(self.study, trial._trial_id, interval, beaten=beaten, pulse=pulse):
            try:
                return self._run_claimed(trial, evaluator, on_point, pid)
            except (KeyboardInterrupt, SystemExit) as stop:
                # Ctrl-C or SIGTERM says nothing about the point: FAIL, but marked so that it
                # is retried whatever --max-retries says (a point is never lost to a Ctrl-C).
                with contextlib.suppress(UpdateFinishedTrialError):
                    trial.set_user_attr(INTERRUPTED_ATTR, True)
                    trial.set_user_attr("error", f"interrupted ({type(stop).__name__})")
                self._tell(trial, state=TrialState.FAIL)
                raise

    def _create(self, pid: str) -> optuna.Trial:
        """The claim in one write: a RUNNING trial created with the point's params, its name,
        its worker and its first heartbeat (Optuna's ask and suggest take one write each)."""
        params = self.grid.params[pid]
        choices = self._choices
        dists = {n: _distribution(n, v, choices, self.ranges) for n, v in params.items()}
        attrs = {"point_id": pid, WORKER_ATTR: self.me, HEARTBEAT_ATTR: 1}
        made = template(params, dists, attrs)
        made._trial_id, made.number = writes.claim(self.study._storage, self.study._study_id, made)
        return claimed_trial(self.study, made)

    def _claim(self, trial: optuna.Trial, evaluator: Evaluator) -> str | None:
        """Write the point's params into a trial from `ask` (the claim, visible before we read)."""
        # An enqueued retry's params (Optuna keeps no public accessor for them before the
        # trial suggests them).
        params = dict(getattr(trial, "_fixed_params", None) or {})
        if "point" in params:
            return None  # a retry enqueued by ddsweep 0.1
        if not params:  # the WAITING trial was taken by another worker first
            pid = self.handout.next(self.me, getattr(evaluator, "holds", None))
            if pid is None:
                return None
            params = self.grid.params[pid]
            sampler = self.study.sampler
            assert isinstance(sampler, GridSampler)
            sampler._chosen[trial.number] = params
        choices = self._choices
        for name, value in params.items():
            dist = _distribution(name, value, choices, self.ranges)
            if isinstance(value, str) and value not in dist.choices:  # type: ignore[attr-defined]
                return None  # a retry enqueued by a grid with other values
            if isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
            else:
                assert isinstance(dist, IntDistribution)
                trial.suggest_int(name, dist.low, dist.high, step=dist.step)
        # The point is what the storage now holds for the trial, whatever handed it out.
        return self.grid.key_of(trial.params)

    def _run_claimed(
        self,
        trial: optuna.Trial,
        evaluator: Evaluator,
        on_point: Callable[[str], None] | None,
        claimed: str | None,
    ) -> str:
        pid = claimed if claimed is not None else self._claim(trial, evaluator)
        if pid not in self.grid.params:
            # A retry enqueued by a run of another grid of this study (say, before an epoch was
            # dropped): not ours to evaluate; a run of that grid enqueues it again.
            trial.set_user_attr("duplicate_of", "not in this grid")
            self._tell(trial, state=TrialState.PRUNED)
            return "duplicate"
        if claimed is None:
            trial.set_user_attr("point_id", pid)
        reason = self._step_back_reason(trial, pid)
        if reason:
            trial.set_user_attr("duplicate_of", reason)
            self._tell(trial, state=TrialState.PRUNED)
            return "duplicate"
        if on_point:
            on_point(pid)
        if claimed is None:
            # Which process holds the point: `study status` and operators can tell who died.
            trial.set_user_attr(WORKER_ATTR, self.me)
        adopted = evaluator.adopt(pid)
        if adopted is not None:
            self._finish(trial, adopted)
            return "adopted"
        try:
            result = evaluator.compute(pid)
            # A worker paused past the grace period (SIGSTOP, a suspended machine) finds its
            # trial judged stale and its point handed on: it records nothing (one read of
            # the trial's state says so). And a result recorded meanwhile by a worker judged
            # stale just after its own check is adopted, not recorded twice.
            if not writes.is_running(self.study._storage, trial._trial_id):
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
        self._tell(trial, outcome.value, attrs=outcome.attrs)

    def _tell(
        self,
        trial: optuna.Trial,
        value: float | None = None,
        *,
        state: TrialState | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Write `attrs` and tell a trial's end, in one write, unless another worker has
        already ended it (judged it stale)."""
        # Not Study.tell, which reads the trial twice first (two queries a trial on an RDB):
        # the checks it adds are ours to make.
        state = state or TrialState.COMPLETE
        if value is not None and not math.isfinite(value):  # as tell: no such value is kept
            state, value = TrialState.FAIL, None
        values = [float(value)] if value is not None and state == TrialState.COMPLETE else None
        with contextlib.suppress(UpdateFinishedTrialError):  # ended between check and write
            writes.finish(self.study._storage, trial._trial_id, state, values, attrs or {})

    def _step_back_reason(self, trial: optuna.Trial, pid: str) -> str | None:
        """Why this trial must not evaluate point `pid` (another trial has it), or None. Read
        after the claim is written: of two racing claims, at least the later reader sees the
        other."""
        view = self.view
        view.refresh()
        with view.lock:
            if pid in view.complete_in:
                return f"complete in trial {view.complete_in[pid]}"
            if view.holding.get(pid, set()) - {trial._trial_id}:  # liveness costs a read
                for t in view.live_holders(pid, view.stale_ids()):
                    if t.number != trial.number:
                        return f"running in trial {t.number}"
        return None

    # the loop
    def work(
        self, evaluator: Evaluator, on_point: Callable[[str], None] | None = None
    ) -> Counter[str]:
        """Run trials until every point is complete, given up on, or running elsewhere."""
        outcomes: Counter[str] = Counter()
        self._fail_stale(force=True)
        self._enqueue_retries(include_failed=True, evaluator=evaluator)
        holds = getattr(evaluator, "holds", None)
        while True:
            self.view.refresh()
            while True:
                # The view as the last trial's step-back check read it: a retry enqueued since
                # is taken one trial later, for one read fewer a trial.
                view = self.view
                if view.waiting():
                    outcomes[self.run_trial(evaluator, on_point)] += 1
                    view.refresh()  # the retry taken (by us or another worker): seen at once
                else:
                    pid = self.handout.next(self.me, holds)
                    if pid is None:
                        break
                    outcomes[self.run_trial(evaluator, on_point, pid)] += 1
                self._fail_stale()
            # A dead worker's trial is FAIL before its point is enqueued again.
            self._fail_stale(force=True)
            # Points left by races or by dead workers, within this same run:
            if self._enqueue_retries(include_failed=False) or self._retry_stale(evaluator):
                continue
            t = self.tally()
            if not [p for p in t.left(self.grid.ids) if p in t.running]:
                return outcomes
            time.sleep(min(2.0, self.policy.heartbeat_interval))  # wait for other workers
            self._fail_stale(force=True)

    def _fail_stale(self, *, force: bool = False) -> None:
        """Mark trials whose worker died FAIL; at most once a second unless `force`."""
        now = time.monotonic()
        if not force and now - self._stale_checked < 1.0:
            return
        self._stale_checked = now
        view = self.view
        view.refresh()
        with view.lock:
            running = view.running()
        if fail_stale(self.study, self.liveness, running):
            view.refresh()

    def _waiting(self) -> int:
        self.view.refresh()
        return self.view.waiting()

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
    journal = journal_path(name, policy)
    if not create and journal is not None and not journal.is_file():
        return None  # a look at a study that was never run leaves no folder behind
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
    study.set_user_attr(RANGES_ATTR, SPREAD)
    return GridStudy(study, policy, True)
