"""The command line: parse options, build a config, call one library function."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ddsweep import probes
from ddsweep.errors import UserError


class _Group(TyperGroup):
    """Every mistake a user can make ends as one line on stderr and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone_mode = kwargs.pop("standalone_mode", True)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[misc]
        except typer.Abort:
            typer.echo("ddsweep: interrupted; what was recorded is kept", err=True)
            sys.exit(130)
        except typer.TyperException as err:  # typer's own copy of click's usage errors
            message = err.format_message().strip()
            if message:  # empty: no_args_is_help has printed the help already
                ctx = getattr(err, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                typer.echo(f"ddsweep: error: {message}{hint}", err=True)
            sys.exit(2)
        except UserError as err:
            typer.echo(f"ddsweep: error: {err}", err=True)
            sys.exit(2)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # typer turns Ctrl-C into 130 before we see it
            typer.echo("ddsweep: interrupted; what was recorded is kept", err=True)
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_Group,
    help="Which block of a diffusion U-Net, at which epoch and noise step, classifies best?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Train DDPMs without labels, probe every U-Net block, sweep with Optuna, track in MLflow."""


TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI [default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db]",
        show_default=False,
    ),
]
Experiment = Annotated[str, typer.Option(help="MLflow experiment name.")]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where datasets live or are downloaded to [default: DDSWEEP_DATA, else ./data]",
        show_default=False,
    ),
]


def parse_channels(text: str | None) -> tuple[int, ...] | None:
    """'32,64,64,64' -> (32, 64, 64, 64)."""
    if text is None:
        return None
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError as err:
        raise UserError(
            f"--channels {text!r}: give comma-separated widths, e.g. 32,64,64,64"
        ) from err


