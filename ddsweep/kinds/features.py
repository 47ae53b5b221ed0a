"""Block features of a backbone named by folder or hub id (any registered kind), with the same
cache, per-image noise and draw averaging as `ddsweep.features`: one forward pass fills every
requested block; latent kinds start from the split's cached latents and are noised in latent
space with the backbone's own schedule."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddsweep import data, diffusion
from ddsweep.errors import UserError
from ddsweep.features import (
    CacheKey,
    FeatureCache,
    FeatureRequest,
    check_memory,
    hooked_pass,
    noise_for,
    pool_features,
    validate_pool,
)
from ddsweep.kinds.latents import split_latents
from ddsweep.kinds.loading import LATENTS, Loaded, Resolved, load

if TYPE_CHECKING:
    from ddsweep.config.probe import ProbeConfig

WEIGHTS = "pretrained"  # the `weights` of a pretrained backbone's cache keys (one set only)
BATCH = 64
Features = dict[str, tuple[torch.Tensor, torch.Tensor]]


def uses_prompt(resolved: Resolved) -> bool:
    """Whether the backbone is conditioned on a prompt (its kind computes a text embedding)."""
    return resolved.kind == "latent-unet"


def checkpoint_key(resolved: Resolved, prompt: str) -> str:
    """The cache key's `checkpoint` of a backbone: kind and weights hash, how latents are made,
    and the prompt it is conditioned on (only when it takes one)."""
    key = resolved.label()
    if resolved.kind_of().input == "latents":
        key += f"|latents={LATENTS}"
    if uses_prompt(resolved):
        key += "|prompt=" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
    return key


def pool_tokens(h: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool transformer tokens [B,T,D]: avg = mean over the patches; otherwise the tokens are
    laid out on their square grid [B,D,s,s] and pooled as a feature map."""
    if pool == "avg":
        return h.mean(dim=1)
    side = math.isqrt(h.shape[1])
    if side * side != h.shape[1]:
        return h.flatten(1)
    return pool_features(h.transpose(1, 2).reshape(len(h), h.shape[2], side, side), pool)


