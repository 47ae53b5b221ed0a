"""`ddsweep study ...`: a sweep file's grid as an Optuna study, every trial an MLflow child run."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import typer

from ddsweep.cli._options import (
    DEFAULT_LAUNCH,
    DEFAULT_RUN,
    AttentionAxis,
    BackboneAxis,
    BlockAxis,
    CpusPerWorker,
    DataDir,
    DatasetAxis,
    EpochAxis,
    Experiment,
    FeatureHelp,
    Gpus,
    GpusPerWorker,
    GracePeriod,
    HeartbeatInterval,
    InceptionWeights,
    KAxis,
    LauncherOpt,
    MaxRetries,
    NoiseAxis,
    ProbeAxis,
    ResolutionAxis,
    SlurmPartition,
    Storage,
    StudyName,
    TimeoutMin,
    TrackingUri,
    Workers,
    axis_overrides,
    bar,
    given_fields,
    launch_options,
    run_options,
    study_progress,
)
from ddsweep.config.fid import DDIM_STEPS, FIDConfig
from ddsweep.config.run import DEFAULT_EXPERIMENT, FOLLOW_INTERVAL, RunOptions
from ddsweep.errors import UserError

F = FIDConfig  # the defaults a sweep file leaves in place
_FILE = "(default: the sweep file's fid: section, else"


def study_config(name: str, overrides: dict[str, list[str]], storage: str | None = None) -> Any:
    """The study of sweeps/NAME.yaml (else the definition stored with it, else the command line
    alone) with the given axes."""
    from ddsweep import study

    return study.study_config(name, overrides, storage)


def fid_study_config(name: str, overrides: dict[str, list[str]], fid: dict[str, Any]) -> Any:
    """The fid-grid study of `name`: a probe study's checkpoints get their own study NAME_fid
    beside it; `fid` holds the FIDConfig settings given on the command line."""
    from ddsweep import fid as fid_mod
    from ddsweep.config import sweep

    sweep.check_study_arg(name)
    base = sweep.load_study(name)
    cfg = replace(sweep.with_overrides(base, name, overrides), kind="fid-grid")
    if base is not None and base.kind == "probe-grid":
        cfg = replace(cfg, study=f"{base.study}_fid")
    cfg = replace(cfg, fid=replace(cfg.fid, **{k: v for k, v in fid.items() if v is not None}))
    fid_mod.validate_config(cfg.fid)
    fid_mod.feature_network(cfg.fid.feature)
    return cfg


def echo_answer(ctx: Any) -> None:
    """The study's answer first, by the report's own code (in words, then at a glance), so the
    end of a grid, `ddsweep report` and the quickstart say the same."""
    if ctx.answer is None:
        return
    from rich.console import Console

    from ddsweep import report

    report.print_report(Console(), ctx.cfg.study, *ctx.answer)


def run_follow(cfg: Any, opts: Any, interval: float) -> None:
    """`probe-grid --follow`: evaluate checkpoints as training writes them, then say how it
    ended (exit 1 when a point failed, 2 when an asked-for epoch never came)."""
    from rich.console import Console

    from ddsweep.study import missing_epochs, outcome_lines
    from ddsweep.study import run_follow as follow

    if not (0 < interval <= 86400):  # also refuses nan and inf
        raise UserError(f"--follow-interval must be seconds in (0, 86400], got {interval}")
    console = Console(stderr=True)
    console.print(
        f"{cfg.study}: following the training runs of its backbones (a look every "
        f"{interval:g} s); Ctrl-C stops, running it again goes on where it stopped"
    )
    progress = bar(console)
    show = study_progress(progress, cfg.study)

    def show_started(*args: Any) -> None:
        if not progress.live.is_started:
            progress.start()
        show(*args)

    try:
        ctx, outcomes = follow(cfg, opts, interval=interval, progress=show_started)
    finally:
        progress.stop()
    if ctx is None:
        raise UserError(f"{cfg.study}: the followed training runs ended with nothing to probe")
    out, err = outcome_lines(ctx, outcomes)
    echo_answer(ctx)
    for line in out:
        typer.echo(line)
    for line in err:
        typer.echo(line, err=True)
    gone = missing_epochs(cfg, ctx)
    if gone:
        raise UserError("; ".join(gone))
    if err:
        raise typer.Exit(1)


def run_grid(cfg: Any, opts: Any, where: Any = DEFAULT_LAUNCH) -> None:
    """Run the study with a progress display (from its first trial on), then say how it ended:
    exit status 1 when a point of the grid failed or is left."""
    from rich.console import Console

    from ddsweep.study import outcome_lines, run_study

    if where.launcher != "local":
        launched_grid(cfg, opts, where)
        return

    progress = bar(Console(stderr=True))
    show = study_progress(progress, cfg.study)

    def show_started(*args: Any) -> None:
        if not progress.live.is_started:  # only once the study is prepared: errors stay one line
            progress.start()
        show(*args)

    try:
        ctx, outcomes = run_study(cfg, opts, progress=show_started)
    finally:
        if progress.live.is_started:  # a stop never started prints a blank line before errors
            progress.stop()
    out, err = outcome_lines(ctx, outcomes)
    if not ctx.board.spreads_ints():
        out.insert(  # before the outcome lines: the grid's summary stays the last line
            0,
            f"note: study {cfg.study} began before ddsweep spread integer axes over their values: "
            "its trials keep the range 0..2^48-1 (optuna-dashboard draws them at 0); a study "
            "created from now on (a new --study name) spreads them",
        )
    echo_answer(ctx)
    for line in out:
        typer.echo(line)
    for line in err:
        typer.echo(line, err=True)
    if err:  # a point of the grid failed or is left: the run did not do what was asked
        raise typer.Exit(1)


def launched_grid(cfg: Any, opts: Any, where: Any) -> None:
    """The study's workers as a submitit job array: Slurm returns once they are submitted;
    the local executor's jobs are waited for, then the run ends as `run_grid` ends."""
    from ddsweep import launch, study

    ctx = study.prepare(cfg, opts)  # the study, its backbones, its parent run: errors now
    handles = launch.submit(where, cfg.study, launch.probe_job(cfg, opts))
    typer.echo(
        f"{cfg.study}: {len(handles)} workers submitted as job array {launch.job_ids(handles)} "
        f"(logs in {launch.submitit_folder(cfg.study)})"
    )
    if where.launcher == "slurm":
        typer.echo(
            f"follow them with `ddsweep study status --study {cfg.study}`; the answer: "
            f"`ddsweep report --study {cfg.study}`"
        )
        return
    outcomes = launch.wait(handles)
    study.finish(ctx)
    out, err = study.outcome_lines(ctx, outcomes)
    for line in out:
        typer.echo(line)
    for line in err:
        typer.echo(line, err=True)
    if err:
        raise typer.Exit(1)


