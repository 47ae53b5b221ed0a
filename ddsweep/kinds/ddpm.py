"""`ddpm`: diffusers' UNet2DModel on pixels, unconditional; the network `ddsweep train` trains
and pretrained DDPMs such as google/ddpm-cifar10-32. Blocks and aliases are the study's
(`ddsweep.model`), so its numbers and cache keys are those of the checkpoints it trains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ddsweep import model
from ddsweep.config.model import ALIASES, SEED_CHANNELS
from ddsweep.kinds.registry import BackboneKind, level_blocks, register


def _blocks(config: Mapping[str, Any]) -> tuple[str, ...]:
    return level_blocks(len(config.get("block_out_channels", SEED_CHANNELS)))


def _path(net: Any, name: str) -> str | None:
    return model.block_path(name, len(net.down_blocks), int(net.config.layers_per_block))


def _call(net: Any, x_t: Any, t: Any, _cond: Any) -> Any:
    return net(x_t, t)


DDPM = register(
    BackboneKind(
        name="ddpm",
        denoiser="UNet2DModel",
        subfolder="unet",
        input="pixels",
        conditioning="none (unconditional)",
        blocks=_blocks,
        block_path=_path,
        call=_call,
        aliases=dict(ALIASES),
        help="UNet2DModel on pixels (ddsweep's own checkpoints, google/ddpm-cifar10-32)",
    )
)