def forward_blocks(
    loaded: Loaded, x_t: torch.Tensor, t: torch.Tensor, blocks: tuple[str, ...], pool: str
) -> dict[str, torch.Tensor]:
    """Pooled outputs [B,D] of `blocks` for one noised batch x_t at steps t (one pass, stopped
    once the last requested block has fired)."""
    kind = loaded.resolved.kind_of()

    def pooled(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        tokens = kind.tokens and h.dim() == 3
        return (pool_tokens(h, pool) if tokens else pool_features(h, pool)).cpu()

    modules = [(b, loaded.module(b)) for b in blocks]  # every name checked before any hook
    return hooked_pass(
        modules, lambda: kind.call(loaded.net, x_t, t.to(x_t.device), loaded.condition), pooled
    )


@torch.no_grad()
def extract(
    loaded: Loaded,
    inputs: torch.Tensor,
    req: FeatureRequest,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """{block: features [N,D]} of the denoiser's inputs [N,C,H,W] (pixels or latents), each
    noised to `req.noise_step` with the backbone's schedule, image i with the noise of
    (split, seed, draw, i) as in `ddsweep.features.noise_for`, averaged over the draws."""
    device = next(loaded.net.parameters()).device
    bf16 = req.precision == "bf16" and device.type == "cuda"
    chunks: dict[str, list[torch.Tensor]] = {b: [] for b in req.blocks}
    for start in range(0, len(inputs), BATCH):
        z0 = inputs[start : start + BATCH]
        idx = torch.arange(start, start + len(z0))
        t = torch.full((len(z0),), req.noise_step, dtype=torch.long)
        total: dict[str, torch.Tensor] = {}
        for draw in range(req.draws()):
            z_t = z0
            if req.noise_step > 0:
                noise = noise_for(idx, z0.shape[1:], req.noise_seed, split=req.split, draw=draw)
                z_t = diffusion.q_sample(loaded.scheduler, z0, noise, t)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                feats = forward_blocks(loaded, z_t.to(device), t, req.blocks, req.pool)
            for b, f in feats.items():
                total[b] = f if b not in total else total[b] + f
        for b in req.blocks:
            chunks[b].append(total[b] / req.draws())
        if on_batch is not None:
            on_batch(len(z0))
    return {b: torch.cat(c) for b, c in chunks.items()}


def block_dims(
    loaded: Loaded, shape: tuple[int, ...], blocks: tuple[str, ...], pool: str
) -> dict[str, int]:
    """Feature dimension per block, from one forward pass on a batch of two blank inputs."""
    device = next(loaded.net.parameters()).device
    with torch.no_grad():
        x = torch.zeros(2, *shape, device=device)
        feats = forward_blocks(loaded, x, torch.zeros(2, dtype=torch.long), blocks, pool)
    return {b: int(f.shape[1]) for b, f in feats.items()}


class _Lazy:
    """The backbone, loaded on first use only (a full cache hit never loads it)."""

    def __init__(self, resolved: Resolved, prompt: str) -> None:
        self.resolved, self.prompt = resolved, prompt
        self.loaded: Loaded | None = None

    def __call__(self) -> Loaded:
        if self.loaded is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.loaded = load(self.resolved, self.prompt, device)
        return self.loaded


def split_features(
    resolved: Resolved,
    dataset: str,
    resolution: int,
    blocks: tuple[str, ...],
    noise_step: int,
    cfg: ProbeConfig,
    cache: FeatureCache,
    data_dir: Path,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, Features], float, int]:
    """({split: {block: (features, labels)}}, seconds extracting, backbone passes) of a
    pretrained backbone, as `ddsweep.evaluate.split_features` gives them for a trained one."""
    from ddsweep.evaluate import probe_splits

    diffusion.validate_noise_step(noise_step, resolved.num_train_timesteps)
    validate_pool(cfg.pool)
    if resolution % resolved.latent_factor:
        raise UserError(
            f"resolution {resolution}: backbone {resolved.spec}'s VAE shrinks images "
            f"{resolved.latent_factor}x, so use a multiple of {resolved.latent_factor} "
            f"(default {resolved.resolution})"
        )
    prompt = cfg.prompt if uses_prompt(resolved) else ""
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    base = FeatureRequest(blocks, noise_step, cfg.noise_seed, cfg.pool, noise_draws=cfg.noise_draws,
                          precision=precision)  # fmt: skip
    lazy = _Lazy(resolved, prompt)
    ident = checkpoint_key(resolved, prompt)
    out: dict[str, Features] = {}
    seconds, passes = 0.0, 0
    for split in probe_splits(dataset, cfg):
        add_val = cfg.flowers_add_val
        fp = data.split_fingerprint(dataset, split, resolution, flowers_add_val=add_val)
        req = dataclasses.replace(base, split=fp)
        keys = {
            b: CacheKey(
                ident,
                WEIGHTS,
                fp,
                resolution,
                noise_step,
                cfg.noise_seed,
                cfg.pool,
                b,
                req.draws(),
                precision,
            )
            for b in blocks
        }
        found = cache.get_many(keys)
        if len(found) < len(keys):
            group = dataclasses.replace(next(iter(keys.values())), block="*")
            with cache.lock(group):
                found = cache.get_many(keys)
                missing = tuple(b for b in blocks if b not in found)
                if missing:
                    t0 = time.perf_counter()
                    ds = data.probe_images(dataset, split, resolution, data_dir,
                                           flowers_add_val=add_val)  # fmt: skip
                    found.update(
                        _fill(lazy, ds, fp, resolution, req, missing, keys, cache, on_batch)
                    )
                    seconds += time.perf_counter() - t0
                    passes += 1
        out[split] = found
    return out, seconds, passes


def _fill(
    lazy: _Lazy,
    ds: Any,
    fp: str,
    resolution: int,
    req: FeatureRequest,
    missing: tuple[str, ...],
    keys: dict[str, CacheKey],
    cache: FeatureCache,
    on_batch: Callable[[int], None] | None,
) -> Features:
    """Extract the missing blocks of one split in one pass and store them."""
    resolved = lazy.resolved
    if resolved.kind_of().input == "latents":
        inputs, labels = split_latents(
            lambda: lazy().vae, resolved.vae_hash, ds, fp, resolution, cache.root,
            precision=req.precision,
        )  # fmt: skip
    else:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=256, shuffle=False, collate_fn=data.batch_collate(ds)
        )
        pairs = list(loader)
        inputs = torch.cat([x for x, _ in pairs])
        labels = torch.cat([torch.as_tensor(y) for _, y in pairs])
    loaded = lazy()
    sub = dataclasses.replace(req, blocks=missing)
    check_memory(block_dims(loaded, tuple(inputs.shape[1:]), missing, req.pool), len(inputs))
    feats = extract(loaded, inputs, sub, on_batch=on_batch)
    return {b: (cache.put(keys[b], feats[b], labels), labels) for b in missing}