def probe_grid(
    study: StudyName,
    dataset: DatasetAxis = None,
    resolution: ResolutionAxis = None,
    attention: AttentionAxis = None,
    epoch: EpochAxis = None,
    block: BlockAxis = None,
    noise_step: NoiseAxis = None,
    probe_kind: ProbeAxis = None,
    k: KAxis = None,
    backbone: BackboneAxis = None,
    storage: Storage = None,
    workers: Workers = DEFAULT_RUN.workers,
    gpus: Gpus = None,
    launcher: LauncherOpt = DEFAULT_LAUNCH.launcher,
    slurm_partition: SlurmPartition = None,
    gpus_per_worker: GpusPerWorker = DEFAULT_LAUNCH.gpus_per_worker,
    timeout_min: TimeoutMin = DEFAULT_LAUNCH.timeout_min,
    cpus_per_worker: CpusPerWorker = None,
    max_retries: MaxRetries = DEFAULT_RUN.max_retries,
    grace_period: GracePeriod = DEFAULT_RUN.grace_period,
    heartbeat_interval: HeartbeatInterval = DEFAULT_RUN.heartbeat_interval,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Probe each checkpoint as the backbones' training runs write it; end once "
            "every followed run has ended and its points are done (off by default).",
        ),
    ] = False,
    follow_interval: Annotated[
        float, typer.Option(help="Seconds between two looks at the followed training runs.")
    ] = FOLLOW_INTERVAL,
) -> None:
    """Run (or resume) the probe grid of a study; re-running does only what is left."""
    opts = run_options(**given_fields(RunOptions, locals()))  # first: checked before any work
    where = launch_options(**locals())
    axes = axis_overrides(
        dataset=dataset,
        resolution=resolution,
        attention=attention,
        epoch=epoch,
        block=block,
        noise_step=noise_step,
        probe=probe_kind,
        k=k,
        backbone=backbone,
    )
    cfg = study_config(study, axes, storage)
    if cfg.kind != "probe-grid":
        raise UserError(f"{cfg.source} is a {cfg.kind} study: run `ddsweep study {cfg.kind}`")
    if follow:
        if where.launcher != "local":
            raise UserError("--follow runs one worker here: leave --launcher out")
        run_follow(cfg, opts, follow_interval)
    else:
        run_grid(cfg, opts, where)


