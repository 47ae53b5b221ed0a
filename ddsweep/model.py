"""The seed backbone (diffusers `UNet2DModel`) and the map from the study's block names to its modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddsweep.config.model import (
    ALIASES,
    BLOCKS,
    PIXELS,
    ModelConfig,
    validate,
)
from ddsweep.errors import UserError

if TYPE_CHECKING:
    from diffusers import UNet2DModel
    from torch import nn


def block_types(levels: int, attention: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block types: attention in the second level and in its mirror, or nowhere."""
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention and levels >= 2:
        down[1] = "AttnDownBlock2D"
        up[levels - 2] = "AttnUpBlock2D"  # up_blocks[levels-2] mirrors down_blocks[1]
    return tuple(down), tuple(up)


def build_unet(cfg: ModelConfig) -> UNet2DModel:
    """A freshly initialised diffusers U-Net for `cfg` (the DDPM CIFAR-10 net by default)."""
    from diffusers import UNet2DModel

    validate(cfg)
    down, up = block_types(len(cfg.channels), cfg.attention)
    return UNet2DModel(
        sample_size=cfg.resolution,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        # The mid block's attention goes with the rest: --no-attention is no attention at all.
        add_attention=cfg.attention,
    )


def config_of(unet: UNet2DModel) -> ModelConfig:
    """Read the architecture back from a U-Net (for self-describing checkpoints)."""
    c = unet.config
    return ModelConfig(
        resolution=int(c.sample_size),
        channels=tuple(int(x) for x in c.block_out_channels),
        attention=any("Attn" in t for t in c.down_block_types),
        layers_per_block=int(c.layers_per_block),
        in_channels=int(c.in_channels),
    )


def block_path(name: str, levels: int = 4, layers_per_block: int = 2) -> str | None:
    """The `named_modules()` path of a study block name or alias, or None when `name` is not
    one."""
    if name == "ddae_layer" and levels >= 3:
        # An up block has layers_per_block + 1 ResNets; the upsampler follows the last.
        return f"up_blocks.{levels - 3}.resnets.{layers_per_block}"
    if name == "mid":
        return "mid_block"
    if name.startswith("down") and name[4:].isdigit():
        n = int(name[4:])
        return f"down_blocks.{n - 1}" if 1 <= n <= levels else None
    if name.startswith("up") and name[2:].isdigit():
        n = int(name[2:])
        return f"up_blocks.{levels - n}" if 1 <= n <= levels else None
    return None


def resolve_block(unet: nn.Module, name: str) -> nn.Module:
    """The module whose output is block `name`: a study name or any `named_modules()` path."""
    modules = dict(unet.named_modules())
    levels = len(getattr(unet, "down_blocks", [])) or 4
    layers = int(getattr(getattr(unet, "config", None), "layers_per_block", 2))
    path = block_path(name, levels, layers) or name
    if path not in modules or path == "":
        raise UserError(
            f"unknown block {name!r}: use one of {', '.join((*BLOCKS, *ALIASES))}, {PIXELS}, "
            "or a named_modules() path of the U-Net such as up_blocks.1.resnets.2"
        )
    return modules[path]


def block_order(name: str) -> int:
    """Sort key: pixels first, then the nine blocks and the aliases in forward order, then
    other paths."""
    if name == PIXELS:
        return -1
    if name in ALIASES:  # inside up3: after up4's output, before up3's
        return 2 * BLOCKS.index("up3") - 1
    return 2 * BLOCKS.index(name) if name in BLOCKS else 2 * len(BLOCKS)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
