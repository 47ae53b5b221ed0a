"""VAE latents of a split: encoded once per (VAE, split, resolution) as the posterior mean times
the VAE's scaling factor, and cached on disk beside the features, keyed by the VAE's content
hash, so every noise step, draw and block of a latent backbone starts from the same latents."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddsweep.kinds.loading import LATENTS

if TYPE_CHECKING:
    from torch.utils.data import Dataset

LATENT_BATCH = 64


def latent_key(vae_hash: str, split: str, resolution: int, precision: str) -> str:
    """The file stem of a split's latents: VAE content, split fingerprint, size, mean/sample."""
    blob = json.dumps(
        {"vae": vae_hash, "split": split, "resolution": resolution, "latents": LATENTS,
         "precision": precision},
        sort_keys=True,
    ).encode()  # fmt: skip
    return "latents-" + hashlib.sha256(blob).hexdigest()[:32]


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """Latents of images [B,C,H,W] in [-1, 1]: posterior mean x scaling_factor. A grey image
    (one channel) is repeated to the VAE's input channels."""
    want = int(vae.config.in_channels)
    if images.shape[1] != want and images.shape[1] == 1:
        images = images.expand(-1, want, -1, -1)
    device = next(vae.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        mean = vae.encode(images.to(device)).latent_dist.mean
    return (mean.float() * float(vae.config.scaling_factor)).cpu()


def split_latents(
    vae_loader: Callable[[], Any],
    vae_hash: str,
    dataset: Dataset[tuple[torch.Tensor, int]],
    split: str,
    resolution: int,
    root: Path,
    *,
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [N,c,h,w] float32, labels [N]) of a split, from the cache or encoded once in
    batches and stored (atomically) as float32."""
    from safetensors.torch import load_file, save_file

    path = root / f"{latent_key(vae_hash, split, resolution, precision)}.safetensors"
    try:
        got = load_file(str(path))
        return got["latents"], got["labels"]
    except Exception:  # absent, or unreadable (SafetensorError is no OSError): a miss
        pass
    vae = vae_loader()
    bf16 = precision == "bf16" and next(vae.parameters()).device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=LATENT_BATCH, shuffle=False)
    chunks, labels = [], []
    for x, y in loader:
        chunks.append(encode(vae, x, bf16=bf16))
        labels.append(torch.as_tensor(y))
        if on_batch is not None:
            on_batch(len(x))
    latents, ys = torch.cat(chunks), torch.cat(labels)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-latents-", suffix=".safetensors")
    os.close(fd)
    try:
        meta = {"vae": vae_hash, "split": split, "resolution": str(resolution), "latents": LATENTS}
        save_file({"latents": latents.contiguous(), "labels": ys.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return latents, ys