@app.command()
def train(
    dataset: Annotated[
        str | None,
        typer.Argument(
            help="cifar10, stl10, flowers102, digits (bundled, offline) or folder:PATH.",
            show_default=False,
        ),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Image size [default: the dataset's: 32, 64, 64, 16]")
    ] = None,
    attention: Annotated[
        bool, typer.Option(help="Attention in the second level and its mirror (the seed net).")
    ] = True,
    channels: Annotated[
        str | None,
        typer.Option(help="U-Net widths [default: 128,256,256,256; digits 32,64,64,64]"),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2000,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Batch size [default: the study's: 320 at 32 px, 20 at 64 px; digits 128]"
        ),
    ] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    ema_decay: Annotated[float, typer.Option(help="EMA decay (with warm-up).")] = 0.9999,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip; 0 turns it off.")] = 1.0,
    checkpoint_every: Annotated[
        int, typer.Option(help="Save a checkpoint every N epochs (and at 0 and the end).")
    ] = 50,
    sample_every: Annotated[
        int,
        typer.Option(
            help="Log a sample grid every N epochs (and at the end); 0 = only at the end."
        ),
    ] = 50,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimiser steps; 0 = no limit.")] = 0,
    sample_count: Annotated[
        int, typer.Option(help="Images per logged sample grid; 0 = none.")
    ] = 16,
    sample_steps: Annotated[int, typer.Option(help="DDIM steps for the sample grids.")] = 50,
    fid_every: Annotated[
        int, typer.Option(help="Log the FID of the EMA weights every N epochs; 0 = off.")
    ] = 0,
    fid_samples: Annotated[int, typer.Option(help="Generated images per FID.")] = 2000,
    fid_sampler: Annotated[str, typer.Option(help="ddpm (1000 steps) or ddim (100).")] = "ddpm",
    fid_feature: Annotated[
        str, typer.Option(help="inception (FID) or randconv (offline; logged as fd_randconv)")
    ] = "inception",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")
    ] = "auto",
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue this training run (MLflow run id) from its last checkpoint, with its "
            "recorded config (only --device, --num-workers and --max-steps apply)."
        ),
    ] = None,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "ddsweep",
) -> None:
    """Train one DDPM backbone without labels; one MLflow run with checkpoints and samples."""
    from ddsweep import data, tracking
    from ddsweep.model import ModelConfig
    from ddsweep.model import validate as validate_model
    from ddsweep.train import (
        TrainConfig,
        close_distributed,
        config_from_params,
        init_distributed,
        with_dataset_defaults,
    )
    from ddsweep.train import train as run_training
    from ddsweep.train import validate as validate_train

    if resume is None:
        if dataset is None:
            raise UserError("missing DATASET: e.g. `ddsweep train digits` (or --resume RUN_ID)")
        base = TrainConfig(
            dataset=dataset,
            model=ModelConfig(attention=attention),
            epochs=epochs,
            lr=lr,
            ema_decay=ema_decay,
            grad_clip=grad_clip,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
            max_steps=max_steps,
            seed=seed,
            device=device,
            num_workers=num_workers,
            sample_count=sample_count,
            sample_steps=sample_steps,
            fid_every=fid_every,
            fid_samples=fid_samples,
            fid_sampler=fid_sampler,
            fid_feature=fid_feature,
        )
        data.dataset_info(dataset)
        cfg = with_dataset_defaults(
            base, resolution=resolution, channels=parse_channels(channels), batch_size=batch_size
        )
        validate_train(cfg)  # before setup: a bad option leaves no mlflow.db behind
        validate_model(cfg.model)
    dist = init_distributed()  # under torchrun: only rank 0 creates or writes MLflow runs
    tracking.setup(tracking_uri, experiment, create=dist.is_main)
    if resume is not None:
        run = tracking.get_run(resume)
        if run.data.tags.get(tracking.KIND_TAG) != "train":
            raise UserError(f"run {resume} is not a `ddsweep train` run and cannot be resumed")
        cfg = config_from_params(run.data.params)
        if dataset is not None and dataset != cfg.dataset:
            raise UserError(f"--resume {resume} trains {cfg.dataset}, not {dataset}; drop DATASET")
        # How to run may change on resume (another machine); what is computed may not.
        cfg = replace(cfg, device=device, num_workers=num_workers, max_steps=max_steps)
    try:
        with _bar() as progress:
            run_id = run_training(
                cfg,
                data_dir=data_dir or data.default_data_dir(),
                resume_run_id=resume,
                progress=progress if dist.is_main else None,
                dist=dist,
            )
    finally:
        close_distributed(dist)
    if dist.is_main:
        typer.echo(f"training run {run_id} finished; `mlflow ui` in this folder shows it")


