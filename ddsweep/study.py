"""Running a study: an Optuna grid study whose trials are grid points, each logged as an MLflow
child run of one parent run per study; resumable, and exactly once across workers.

Exactly once, in the order things happen in a trial:
1. The trial takes its point (GridSampler, or an enqueued retry) and the point becomes visible
   in the storage as the trial's param while the trial is RUNNING.
2. Only then it reads the storage: if another trial holds the same point and is COMPLETE, or
   RUNNING with a fresh heartbeat, this trial steps back (PRUNED, attribute `duplicate_of`).
   Two racing trials each write before they read, so at least one sees the other; both may step
   back, never both run. A point left without a trial that way is enqueued again.
3. Before evaluating, an MLflow child run already logged for the point (a worker killed after
   logging, before telling Optuna) is adopted instead of evaluated again.
A trial that raises is FAIL with the error as attribute and tag; the next run of the command
retries it, up to --max-retries. A trial whose heartbeat stops (SIGKILL, lost machine) is
marked FAIL after the grace period and retried by any worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from optuna.samplers import BaseSampler

from ddsweep import evaluate, sweep, tracking
from ddsweep.errors import UserError
from ddsweep.features import FeatureCache
from ddsweep.model import PIXELS

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

STUDY_TAG = "ddsweep.study"
POINT_TAG = "ddsweep.point"
HEARTBEAT_ATTR = "heartbeat"


@dataclass(frozen=True)
class RunOptions:
    """How to run a study (not what it computes)."""

    storage: str | None = None  # None: a journal file under .ddsweep/optuna/
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    workers: int = 1
    max_retries: int = 2
    heartbeat_interval: int = 10
    grace_period: int = 60
    data_dir: Path = Path("data")
    inception_weights: Path | None = None  # fid-grid: --inception-weights


# --- storage ------------------------------------------------------------------------------------


def default_storage_path(study: str) -> Path:
    """The local journal file of a study: .ddsweep/optuna/NAME.journal."""
    root = Path(os.environ.get("DDSWEEP_HOME") or ".ddsweep")
    return root / "optuna" / f"{study}.journal"


def make_storage(study: str, opts: RunOptions) -> optuna.storages.BaseStorage:
    """Journal file storage by default (several processes on one machine), or an RDB URL with
    Optuna's heartbeat (several machines)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = opts.storage
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
            url, heartbeat_interval=opts.heartbeat_interval, grace_period=opts.grace_period
        )
    except Exception as err:  # bad URL, server down, missing driver: all the user's to fix
        raise UserError(
            f"cannot open Optuna storage {tracking.redact(url)}: {tracking.first_line(err)}"
        ) from err


def uses_rdb_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether Optuna's own heartbeat is on (RDBStorage with heartbeat_interval).

    A study holds its RDBStorage wrapped in Optuna's `_CachedStorage`, which forwards the
    heartbeat: ask the storage, not its class."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


# --- trial bookkeeping --------------------------------------------------------------------------


def point_key(pid: str) -> int:
    """A stable 48-bit integer for a point id: the Optuna param of its trial.

    The param is an int in one fixed range, not a categorical over the grid, because Optuna
    refuses a categorical whose choices change, and a grid grows when a sweep file gains an
    epoch; the readable id is kept beside it as the trial attribute `point_id`.
    """
    import hashlib

    return int.from_bytes(hashlib.sha256(pid.encode()).digest()[:6], "big")


POINT_KEY_MAX = 2**48 - 1


def trial_point(t: FrozenTrial) -> int | None:
    """The point key a trial holds (its param, or the fixed param of an enqueued retry)."""
    if "point" in t.params:
        return int(t.params["point"])
    fixed = t.system_attrs.get("fixed_params") or {}
    value = fixed.get("point")
    return int(value) if value is not None else None


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

    complete: set[int]
    running: set[int]
    waiting: set[int]
    failures: Counter[int]

    def left(self, keys: list[int]) -> list[int]:
        """Points with no COMPLETE trial."""
        return [p for p in keys if p not in self.complete]


