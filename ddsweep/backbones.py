"""Backbones for studies: reuse a finished training run with the same config, resume an
interrupted one, or train a new one (`ddsweep study train-grid` and `ddsweep quickstart`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep import sweep, tracking
from ddsweep.model import ModelConfig
from ddsweep.tracking import runs
from ddsweep.train import TrainConfig, train, validate, with_dataset_defaults

if TYPE_CHECKING:
    from rich.progress import Progress


def configs_for(cfg: sweep.StudyConfig, **extra: Any) -> list[TrainConfig]:
    """One TrainConfig per (dataset, resolution, attention) of the study, with its `train:`
    section (and `extra`) applied over the dataset defaults."""
    overrides = {**dict(cfg.train), **extra}
    out = []
    for dataset, resolution, attention in sweep.backbones(cfg.axes):
        base = TrainConfig(dataset=dataset, model=ModelConfig(attention=attention))
        plain = {k: v for k, v in overrides.items() if k not in ("channels", "batch_size")}
        base = dataclasses.replace(base, **plain)
        tc = with_dataset_defaults(
            base,
            resolution=resolution,
            channels=overrides.get("channels"),
            batch_size=overrides.get("batch_size"),
        )
        validate(tc)
        out.append(tc)
    return out


def matching_run(cfg: TrainConfig) -> tuple[str, str] | None:
    """(run id, status) of the newest training run recorded with exactly this config (any
    status but deleted), or None."""
    params = tracking.flat_params(cfg)
    return runs.matching_training_run(
        cfg.dataset, cfg.model.resolution, cfg.model.attention, params
    )


def ensure_trained(
    cfg: TrainConfig, data_dir: Path, progress: Progress | None = None
) -> tuple[str, str]:
    """(run id, what happened: reused | resumed | trained) for one backbone config."""
    found = matching_run(cfg)
    if found is None:
        return train(cfg, data_dir=data_dir, progress=progress), "trained"
    run_id, status = found
    if status == "FINISHED":
        return run_id, "reused"
    return train(cfg, data_dir=data_dir, resume_run_id=run_id, progress=progress), "resumed"


def ensure_all(
    cfg: sweep.StudyConfig,
    data_dir: Path,
    progress: Progress | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    on_backbone: Callable[[TrainConfig, str, str], None] | None = None,
) -> list[tuple[TrainConfig, str, str]]:
    """Every backbone of the study trained (reused, resumed or trained anew) in `experiment`:
    (config, run id, what happened) per backbone, each also passed to `on_backbone` as soon as
    it is ready."""
    tracking.setup(tracking_uri, experiment)
    done = []
    for tc in configs_for(cfg):
        run_id, how = ensure_trained(tc, data_dir, progress)
        if on_backbone is not None:
            on_backbone(tc, run_id, how)
        done.append((tc, run_id, how))
    return done
