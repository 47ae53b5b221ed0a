"""A backbone named by a local diffusers folder or `hub:ORG/NAME`: resolved (its kind, content
hash, native resolution and noise schedule, read from its folder without loading any weights)
and loaded (denoiser, VAE, scheduler and conditioning, once per process)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep.errors import UserError, first_line
from ddsweep.kinds import hub
from ddsweep.kinds.registry import BackboneKind, find_for_class, get, kinds

if TYPE_CHECKING:
    from torch import nn

# How an image becomes a latent: the posterior mean times the VAE's scaling factor (DIFT, DDAE
# and REPA's choice); recorded with every latent result and part of every latent cache key.
LATENTS = "mean"
MODEL_INDEX = "model_index.json"
SCHEDULER = "scheduler/scheduler_config.json"
# Early hub repos (google/ddpm-cifar10-32) keep one model flat beside model_index.json.
FLAT_SCHEDULER = "scheduler_config.json"


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON: {first_line(err)}") from err
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a diffusers config (a JSON object)")
    return value


@dataclass(frozen=True)
class Resolved:
    """A backbone found on disk: what a grid point needs to know before anything is loaded."""

    spec: str  # as the user named it (a path or hub:ORG/NAME)
    folder: Path  # the pipeline folder (or a lone model folder, pixels kinds only)
    kind: str
    identity: str  # content hash of every weights file it loads (denoiser, VAE, text encoder)
    resolution: int  # native image size: sample_size x the VAE's factor
    num_train_timesteps: int
    latent_factor: int = 1  # image pixels per latent pixel (1: no VAE)
    vae_hash: str = ""  # content hash of the VAE weights ("" without one)
    blocks: tuple[str, ...] = ()  # its named blocks in forward order, then its aliases

    def kind_of(self) -> BackboneKind:
        return get(self.kind)

    def label(self) -> str:
        """How tables, tags and params name it: kind and content hash."""
        return f"{self.kind}:{self.identity}"

    def accepts(self, block: str) -> bool:
        """Whether a study's block name applies to this backbone (its own names and aliases,
        or a module path)."""
        return block in self.blocks or "." in block


def _denoiser(folder: Path) -> tuple[BackboneKind, Path]:
    """(kind, denoiser folder) of a pipeline folder or a lone model folder."""
    if (folder / MODEL_INDEX).is_file() and not (folder / "config.json").is_file():
        index = _json(folder / MODEL_INDEX)
        for sub, entry in index.items():
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
                kind = find_for_class(entry[1])
                if kind is not None and (folder / sub).is_dir():
                    return kind, folder / sub
        classes = sorted(e[1] for e in index.values() if isinstance(e, list) and len(e) == 2)
        raise UserError(
            f"{folder}: no registered backbone kind for its components ({', '.join(classes)}); "
            f"kinds: {', '.join(k.name + ' = ' + k.denoiser for k in kinds())}"
        )
    if (folder / "config.json").is_file():
        name = str(_json(folder / "config.json").get("_class_name", "UNet2DModel"))
        kind = find_for_class(name)
        if kind is None:
            raise UserError(f"{folder} holds a {name}: no registered backbone kind loads it")
        return kind, folder
    raise UserError(
        f"{folder} is no diffusers folder (no model_index.json or config.json): pass a "
        "pipeline or model folder written by save_pretrained, or hub:ORG/NAME"
    )


def _weights_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{folder} has no .safetensors weights: ddsweep loads safetensors only (never "
            "pickles); convert with from_pretrained(...).save_pretrained(safe_serialization=True)"
        )
    return files


def _hash_of(folders: list[Path]) -> str:
    from ddsweep.checkpoints import _file_hash

    h = hashlib.sha256()
    for folder in folders:
        for f in _weights_files(folder):
            h.update(f"{folder.name}/{f.name}\0".encode())
            h.update(_file_hash(f.resolve()).encode())  # memo keyed on the full stat
    return h.hexdigest()[:16]


def folder_of(spec: str) -> Path:
    """The local folder `spec` names (a hub id resolved through the cache)."""
    folder = hub.resolve(spec) if hub.is_hub(spec) else Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(f"backbone {spec}: no such folder")
    return folder


def resolve(spec: str) -> Resolved:
    """Kind, identity, native resolution and schedule of the backbone `spec` names (the
    weights are hashed once per file content: see checkpoints._file_hash)."""
    folder = folder_of(spec)
    kind, net_dir = _denoiser(folder)
    config = _json(net_dir / "config.json")
    parts = [net_dir]
    factor, vae_hash = 1, ""
    if kind.input == "latents":
        vae_dir = folder / "vae"
        if not (vae_dir / "config.json").is_file():
            raise UserError(f"{folder}: a {kind.name} backbone needs its VAE in vae/")
        factor = 2 ** (len(_json(vae_dir / "config.json").get("block_out_channels", [0])) - 1)
        vae_hash = _hash_of([vae_dir])
        parts.append(vae_dir)
    if kind.condition is not None and (folder / "text_encoder").is_dir():
        parts.append(folder / "text_encoder")
    if not (folder / SCHEDULER).is_file() and not (folder / FLAT_SCHEDULER).is_file():
        raise UserError(
            f"{folder}: no {SCHEDULER}; ddsweep reads a backbone's noise schedule from it "
            "(never assumes one): pass the pipeline folder, not its model subfolder"
        )
    steps = int(_json(scheduler_file(folder)).get("num_train_timesteps", 1000))
    size = config.get("sample_size")
    size = size[0] if isinstance(size, list) else size
    if not isinstance(size, int):
        raise UserError(f"{net_dir}/config.json gives no sample_size")
    blocks = (*kind.blocks(config), *kind.aliases)
    return Resolved(
        spec, folder, kind.name, _hash_of(parts), size * factor, steps, factor, vae_hash, blocks
    )


@dataclass
class Loaded:
    """A backbone in memory: its denoiser, VAE (latent kinds), schedule and conditioning."""

    resolved: Resolved
    net: nn.Module
    vae: Any
    scheduler: Any
    condition: Any

    def module(self, name: str) -> nn.Module:
        """The module whose output is block `name`: a kind's name or alias, or any
        `named_modules()` path of the denoiser."""
        kind = self.resolved.kind_of()
        modules = dict(self.net.named_modules())
        path = kind.block_path(self.net, name) or name
        if path == "" or path not in modules:
            known = ", ".join(self.resolved.blocks)
            raise UserError(
                f"unknown block {name!r} of {kind.name} backbone {self.resolved.spec}: use one "
                f"of {known}, or a named_modules() path of its denoiser"
            )
        return modules[path]


def scheduler_file(folder: Path) -> Path:
    """The scheduler config of a pipeline folder (scheduler/, or flat beside the model)."""
    nested = folder / SCHEDULER
    return nested if nested.is_file() else folder / FLAT_SCHEDULER


def scheduler_of(folder: Path) -> Any:
    """The folder's own noise schedule as a DDPMScheduler (whose add_noise is q_sample): betas
    and step count from its scheduler config, whatever sampler class the pipeline names."""
    from diffusers import DDPMScheduler

    config = _json(scheduler_file(folder))
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return DDPMScheduler(**{k: config[k] for k in keys if k in config})


def load(resolved: Resolved, prompt: str = "", device: str = "cpu") -> Loaded:
    """Load the backbone's parts from its folder (safetensors only, never online)."""
    return _load(resolved, prompt, device)


@functools.lru_cache(maxsize=2)
def _load(resolved: Resolved, prompt: str, device: str) -> Loaded:
    import diffusers

    kind = resolved.kind_of()
    folder = resolved.folder
    net_dir = folder if (folder / "config.json").is_file() else folder / kind.subfolder
    opts: dict[str, Any] = {
        "use_safetensors": True,
        "local_files_only": True,
        "low_cpu_mem_usage": False,
    }
    try:
        net = getattr(diffusers, kind.denoiser).from_pretrained(net_dir, **opts).eval()
        vae = None
        if kind.input == "latents":
            vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", **opts).eval().to(device)
        condition = kind.condition(folder, net, prompt) if kind.condition else None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"cannot load backbone {resolved.spec}: {first_line(err)}") from err
    for module in (net, vae):
        if module is not None:
            module.requires_grad_(False)
    return Loaded(resolved, net.to(device), vae, scheduler_of(folder), condition)