@app.command()
def probe(
    run: Annotated[
        str | None, typer.Option(help="Training run (MLflow run id) whose checkpoint to probe.")
    ] = None,
    backbone: Annotated[
        Path | None,
        typer.Option(help="A local diffusers UNet2DModel folder to probe instead of a run."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="Labelled data to probe [default: the dataset the backbone trained on]"),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Image size [default: the backbone's]")
    ] = None,
    attention: Annotated[
        bool,
        typer.Option(help="With neither --run nor --backbone: pick the latest run with/without."),
    ] = True,
    epoch: Annotated[
        int | None, typer.Option(help="Checkpoint epoch of --run [default: the last saved]")
    ] = None,
    block: Annotated[
        str, typer.Option(help="down1..down4, mid, up4..up1, pixels, or a named_modules() path.")
    ] = "up4",
    noise_step: Annotated[int, typer.Option(help="Noise the images to step t (0 = clean).")] = 0,
    probe_kind: Annotated[
        str, typer.Option("--probe", help=f"Probe kind: {', '.join(probes.names())}.")
    ] = probes.names()[0],
    k: Annotated[int, typer.Option(help="Neighbours, for a probe that uses k (knn).")] = 50,
    pool: Annotated[str, typer.Option(help="avg, flatten or avgN (e.g. avg2).")] = "avg",
    weights: Annotated[str, typer.Option(help="ema or raw checkpoint weights.")] = "ema",
    linear_epochs: Annotated[int, typer.Option(help="Linear probe epochs.")] = 30,
    linear_lr: Annotated[float, typer.Option(help="Linear probe Adam learning rate.")] = 1e-3,
    knn_metric: Annotated[str, typer.Option(help="cosine or euclidean.")] = "cosine",
    knn_weighting: Annotated[
        str, typer.Option(help="uniform, distance, or temperature (DINO).")
    ] = "uniform",
    noise_seed: Annotated[int, typer.Option(help="Seed of the per-image noise.")] = 0,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "ddsweep",
) -> None:
    """Probe one block of one checkpoint (one grid point); logs one MLflow run."""
    from ddsweep import data, evaluate, tracking
    from ddsweep.features import FeatureCache

    exp_id = tracking.setup(tracking_uri, experiment)
    cfg = evaluate.ProbeConfig(
        settings=(
            ("linear", probes.LinearSettings(epochs=linear_epochs, lr=linear_lr)),
            ("knn", probes.KnnSettings(metric=knn_metric, weighting=knn_weighting)),
        ),
        pool=pool,
        weights=weights,
        noise_seed=noise_seed,
    )
    evaluate.validate_probe_config(cfg)
    bb, point = evaluate.resolve_point(
        run=run,
        backbone=backbone,
        dataset=dataset,
        resolution=resolution,
        attention=attention,
        epoch=epoch,
        block=block,
        noise_step=noise_step,
        probe=probe_kind,
        k=k,
    )
    metrics = evaluate.evaluate(bb, point, cfg, FeatureCache(), data_dir or data.default_data_dir())
    run_id = tracking.log_run(
        exp_id,
        f"probe-{point.block}-e{point.epoch}-t{point.noise_step}-{point.probe}",
        evaluate.point_params(point, cfg, bb),
        metrics,
        {tracking.KIND_TAG: "probe", "backbone_run": bb.run_id or "" if bb else ""},
    )
    _print_metrics(point, metrics, run_id)


def _print_metrics(point: Any, metrics: dict[str, float], run_id: str) -> None:
    from rich.console import Console
    from rich.table import Table

    kind = probes.get(point.probe)
    shown = [m for m in kind.metrics if m in metrics]
    table = Table(
        title=f"{point.probe} probe of {point.block}, epoch {point.epoch}, t={point.noise_step}"
    )
    for col in ("dataset", "block", "epoch", "t", "probe", *shown, "extract s", "fit s"):
        table.add_column(col, justify="right")
    table.add_row(
        point.dataset,
        point.block,
        str(point.epoch),
        str(point.noise_step),
        point.probe + (f" k={point.k}" if kind.uses_k else ""),
        *(f"{100 * metrics[m]:.1f} %" for m in shown),
        f"{metrics['extract_s']:.1f}",
        f"{metrics['fit_s']:.1f}",
    )
    Console().print(table)
    typer.echo(f"logged as MLflow run {run_id}")


study_app = typer.Typer(
    cls=_Group,
    help="Run a sweep file's grid as an Optuna study, every trial an MLflow child run.",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")

StudyName = Annotated[
    str, typer.Option("--study", help="Study name: runs sweeps/NAME.yaml (or a YAML path).")
]
AxisOpt = Annotated[list[str] | None, typer.Option(show_default=False)]
Storage = Annotated[
    str | None,
    typer.Option(
        help="Optuna storage URL (e.g. postgresql://user@host/db) shared by workers on several "
        "machines [default: the journal file .ddsweep/optuna/NAME.journal]",
        show_default=False,
    ),
]


DatasetAxis = Annotated[list[str] | None, typer.Option(help="Dataset axis (repeatable).")]
ResolutionAxis = Annotated[list[str] | None, typer.Option(help="Resolution axis.")]
AttentionAxis = Annotated[list[str] | None, typer.Option(help="Attention axis: true and/or false.")]
EpochAxis = Annotated[
    list[str] | None, typer.Option(help="Epoch axis: 50 or START:STOP:STEP (stop included).")
]
BlockAxis = Annotated[list[str] | None, typer.Option(help="Block axis, e.g. --block up3.")]
NoiseAxis = Annotated[list[str] | None, typer.Option(help="Noise-step axis.")]
ProbeAxis = Annotated[
    list[str] | None, typer.Option("--probe", help="Probe axis: linear and/or knn.")
]
KAxis = Annotated[list[str] | None, typer.Option(help="k axis (knn only).")]


Workers = Annotated[int, typer.Option(help="Local worker processes.")]
MaxRetries = Annotated[int, typer.Option(help="Retries of a failed point across runs.")]
GracePeriod = Annotated[
    int, typer.Option(help="Seconds without heartbeat before a trial counts as dead.")
]
HeartbeatInterval = Annotated[int, typer.Option(help="Seconds between heartbeats.")]


def _run_options(**given: Any) -> Any:
    """RunOptions from the command line, checked."""
    from ddsweep import data
    from ddsweep.study import RunOptions

    if given["workers"] < 1 or given["max_retries"] < 0:
        raise UserError("--workers must be at least 1 and --max-retries at least 0")
    if given["grace_period"] <= 0 or given["heartbeat_interval"] <= 0:
        raise UserError("--grace-period and --heartbeat-interval must be positive")
    if given["heartbeat_interval"] >= given["grace_period"]:
        raise UserError("--heartbeat-interval must be shorter than --grace-period")
    given["data_dir"] = given.get("data_dir") or data.default_data_dir()
    return RunOptions(**given)


def _axis_overrides(**axes: list[str] | None) -> dict[str, list[str]]:
    return {k: v for k, v in axes.items() if v}


def _study_config(name: str, overrides: dict[str, list[str]]) -> Any:
    from ddsweep import sweep

    return sweep.with_overrides(sweep.load_study(name), name, overrides)


@study_app.command("probe-grid")
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
    storage: Storage = None,
    workers: Workers = 1,
    max_retries: MaxRetries = 2,
    grace_period: GracePeriod = 60,
    heartbeat_interval: HeartbeatInterval = 10,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "ddsweep",
) -> None:
    """Run (or resume) the probe grid of a study; re-running does only what is left."""

    cfg = _study_config(
        study,
        _axis_overrides(
            dataset=dataset,
            resolution=resolution,
            attention=attention,
            epoch=epoch,
            block=block,
            noise_step=noise_step,
            probe=probe_kind,
            k=k,
        ),
    )
    if cfg.kind != "probe-grid":
        raise UserError(f"{cfg.source} is a {cfg.kind} study: run `ddsweep study {cfg.kind}`")
    opts = _run_options(
        storage=storage,
        tracking_uri=tracking_uri,
        experiment=experiment,
        workers=workers,
        max_retries=max_retries,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        data_dir=data_dir,
    )
    _run_grid(cfg, opts)


def _study_progress(bar: Any, name: str) -> Any:
    """A callback that shows a study's trials done / left, failures and the current point."""
    task = bar.add_task(name, total=None, state="starting")

    def show(ctx: Any, t: Any, current: str | None) -> None:
        done = sum(1 for p in ctx.ids if p in t.complete)
        state = f"{len(t.running)} running, {sum(t.failures.values())} failed"
        if current:
            state += f" | {current}"
        bar.update(task, total=len(ctx.ids), completed=done, state=state)

    return show


def _bar(console: Any = None) -> Any:
    """One Rich progress display for training tasks (loss, img/s) and study tasks (state)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class StateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            f = task.fields
            if "state" in f:
                return Text(str(f["state"]))
            if "loss" in f:
                return Text(f"loss {f['loss']:.4f}  {f.get('ips', 0):.0f} img/s")
            return Text("")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        StateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _run_grid(cfg: Any, opts: Any) -> None:
    from rich.console import Console

    from ddsweep.study import run_study

    bar = _bar(Console(stderr=True))
    show = _study_progress(bar, cfg.study)

    def show_started(*args: Any) -> None:
        if not bar.live.is_started:  # only once the study is prepared: errors stay one line
            bar.start()
        show(*args)

    try:
        ctx, outcomes = run_study(cfg, opts, progress=show_started)
    finally:
        bar.stop()
    t = ctx.board.tally()
    done = sum(1 for p in ctx.ids if p in t.complete)
    ran = outcomes["complete"]
    if ran == 0 and done == len(ctx.ids):
        typer.echo(f"{cfg.study}: all {done} points were already complete; nothing to do")
    else:
        typer.echo(
            f"{cfg.study}: {done}/{len(ctx.ids)} points complete ({ran} evaluated now, "
            f"{outcomes['failed']} failed, {outcomes['adopted']} adopted from earlier runs)"
        )
    if done < len(ctx.ids):
        typer.echo(f"see `ddsweep study status --study {cfg.study}` for what is left")


@study_app.command("status")
def study_status(
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
    experiment: Experiment = "ddsweep",
) -> None:
    """Complete / running / failed / left, in total and per axis value."""
    from rich.console import Console

    from ddsweep.study import status_tables

    axes = _axis_overrides(
        dataset=dataset,
        resolution=resolution,
        attention=attention,
        epoch=epoch,
        block=block,
        noise_step=noise_step,
        probe=probe_kind,
        k=k,
    )
    cfg = _study_config(study, axes)
    for table in status_tables(
        cfg, storage=storage, tracking_uri=tracking_uri, experiment=experiment
    ):
        Console().print(table)


InceptionWeights = Annotated[
    Path | None,
    typer.Option(
        help="Inception weights file for FID (weights-inception-2015-12-05-6726825d.pth) "
        "[default: DDSWEEP_INCEPTION_WEIGHTS, else torchmetrics' download]",
        show_default=False,
    ),
]


RunOpt = Annotated[str, typer.Option("--run", help="Training run (MLflow run id).")]
EpochOpt = Annotated[int | None, typer.Option(help="Checkpoint epoch [default: the last saved]")]


def _checkpoint(run: str, epoch: int | None, weights: str) -> tuple[Any, Any]:
    """(U-Net on the best device, Backbone) of a training run's checkpoint."""
    import torch

    from ddsweep import checkpoints, evaluate

    epochs = evaluate.saved_epochs(run)
    ep = epoch if epoch is not None else (epochs[-1] if epochs else 0)
    backbone = evaluate.fetch_backbone(run, ep, epochs)
    unet = checkpoints.load_unet(backbone.folder, weights)  # type: ignore[arg-type]
    return unet.to("cuda" if torch.cuda.is_available() else "cpu"), backbone


@app.command()
def sample(
    run: RunOpt,
    epoch: EpochOpt = None,
    n: Annotated[int, typer.Option(help="Number of images.")] = 64,
    sampler: Annotated[str, typer.Option(help="ddpm (all 1000 steps) or ddim.")] = "ddim",
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    weights: Annotated[str, typer.Option(help="ema or raw checkpoint weights.")] = "ema",
    out: Annotated[
        Path | None, typer.Option(help="PNG file [default: samples-RUN-eEPOCH.png]")
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """A PNG grid of images generated by one checkpoint, also logged to its training run."""
    from PIL import Image

    from ddsweep import diffusion, tracking
    from ddsweep.tracking import runs

    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    tracking.setup(tracking_uri, create=False)
    unet, backbone = _checkpoint(run, epoch, weights)
    with _bar() as bar:
        task = bar.add_task(f"sampling epoch {backbone.epoch}", total=n, state=sampler)
        images = diffusion.sample(
            unet,
            n,
            sampler=sampler,  # type: ignore[arg-type]
            steps=1000 if sampler == "ddpm" else steps,
            seed=seed,
            on_batch=lambda b: bar.advance(task, b),
        )
    path = out or Path(f"samples-{run[:8]}-e{backbone.epoch:04d}-{sampler}-seed{seed}.png")
    if path.exists():
        raise UserError(f"{path} exists: pass another --out (nothing is overwritten)")
    Image.fromarray(diffusion.to_grid(images).numpy()).save(path)
    runs.log_artifact(run, path, "samples")
    typer.echo(f"wrote {path} and logged it under samples/ of run {run}")


@app.command()
def fid(
    run: RunOpt,
    epoch: EpochOpt = None,
    samples: Annotated[int, typer.Option(help="Generated images (2000 in the study).")] = 2000,
    sampler: Annotated[str, typer.Option(help="ddpm (all 1000 steps) or ddim.")] = "ddpm",
    steps: Annotated[int | None, typer.Option(help="DDIM steps [default: 100]")] = None,
    feature: Annotated[
        str, typer.Option(help="inception (FID) or randconv (offline; logged as fd_randconv)")
    ] = "inception",
    inception_weights: InceptionWeights = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    weights: Annotated[str, typer.Option(help="ema or raw checkpoint weights.")] = "ema",
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "ddsweep",
) -> None:
    """FID of one checkpoint against the test split; logged as a fid run and on the training run."""
    from ddsweep import data, tracking
    from ddsweep import fid as fid_mod
    from ddsweep.tracking import runs

    cfg = fid_mod.FIDConfig(
        samples=samples, sampler=sampler, steps=steps, seed=seed, feature=feature
    )
    fid_mod.validate_config(cfg)
    net, net_name = fid_mod.feature_network(feature)
    weights_file = fid_mod.inception_weights_path(inception_weights)
    fid_mod.make_metric(net, weights_file)  # fail in seconds, before any sampling
    exp_id = tracking.setup(tracking_uri, experiment)
    unet, backbone = _checkpoint(run, epoch, weights)
    meta = tracking.get_run(run).data.tags
    with _bar() as bar:
        task = bar.add_task(f"FID epoch {backbone.epoch}", total=samples, state=sampler)
        metrics = fid_mod.fid_of_checkpoint(
            unet,
            meta["dataset"],
            int(meta["resolution"]),
            data_dir or data.default_data_dir(),
            cfg,
            feature=net,
            feature_name=net_name,
            weights=weights_file,
            on_batch=lambda b: bar.advance(task, b),
        )
    name = fid_mod.metric_name(net, net_name)
    params = {
        "dataset": meta["dataset"],
        "resolution": meta["resolution"],
        "attention": meta["attention"],
        "epoch": str(backbone.epoch),
        "backbone_run": run,
        "weights": weights,
        "steps": str(fid_mod.sampler_steps(cfg)),
        **{k: v for k, v in tracking.flat_params(cfg).items() if k != "steps"},
    }
    tracking.log_run(exp_id, f"fid-e{backbone.epoch}", params, metrics, {tracking.KIND_TAG: "fid"})
    runs.log_metric(run, name, metrics[name], int(backbone.epoch))
    typer.echo(f"{name} of run {run} at epoch {backbone.epoch}: {metrics[name]:.2f}")


@study_app.command("fid-grid")
def fid_grid(
    study: StudyName,
    dataset: DatasetAxis = None,
    resolution: ResolutionAxis = None,
    attention: AttentionAxis = None,
    epoch: EpochAxis = None,
    samples: Annotated[
        int | None, typer.Option(help="Generated images per checkpoint [default: 2000]")
    ] = None,
    sampler: Annotated[
        str | None, typer.Option(help="ddpm (1000 steps) or ddim [default: ddpm]")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="DDIM steps [default: 100]")] = None,
    feature: Annotated[
        str | None,
        typer.Option(help="inception (FID) or randconv (offline; logged as fd_randconv)"),
    ] = None,
    inception_weights: InceptionWeights = None,
    storage: Storage = None,
    workers: Workers = 1,
    max_retries: MaxRetries = 2,
    grace_period: GracePeriod = 60,
    heartbeat_interval: HeartbeatInterval = 10,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "ddsweep",
) -> None:
    """FID of every checkpoint of a study's backbones: one trial and child run per checkpoint."""
    from ddsweep import sweep

    overrides = _axis_overrides(
        dataset=dataset, resolution=resolution, attention=attention, epoch=epoch
    )
    base = sweep.load_study(study)
    if base is None:
        cfg = replace(sweep.with_overrides(None, study, overrides), kind="fid-grid")
    else:
        cfg = replace(sweep.with_overrides(base, study, overrides), kind="fid-grid")
        if base.kind == "probe-grid":
            # The FID of a probe study's checkpoints: its own study, beside the probe one.
            cfg = replace(cfg, study=f"{base.study}_fid")
    given: dict[str, Any] = {"samples": samples, "sampler": sampler, "steps": steps}
    given["feature"] = feature
    cfg = replace(cfg, fid=replace(cfg.fid, **{k: v for k, v in given.items() if v is not None}))
    from ddsweep import fid

    fid.validate_config(cfg.fid)
    fid.feature_network(cfg.fid.feature)
    opts = _run_options(
        storage=storage,
        tracking_uri=tracking_uri,
        experiment=experiment,
        workers=workers,
        max_retries=max_retries,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        data_dir=data_dir,
        inception_weights=inception_weights,
    )
    _run_grid(cfg, opts)


@study_app.command("train-grid")
def train_grid(
    study: StudyName,
    dataset: Annotated[list[str] | None, typer.Option(help="Dataset axis (repeatable).")] = None,
    resolution: Annotated[list[str] | None, typer.Option(help="Resolution axis.")] = None,
    attention: Annotated[
        list[str] | None, typer.Option(help="Attention axis: true and/or false.")
    ] = None,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "ddsweep",
) -> None:
    """Train one backbone per (dataset, resolution, attention) of a study (reuse, resume)."""
    from ddsweep import backbones, data, tracking

    cfg = _study_config(
        study, _axis_overrides(dataset=dataset, resolution=resolution, attention=attention)
    )
    tracking.setup(tracking_uri, experiment)
    configs = backbones.configs_for(cfg)
    with _bar() as progress:
        for tc in configs:
            run_id, how = backbones.ensure_trained(
                tc, data_dir or data.default_data_dir(), progress
            )
            progress.console.print(
                f"{tc.dataset} {tc.model.resolution} px attention={tc.model.attention}: "
                f"run {run_id} ({how})"
            )


@app.command()
def report(
    study: StudyName,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the files [default: reports/NAME/]")
    ] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option("--format", help="table, csv, md, png or all (repeatable) [default: all]"),
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Block x epoch tables of a study from MLflow: terminal, CSV, Markdown and PNG plots."""
    from ddsweep import report as report_mod
    from ddsweep import tracking

    tracking.setup(tracking_uri, create=False)
    report_mod.parse_formats(formats or ["all"])
    tracking.check_reachable()
    report_mod.write_report(study, out or report_mod.default_out_dir(study), formats or ["all"])


@app.command()
def quickstart(
    workers: Annotated[int, typer.Option(help="Local worker processes for the grid.")] = 1,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "ddsweep",
) -> None:
    """The whole pipeline on the bundled digits set, offline on a CPU: train, probe, report."""
    from rich.console import Console

    from ddsweep import data
    from ddsweep import quickstart as qs
    from ddsweep.study import RunOptions

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    opts = RunOptions(
        tracking_uri=tracking_uri,
        experiment=experiment,
        workers=workers,
        data_dir=data_dir or data.default_data_dir(),
    )
    console = Console()
    with _bar(Console(stderr=True)) as bar:
        cfg = qs.run(opts, bar, _study_progress(bar, qs.STUDY))
    files = qs.write_report(cfg, console)
    where = files[0].parent if files else "reports/"
    console.print(
        f"\nThe report files are in {where}/. Run `mlflow ui` in this folder to browse every "
        "run: the training run with its loss curve and samples, and the study with one child "
        "run per grid point."
    )


def main() -> None:
    """Console-script entry point."""
    app()


# MLflow's per-file download bars would drown our own progress output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


if __name__ == "__main__":
    main()
