"""The field's probe protocols by name: each sets every probe setting of a published protocol
at once (probe kind, its settings, the k values, and for DDAE the noise step).

A protocol is a value of a study's `protocol` axis; `docs/protocols.md` lists what each sets
and where it comes from. The settings here are the whole truth: a protocol name expands to
exactly these, and the probe kinds it names use their registry defaults for everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ddsweep.config.probekinds import get
from ddsweep.config.probesettings import DEFAULT_K, DINO_TEMPERATURE
from ddsweep.errors import UserError

__all__ = ["PROTOCOLS", "SEED", "Part", "Protocol", "names", "protocol"]

SEED = "seed"  # the study's own protocol; its points carry no protocol name, as before


@dataclass(frozen=True)
class Part:
    """One probe kind of a protocol: its settings off the registry defaults, and its k values
    (empty for kinds without neighbours)."""

    probe: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    ks: tuple[int, ...] = ()

    def settings_of(self) -> Any:
        """The kind's settings dataclass with this part's values."""
        return dataclasses.replace(get(self.probe).defaults(), **self.settings)


@dataclass(frozen=True)
class Protocol:
    """A named protocol: the probe kinds it runs, the noise step it fixes (None: the study's
    noise_step axis), the block it is usually reported on, and where it comes from."""

    name: str
    parts: tuple[Part, ...]
    source: str
    noise_step: int | None = None
    block: str | None = None  # informational: the layer the protocol's authors report


PROTOCOLS: Mapping[str, Protocol] = MappingProxyType(
    {
        p.name: p
        for p in (
            Protocol(
                SEED,
                (Part("linear"), Part("knn", ks=(DEFAULT_K,))),
                "the study: Adam linear probe (30 epochs, lr 1e-3, batch 256) and k-NN "
                "(cosine, uniform votes, k = 50)",
            ),
            Protocol(
                "ddae",
                (
                    Part(
                        "linear",
                        {"epochs": 15, "lr": 1e-3, "batch_size": 128, "schedule": "cosine"},
                    ),
                ),
                "DDAE (Xiang et al. 2023), FutureXiang/ddae linear.py and config/DDPM_ddpm.yaml",
                noise_step=10,  # DDAE's t = 11 in its 1-based schedule: alpha-bar 0.99781
                block="ddae_layer",
            ),
            Protocol(
                "dino",
                (
                    Part(
                        "knn",
                        {"metric": "cosine", "weighting": "temperature"},
                        ks=(10, 20, 100, 200),
                    ),
                ),
                f"DINO (Caron et al. 2021), facebookresearch/dino eval_knn.py: T = "
                f"{DINO_TEMPERATURE}",
            ),
            Protocol(
                "clip",
                (Part("logreg"),),
                "CLIP (Radford et al. 2021), appendix A.3: L-BFGS logistic regression, L2 "
                "chosen on a validation split",
            ),
        )
    }
)


def names() -> tuple[str, ...]:
    """Every protocol, in the order of the docs."""
    return tuple(PROTOCOLS)


def protocol(name: str) -> Protocol:
    """The protocol called `name`; UserError listing the known ones when there is none."""
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown protocol {name!r}; allowed: {', '.join(names())}") from None
