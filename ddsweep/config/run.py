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
