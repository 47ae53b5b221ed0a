"""One training run's settings (`TrainConfig`): the study's defaults, written once; the CLI's
options, a sweep file's `train:` section and the run's MLflow params are views of it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ddsweep.config.fid import FIDConfig
from ddsweep.config.model import ModelConfig
from ddsweep.config.probesettings import DEFAULT_K

# `ddsweep train --probe-every`'s defaults: cheap and informative blocks, and k-NN (no fitting:
# the cheapest probe).
DEFAULT_BLOCKS: tuple[str, ...] = ("down4", "mid", "up4", "up3")
DEFAULT_PROBES: tuple[str, ...] = (f"knn{DEFAULT_K}",)
# Marks the fields a sweep file's `train:` section may set for train-grid.
_SWEEP: dict[str, Any] = {"sweep": True}


@dataclass(frozen=True)
class TrainConfig:
    """One training run; defaults follow the study (AdamW 1e-4, 2000 epochs, weights every 50)."""

    dataset: str = "cifar10"
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = field(default=2000, metadata=_SWEEP)
    batch_size: int = field(default=128, metadata=_SWEEP)
    lr: float = field(default=1e-4, metadata=_SWEEP)
    weight_decay: float = 0.0
    ema_decay: float = field(default=0.9999, metadata=_SWEEP)
    grad_clip: float = field(default=1.0, metadata=_SWEEP)
    checkpoint_every: int = field(default=50, metadata=_SWEEP)
    sample_every: int = field(default=50, metadata=_SWEEP)
    sample_count: int = 16
    sample_steps: int = 50
    max_steps: int = field(default=0, metadata=_SWEEP)  # 0 = no limit; for smoke runs
    seed: int = field(default=0, metadata=_SWEEP)
    device: str = field(default="auto", metadata=_SWEEP)
    num_workers: int = 0
    log_every: int = 10
    fid_every: int = 0  # 0: off; else the Fréchet distance of the EMA weights every N epochs
    fid_samples: int = FIDConfig.samples
    fid_sampler: str = FIDConfig.sampler
    fid_feature: str = FIDConfig.feature  # or randconv (offline, logged as fd_randconv)
    probe_every: int = 0  # 0: off; else probe the EMA weights every N epochs (ddsweep.trainprobe)
    probe_block: tuple[str, ...] = DEFAULT_BLOCKS
    probe: tuple[str, ...] = DEFAULT_PROBES  # knn50, linear, ...
    probe_noise_step: int = 0
    stop_when_probe_plateaus: str = ""  # a probe metric; "": train all epochs
    patience: int = 5  # probe evaluations without a gain beyond the bootstrap interval


# Settings that only watch training (the probe evaluations run in a forked RNG and change no
# weight): two runs that differ in them trained the same network, so a backbone's identity
# (`identity_params`) leaves them out and a run made without probing is reused by one with it.
WATCH_FIELDS = ("probe_every", "probe_block", "probe", "probe_noise_step")


def sweep_keys() -> tuple[str, ...]:
    """The keys of a sweep file's `train:` section: the marked TrainConfig fields, and the
    model's `channels`."""
    return (*(f.name for f in fields(TrainConfig) if f.metadata.get("sweep")), "channels")
