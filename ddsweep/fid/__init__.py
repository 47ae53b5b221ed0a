"""Fréchet distances of generated images to a dataset's test split, through torchmetrics.

With the standard Inception network (an int `feature`: 64, 192, 768 or 2048 dims) the distance is
the FID; with any other `nn.Module` it is named `fd_<name>`, never FID, since its values are on
another scale. The statistics of the real images (mean, covariance, count) are computed once per
(dataset split, resolution, feature network) and kept on disk, so every checkpoint of a study
pays only for its own samples.

The study scores 2,000 samples per checkpoint against the test set but does not name its
sampler. The default here is DDPM ancestral sampling over all 1000 steps: the process the network
was trained to reverse, the sampler DDPM FIDs are usually reported with (Ho et al. 2020) and the
default of diffusers' DDPMPipeline. DDIM (`sampler="ddim"`, 100 steps unless `steps` says
otherwise) is ten times faster but scores worse, so the two must not be compared: Song et al.
(2021, table 1) report CIFAR-10 FID 4.16 at 100 DDIM steps against 3.17 for DDPM (50k samples).
A DDPM image set depends on the seed *and* the batch size (one generator draws all the noise).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ddsweep import diffusion
from ddsweep.errors import UserError

if TYPE_CHECKING:
    from diffusers import UNet2DModel

from ddsweep.fid.network import (
    INCEPTION_DIMS,
    INCEPTION_FILE,
    INCEPTION_URL,
    WEIGHTS_ENV,
    RandomConvFeatures,
    feature_network,
    hub_weights_path,
    inception_weights_path,
    make_metric,
    metric_name,
    network_id,
)
from ddsweep.fid.stats import (
    REFERENCE_SPLIT,
    RealStats,
    _update,
    default_stats_dir,
    load_stats,
    real_stats,
    save_stats,
    set_real_stats,
    stats_key,
    stats_of_state,
)

__all__ = [
    "DDIM_STEPS",
    "INCEPTION_DIMS",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "REFERENCE_SPLIT",
    "WEIGHTS_ENV",
    "FIDConfig",
    "RandomConvFeatures",
    "RealStats",
    "default_stats_dir",
    "feature_network",
    "fid_of_checkpoint",
    "hub_weights_path",
    "inception_weights_path",
    "load_stats",
    "make_metric",
    "metric_name",
    "network_id",
    "real_stats",
    "run_params",
    "sampler_steps",
    "save_stats",
    "set_real_stats",
    "stats_key",
    "stats_of_state",
    "validate_config",
]

DDIM_STEPS = 100  # DDIM steps when `steps` is not given


@dataclass(frozen=True)
class FIDConfig:
    """How the generated images are made: 2,000 as in the study, DDPM ancestral by default."""

    samples: int = 2000
    sampler: str = "ddpm"
    steps: int | None = None  # DDIM only (None: 100); DDPM always runs all 1000 steps
    seed: int = 0
    batch_size: int = 256
    feature: str = "inception"  # or "randconv": see feature_network


def sampler_steps(cfg: FIDConfig) -> int:
    """The number of network evaluations per image that `cfg` asks for."""
    if cfg.sampler == "ddpm":
        return diffusion.NUM_TRAIN_TIMESTEPS
    return cfg.steps if cfg.steps is not None else DDIM_STEPS


def run_params(
    cfg: FIDConfig,
    *,
    dataset: str,
    resolution: int,
    attention: bool,
    epoch: int,
    backbone_run: str,
    weights: str,
) -> dict[str, str]:
    """The params of one FID run: the checkpoint it scored and how its images were made."""
    settings = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k != "steps"}
    return {
        "dataset": dataset,
        "resolution": str(resolution),
        "attention": str(attention),
        "epoch": str(epoch),
        "backbone_run": backbone_run,
        "weights": weights,
        "steps": str(sampler_steps(cfg)),
        **settings,
    }


def validate_config(cfg: FIDConfig) -> None:
    """Raise UserError for settings that cannot give a Fréchet distance."""
    if cfg.sampler not in diffusion.SAMPLERS:
        raise UserError(
            f"unknown sampler {cfg.sampler!r}: use one of {', '.join(diffusion.SAMPLERS)}"
        )
    if cfg.sampler == "ddpm" and cfg.steps not in (None, diffusion.NUM_TRAIN_TIMESTEPS):
        raise UserError(
            f"DDPM ancestral sampling runs all {diffusion.NUM_TRAIN_TIMESTEPS} steps, not "
            f"{cfg.steps}: use --sampler ddim to choose the number of steps"
        )
    steps = sampler_steps(cfg)
    if not 1 <= steps <= diffusion.NUM_TRAIN_TIMESTEPS:
        raise UserError(
            f"DDIM sampling takes 1 to {diffusion.NUM_TRAIN_TIMESTEPS} steps, got {steps}"
        )
    if cfg.samples < 2:
        raise UserError(f"a Fréchet distance needs at least 2 samples, got {cfg.samples}")
    if cfg.batch_size < 1:
        raise UserError(f"the batch size must be positive, got {cfg.batch_size}")


# --- the feature network ------------------------------------------------------------------------


def _check_backbone(unet: UNet2DModel, resolution: int) -> None:
    """UserError unless `unet` makes RGB images at `resolution` px."""
    if int(unet.config.sample_size) != resolution:
        raise UserError(
            f"the backbone generates {unet.config.sample_size} px images, not {resolution} px"
        )
    if int(unet.config.in_channels) != 3:
        raise UserError(f"FID needs RGB images; the backbone makes {unet.config.in_channels}")


def fid_of_checkpoint(
    unet: UNet2DModel,
    dataset: str,
    resolution: int,
    data_dir: Path | str,
    cfg: FIDConfig | None = None,
    *,
    feature: int | nn.Module = 2048,
    feature_name: str | None = None,
    weights: Path | None = None,
    cache_root: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_real_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Fréchet distance of `cfg.samples` images generated by `unet` to the test split of
    `dataset`, on the U-Net's device. Returns {metric_name: value, "samples", "real_samples",
    "sample_s", "features_s", "real_stats_s", "real_cached" (1.0 on a cache hit), "images_per_s"}.

    `on_batch(n)` follows the generated images, `on_real_batch(n)` the real ones (only when
    their statistics are not cached yet).
    """
    cfg = cfg or FIDConfig()
    validate_config(cfg)
    _check_backbone(unet, resolution)
    name = metric_name(feature, feature_name)
    device = next(unet.parameters()).device
    metric = make_metric(feature, weights).to(device)

    t0 = time.perf_counter()
    stats, computed = real_stats(
        metric, dataset, resolution, data_dir,
        batch_size=cfg.batch_size, cache_root=cache_root, on_batch=on_real_batch,
    )  # fmt: skip
    real_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = diffusion.sample(
        unet, cfg.samples, sampler=cfg.sampler,  # type: ignore[arg-type]
        steps=sampler_steps(cfg), seed=cfg.seed, batch_size=cfg.batch_size, on_batch=on_batch,
    )  # fmt: skip
    sample_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    _update(metric, images, real=False, batch_size=cfg.batch_size)
    value = float(metric.compute())
    features_s = time.perf_counter() - t0
    return {
        name: value,
        "samples": float(cfg.samples),
        "real_samples": float(stats.count),
        "sample_s": sample_s,
        "features_s": features_s,
        "real_stats_s": real_s,
        "real_cached": 0.0 if computed else 1.0,
        "images_per_s": cfg.samples / sample_s if sample_s > 0 else float("inf"),
    }
