"""Backbones: one `ddsweep train` (a new config with its dataset's defaults, or a run resumed
with its recorded config), and every backbone of a study (reuse a finished training run with the
same config, resume an interrupted one, or train a new one: `ddsweep study train-grid` and
`ddsweep quickstart`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep import data, tracking
from ddsweep.config import sweep
from ddsweep.config.model import ModelConfig
from ddsweep.config.train import TrainConfig
from ddsweep.distributed import close_distributed, init_distributed
from ddsweep.errors import UserError, did_you_mean
from ddsweep.tracking import runs
from ddsweep.train import train
from ddsweep.trainrun import config_from_params, identity_params, validate, with_dataset_defaults

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
    """(run id, status) of the newest training run that trained this config's network (any
    status but deleted), or None. Settings that only watch training do not count, and a run
    recorded before a setting existed matches that setting's default (`identity_params`)."""
    params, optional = identity_params(cfg)
    return runs.matching_training_run(
        cfg.dataset, cfg.model.resolution, cfg.model.attention, params, optional
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
    extra: dict[str, Any] | None = None,
) -> list[tuple[TrainConfig, str, str]]:
    """Every backbone of the study trained (reused, resumed or trained anew) in `experiment`:
    (config, run id, what happened) per backbone, each also passed to `on_backbone` as soon as
    it is ready. `extra`: TrainConfig fields over the study's `train:` section."""
    tracking.setup(tracking_uri, experiment)
    done = []
    for tc in configs_for(cfg, **(extra or {})):
        run_id, how = ensure_trained(tc, data_dir, progress)
        if on_backbone is not None:
            on_backbone(tc, run_id, how)
        done.append((tc, run_id, how))
    return done


def array_trainer(
    cfg: sweep.StudyConfig, data_dir: Path, tracking_uri: str | None, experiment: str
) -> Counter[str]:
    """One task of a train-grid job array (ddsweep.launch): the study's one backbone."""
    done = ensure_all(cfg, data_dir, tracking_uri=tracking_uri, experiment=experiment)
    return Counter(how for _, _, how in done)


# --- one backbone: `ddsweep train` --------------------------------------------------------------


def for_dataset(
    cfg: TrainConfig,
    *,
    resolution: int | None = None,
    channels: tuple[int, ...] | None = None,
    batch_size: int | None = None,
) -> TrainConfig:
    """A new training's config: `cfg` with its dataset's defaults where nothing was given,
    checked (UserError for an unknown dataset or options no training can use)."""
    from ddsweep.config.model import validate as validate_model

    data.dataset_info(cfg.dataset)
    out = with_dataset_defaults(
        cfg, resolution=resolution, channels=channels, batch_size=batch_size
    )
    validate(out)
    validate_model(out.model)
    return out


def resumed_config(
    run_id: str, recorded: dict[str, str], how: TrainConfig, dataset: str | None = None
) -> TrainConfig:
    """The config recorded by run `run_id`, with how to run taken from `how` (device,
    workers, max steps: another machine may resume); what is computed may not change, so a
    `dataset` other than the recorded one is a UserError."""
    cfg = config_from_params(recorded)
    if dataset is not None and dataset != cfg.dataset:
        raise UserError(f"--resume {run_id} trains {cfg.dataset}, not {dataset}; drop DATASET")
    return dataclasses.replace(
        cfg, device=how.device, num_workers=how.num_workers, max_steps=how.max_steps
    )


def check_probe_blocks(blocks: tuple[str, ...]) -> None:
    """UserError, before any run is created, for a --probe-block that names no block (a module
    path, with its dots, is checked against the network once it is built)."""
    from ddsweep.model import ALIASES, BLOCKS, PIXELS

    known = (*BLOCKS, *ALIASES, PIXELS)
    for block in blocks:
        if block not in known and "." not in block and not block.endswith("_block"):
            raise UserError(
                f"--probe-block: unknown block {block!r}{did_you_mean(block, known)}; allowed: "
                f"{', '.join(known)} or a named_modules() path of the U-Net"
            )


def run_training(
    cfg: TrainConfig,
    *,
    data_dir: Path,
    resume: str | None = None,
    dataset: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    progress: Progress | None = None,
) -> str:
    """One `ddsweep train`: train `cfg` as a new MLflow run, or continue run `resume` with its
    recorded config (see `resumed_config`; `dataset` is the one the user named, if any). Under
    torchrun only rank 0 creates or writes runs; returns the run id ("" on other ranks)."""
    from ddsweep.tracking import runs

    dist = init_distributed()
    try:
        if resume is None and dist.is_main:  # data that cannot be had: one line, no run, no store
            check_probe_blocks(cfg.probe_block if cfg.probe_every else ())
            data.training_set(cfg.dataset, cfg.model.resolution, data_dir)
        if resume is not None:  # an unknown run: one line, and no store created to say so
            tracking.setup(tracking_uri, create=False)
            tracking.training_run(resume)
        tracking.setup(tracking_uri, experiment, create=dist.is_main)
        if resume is not None:
            cfg = resumed_config(resume, runs.training_params(resume), cfg, dataset)
        return train(
            cfg,
            data_dir=data_dir,
            resume_run_id=resume,
            progress=progress if dist.is_main else None,
            dist=dist,
        )
    finally:
        close_distributed(dist)


# --- following training runs as they write checkpoints: `probe-grid --follow` --------------------


def followed_run(dataset: str, resolution: int, attention: bool) -> str | None:
    """The training run a --follow study follows for this backbone: the newest one running or
    finished; None while there is none."""
    for run in tracking.training_runs(dataset, resolution, attention):
        if run.live or run.status == "FINISHED":
            return run.run_id
    return None


def resume_epoch(run_id: str) -> int:
    """The epoch the resume state of run `run_id` names (-1 when it has none yet): every
    checkpoint up to it is complete, since a training writes the state after the checkpoint."""
    import json
    import tempfile

    from ddsweep import checkpoints

    with tempfile.TemporaryDirectory(prefix="ddsweep-follow-") as tmp:
        try:
            got = runs.download(run_id, f"{checkpoints.RESUME}/{checkpoints.STATE}", Path(tmp))
            return int(json.loads(got.read_text())["epoch"])
        except Exception:  # not written yet (MLflow's error), or being replaced
            return -1


def ready_epochs(run_id: str) -> tuple[tuple[int, ...], bool]:
    """(epochs of run `run_id` whose checkpoints are complete, whether the run has ended). The
    status is read first: once it says ended, the epochs read after it are all there will be."""
    ended = not tracking.training_run(run_id).live
    last = resume_epoch(run_id)
    return tuple(e for e in runs.saved_epochs(run_id) if e <= last), ended
