"""Running a study: wires one objective (what to compute), the scheduler (exactly-once trials on
Optuna) and the recorder (MLflow parent and child runs) together, with local worker processes.

    cfg ─► objective.points ─► scheduler hands out a point ─► objective.evaluate ─► recorder

The objective knows neither Optuna nor MLflow, the scheduler nothing of probes, the recorder
nothing of either; this module is the only one that knows all three.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep import devices, evaluate, scheduler, tracking
from ddsweep.config import sweep
from ddsweep.config.model import PIXELS
from ddsweep.config.points import legacy_id, legacy_ids
from ddsweep.config.run import FOLLOW_INTERVAL, RunOptions
from ddsweep.errors import UserError
from ddsweep.objectives import OBJECTIVES, Objective, Pins, Record
from ddsweep.scheduler import GridStudy, Outcome, Tally
from ddsweep.studychecks import check_points
from ddsweep.tracking import schema
from ddsweep.tracking.recorder import StudyRecorder
from ddsweep.tracking.schema import POINT_TAG, STUDY_TAG, backbone_pin

if TYPE_CHECKING:
    from ddsweep.backbones import TrainerWatch

__all__ = ["POINT_TAG", "STUDY_TAG", "Context", "RunOptions", "prepare", "run_study"]

PARENT_WAIT_S = 20.0  # how long after a study's creation other workers wait for its parent run
PARENT_ATTR = "mlflow_parent_run_id"
DEFINITION_ATTR = "definition"  # the sweep-file document of the study's latest run


def study_config(
    name: str, overrides: Mapping[str, list[str]], storage: str | None = None
) -> sweep.StudyConfig:
    """The study `name`: its sweep file, else the definition stored with it when it was run
    (a study defined on the command line alone), with command-line axes replacing whole axes."""
    is_file = sweep.check_study_arg(name)
    base = sweep.load_study(name)
    if base is None and not is_file:
        board = scheduler.open_study(name, scheduler.Policy(storage), "maximize", create=False)
        stored = board.attrs.get(DEFINITION_ATTR) if board is not None else None
        if stored is not None:
            base = sweep.parse_study(stored, f"the definition stored with study {name}")
    return sweep.with_overrides(base, name, overrides)


# --- backbones ------------------------------------------------------------------------------------


def pin_backbones(board: GridStudy | None, cfg: sweep.StudyConfig) -> Pins:
    """{(dataset, resolution, attention): (training run id, saved epochs)}; the run chosen the
    first time is kept in the study, so a newer training run never changes a study. With no
    study yet, the runs are only found and checked (a bad --epoch records nothing)."""
    out = {}
    pinned = board.attrs if board is not None else {}
    for key in sweep.backbones(cfg.axes) if _needs_net(cfg) else []:
        d, r, a = key
        attr = backbone_pin(d, r, a)
        run_id = pinned.get(attr)
        if run_id is None:
            # The study's own train: section, not `ddsweep train`'s defaults, trains its nets.
            hint = sweep.study_steps(cfg.study)
            run_id = tracking.latest_training_run(d, r, a, hint=hint).run_id
            if board is not None:
                board.set_attr(attr, run_id)
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


# --- one worker ---------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything a worker needs, resolved once."""

    cfg: sweep.StudyConfig
    opts: RunOptions
    board: GridStudy
    objective: Objective
    recorder: StudyRecorder
    answer: tuple[Any, Any] | None = None  # the answer's (facets, summary rows), once known

    @property
    def ids(self) -> list[str]:
        return list(self.objective.points)

    @property
    def parent_id(self) -> str:
        return self.recorder.parent_id


