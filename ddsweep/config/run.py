"""How a study is run (`RunOptions`: where it is stored and tracked, how many workers), as
opposed to what it computes (`config.sweep.StudyConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ddsweep.config import paths

if TYPE_CHECKING:
    from ddsweep.scheduler.types import Policy

DEFAULT_EXPERIMENT = "ddsweep"  # the MLflow experiment of every run unless --experiment says
FOLLOW_INTERVAL = 10.0  # seconds between two looks at the followed training runs


@dataclass(frozen=True)
class RunOptions:
    """How to run a study (not what it computes)."""

    storage: str | None = None  # None: a journal file under .ddsweep/optuna/
    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    workers: int = 1
    gpus: tuple[int, ...] | None = None  # --gpus: the GPUs workers are placed on (None: all)
    max_retries: int = 2
    heartbeat_interval: int = 10
    grace_period: int = 60
    data_dir: Path = Path(paths.DATA_DIR)
    inception_weights: Path | None = None  # fid-grid: --inception-weights

    def policy(self) -> Policy:
        """The scheduler's part of these options."""
        from ddsweep.scheduler.types import Policy  # the scheduler package imports Optuna

        return Policy(self.storage, self.max_retries, self.heartbeat_interval, self.grace_period)


@dataclass(frozen=True)
class Checkpoint:
    """Which weights of a training run: its run id, an epoch (None: the last saved) and
    ema or raw."""

    run: str
    epoch: int | None = None
    weights: str = "ema"


@dataclass(frozen=True)
class SampleConfig:
    """How `ddsweep sample` generates its grid."""

    n: int = 64
    sampler: str = "ddim"
    steps: int = 50  # DDIM only; DDPM always runs every training step
    seed: int = 0


LAUNCHERS: tuple[str, ...] = ("local", "slurm", "local-submitit")


@dataclass(frozen=True)
class Launch:
    """Where a study's workers run (`--launcher` and the job options; ddsweep.launch): local
    processes, a Slurm job array, or the same jobs on this machine (submitit's local one)."""

    launcher: str = "local"
    slurm_partition: str | None = None
    gpus_per_worker: int = 1
    timeout_min: int = 240
    cpus_per_worker: int | None = None  # None: Slurm's default

    def check(self) -> None:
        """Raise UserError for options no launcher can use."""
        from ddsweep.errors import UserError

        if self.launcher not in LAUNCHERS:
            known = ", ".join(LAUNCHERS)
            raise UserError(f"unknown --launcher {self.launcher!r}: use one of {known}")
        if self.gpus_per_worker < 0 or self.timeout_min <= 0:
            raise UserError("--gpus-per-worker must be at least 0 and --timeout-min positive")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise UserError("--cpus-per-worker must be positive")
