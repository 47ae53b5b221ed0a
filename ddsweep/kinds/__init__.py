"""Backbone kinds: a registry (`registry`), one module per kind (`ddpm`, `latent_unet`, `dit`,
registered in this order on import), how a backbone is named and loaded (`loading`, `hub`), its
latents (`latents`) and its block features (`features`)."""

from __future__ import annotations

from ddsweep.kinds import ddpm, dit, latent_unet
from ddsweep.kinds.registry import BackboneKind, find_for_class, get, names, register, unregister

__all__ = [
    "BackboneKind",
    "ddpm",
    "dit",
    "find_for_class",
    "get",
    "latent_unet",
    "names",
    "register",
    "unregister",
]
