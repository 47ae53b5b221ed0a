"""`dit`: DiT (DiTTransformer2DModel) on VAE latents, conditioned on the null class (the label
embedding's row after the last class, `num_embeds_ada_norm`, which class dropout trained).
Blocks `layer1..layerN` are the transformer blocks, their tokens averaged over patches."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddsweep.kinds.registry import BackboneKind, register

# DDAE (Xiang et al. 2023) transfers DiT-XL/2's 13th transformer block at t = 121.
DDAE_LAYER = 13
ALIASES = {
    "ddae_dit_layer": f"DDAE's DiT layer: transformer block {DDAE_LAYER} (layer{DDAE_LAYER})"
}


def _blocks(config: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(f"layer{i}" for i in range(1, int(config["num_layers"]) + 1))


def _path(net: Any, name: str) -> str | None:
    if name == "ddae_dit_layer":
        name = f"layer{DDAE_LAYER}"
    rest = name[len("layer") :]
    if name.startswith("layer") and rest.isdigit():
        n = int(rest)
        return f"transformer_blocks.{n - 1}" if 1 <= n <= len(net.transformer_blocks) else None
    return None


def null_class(net: Any) -> int:
    """The label of no class: the embedding row after the last class."""
    return int(net.config.num_embeds_ada_norm)


def _condition(_folder: Path, net: Any, _prompt: str) -> Any:
    return null_class(net)


def _call(net: Any, x_t: Any, t: Any, label: int) -> Any:
    import torch

    labels = torch.full((len(x_t),), label, dtype=torch.long, device=x_t.device)
    return net(x_t, timestep=t, class_labels=labels)


DIT = register(
    BackboneKind(
        name="dit",
        denoiser="DiTTransformer2DModel",
        subfolder="transformer",
        input="latents",
        conditioning="the null class (num_embeds_ada_norm)",
        blocks=_blocks,
        block_path=_path,
        call=_call,
        condition=_condition,
        aliases=ALIASES,
        tokens=True,
        help="DiT: DiTTransformer2DModel on VAE latents, null class",
    )
)
