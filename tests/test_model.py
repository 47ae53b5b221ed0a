"""The seed U-Net and the study's block names: size, shapes, the name map, attention, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from ddsweep.config.model import BLOCKS, PIXELS, ModelConfig, validate
from ddsweep.errors import UserError
from ddsweep.model import (
    block_order,
    block_path,
    build_unet,
    config_of,
    count_parameters,
    resolve_block,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelConfig(resolution=8, channels=(32, 32, 32))

# diffusers module of every study block (DESIGN.md: upN is up_blocks[4-N]).
DIFFUSERS_PATH = {
    "down1": "down_blocks.0",
    "down2": "down_blocks.1",
    "down3": "down_blocks.2",
    "down4": "down_blocks.3",
    "mid": "mid_block",
    "up4": "up_blocks.0",
    "up3": "up_blocks.1",
    "up2": "up_blocks.2",
    "up1": "up_blocks.3",
}

# Block outputs of the seed net for one 32 px image (C, H, W): the study's table.
SEED_SHAPES_32PX = {
    "down1": (128, 16, 16),
    "down2": (256, 8, 8),
    "down3": (256, 4, 4),
    "down4": (256, 4, 4),
    "mid": (256, 4, 4),
    "up4": (256, 8, 8),
    "up3": (256, 16, 16),
    "up2": (256, 32, 32),
    "up1": (128, 32, 32),
}


@pytest.fixture(scope="module")
def seed_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet(ModelConfig()).eval()


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    return build_unet(TINY)


def attention_owners(unet: nn.Module) -> set[str]:
    """The top-level blocks (down_blocks.1, mid_block, ...) that hold an attention layer."""
    owners = set()
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            parts = name.split(".")
            owners.add(".".join(parts[:2]) if parts[0].endswith("_blocks") else parts[0])
    return owners


def test_seed_config_is_the_35_7m_ddpm_cifar10_network(seed_unet: UNet2DModel) -> None:
    assert count_parameters(seed_unet) == 35_746_307
    assert tuple(seed_unet.config.block_out_channels) == (128, 256, 256, 256)
    assert seed_unet.config.layers_per_block == 2
    assert seed_unet.config.sample_size == 32
    assert seed_unet.config.in_channels == seed_unet.config.out_channels == 3


def test_block_outputs_at_32px_have_the_studys_shapes(seed_unet: UNet2DModel) -> None:
    outputs: dict[str, tuple[int, ...]] = {}

    def keep(name: str) -> object:
        def hook(module: nn.Module, args: object, output: object) -> None:
            # Down blocks return (hidden_states, residuals); the block output is the first.
            tensor = output[0] if isinstance(output, tuple) else output
            assert isinstance(tensor, torch.Tensor)
            outputs[name] = tuple(tensor.shape[1:])

        return hook

    handles = [resolve_block(seed_unet, b).register_forward_hook(keep(b)) for b in BLOCKS]
    try:
        with torch.no_grad():
            out = seed_unet(torch.randn(1, 3, 32, 32), torch.tensor([10])).sample
    finally:
        for handle in handles:
            handle.remove()
    assert out.shape == (1, 3, 32, 32)
    assert outputs == SEED_SHAPES_32PX
    assert outputs["down4"] == (256, 4, 4)
    assert outputs["up3"] == (256, 16, 16)


@pytest.mark.parametrize(("block", "path"), DIFFUSERS_PATH.items())
def test_block_names_map_to_the_documented_diffusers_modules(
    seed_unet: UNet2DModel, block: str, path: str
) -> None:
    assert block_path(block) == path
    assert resolve_block(seed_unet, block) is seed_unet.get_submodule(path)


def test_blocks_are_in_forward_order_and_up_mirrors_down() -> None:
    assert BLOCKS == ("down1", "down2", "down3", "down4", "mid", "up4", "up3", "up2", "up1")
    assert block_path("up4") == "up_blocks.0"
    assert block_path("down1") == "down_blocks.0"
    # A net with fewer levels mirrors over its own depth.
    assert block_path("up2", levels=2) == "up_blocks.0"
    assert block_path("down3", levels=2) is None


def test_attention_sits_in_the_second_down_block_and_its_mirror(seed_unet: UNet2DModel) -> None:
    assert seed_unet.config.down_block_types == (
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
    )
    assert seed_unet.config.up_block_types == (
        "UpBlock2D",
        "UpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    )
    # The DDPM CIFAR-10 net also attends in its middle block.
    assert attention_owners(seed_unet) == {"down_blocks.1", "up_blocks.2", "mid_block"}
    assert block_path("down2") == "down_blocks.1"
    assert block_path("up2") == "up_blocks.2"


def test_no_attention_means_no_attention_anywhere() -> None:
    unet = build_unet(ModelConfig(resolution=8, channels=(32, 32, 32), attention=False))
    assert attention_owners(unet) == set()
    assert not any("Attn" in t for t in unet.config.down_block_types + unet.config.up_block_types)
    assert config_of(unet).attention is False


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        ModelConfig(resolution=16, channels=(32, 64, 64, 64), attention=False),
        ModelConfig(resolution=8, channels=(32, 64), layers_per_block=1),
    ],
    ids=["tiny", "digits-noattn", "two-levels"],
)
def test_config_of_reads_back_the_architecture(cfg: ModelConfig) -> None:
    unet = build_unet(cfg)
    assert config_of(unet) == cfg
    with torch.no_grad():
        out = unet(torch.randn(2, 3, cfg.resolution, cfg.resolution), torch.tensor([0, 999]))
    assert out.sample.shape == (2, 3, cfg.resolution, cfg.resolution)


@pytest.mark.parametrize("name", ["up5", "down0", "middle", "up_blocks.9", "", "pixel"])
def test_unknown_block_is_a_user_error_listing_the_nine_names(
    tiny_unet: UNet2DModel, name: str
) -> None:
    with pytest.raises(UserError) as err:
        resolve_block(tiny_unet, name)
    message = str(err.value)
    assert repr(name) in message
    assert ", ".join(BLOCKS) in message


@pytest.mark.parametrize(
    "path", ["up_blocks.1.resnets.2", "down_blocks.1.attentions.0", "mid_block", "conv_out"]
)
def test_any_named_modules_path_is_accepted(tiny_unet: UNet2DModel, path: str) -> None:
    assert resolve_block(tiny_unet, path) is dict(tiny_unet.named_modules())[path]


def test_every_named_module_resolves_to_itself(tiny_unet: UNet2DModel) -> None:
    for path, module in tiny_unet.named_modules():
        if path:
            assert resolve_block(tiny_unet, path) is module


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (ModelConfig(resolution=30), ["--resolution 30", "multiple of 8"]),
        (ModelConfig(resolution=0), ["--resolution 0"]),
        (ModelConfig(resolution=-32), ["--resolution -32"]),
        (ModelConfig(resolution=10, channels=(32, 32, 32)), ["--resolution 10", "multiple of 4"]),
        (ModelConfig(channels=(32,)), ["--channels", "at least 2"]),
        (ModelConfig(channels=()), ["--channels", "at least 2"]),
        (ModelConfig(channels=(32, 48, 64, 64)), ["--channels 32,48,64,64", "multiple of 32"]),
        (ModelConfig(channels=(0, 32, 32, 32)), ["--channels 0,32,32,32"]),
        (ModelConfig(channels=(-32, 32, 32, 32)), ["--channels -32,32,32,32"]),
        # 1x1 innermost maps with one channel per group-norm group: nothing to normalise.
        (ModelConfig(resolution=8, channels=(32, 32, 32, 32)), ["1x1", "one value per group"]),
        (ModelConfig(resolution=2, channels=(64, 32)), ["1x1", "one value per group"]),
    ],
)
def test_bad_resolution_or_channels_is_a_user_error(cfg: ModelConfig, words: list[str]) -> None:
    with pytest.raises(UserError) as err:
        validate(cfg)
    for word in words:
        assert word in str(err.value)
    with pytest.raises(UserError):
        build_unet(cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(resolution=8, channels=(32, 32, 32)),  # 2x2 innermost
        ModelConfig(resolution=8, channels=(64, 64, 64, 64)),  # 1x1, two channels a group
    ],
)
def test_the_smallest_valid_nets_run_on_a_batch_of_one(cfg: ModelConfig) -> None:
    with torch.no_grad():
        out = build_unet(cfg).eval()(torch.randn(1, 3, 8, 8), torch.tensor([3])).sample
    assert out.shape == (1, 3, 8, 8)


def test_block_order_puts_pixels_first_then_forward_order_then_paths() -> None:
    names = ["up_blocks.1.resnets.2", "up1", "mid", PIXELS, "down1", "up4"]
    assert sorted(names, key=block_order) == [
        PIXELS,
        "down1",
        "mid",
        "up4",
        "up1",
        "up_blocks.1.resnets.2",
    ]
