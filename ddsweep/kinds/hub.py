"""`hub:ORG/NAME` backbones through huggingface_hub's local cache, honouring HF_HUB_OFFLINE."""

from __future__ import annotations

import os
from pathlib import Path

from ddsweep.config.hub import PREFIX, is_hub, repo_id
from ddsweep.errors import UserError, first_line

__all__ = ["PREFIX", "cache_dir", "is_hub", "offline", "repo_id", "resolve"]

# What a backbone needs from a repo: configs, tokenizer files and safetensors weights (never
# pickles: ddsweep does not load them, so they are not fetched either).
ALLOW = ["*.json", "*.txt", "*.safetensors", "*.model"]


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, at call time (tests and users set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def cache_dir() -> Path:
    """huggingface_hub's cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def resolve(spec: str) -> Path:
    """The local snapshot folder of hub:ORG/NAME: from the cache, else (network allowed)
    downloaded into it; UserError naming the download command when neither works."""
    from huggingface_hub import snapshot_download

    name = repo_id(spec)
    try:
        return Path(snapshot_download(name, cache_dir=cache_dir(), local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, or a damaged cache entry
        missing = err
    if not offline():
        try:
            got = snapshot_download(name, cache_dir=cache_dir(), allow_patterns=ALLOW)
            return Path(got)
        except Exception as err:  # no network, no such repo, gated: say how to get it
            missing = err
    why = "HF_HUB_OFFLINE is set" if offline() else first_line(missing)
    raise UserError(
        f"backbone {spec} is not in the Hugging Face cache ({cache_dir()}) and cannot be "
        f"downloaded ({why}): run `huggingface-cli download {name}` where the network is on"
    )
