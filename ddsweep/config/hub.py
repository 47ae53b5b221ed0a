"""How a sweep file or `--backbone` names a Hugging Face hub backbone: `hub:ORG/NAME` (its
resolution through the local cache is `ddsweep.kinds.hub`)."""

from __future__ import annotations

from ddsweep.errors import UserError

PREFIX = "hub:"


def is_hub(spec: str) -> bool:
    """Whether `spec` names a hub repo (hub:ORG/NAME)."""
    return spec.startswith(PREFIX)


def repo_id(spec: str) -> str:
    """ORG/NAME of hub:ORG/NAME; UserError for anything else after the prefix."""
    name = spec[len(PREFIX) :]
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise UserError(
            f"{spec!r} is no hub id: write hub:ORG/NAME, e.g. hub:google/ddpm-cifar10-32"
        )
    return name