def tally(study: optuna.Study, grace: float) -> Tally:
    """Count trials per point: complete, running (fresh), waiting, failed."""
    from optuna.trial import TrialState

    t = Tally(set(), set(), set(), Counter())
    now = time.time()
    for tr in study.get_trials(deepcopy=False):
        pid = trial_point(tr)
        if pid is None:
            continue
        if tr.state == TrialState.COMPLETE:
            t.complete.add(pid)
        elif tr.state == TrialState.RUNNING and is_fresh(tr, grace, now):
            t.running.add(pid)
        elif tr.state == TrialState.WAITING:
            t.waiting.add(pid)
        elif tr.state == TrialState.FAIL:
            t.failures[pid] += 1
    return t


def fail_stale(study: optuna.Study, grace: float) -> int:
    """Mark RUNNING trials whose heartbeat stopped as FAIL (Optuna's own check on RDB)."""
    import optuna
    from optuna.trial import TrialState

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


# --- MLflow parent --------------------------------------------------------------------------------


PARENT_WAIT_S = 20.0  # how long after a study's creation other workers wait for its parent run
CREATED_ATTR = "created_at"


def parent_run(cfg: sweep.StudyConfig, experiment_id: str, *, wait_s: float = 0.0) -> str:
    """The study's MLflow parent run, created once and found again on every re-run.

    Workers started together would each create one: a worker that did not create the Optuna
    study (exactly one does) waits up to `wait_s` for the creator's parent run first. Without
    the wait, a worker whose create_run was held up by the database lock could keep its own
    run after another had kept its own too, and children would split between two parents.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    query = f"tags.`{tracking.KIND_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{cfg.study}'"

    def oldest() -> str | None:
        found = client.search_runs(
            [experiment_id], query, order_by=["attributes.start_time ASC"], max_results=5
        )
        runs = sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))
        return str(runs[0].info.run_id) if runs else None

    found = oldest()
    deadline = time.monotonic() + wait_s
    while found is None and time.monotonic() < deadline:
        time.sleep(0.2)
        found = oldest()
    if found:
        return found
    run = client.create_run(
        experiment_id,
        tags={
            tracking.KIND_TAG: "study",
            STUDY_TAG: cfg.study,
            "kind": cfg.kind,
            "code_version": tracking.code_version(),
            "sweep_file": cfg.source,
        },
        run_name=cfg.study,
    )
    params = {f"axis.{k}": json.dumps(v) for k, v in dataclasses.asdict(cfg.axes).items()}
    params.update(tracking.flat_params(cfg.probe))
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    winner = oldest()
    if winner and winner != run.info.run_id:  # two workers raced: keep the oldest only
        client.delete_run(run.info.run_id)
        return winner
    return str(run.info.run_id)


def _param(k: str, v: str) -> Any:
    from mlflow.entities import Param

    return Param(k, v[:6000])


def logged_child(parent_id: str, experiment_id: str, pid: str) -> Any | None:
    """A FINISHED child run already logged for point `pid`, if any."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{POINT_TAG}` = '{pid}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


# --- backbones ------------------------------------------------------------------------------------


def pin_backbones(
    study: optuna.Study | None, cfg: sweep.StudyConfig
) -> dict[sweep.Backbone3, tuple[str, tuple[int, ...]]]:
    """{(dataset, resolution, attention): (training run id, saved epochs)}; the run chosen the
    first time is kept in the Optuna study, so a newer training run never changes a study.
    With no study yet, the runs are only found and checked (a bad --epoch records nothing)."""
    out = {}
    pinned = study.user_attrs if study is not None else {}
    needs_net = any(b != PIXELS for b in cfg.axes.block)
    for key in sweep.backbones(cfg.axes) if needs_net else []:
        d, r, a = key
        attr = f"backbone:{d}/{r}/{a}"
        run_id = pinned.get(attr)
        if run_id is None:
            run_id = tracking.latest_training_run(d, r, a).info.run_id
            if study is not None:
                study.set_user_attr(attr, run_id)
        epochs = tuple(evaluate.saved_epochs(run_id))
        missing = [e for e in cfg.axes.epoch if e not in epochs]
        if missing:
            raise UserError(
                f"{cfg.source}: axes.epoch: {', '.join(map(str, missing))} not saved by training "
                f"run {run_id} ({d}, {r} px, attention {a}); saved epochs: "
                f"{', '.join(map(str, epochs)) or 'none'}"
            )
        out[key] = (run_id, epochs)
    return out