class _Trials:
    """The scheduler's view of a study: evaluate with the objective, log with the recorder. A
    point is known everywhere by its canonical id (`pid`, `config.points.point_id`)."""

    def __init__(self, objective: Objective, recorder: StudyRecorder, legacy: bool) -> None:
        self.objective, self.recorder = objective, recorder
        self.legacy = legacy  # the study has trials of ddsweep 0.1, whose children may be adopted

    def _outcome(self, pid: str, run_id: str, metrics: dict[str, float]) -> Outcome:
        value, attrs = self.objective.value(self.objective.points[pid], metrics)
        return Outcome(value, {**attrs, "mlflow_run_id": run_id})

    def adopt(self, pid: str) -> Outcome | None:
        point = self.objective.points[pid]
        found = self.recorder.adopted(pid)
        if found is None and self.legacy and not point.settings:  # logged by ddsweep 0.1
            found = self.recorder.adopted(legacy_id(point))
        return self._outcome(pid, *found) if found else None

    def compute(self, pid: str) -> Record:
        return self.objective.evaluate(self.objective.points[pid])

    def record(self, pid: str, trial_number: int, result: Record) -> Outcome:
        device = devices.label()
        note = trial_description(pid, self.objective.metric, result)
        tags = {schema.DEVICE_TAG: device}
        run_id = self.recorder.log_trial(pid, trial_number, result, tags=tags, description=note)
        outcome = self._outcome(pid, run_id, result.metrics)
        return Outcome(outcome.value, {**outcome.attrs, schema.DEVICE_TAG: device})

    def holds(self, group: str) -> bool:
        return self.objective.holds(group)

    def fail(self, pid: str, trial_number: int, message: str) -> None:
        name, params = self.objective.failure(self.objective.points[pid])
        kind = self.objective.run_kind
        self.recorder.log_failure(pid, trial_number, name, kind, params, message)


def trial_description(pid: str, metric: str, record: Record) -> str:
    """A trial run's description in `mlflow ui`: its point, setting by setting, and its value
    (top1 in % with half its 95 % bootstrap interval over the test examples, as the report
    computes it, when the trial kept its predictions)."""
    from urllib.parse import parse_qsl

    from ddsweep.report import stats

    value = record.metrics.get(metric)
    said = "" if value is None else f"{metric} {value:.4g}"
    test = (record.predictions or {}).get("test")
    if value is not None and metric == "top1":
        said = f"top1 {100 * value:.1f} %"
        if test is not None and len(test[1]):
            low, high = stats.bootstrap_interval(test[0] == test[1])
            said = f"top1 {100 * value:.1f} ± {100 * (high - low) / 2:.1f} % (95 % interval)"
    point = ", ".join(f"{n} {v}" for n, v in parse_qsl(pid))
    return f"**{said}**\n\n{point}" if said else point


def make_objective(cfg: sweep.StudyConfig, opts: RunOptions, pins: Pins) -> Objective:
    """The study kind's objective over `cfg`'s grid, with its backbones pinned as `pins`."""
    make = OBJECTIVES[cfg.kind]
    fetch = evaluate.fetch_backbone
    return make(cfg, pins, fetch, opts.data_dir, inception_weights=opts.inception_weights)


