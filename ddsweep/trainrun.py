"""A training run's settings beyond `config.train.TrainConfig`: their validation, the device,
the dataset-dependent defaults, the run's name, and the params that identify the network it
trained (read back from MLflow)."""

from __future__ import annotations

import math
from dataclasses import MISSING, fields, replace
from typing import Any

import torch

from ddsweep import data, diffusion, tracking, trainprobe
from ddsweep.config.model import ModelConfig
from ddsweep.config.train import WATCH_FIELDS, TrainConfig
from ddsweep.errors import UserError


def identity_params(cfg: TrainConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(params a training run must hold to have trained `cfg`'s network, params it may lack):
    the second are the settings left at their defaults, which a run recorded before the
    setting existed does not name; its training behaved as the default does."""
    params = {k: v for k, v in tracking.flat_params(cfg).items() if k not in WATCH_FIELDS}
    at_default = {
        f.name
        for f in fields(cfg)
        if f.default is not MISSING and getattr(cfg, f.name) == f.default
    }
    return params, {k: v for k, v in params.items() if k in at_default}


def study_batch_size(resolution: int, attention: bool) -> int:
    """The study's batch sizes (A100): 320/1024 at 32 px, 20/320 at 64 px (attention/none)."""
    if resolution <= 32:
        return 320 if attention else 1024
    return 20 if attention else 320


def validate(cfg: TrainConfig) -> None:
    """Raise UserError for options no training can use."""
    positive: dict[str, float] = {
        "--epochs": cfg.epochs,
        "--batch-size": cfg.batch_size,
        "--checkpoint-every": cfg.checkpoint_every,
        "--sample-steps": cfg.sample_steps,
        "--log-every": cfg.log_every,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise UserError(f"{flag} must be a positive number, got {value}")
    non_negative: dict[str, float] = {
        "--sample-every": cfg.sample_every,
        "--fid-every": cfg.fid_every,
        "--sample-count": cfg.sample_count,
        "--max-steps": cfg.max_steps,
        "--num-workers": cfg.num_workers,
        "--grad-clip": cfg.grad_clip,
        "--weight-decay": cfg.weight_decay,
    }
    for flag, value in non_negative.items():
        if not (value >= 0 and math.isfinite(value)):  # NaN fails every comparison
            raise UserError(f"{flag} must be a finite number, 0 or more, got {value}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive finite number, got {cfg.lr}")
    if not 0 <= cfg.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.sample_steps > diffusion.NUM_TRAIN_TIMESTEPS:
        raise UserError(
            f"--sample-steps {cfg.sample_steps}: DDIM can take at most "
            f"{diffusion.NUM_TRAIN_TIMESTEPS} steps (the training schedule's length)"
        )
    trainprobe.validate(
        cfg.probe_every, cfg.probe_block, cfg.probe, cfg.probe_noise_step,
        cfg.stop_when_probe_plateaus, cfg.patience,
    )  # fmt: skip


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use cpu or auto")
    return device


def run_name(cfg: TrainConfig) -> str:
    """The MLflow run name: dataset, resolution and attention."""
    attn = "attn" if cfg.model.attention else "noattn"
    return f"{cfg.dataset}-{cfg.model.resolution}px-{attn}"


def config_from_params(params: dict[str, str]) -> TrainConfig:
    """Rebuild the TrainConfig that `tracking.flat_params` recorded as MLflow params."""
    model_fields = {f for f in ModelConfig.__dataclass_fields__}
    values: dict[str, Any] = {}
    model_values: dict[str, Any] = {}
    for name, f in {**TrainConfig.__dataclass_fields__, **ModelConfig.__dataclass_fields__}.items():
        if name == "model" or name not in params:
            continue
        raw = params[name]
        default = getattr(ModelConfig() if name in model_fields else TrainConfig(), name)
        value: Any
        if isinstance(default, bool):
            value = raw == "True"
        elif isinstance(default, tuple) and default and isinstance(default[0], str):
            value = tuple(raw.split(",")) if raw else ()
        elif isinstance(default, tuple):
            value = tuple(int(x) for x in raw.split(","))
        else:
            value = type(default)(raw)
        (model_values if name in model_fields else values)[name] = value
        del f
    return TrainConfig(**values, model=ModelConfig(**model_values))


def with_dataset_defaults(cfg: TrainConfig, **given: Any) -> TrainConfig:
    """`cfg` with dataset-dependent defaults filled in where the user gave nothing."""
    info = data.dataset_info(cfg.dataset)

    def pick(name: str, default: Any) -> Any:
        # `is None`, not `or`: an explicit 0 must reach validation, not become the default.
        value = given.get(name)
        return default if value is None else value

    model = replace(
        cfg.model,
        resolution=pick("resolution", info.default_resolution),
        channels=pick("channels", info.default_channels),
    )
    batch = pick(
        "batch_size",
        128 if cfg.dataset == "digits" else study_batch_size(model.resolution, model.attention),
    )
    return replace(cfg, model=model, batch_size=batch)