class _GridSampler(BaseSampler):
    """Hands each new trial a point of the grid that no trial holds yet, known by its value.

    Written by hand because Optuna's GridSampler fits a fixed grid only: it stores the whole
    grid in every trial and compares it with every trial's copy on each ask (measured here:
    0.6 s of bookkeeping a trial at 800 points, growing with the cube of the grid), and when
    the grid changes (a sweep gains an epoch) it forgets every point already done and hands
    each out again. Points here are the `point` param itself, so only new points are handed out.
    """

    def __init__(self, keys: list[int], seed: int = 0) -> None:
        self._order = list(keys)
        random.Random(seed).shuffle(self._order)  # the same order in every worker

    def unclaimed(self, study: optuna.Study) -> list[int]:
        """Points of the grid with no trial at all (in any state), in hand-out order."""
        held = {trial_point(t) for t in study.get_trials(deepcopy=False)}
        return [k for k in self._order if k not in held]

    def is_exhausted(self, study: optuna.Study) -> bool:
        """Whether every point has a trial; what is left is retries (`enqueue_retries`)."""
        return not self.unclaimed(study)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: Any, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        if param_name != "point":
            raise ValueError(f"the grid has one param, point, not {param_name!r}")
        free = self.unclaimed(study) or self._order  # exhausted: a duplicate that steps back
        # Workers reading the storage at the same moment see the same list; their trial
        # numbers differ, so they take different points.
        return free[trial.number % len(free)]


# --- one worker ---------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything a worker needs, resolved once."""

    cfg: sweep.StudyConfig
    opts: RunOptions
    study: optuna.Study
    ids: list[str]
    keys: list[int]  # point_key of each id, same order
    experiment_id: str
    parent_id: str
    runs: dict[sweep.Backbone3, tuple[str, tuple[int, ...]]]
    fill_blocks: tuple[str, ...]
    cache: FeatureCache