def fid_grid(
    study: StudyName,
    dataset: DatasetAxis = None,
    resolution: ResolutionAxis = None,
    attention: AttentionAxis = None,
    epoch: EpochAxis = None,
    samples: Annotated[
        int | None,
        typer.Option(
            help=f"Generated images per checkpoint {_FILE} {F.samples}).", show_default=False
        ),
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(help=f"ddpm (1000 steps) or ddim {_FILE} {F.sampler}).", show_default=False),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help=f"DDIM steps {_FILE} {DDIM_STEPS}).", show_default=False)
    ] = None,
    feature: Annotated[
        str | None,
        typer.Option(help=f"{FeatureHelp[:-1]} {_FILE} {F.feature}).", show_default=False),
    ] = None,
    inception_weights: InceptionWeights = None,
    storage: Storage = None,
    workers: Workers = DEFAULT_RUN.workers,
    gpus: Gpus = None,
    launcher: LauncherOpt = DEFAULT_LAUNCH.launcher,
    slurm_partition: SlurmPartition = None,
    gpus_per_worker: GpusPerWorker = DEFAULT_LAUNCH.gpus_per_worker,
    timeout_min: TimeoutMin = DEFAULT_LAUNCH.timeout_min,
    cpus_per_worker: CpusPerWorker = None,
    max_retries: MaxRetries = DEFAULT_RUN.max_retries,
    grace_period: GracePeriod = DEFAULT_RUN.grace_period,
    heartbeat_interval: HeartbeatInterval = DEFAULT_RUN.heartbeat_interval,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """FID of every checkpoint of a study's backbones: one trial and child run per checkpoint."""
    opts = run_options(**given_fields(RunOptions, locals()))  # first: checked before any work
    where = launch_options(**locals())
    axes = axis_overrides(dataset=dataset, resolution=resolution, attention=attention, epoch=epoch)
    fid = {"samples": samples, "sampler": sampler, "steps": steps, "feature": feature}
    cfg = fid_study_config(study, axes, fid)
    run_grid(cfg, opts, where)


def train_grid(
    study: StudyName,
    dataset: DatasetAxis = None,
    resolution: ResolutionAxis = None,
    attention: AttentionAxis = None,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    launcher: LauncherOpt = DEFAULT_LAUNCH.launcher,
    slurm_partition: SlurmPartition = None,
    gpus_per_worker: GpusPerWorker = DEFAULT_LAUNCH.gpus_per_worker,
    timeout_min: TimeoutMin = DEFAULT_LAUNCH.timeout_min,
    cpus_per_worker: CpusPerWorker = None,
) -> None:
    """Train one backbone per (dataset, resolution, attention) of a study (reuse, resume)."""
    from ddsweep import backbones, launch
    from ddsweep.config import paths

    where = launch_options(**locals())
    axes = axis_overrides(dataset=dataset, resolution=resolution, attention=attention)
    cfg = study_config(study, axes)
    if where.launcher != "local":
        job = launch.train_job(cfg, data_dir or paths.data_dir(), tracking_uri, experiment)
        handles = launch.submit(where, cfg.study, job)
        typer.echo(
            f"{cfg.study}: {len(handles)} backbones submitted as job array "
            f"{launch.job_ids(handles)} (logs in {launch.submitit_folder(cfg.study)})"
        )
        if where.launcher == "local-submitit":
            typer.echo(f"{cfg.study}: {dict(launch.wait(handles))}")
        return
    with bar() as progress:

        def show(tc: Any, run_id: str, how: str) -> None:
            progress.console.print(
                f"{tc.dataset} {tc.model.resolution} px attention={tc.model.attention}: "
                f"run {run_id} ({how})"
            )

        backbones.ensure_all(
            cfg,
            data_dir or paths.data_dir(),
            progress,
            tracking_uri=tracking_uri,
            experiment=experiment,
            on_backbone=show,
        )


def status(
    study: StudyName,
    dataset: DatasetAxis = None,
    resolution: ResolutionAxis = None,
    attention: AttentionAxis = None,
    epoch: EpochAxis = None,
    block: BlockAxis = None,
    noise_step: NoiseAxis = None,
    probe_kind: ProbeAxis = None,
    k: KAxis = None,
    storage: Storage = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """Complete / running / failed / left, in total and per axis value."""
    from ddsweep.config import stores

    axes = axis_overrides(
        dataset=dataset,
        resolution=resolution,
        attention=attention,
        epoch=epoch,
        block=block,
        noise_step=noise_step,
        probe=probe_kind,
        k=k,
    )
    unstarted = stores.unstarted_study(study, axes, storage)
    if unstarted is not None:  # no journal: said before Optuna (or MLflow) is even imported
        raise unstarted
    from rich.console import Console

    from ddsweep.studystatus import status_tables

    cfg = study_config(study, axes, storage)
    for table in status_tables(
        cfg, storage=storage, tracking_uri=tracking_uri, experiment=experiment
    ):
        Console().print(table)
