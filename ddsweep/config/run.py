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
