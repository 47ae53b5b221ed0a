"""The backbone kinds ddsweep knows: one `BackboneKind` entry each, in registration order.

A kind says how a diffusers folder of it is recognised and loaded, its named blocks in forward
order (any `named_modules()` path is accepted too), what the denoiser is fed (pixels, or VAE
latents), the conditioning it gets and how to call it. Its noise schedule is always read from
the folder's own scheduler config. Adding a kind is one module that calls `register(...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ddsweep.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

__all__ = ["BackboneKind", "Input", "find_for_class", "get", "names", "register", "unregister"]

Input = Literal["pixels", "latents"]
# (denoiser, x_t [B,C,H,W], t [B], conditioning) -> the denoiser's output; hooks catch blocks.
Call = Callable[["nn.Module", "torch.Tensor", "torch.Tensor", Any], Any]
# (pipeline folder, denoiser, prompt) -> what `call` gets beside x_t and t (computed once).
Condition = Callable[["Path", "nn.Module", str], Any]


@dataclass(frozen=True)
class BackboneKind:
    """One backbone kind.

        `denoiser` is the diffusers class name of its network (how a folder is recognised: the
        `_class_name` of its config, or the entry of its pipeline's `model_index.json`), found in a
        pipeline folder under `subfolder`. `blocks(config)` names its probed outputs in forward order
    (from the denoiser's config.json, so a study expands without loading weights);
        `block_path(net, name)` maps a block name or alias to its `named_modules()` path (None: not
        one of its names). `aliases` describes the named layers of the field's papers."""

    name: str
    denoiser: str
    subfolder: str
    input: Input
    conditioning: str  # in words, for help and docs
    blocks: Callable[[Mapping[str, Any]], tuple[str, ...]]
    block_path: Callable[[nn.Module, str], str | None]
    call: Call
    condition: Condition | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    # Token outputs [B, T, D] (a transformer): pooled as the mean over tokens for `avg`.
    tokens: bool = False
    help: str = ""


_KINDS: dict[str, BackboneKind] = {}


def register(kind: BackboneKind) -> BackboneKind:
    """Add a kind (its name and denoiser class must be new); returns it."""
    if kind.name in _KINDS:
        raise ValueError(f"backbone kind {kind.name!r} is registered already")
    if find_for_class(kind.denoiser) is not None:
        raise ValueError(f"a backbone kind for {kind.denoiser} is registered already")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that register their own)."""
    _KINDS.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered kinds, in registration order."""
    return tuple(_KINDS)


def get(name: str) -> BackboneKind:
    """The kind called `name`; UserError listing the known ones otherwise."""
    try:
        return _KINDS[name]
    except KeyError:
        raise UserError(f"unknown backbone kind {name!r}: use one of {', '.join(_KINDS)}") from None


def find_for_class(class_name: str) -> BackboneKind | None:
    """The kind whose denoiser is the diffusers class `class_name`, or None."""
    return next((k for k in _KINDS.values() if k.denoiser == class_name), None)


def kinds() -> Iterator[BackboneKind]:
    """Every registered kind."""
    return iter(_KINDS.values())


def level_blocks(levels: int) -> tuple[str, ...]:
    """A U-Net's blocks by level: down1..downL, mid, upL..up1 (upN mirrors downN)."""
    down = tuple(f"down{i}" for i in range(1, levels + 1))
    return (*down, "mid", *(f"up{i}" for i in range(levels, 0, -1)))


def level_path(levels: int, name: str) -> str | None:
    """The `named_modules()` path of a level block name of a U-Net with `levels` levels."""
    if name == "mid":
        return "mid_block"
    for prefix, fmt in (("down", "down_blocks.{}"), ("up", "up_blocks.{}")):
        rest = name[len(prefix) :]
        if name.startswith(prefix) and rest.isdigit() and 1 <= int(rest) <= levels:
            n = int(rest)
            return fmt.format(n - 1 if prefix == "down" else levels - n)
    return None