def _parent_fields(cfg: sweep.StudyConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Tags and params of a study's parent run: its kind, file, axes and shared settings."""
    tags = {"kind": cfg.kind, "sweep_file": cfg.source}
    params = {f"axis.{k}": json.dumps(v) for k, v in dataclasses.asdict(cfg.axes).items()}
    if not cfg.axes.epoch:  # an empty epoch axis means every saved checkpoint, not none
        params["axis.epoch"] = "all checkpoints"
    params.update(cfg.probe.params())
    return tags, params


def prepare(cfg: sweep.StudyConfig, opts: RunOptions) -> Context:
    """Open the study, pin backbones, expand the grid, find the MLflow parent."""
    exp_id, board = _open(cfg, opts)
    return _start(cfg, opts, exp_id, board, make_objective(cfg, opts, pin_backbones(board, cfg)))


def _open(
    cfg: sweep.StudyConfig, opts: RunOptions, *, follow: bool = False
) -> tuple[str, GridStudy]:
    """(MLflow experiment id, the study, created if new). A new study's backbones are
    checked before any store is opened: with none trained, one line and nothing left behind."""
    tracking.setup(opts.tracking_uri, create=False)  # the URI only: nothing created yet
    make = OBJECTIVES[cfg.kind]
    # What would fail every point (no FID weights offline) is one line now, not N failed trials.
    make.check(cfg, opts.inception_weights)
    board = scheduler.open_study(cfg.study, opts.policy(), make.direction, create=False)
    # A new study's backbones are checked before anything is recorded (found, not pinned); a
    # followed study's checkpoints are still to come (its k is checked all the same).
    check_points(cfg, opts, {} if follow else pin_backbones(board, cfg))
    exp_id = tracking.setup(opts.tracking_uri, opts.experiment)
    if board is None:
        board = scheduler.open_study(cfg.study, opts.policy(), make.direction)
        assert board is not None
    return exp_id, board


def _use(board: GridStudy, objective: Objective) -> None:
    board.use(
        scheduler.Grid(
            {pid: objective.params(p) for pid, p in objective.points.items()},
            objective.vocabulary(),
            legacy_ids(objective.points),
            {pid: g for pid, p in objective.points.items() if (g := objective.group(p))},
        )
    )


def _start(
    cfg: sweep.StudyConfig, opts: RunOptions, exp_id: str, board: GridStudy, objective: Objective
) -> Context:
    """Run `objective`'s grid on the study and open (or find) its MLflow parent run."""
    _use(board, objective)
    board.name_metric(objective.metric_name)
    # A study keeps the experiment of its parent run: a plain run and one under `mlflow run`
    # (whose project run, in mlflow run's experiment, became the parent) share one parent.
    pinned = board.attrs.get(PARENT_ATTR)
    exp_id = (tracking.run_experiment(pinned) if pinned else None) or exp_id
    # A worker that did not create the study waits for the creator's parent run, unless the
    # study is old enough that its creator must have given up.
    recorder = StudyRecorder(exp_id, cfg.study)
    wait = 0.0 if board.created else max(0.0, PARENT_WAIT_S - board.age())
    parent = recorder.open_parent(*_parent_fields(cfg), wait_s=wait)
    board.set_attr(PARENT_ATTR, parent)
    board.set_attr(DEFINITION_ATTR, sweep.to_document(cfg))
    ctx = Context(cfg, opts, board, objective, recorder)
    # Recorded before any trial: a command killed or interrupted before its finish step leaves
    # a parent that says how much of its grid is complete (the report's INCOMPLETE line).
    t = board.tally()
    recorder.mark_progress(sum(p in t.complete for p in ctx.ids), len(ctx.ids))
    return ctx


def work(ctx: Context, on_point: Callable[[str], None] | None = None) -> Counter[str]:
    """Run trials until every point is complete, given up on, or running elsewhere."""
    trials = _Trials(ctx.objective, ctx.recorder, ctx.board.has_legacy_trials())
    return ctx.board.work(trials, on_point)


def _worker_main(cfg: sweep.StudyConfig, opts: RunOptions) -> None:
    """Entry point of a spawned worker process."""
    scheduler.share_cores(opts.workers)
    # Ctrl-C reaches every worker of the terminal's process group, and stop_workers sends
    # SIGTERM: both end the trial as interrupted (retried whatever --max-retries says), quietly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        work(prepare(cfg, opts))


def array_worker(cfg: sweep.StudyConfig, opts: RunOptions) -> Counter[str]:
    """One task of a job array (ddsweep.launch): a worker of the study, as a `--workers`
    process is one; the last one to end with no trial running elsewhere writes the answer to
    the parent run. Ctrl-C, SIGTERM and preemption end the trial as interrupted and raise."""
    ctx = prepare(cfg, opts)
    outcomes = work(ctx)
    if not ctx.board.tally().running:
        finish(ctx)
    return outcomes


def start_workers(
    opts: RunOptions, target: Callable[..., None], args: tuple[Any, ...]
) -> list[Any]:
    """Spawn workers 1..N-1 of `opts.workers`, each with its own CUDA_VISIBLE_DEVICES (worker i
    on chosen GPU i mod G), and make worker 0's GPU this process's current device."""
    gpus = devices.plan(opts.workers, opts.gpus)
    devices.use_here(gpus[0])
    envs = [{devices.VISIBLE: g} if g is not None else {} for g in gpus[1:]]
    return scheduler.spawn_workers(opts.workers - 1, target, args, envs)


Progress = Callable[[Context, Tally, str | None], None]


def run_study(
    cfg: sweep.StudyConfig, opts: RunOptions, *, progress: Progress | None = None
) -> tuple[Context, Counter[str]]:
    """Run (or resume) a grid with `opts.workers` local workers; returns the outcome counts of
    the trials this process ran."""
    ctx = prepare(cfg, opts)
    scheduler.share_cores(opts.workers)
    current: list[str | None] = [None]

    def report() -> None:
        if progress is not None:
            progress(ctx, ctx.board.tally(), current[0])

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            report()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    procs = []
    try:
        procs = start_workers(opts, _worker_main, (cfg, opts))

        def on_point(pid: str) -> None:
            current[0] = pid
            report()

        outcomes = work(ctx, on_point)
        for p in procs:
            p.join()
    finally:
        scheduler.stop_workers(procs)
        stop.set()
        poller.join(timeout=2)
    current[0] = None
    report()
    finish(ctx)
    return ctx, outcomes


def finish(ctx: Context) -> None:
    """At the end of a command: the answer so far on the parent run, which is then closed with
    its count of complete points and linked from the project run (under `mlflow run`)."""
    t = ctx.board.tally()
    done = sum(p in t.complete for p in ctx.ids)
    publish_answer(ctx, done)
    ctx.recorder.close(done, len(ctx.ids))
    ctx.recorder.link_project_run()


def publish_answer(ctx: Context, done: int) -> None:
    """The study's definition and, for a probe grid, its answer so far (best block, epoch and
    top1, chosen as the report chooses them; the report's tables) on the parent run, with
    `done` points complete."""
    from ddsweep import report
    from ddsweep.report import answer

    cfg = ctx.cfg
    source = None if cfg.source == sweep.CLI_SOURCE else Path(cfg.source)
    ctx.recorder.log_definition(source, sweep.to_document(cfg))
    if cfg.kind != "probe-grid":
        return
    # An incomplete grid claims no comparison (see withhold_claims).
    trials, facets, rows = report.study_results(ctx.parent_id, incomplete=done < len(ctx.ids))
    if facets:
        metrics, tags = answer.headline(facets, rows)
        found = report.study_answer(facets, rows)
        ctx.answer = (facets, rows)
        card = report.methods_card(cfg.study, facets, trials, report.split_inputs(trials))
        ctx.recorder.log_answer(
            metrics,
            tags,
            answer.tables(facets, rows),
            done,
            note=answer.note(cfg.study, found, rows),
            files={report.METHODS_MD: card},
        )


def follow_pins(
    board: GridStudy, cfg: sweep.StudyConfig, watch: TrainerWatch | None = None
) -> tuple[Pins, bool]:
    """({backbone: (training run id, epochs whose checkpoints are complete and asked for)},
    whether every followed training run has ended). A backbone whose run has not started yet
    has no epochs; the run found first is pinned in the study, as `pin_backbones` does."""
    from ddsweep import backbones

    out: dict[sweep.Backbone3, tuple[str, tuple[int, ...]]] = {}
    ended = True
    pinned = board.attrs
    asked = set(cfg.axes.epoch)
    for key in sweep.backbones(cfg.axes) if _needs_net(cfg) else []:
        attr = backbone_pin(*key)
        run_id = pinned.get(attr) or backbones.followed_run(*key)
        if run_id is None:
            out[key], ended = ("", ()), False
            continue
        if attr not in pinned:
            board.set_attr(attr, run_id)
        epochs, done = backbones.ready_epochs(run_id)
        if not done and watch is not None:  # a run left RUNNING by a dead trainer has ended
            done = backbones.trainer_gone(run_id, watch)
        ended = ended and done
        out[key] = (run_id, tuple(e for e in epochs if not asked or e in asked))
    return out, ended


def _needs_net(cfg: sweep.StudyConfig) -> bool:
    return any(b != PIXELS for b in cfg.axes.block) or cfg.kind == "fid-grid"


def run_follow(
    cfg: sweep.StudyConfig,
    opts: RunOptions,
    *,
    interval: float = FOLLOW_INTERVAL,
    progress: Progress | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> tuple[Context | None, Counter[str]]:
    """Evaluate every checkpoint of the study's backbones as their training runs write it:
    look every `interval` seconds (sleeping between looks), run the points found, and return
    once every followed run has ended and its points are done. The scheduler's exactly-once
    rules hold as in `run_study`: Ctrl-C and re-running lose and double nothing. A run whose
    trainer stops beating for `trainer_grace(opts.grace_period)` (on `clock`) counts as
    ended: what it saved
    is probed, then UserError says which run to resume."""
    from ddsweep import backbones

    if opts.workers > 1:
        raise UserError("--follow runs one worker: start more followers in other shells")
    exp_id, board = _open(cfg, opts, follow=True)
    # Every checkpoint written so far (those asked for by --epoch are kept by follow_pins).
    grid_cfg = dataclasses.replace(cfg, axes=dataclasses.replace(cfg.axes, epoch=()))
    ctx: Context | None = None
    outcomes: Counter[str] = Counter()
    watch = backbones.TrainerWatch(backbones.trainer_grace(opts.grace_period), clock)
    while True:
        pins, ended = follow_pins(board, cfg, watch)
        objective = make_objective(grid_cfg, opts, pins)
        if objective.points:
            if ctx is None:
                ctx = _start(cfg, opts, exp_id, board, objective)
            else:
                ctx.objective = objective
                _use(board, objective)
            outcomes += work(ctx, _shown(ctx, progress))
        if ended:
            break
        (sleep or time.sleep)(interval)  # looked up now: tests may replace `time`
    if ctx is not None:
        finish(ctx)
    if watch.gone:
        run_id = watch.gone[0]
        raise UserError(
            f"training run {run_id} is RUNNING but its trainer has shown no life for "
            f"{watch.grace:g} s (killed, or its machine lost?): the checkpoints it "
            f"completed are probed; resume it with `ddsweep train --resume {run_id}`, then "
            "run this command again"
        )
    return ctx, outcomes


def _shown(ctx: Context, progress: Progress | None) -> Callable[[str], None] | None:
    """The on_point callback that shows `ctx`'s progress, if there is a display."""
    if progress is None:
        return None
    return lambda pid: progress(ctx, ctx.board.tally(), pid)


def missing_epochs(cfg: sweep.StudyConfig, ctx: Context | None) -> list[str]:
    """What --epoch asked for that a followed training run ended without, one line a run."""
    if not cfg.axes.epoch or ctx is None:
        return []
    lines = []
    for key, (run_id, epochs) in ctx.objective.pins.items():
        gone = [e for e in cfg.axes.epoch if e not in epochs]
        if gone:
            lines.append(
                f"training run {run_id or '(none)'} ({key[0]}, {key[1]} px, attention "
                f"{key[2]}) ended without epochs {', '.join(map(str, gone))}: left out"
            )
    return lines


def outcome_lines(ctx: Context, outcomes: Counter[str]) -> tuple[list[str], list[str]]:
    """(lines for stdout, lines for stderr) that say how a run of the grid ended; the stderr
    lines are there exactly when some point of the grid is failed or left (the run failed)."""
    t = ctx.board.tally()
    total, name = len(ctx.ids), ctx.cfg.study
    done = sum(1 for p in ctx.ids if p in t.complete)
    ran = outcomes["complete"]
    if ran == 0 and done == total:
        return [f"{name}: all {done} points were already complete; nothing to do"], []
    out = [
        f"{name}: {done}/{total} points complete ({ran} evaluated now, {outcomes['failed']} "
        f"failed, {outcomes['adopted']} adopted from earlier runs)"
    ]
    if done == total:
        return out, []
    failed = [p for p in ctx.ids if p not in t.complete and t.failures[p]]
    given_up = [p for p in failed if t.failures[p] > ctx.opts.max_retries]
    err = [f"ddsweep: {len(failed)} of {total} points failed, {total - done - len(failed)} left"]
    if failed:
        err.append(f"first error ({failed[0]}): {t.last_error[failed[0]]}")
    if given_up:
        more = max(t.failures[p] for p in given_up)
        err.append(
            f"{len(given_up)} used up their {ctx.opts.max_retries} retries: fix the cause, then "
            f"re-run with --max-retries {more}"
        )
    else:
        err.append("re-run the same command to retry them")
    err.append(f"`ddsweep study status --study {name}` shows what is left")
    return out, err
