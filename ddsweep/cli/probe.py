"""`ddsweep probe`: one grid point, evaluated and logged as one MLflow run."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ddsweep.cli._options import DataDir, Experiment, TrackingUri
from ddsweep.config import probekinds as probes
from ddsweep.config.model import DEFAULT_BLOCK, ModelConfig
from ddsweep.config.probe import ProbeConfig
from ddsweep.config.probesettings import KnnSettings, LinearSettings
from ddsweep.config.run import DEFAULT_EXPERIMENT
from ddsweep.config.sweep import Axes

L, K = LinearSettings, KnnSettings  # the probe kinds' defaults


def probe(
    run: Annotated[
        str | None,
        typer.Option(
            help="Training run (MLflow run id) whose checkpoint to probe (default: the newest "
            "finished training run of --dataset, --resolution and --attention, in any experiment).",
            show_default=False,
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="A backbone to probe instead of a run: a local diffusers folder (a UNet2DModel "
            "folder, or a pipeline folder of any backbone kind: ddpm, latent-unet = Stable "
            "Diffusion, dit) or hub:ORG/NAME from the Hugging Face cache (default: none).",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Labelled data to probe (default: the dataset the backbone trained on).",
            show_default=False,
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(help="Image size (default: the backbone's).", show_default=False),
    ] = None,
    attention: Annotated[
        bool,
        typer.Option(help="With neither --run nor --backbone: pick the latest run with/without."),
    ] = ModelConfig.attention,
    epoch: Annotated[
        int | None,
        typer.Option(
            help="Checkpoint epoch of --run (default: the last saved).", show_default=False
        ),
    ] = None,
    block: Annotated[
        str,
        typer.Option(
            help="down1..down4, mid, up4..up1, pixels, ddae_layer (up3's last ResNet, DDAE's "
            "layer), or a named_modules() path; a dit backbone: layer1..layerN, ddae_dit_layer; "
            "a latent-unet: its levels' down/mid/up blocks, dift_layer."
        ),
    ] = DEFAULT_BLOCK,
    noise_step: Annotated[
        int, typer.Option(help="Noise the images to step t (0 = clean).")
    ] = Axes.noise_step[0],
    probe_kind: Annotated[
        str, typer.Option("--probe", help=f"Probe kind: {', '.join(probes.names())}.")
    ] = probes.names()[0],
    k: Annotated[int, typer.Option(help="Neighbours, for a probe that uses k (knn).")] = Axes.k[0],
    pool: Annotated[str, typer.Option(help="avg, flatten or avgN (e.g. avg2).")] = ProbeConfig.pool,
    weights: Annotated[
        str, typer.Option(help="ema or raw checkpoint weights.")
    ] = ProbeConfig.weights,
    linear_epochs: Annotated[int, typer.Option(help="Linear probe epochs.")] = L.epochs,
    linear_lr: Annotated[float, typer.Option(help="Linear probe Adam learning rate.")] = L.lr,
    knn_metric: Annotated[str, typer.Option(help="cosine or euclidean.")] = K.metric,
    knn_weighting: Annotated[
        str, typer.Option(help="uniform, distance, or temperature (DINO).")
    ] = K.weighting,
    noise_seed: Annotated[
        int, typer.Option(help="Seed of the per-image noise.")
    ] = ProbeConfig.noise_seed,
    noise_draws: Annotated[
        int, typer.Option(help="Average the features over N noise draws (noise steps > 0).")
    ] = ProbeConfig.noise_draws,
    val_fraction: Annotated[
        float,
        typer.Option(help="Part of the train split held out and scored as validation (0: none)."),
    ] = ProbeConfig.val_fraction,
    prompt: Annotated[
        str,
        typer.Option(help="The one fixed prompt of a latent-unet backbone (default: empty)."),
    ] = ProbeConfig.prompt,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """Probe one block of one checkpoint (one grid point); logs one MLflow run."""
    from ddsweep import single

    cfg = ProbeConfig(
        settings=(
            ("linear", L(epochs=linear_epochs, lr=linear_lr)),
            ("knn", K(metric=knn_metric, weighting=knn_weighting)),
        ),
        pool=pool,
        weights=weights,
        noise_seed=noise_seed,
        noise_draws=noise_draws,
        val_fraction=val_fraction,
        prompt=prompt,
    )
    where = {"run": run, "backbone": backbone, "dataset": dataset, "resolution": resolution}
    where |= {"attention": attention, "epoch": epoch, "block": block, "noise_step": noise_step}
    where |= {"probe": probe_kind, "k": k}
    point, metrics, run_id = single.probe(
        cfg, where, data_dir=data_dir, tracking_uri=tracking_uri, experiment=experiment
    )
    print_metrics(point, metrics, run_id)


def print_metrics(point: Any, metrics: dict[str, float], run_id: str) -> None:
    """One table row: the point and the metrics its probe kind reports, then the run id."""
    from rich.console import Console
    from rich.table import Table

    from ddsweep.report.text import is_accuracy

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
        *(f"{100 * metrics[m]:.1f} %" if is_accuracy(m) else f"{metrics[m]:.4g}" for m in shown),
        f"{metrics['extract_s']:.1f}",
        f"{metrics['fit_s']:.1f}",
    )
    Console().print(table)
    typer.echo(f"logged as MLflow run {run_id}")
