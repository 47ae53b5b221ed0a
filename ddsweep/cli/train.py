"""`ddsweep train`: one backbone, one MLflow run."""

from __future__ import annotations

from typing import Annotated

import typer

from ddsweep.cli._options import DataDir, Experiment, FeatureHelp, TrackingUri, bar, given_fields
from ddsweep.config.fid import DDIM_STEPS, NUM_TRAIN_TIMESTEPS
from ddsweep.config.model import ModelConfig
from ddsweep.config.run import DEFAULT_EXPERIMENT
from ddsweep.config.train import TrainConfig
from ddsweep.errors import UserError

D = TrainConfig  # the defaults of every option below


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


def train(
    dataset: Annotated[
        str | None,
        typer.Argument(
            help="cifar10, stl10, flowers102, digits (bundled, offline) or folder:PATH "
            "(none with --resume: the run's).",
            show_default=False,
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            help="Image size (default: the dataset's: 32, 64, 64, 16).", show_default=False
        ),
    ] = None,
    attention: Annotated[
        bool, typer.Option(help="Attention in the second level and its mirror (the seed net).")
    ] = ModelConfig.attention,
    channels: Annotated[
        str | None,
        typer.Option(
            help="U-Net widths (default: the dataset's: 128,256,256,256; digits 32,64,64,64).",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = D.epochs,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Batch size (default: the study's: 320 at 32 px, 20 at 64 px, 1024 and 320 "
            "without attention; digits 128).",
            show_default=False,
        ),
    ] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = D.lr,
    ema_decay: Annotated[float, typer.Option(help="EMA decay (with warm-up).")] = D.ema_decay,
    grad_clip: Annotated[
        float, typer.Option(help="Gradient-norm clip; 0 turns it off.")
    ] = D.grad_clip,
    checkpoint_every: Annotated[
        int, typer.Option(help="Save a checkpoint every N epochs (and at 0 and the end).")
    ] = D.checkpoint_every,
    sample_every: Annotated[
        int,
        typer.Option(
            help="Log a sample grid every N epochs (and at the end); 0 = only at the end."
        ),
    ] = D.sample_every,
    max_steps: Annotated[
        int, typer.Option(help="Stop after N optimiser steps; 0 = no limit.")
    ] = D.max_steps,
    sample_count: Annotated[
        int, typer.Option(help="Images per logged sample grid; 0 = none.")
    ] = D.sample_count,
    sample_steps: Annotated[
        int, typer.Option(help="DDIM steps for the sample grids.")
    ] = D.sample_steps,
    fid_every: Annotated[
        int, typer.Option(help="Log the FID of the EMA weights every N epochs; 0 = off.")
    ] = D.fid_every,
    fid_samples: Annotated[int, typer.Option(help="Generated images per FID.")] = D.fid_samples,
    fid_sampler: Annotated[
        str, typer.Option(help=f"ddpm ({NUM_TRAIN_TIMESTEPS} steps) or ddim ({DDIM_STEPS}).")
    ] = D.fid_sampler,
    fid_feature: Annotated[str, typer.Option(help=FeatureHelp)] = D.fid_feature,
    probe_every: Annotated[
        int,
        typer.Option(
            help="Probe the EMA weights every N epochs on the labelled train/test splits and log "
            "probe/PROBE/top1/BLOCK (epoch as step); 0 = off."
        ),
    ] = D.probe_every,
    probe_block: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Block to probe while training; repeat for more (default: "
            f"{' '.join(D.probe_block)}).",
            show_default=False,
        ),
    ] = None,
    probe: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Probe while training: knnK (knn = knn50) or linear; repeat for more "
            f"(default: {' '.join(D.probe)}).",
            show_default=False,
        ),
    ] = None,
    probe_noise_step: Annotated[
        int, typer.Option(help="Noise step t of the probed features (0: clean images).")
    ] = D.probe_noise_step,
    stop_when_probe_plateaus: Annotated[
        str | None,
        typer.Option(
            help="Stop when this probe metric (e.g. probe/knn50/top1/up3) has not beaten its "
            "own 95 % bootstrap interval for --patience evaluations; none by default.",
            show_default=False,
        ),
    ] = None,
    patience: Annotated[
        int, typer.Option(help="Probe evaluations without a gain before stopping.")
    ] = D.patience,
    seed: Annotated[int, typer.Option(help="Random seed.")] = D.seed,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")
    ] = D.device,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = D.num_workers,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue this training run (MLflow run id) from its last checkpoint, with its "
            "recorded config (only --device, --num-workers and --max-steps apply); "
            "none by default: a new run.",
            show_default=False,
        ),
    ] = None,
    system_metrics: Annotated[
        bool,
        typer.Option(
            help="Record MLflow's system metrics (CPU, memory, GPU) on the run; needs psutil "
            "(ddsweep's `system` extra)."
        ),
    ] = False,
    register: Annotated[
        str | None,
        typer.Option(
            help="Register the final checkpoint as a new version of this model in MLflow's "
            "model registry; none by default.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """Train one DDPM backbone without labels; one MLflow run with checkpoints and samples."""
    options = dict(locals())  # first: the options, named as TrainConfig's fields
    from ddsweep import backbones as lib
    from ddsweep.config import paths
    from ddsweep.tracking import training

    if resume is None and dataset is None:
        raise UserError("missing DATASET: e.g. `ddsweep train digits` (or --resume RUN_ID)")
    if register is not None:
        training.check_model_name(register)
    if system_metrics:
        training.enable_system_metrics()
    for name in ("probe_block", "probe"):  # lists from Typer, tuples in the config
        options[name] = tuple(options[name]) if options[name] else None
    cfg = TrainConfig(model=ModelConfig(attention=attention), **given_fields(TrainConfig, options))
    if resume is None:  # checked before MLflow: a bad option leaves no mlflow.db behind
        cfg = lib.for_dataset(
            cfg, resolution=resolution, channels=parse_channels(channels), batch_size=batch_size
        )
    with bar() as progress:
        run_id = lib.run_training(
            cfg,
            data_dir=data_dir or paths.data_dir(),
            resume=resume,
            dataset=dataset,
            tracking_uri=tracking_uri,
            experiment=experiment,
            progress=progress,
        )
    if run_id:  # "" on the other processes of a torchrun job
        typer.echo(f"training run {run_id} finished; `mlflow ui` in this folder shows it")
        if register:
            uri, epoch = training.register_backbone(run_id, register)
            typer.echo(f"registered epoch {epoch} as {uri} (a diffusers folder)")
