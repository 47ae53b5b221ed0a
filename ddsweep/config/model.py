"""The study's block names and the U-Net architecture settings (`ModelConfig`), with their
validation; building the network is `ddsweep.model`'s."""

from __future__ import annotations

from dataclasses import dataclass

from ddsweep.errors import UserError

# The nine probed outputs in forward order; `upN` mirrors `downN` (diffusers `up_blocks[4-N]`).
BLOCKS: tuple[str, ...] = ("down1", "down2", "down3", "down4", "mid", "up4", "up3", "up2", "up1")
# `ddsweep probe`'s block: the first decoder block, the study's usual best.
DEFAULT_BLOCK = "up4"
# The input image itself: a baseline row in every report.
PIXELS = "pixels"
# Readable names for layers inside a block, {alias: what it is}. `ddae_layer`: the last ResNet
# of up3 (the decoder block at a quarter of the resolution, 8x8 at 32 px), before its
# upsampler; DDAE's best layer for this U-Net (its `out_6`), at 32 px `up_blocks.1.resnets.2`.
ALIASES: dict[str, str] = {"ddae_layer": "up3's last ResNet, before upsampling"}
# The DDPM CIFAR-10 channels; the 35.7 M-parameter network of the study and of DDAE.
SEED_CHANNELS: tuple[int, ...] = (128, 256, 256, 256)


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net architecture; the defaults are the study's seed backbone."""

    resolution: int = 32
    channels: tuple[int, ...] = SEED_CHANNELS
    attention: bool = True
    layers_per_block: int = 2
    in_channels: int = 3


def validate(cfg: ModelConfig) -> None:
    """Raise UserError for an architecture the U-Net cannot build or run."""
    levels = len(cfg.channels)
    if levels < 2:
        raise UserError(f"--channels needs at least 2 levels, got {cfg.channels}")
    if any(c <= 0 or c % 32 for c in cfg.channels):
        raise UserError(
            f"--channels {','.join(map(str, cfg.channels))}: every width must be a positive "
            "multiple of 32 (the U-Net's group norm has 32 groups)"
        )
    factor = 2 ** (levels - 1)
    if cfg.resolution <= 0 or cfg.resolution % factor:
        raise UserError(
            f"--resolution {cfg.resolution}: the U-Net halves the image {levels - 1} times, "
            f"so the resolution must be a positive multiple of {factor} (e.g. 32 or 64)"
        )
    # Group norm (32 groups) needs two values per group per image, or torch refuses a batch of
    # one; the innermost level holds the fewest (e.g. 8 px, width 32: 1x1, one channel a group).
    side = cfg.resolution // factor
    if min(cfg.channels[-2:]) // 32 * side * side < 2:
        raise UserError(
            f"--resolution {cfg.resolution} with --channels {','.join(map(str, cfg.channels))}: "
            f"the innermost level is {side}x{side} with one value per group-norm group, which "
            "cannot be normalised; use a larger --resolution, fewer levels or wider channels"
        )