def open_study(
    cfg: sweep.StudyConfig, opts: RunOptions, *, create: bool = True
) -> tuple[optuna.Study, Any]:
    """The Optuna study of `cfg` (created on first use) and its storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(cfg.study, opts)
    if not create:
        try:
            return optuna.load_study(study_name=cfg.study, storage=storage), storage
        except KeyError as err:
            raise UserError(
                f"study {cfg.study!r} has not been started: run `ddsweep study {cfg.kind} "
                f"--study {cfg.study}`"
            ) from err
    study, _ = _create_or_load(cfg.study, storage, _direction(cfg))
    return study, storage


def _direction(cfg: sweep.StudyConfig) -> Literal["minimize", "maximize"]:
    """Accuracy is maximised, a Fréchet distance minimised."""
    return "minimize" if cfg.kind == "fid-grid" else "maximize"


def _create_or_load(
    name: str, storage: Any, direction: Literal["minimize", "maximize"] = "maximize"
) -> tuple[optuna.Study, bool]:
    """The study `name` and whether this call created it (exactly one racing worker does)."""
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage), False
    study.set_user_attr(CREATED_ATTR, time.time())
    return study, True


def prepare(cfg: sweep.StudyConfig, opts: RunOptions) -> Context:
    """Open the study, pin backbones, expand the grid, find the MLflow parent."""
    import optuna

    exp_id = tracking.setup(opts.tracking_uri, opts.experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg.kind == "fid-grid":  # no weights offline: one line now, not a failed trial per point
        from ddsweep import fid

        feature, _ = fid.feature_network(cfg.fid.feature)
        fid.make_metric(feature, fid.inception_weights_path(opts.inception_weights))
    storage = make_storage(cfg.study, opts)
    created = False
    try:
        study = optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError:  # a new study: check its backbones before recording anything
        pin_backbones(None, cfg)
        study, created = _create_or_load(cfg.study, storage, _direction(cfg))
    runs = pin_backbones(study, cfg)
    expand = sweep.expand_fid if cfg.kind == "fid-grid" else sweep.expand
    points = expand(cfg.axes, lambda key: runs[key][1])
    ids = [sweep.point_id(p) for p in points]
    if not ids:
        raise UserError(f"{cfg.source}: the grid is empty")
    keys = [point_key(pid) for pid in ids]
    if len(set(keys)) != len(keys):
        raise RuntimeError("two grid points share a 48-bit key")  # ~1e-5 at a million points
    sampler = _GridSampler(keys, seed=0)
    study = optuna.load_study(study_name=cfg.study, storage=study._storage, sampler=sampler)
    # A worker that did not create the study waits for the creator's parent run, unless the
    # study is old enough that its creator must have given up.
    age = time.time() - float(study.user_attrs.get(CREATED_ATTR, 0.0))
    parent = parent_run(cfg, exp_id, wait_s=0.0 if created else max(0.0, PARENT_WAIT_S - age))
    study.set_user_attr("mlflow_parent_run_id", parent)
    fill = tuple(b for b in cfg.axes.block if b != PIXELS)
    return Context(cfg, opts, study, ids, keys, exp_id, parent, runs, fill, FeatureCache())


def enqueue_retries(ctx: Context, *, include_failed: bool) -> int:
    """Enqueue points that have no COMPLETE, RUNNING or WAITING trial: failed ones (up to
    --max-retries) when `include_failed`, and those left without a trial by a stepped-back race."""
    t = tally(ctx.study, ctx.opts.grace_period)
    visited = {trial_point(tr) for tr in ctx.study.get_trials(deepcopy=False)}
    n = 0
    for key in t.left(ctx.keys):
        if key in t.running or key in t.waiting:
            continue
        fails = t.failures[key]
        if fails and (not include_failed or fails > ctx.opts.max_retries):
            continue
        if not fails and key not in visited:
            continue  # the grid sampler still owes it a trial
        ctx.study.enqueue_trial({"point": key}, skip_if_exists=False)
        n += 1
    return n


def step_back_reason(ctx: Context, trial: optuna.Trial, key: int) -> str | None:
    """Why this trial must not evaluate point `key` (another trial has it), or None."""
    from optuna.trial import TrialState

    now = time.time()
    for t in ctx.study.get_trials(deepcopy=False):
        if t.number == trial.number or trial_point(t) != key:
            continue
        if t.state == TrialState.COMPLETE:
            return f"complete in trial {t.number}"
        if t.state == TrialState.RUNNING and is_fresh(t, ctx.opts.grace_period, now):
            return f"running in trial {t.number}"
    return None


def objective_metric(ctx: Context) -> str:
    """The metric Optuna records as a trial's value: top1, or the Fréchet distance."""
    if ctx.cfg.kind != "fid-grid":
        return "top1"
    from ddsweep import fid

    return fid.metric_name(*fid.feature_network(ctx.cfg.fid.feature))


