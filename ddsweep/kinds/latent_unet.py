"""`latent-unet`: Stable Diffusion 1.x/2.x, a UNet2DConditionModel on VAE latents, conditioned
on one fixed prompt through the pipeline's CLIP text encoder: the empty prompt by default, never
a per-class one (that would hand the labels to the features). The embedding is computed once
per backbone and prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddsweep.errors import UserError
from ddsweep.kinds.registry import BackboneKind, level_blocks, level_path, register

# DIFT (Tang et al. 2023) takes SD's decoder block of index 1 (`up_ft_index=1`) at t = 261.
ALIASES = {"dift_layer": "DIFT's layer: the output of up_blocks[1] (up_ft_index=1)"}


def _path(net: Any, name: str) -> str | None:
    if name == "dift_layer":
        return "up_blocks.1"
    return level_path(len(net.down_blocks), name)


def prompt_embedding(folder: Path, prompt: str) -> Any:
    """The text encoder's last hidden state for `prompt` [1, L, D], padded to the tokenizer's
    length as Stable Diffusion's pipeline pads it."""
    import torch

    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise UserError(
            "a latent-unet (Stable Diffusion) backbone needs transformers for its text "
            "encoder: pip install 'ddsweep[latent]'"
        ) from err

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return encoder.eval()(ids)[0]


def _condition(folder: Path, _net: Any, prompt: str) -> Any:
    return prompt_embedding(folder, prompt)


def _call(net: Any, x_t: Any, t: Any, embedding: Any) -> Any:
    states = embedding.to(x_t.device, x_t.dtype).expand(len(x_t), -1, -1)
    return net(x_t, t, encoder_hidden_states=states)


LATENT_UNET = register(
    BackboneKind(
        name="latent-unet",
        denoiser="UNet2DConditionModel",
        subfolder="unet",
        input="latents",
        conditioning="one fixed prompt through the text encoder (default: the empty prompt)",
        blocks=lambda config: level_blocks(len(config["block_out_channels"])),
        block_path=_path,
        call=_call,
        condition=_condition,
        aliases=ALIASES,
        help="Stable Diffusion 1.x/2.x: UNet2DConditionModel on VAE latents",
    )
)