def backbone_params(resolved: Resolved) -> dict[str, str]:
    """MLflow params naming a pretrained backbone: kind, content hash, where it was found,
    and for latent kinds how latents are made."""
    out = {"backbone_kind": resolved.kind, "backbone_hash": resolved.identity,
           "backbone_source": resolved.spec}  # fmt: skip
    if resolved.kind_of().input == "latents":
        out["latents"] = LATENTS
    return out


def is_pretrained(spec: str) -> bool:
    """Whether `spec` names a backbone for the kinds' path: a hub id, a pipeline folder, or a
    model folder of a kind other than a lone UNet2DModel (ddsweep's own checkpoints and plain
    UNet2DModel folders keep the path they always had: same numbers, same cache keys)."""
    from ddsweep.kinds import hub
    from ddsweep.kinds.loading import MODEL_INDEX, _json

    if hub.is_hub(spec):
        return True
    folder = Path(spec).expanduser()
    if (folder / MODEL_INDEX).is_file():
        return True
    config = folder / "config.json"
    return config.is_file() and _json(config).get("_class_name", "UNet2DModel") != "UNet2DModel"


def pretrained_backbone(spec: str) -> tuple[Any, Resolved]:
    """(evaluate.Backbone, its resolution) of a pretrained backbone spec."""
    from ddsweep.evaluate import Backbone
    from ddsweep.kinds.loading import resolve

    resolved = resolve(spec)
    return Backbone(resolved.folder, pretrained=resolved), resolved


def pretrained_point(
    spec: str,
    dataset: str | None,
    resolution: int | None,
    block: str,
    noise_step: int,
    probe: str,
    k: int,
) -> tuple[Any, Any] | None:
    """(Backbone, Point) of `ddsweep probe --backbone SPEC` for a pretrained backbone (no epoch,
    no attention: the backbone is named by its content hash), or None for a trained one."""
    from ddsweep import probes
    from ddsweep.config.points import Point

    if not is_pretrained(spec):
        return None
    if dataset is None:
        raise UserError(f"--backbone {spec} was not trained by ddsweep: pass --dataset")
    backbone, resolved = pretrained_backbone(spec)
    diffusion.validate_noise_step(noise_step, resolved.num_train_timesteps)
    info = data.dataset_info(dataset)
    uses_k = probes.get(probe).uses_k
    point = Point(
        dataset=info.name,
        resolution=resolution or resolved.resolution,
        attention=None,
        epoch=None,
        block=block,
        noise_step=noise_step,
        probe=probe,
        k=k if uses_k else 0,
        settings=(("backbone", resolved.label()),),
    )
    return backbone, point
