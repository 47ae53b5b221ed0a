"""How a Fréchet distance's images are made and scored (`FIDConfig`, the sweep file's `fid:`
section), the samplers and the feature networks by name, and their validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ddsweep.errors import UserError

Sampler = Literal["ddpm", "ddim"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
NUM_TRAIN_TIMESTEPS = 1000
FEATURES: tuple[str, ...] = ("inception", "randconv")  # see ddsweep.fid.feature_network
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
        return NUM_TRAIN_TIMESTEPS
    return cfg.steps if cfg.steps is not None else DDIM_STEPS


def validate_config(cfg: FIDConfig) -> None:
    """Raise UserError for settings that cannot give a Fréchet distance."""
    if cfg.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {cfg.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if cfg.sampler == "ddpm" and cfg.steps not in (None, NUM_TRAIN_TIMESTEPS):
        raise UserError(
            f"DDPM ancestral sampling runs all {NUM_TRAIN_TIMESTEPS} steps, not "
            f"{cfg.steps}: use --sampler ddim to choose the number of steps"
        )
    steps = sampler_steps(cfg)
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise UserError(f"DDIM sampling takes 1 to {NUM_TRAIN_TIMESTEPS} steps, got {steps}")
    if cfg.samples < 2:
        raise UserError(f"a Fréchet distance needs at least 2 samples, got {cfg.samples}")
    if cfg.batch_size < 1:
        raise UserError(f"the batch size must be positive, got {cfg.batch_size}")


def check_feature(name: str) -> None:
    """UserError unless `name` is a feature network ddsweep knows."""
    if name not in FEATURES:
        raise UserError(f"unknown feature network {name!r}: use one of {', '.join(FEATURES)}")