def evaluate_point(ctx: Context, trial: optuna.Trial, point: evaluate.Point, pid: str) -> float:
    """Evaluate one point and log its child run; returns its objective (top1 or FID)."""
    if ctx.cfg.kind == "fid-grid":
        return evaluate_fid_point(ctx, trial, point, pid)
    backbone = None
    if point.block != PIXELS:
        assert point.attention is not None and point.epoch is not None
        run_id, epochs = ctx.runs[(point.dataset, point.resolution, point.attention)]
        backbone = evaluate.fetch_backbone(run_id, point.epoch, list(epochs))
    metrics = evaluate.evaluate(
        backbone, point, ctx.cfg.probe, ctx.cache, ctx.opts.data_dir, fill_blocks=ctx.fill_blocks
    )
    params = evaluate.point_params(point, ctx.cfg.probe, backbone)
    tags = {
        tracking.KIND_TAG: "trial",
        STUDY_TAG: ctx.cfg.study,
        POINT_TAG: pid,
        "optuna.trial_number": str(trial.number),
    }
    run_id = tracking.log_run(
        ctx.experiment_id, _run_name(point), params, metrics, tags, parent_run_id=ctx.parent_id
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    return float(metrics["top1"])


def evaluate_fid_point(ctx: Context, trial: optuna.Trial, point: evaluate.Point, pid: str) -> float:
    """Generate images from one checkpoint, score them against the test split, log the run."""
    import torch

    from ddsweep import checkpoints, fid

    assert point.attention is not None and point.epoch is not None
    run_id, epochs = ctx.runs[(point.dataset, point.resolution, point.attention)]
    backbone = evaluate.fetch_backbone(run_id, point.epoch, list(epochs))
    unet = checkpoints.load_unet(backbone.folder, ctx.cfg.probe.weights)  # type: ignore[arg-type]
    unet.to("cuda" if torch.cuda.is_available() else "cpu")
    feature, name = fid.feature_network(ctx.cfg.fid.feature)
    metrics = fid.fid_of_checkpoint(
        unet,
        point.dataset,
        point.resolution,
        ctx.opts.data_dir,
        ctx.cfg.fid,
        feature=feature,
        feature_name=name,
        weights=fid.inception_weights_path(ctx.opts.inception_weights),
    )
    params = {
        "dataset": point.dataset,
        "resolution": str(point.resolution),
        "attention": str(point.attention),
        "epoch": str(point.epoch),
        "backbone_run": run_id,
        "weights": ctx.cfg.probe.weights,
        "steps": str(fid.sampler_steps(ctx.cfg.fid)),
        **{k: v for k, v in tracking.flat_params(ctx.cfg.fid).items() if k != "steps"},
    }
    tags = {
        tracking.KIND_TAG: "fid",
        STUDY_TAG: ctx.cfg.study,
        POINT_TAG: pid,
        "optuna.trial_number": str(trial.number),
    }
    name_ = f"fid-e{point.epoch}" + ("" if point.attention else "-noattn")
    child = tracking.log_run(
        ctx.experiment_id, name_, params, metrics, tags, parent_run_id=ctx.parent_id
    )
    trial.set_user_attr("mlflow_run_id", child)
    return float(metrics[objective_metric(ctx)])


def _run_name(p: evaluate.Point) -> str:
    parts = [p.block, f"e{p.epoch}" if p.epoch is not None else "", f"t{p.noise_step}", p.probe]
    if p.probe == "knn":
        parts.append(f"k{p.k}")
    if p.attention is False:
        parts.append("noattn")
    return "-".join(x for x in parts if x)


def run_trial(ctx: Context, on_point: Callable[[str], None] | None = None) -> str:
    """Ask for one trial, evaluate it (or step back), tell the result; returns its final state."""
    trial = ctx.study.ask()
    # The heartbeat covers the whole trial: a worker killed while it claims a point leaves a
    # trial that goes stale like any other, not one RUNNING forever.
    with Heartbeat(ctx.study, trial._trial_id, ctx.opts.heartbeat_interval):
        return _run_claimed(ctx, trial, on_point)


def _run_claimed(ctx: Context, trial: optuna.Trial, on_point: Callable[[str], None] | None) -> str:
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    key = trial.suggest_int("point", 0, POINT_KEY_MAX)  # the claim: visible before we read
    if key not in ctx.keys:
        # A retry enqueued by a run of another grid of this study (say, before an epoch was
        # dropped): not ours to evaluate; a run of that grid enqueues it again.
        trial.set_user_attr("duplicate_of", "not in this grid")
        _tell(ctx, trial, state=TrialState.PRUNED)
        return "duplicate"
    pid = ctx.ids[ctx.keys.index(key)]
    point = sweep.parse_point_id(pid)
    trial.set_user_attr("point_id", pid)
    trial.set_user_attr("axes", dataclasses.asdict(point))
    reason = step_back_reason(ctx, trial, key)
    if reason:
        trial.set_user_attr("duplicate_of", reason)
        _tell(ctx, trial, state=TrialState.PRUNED)
        return "duplicate"
    if on_point:
        on_point(pid)
    # Which process holds the point: `study status` and operators can tell who died.
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    adopted = logged_child(ctx.parent_id, ctx.experiment_id, pid)
    if adopted is not None:
        trial.set_user_attr("mlflow_run_id", adopted.info.run_id)
        _tell(ctx, trial, float(adopted.data.metrics[objective_metric(ctx)]))
        return "adopted"
    try:
        top1 = evaluate_point(ctx, trial, point, pid)
    except (KeyboardInterrupt, SystemExit):
        _tell(ctx, trial, state=TrialState.FAIL)
        raise
    except Exception as err:
        message = f"{type(err).__name__}: {tracking.first_line(err)}"
        _log_failure(ctx, trial, point, pid, message)
        with contextlib.suppress(UpdateFinishedTrialError):  # judged stale meanwhile
            trial.set_user_attr("error", message)
        _tell(ctx, trial, state=TrialState.FAIL)
        return "failed"
    # Another worker may have judged this trial stale meanwhile: the tell is then skipped and
    # the retry adopts the child run logged above instead of evaluating again.
    _tell(ctx, trial, top1)
    return "complete"


def _tell(ctx: Context, trial: optuna.Trial, value: float | None = None, **kw: Any) -> None:
    """Tell a trial's end, unless another worker has already ended it (judged it stale)."""
    from optuna.exceptions import UpdateFinishedTrialError

    with contextlib.suppress(UpdateFinishedTrialError):  # ended between tell's check and write
        ctx.study.tell(trial, value, skip_if_finished=True, **kw)


def _log_failure(
    ctx: Context, trial: optuna.Trial, point: evaluate.Point, pid: str, message: str
) -> None:
    """A FAILED child run that carries the error, so `mlflow ui` shows what went wrong."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.create_run(
        ctx.experiment_id,
        tags={
            tracking.KIND_TAG: "trial",
            STUDY_TAG: ctx.cfg.study,
            POINT_TAG: pid,
            "optuna.trial_number": str(trial.number),
            "error": message[:5000],
            "mlflow.parentRunId": ctx.parent_id,
        },
        run_name=_run_name(point),
    )
    client.log_batch(
        run.info.run_id,
        params=[_param(k, v) for k, v in evaluate.point_params(point, ctx.cfg.probe, None).items()],
    )
    client.set_terminated(run.info.run_id, "FAILED")


def work(ctx: Context, on_point: Callable[[str], None] | None = None) -> Counter[str]:
    """Run trials until every point is complete, given up on, or running elsewhere."""
    outcomes: Counter[str] = Counter()
    fail_stale(ctx.study, ctx.opts.grace_period)
    enqueue_retries(ctx, include_failed=True)
    sampler = ctx.study.sampler
    assert isinstance(sampler, _GridSampler)
    while True:
        while True:
            waiting = _waiting(ctx.study)
            if not waiting and sampler.is_exhausted(ctx.study):
                break
            outcomes[run_trial(ctx, on_point)] += 1
            fail_stale(ctx.study, ctx.opts.grace_period)
        # Points left by races or by dead workers, within this same run:
        if enqueue_retries(ctx, include_failed=False) or _retry_stale(ctx):
            continue
        t = tally(ctx.study, ctx.opts.grace_period)
        if not [p for p in t.left(ctx.keys) if p in t.running]:
            return outcomes
        time.sleep(min(2.0, ctx.opts.heartbeat_interval))  # wait for other workers' points
        fail_stale(ctx.study, ctx.opts.grace_period)


def _waiting(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _retry_stale(ctx: Context) -> int:
    """Enqueue points whose last failure was a dead worker (not an error), within limits."""
    from optuna.trial import TrialState

    t = tally(ctx.study, ctx.opts.grace_period)
    last_error: dict[int, str] = {}  # point -> error of its latest FAIL trial
    for tr in ctx.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        key = trial_point(tr)
        if key is not None:  # trials come in trial-number order: the last one wins
            last_error[key] = str(tr.user_attrs.get("error", "stale"))
    n = 0
    for key in t.left(ctx.keys):
        if key in t.running or key in t.waiting or key not in last_error:
            continue
        if not last_error[key].startswith("stale") or t.failures[key] > ctx.opts.max_retries:
            continue
        ctx.study.enqueue_trial({"point": key}, skip_if_exists=False)
        n += 1
    return n


def share_cores(workers: int) -> None:
    """Give each of `workers` local processes its share of the cores: torch's intra-op threads
    spin against each other otherwise (measured here: a linear probe 3 s alone, 59-105 s with
    two 2-thread processes on 2 cores)."""
    import torch

    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _worker_main(cfg: sweep.StudyConfig, opts: RunOptions) -> None:
    """Entry point of a spawned worker process."""
    import signal

    share_cores(opts.workers)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctx = prepare(cfg, opts)
    work(ctx)


def run_study(
    cfg: sweep.StudyConfig,
    opts: RunOptions,
    *,
    progress: Callable[[Context, Tally, str | None], None] | None = None,
) -> tuple[Context, Counter[str]]:
    """Run (or resume) a probe grid with `opts.workers` local workers; returns the outcome counts
    of the trials this process ran."""
    ctx = prepare(cfg, opts)
    share_cores(opts.workers)
    current: list[str | None] = [None]

    def report() -> None:
        if progress is not None:
            progress(ctx, tally(ctx.study, opts.grace_period), current[0])

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            report()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    procs = []
    try:
        spawn = mp.get_context("spawn")
        for _ in range(max(0, opts.workers - 1)):
            p = spawn.Process(target=_worker_main, args=(cfg, opts), daemon=False)
            p.start()
            procs.append(p)

        def on_point(pid: str) -> None:
            current[0] = pid
            report()

        outcomes = work(ctx, on_point)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        stop.set()
        poller.join(timeout=2)
    current[0] = None
    report()
    _close_parent(ctx)
    return ctx, outcomes


def _close_parent(ctx: Context) -> None:
    """The parent run is FINISHED once every point is complete, RUNNING while work is left."""
    from mlflow.tracking import MlflowClient

    t = tally(ctx.study, ctx.opts.grace_period)
    complete = all(k in t.complete for k in ctx.keys)
    client = MlflowClient()
    if complete:
        client.set_terminated(ctx.parent_id, "FINISHED")
    elif client.get_run(ctx.parent_id).info.status != "RUNNING":
        client.update_run(ctx.parent_id, status="RUNNING")


# --- status -------------------------------------------------------------------------------------


def status_rows(ctx_ids: list[str], study: optuna.Study, grace: float) -> dict[str, Counter[str]]:
    """{"axis=value": Counter(complete, running, failed, left)} plus a "total" row."""
    t = tally(study, grace)
    rows: dict[str, Counter[str]] = {"total": Counter()}
    points = [sweep.parse_point_id(pid) for pid in ctx_ids]
    for axis in sweep.AXES:  # rows in axis order, values in grid order
        for point in points:
            value = getattr(point, axis)
            if value is not None and not (axis == "k" and point.probe != "knn"):
                rows.setdefault(f"{axis}={value}", Counter())
    for pid in ctx_ids:
        key = point_key(pid)
        if key in t.complete:
            state = "complete"
        elif key in t.running:
            state = "running"
        elif t.failures[key]:
            state = "failed"
        else:
            state = "left"
        rows["total"][state] += 1
        point = sweep.parse_point_id(pid)
        for axis in sweep.AXES:
            value = getattr(point, axis)
            if value is None or (axis == "k" and point.probe != "knn"):
                continue
            rows.setdefault(f"{axis}={value}", Counter())[state] += 1
    return rows


def status_tables(
    cfg: sweep.StudyConfig,
    *,
    storage: str | None,
    tracking_uri: str | None,
    experiment: str,
) -> list[Any]:
    """Rich tables of a study's progress, read from its storage."""
    from rich.table import Table

    opts = RunOptions(storage=storage, tracking_uri=tracking_uri, experiment=experiment)
    tracking.setup(tracking_uri, experiment)
    study, _ = open_study(cfg, opts, create=False)
    runs = {}
    for key in sweep.backbones(cfg.axes):
        run_id = study.user_attrs.get(f"backbone:{key[0]}/{key[1]}/{key[2]}")
        runs[key] = tuple(evaluate.saved_epochs(run_id)) if run_id else ()
    expand = sweep.expand_fid if cfg.kind == "fid-grid" else sweep.expand
    ids = [sweep.point_id(p) for p in expand(cfg.axes, lambda key: runs.get(key, ()))]
    rows = status_rows(ids, study, opts.grace_period)
    table = Table(title=f"study {cfg.study}: {len(ids)} points")
    for col in ("", "complete", "running", "failed", "left"):
        table.add_column(col, justify="left" if not col else "right")
    for name, c in rows.items():
        style = "bold" if name == "total" else None
        table.add_row(
            name, *(str(c[s]) for s in ("complete", "running", "failed", "left")), style=style
        )
    return [table]
