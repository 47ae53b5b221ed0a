"""Feature extraction: one forward pass fills every requested block, with a content-keyed cache.

`extract` runs the frozen U-Net over a dataset once per batch, catching block outputs with forward
hooks and stopping the pass as soon as the last requested block has fired. `FeatureCache` keeps
the pooled features on disk, keyed by everything that determines them, so an entry cannot go stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ddsweep import data, diffusion, integrity
from ddsweep.config import paths
from ddsweep.config.model import PIXELS
from ddsweep.config.probe import AVG_N, POOLS_HELP, validate_pool
from ddsweep.errors import UserError
from ddsweep.model import resolve_block

if TYPE_CHECKING:
    from diffusers import UNet2DModel
    from torch.utils.data import Dataset


def pool_features(x: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool a block output [B,C,H,W] to [B,D] (any other rank is flattened)."""
    if x.dim() != 4:
        return x.flatten(1)
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "flatten":
        return x.flatten(1)
    m = AVG_N.match(pool)
    if m is None:
        raise UserError(f"unknown pooling {pool!r}: use {POOLS_HELP}")
    return F.adaptive_avg_pool2d(x, int(m.group(1))).flatten(1)


def pixel_pool(pool: str) -> str:
    """Pooling for the `pixels` baseline: the average colour is no baseline, so `avg` flattens."""
    return "flatten" if pool == "avg" else pool


# Part of every cache key: bump when the noise added to an image changes meaning. v3: each
# image's noise is the SplitMix64 stream of its seed through Box-Muller, computed for a whole
# batch at once on any device (v2 seeded one torch.Generator per image on the host).
NOISE_SCHEME = "split-index-draw-splitmix-v3"
# Part of every cache key: the dtype entries are stored in. Features are float32 as extracted,
# so a hit is bit for bit what the extraction gave. Until 0.4 entries were float16 when a
# per-feature check allowed it, which moved k-NN cells by up to 1.1 points on digits (features
# with mean >> std): with this field every key changed, and no such entry is ever read.
STORED = "float32"


def noise_seed_of(split: str, index: int, noise_seed: int, draw: int = 0) -> int:
    """The generator seed of image `index` of `split` (a split fingerprint) in noise draw `draw`.

    The split is part of the seed: with (seed, index) alone, train image i and test image i got
    the same noise, and a noisy test image's nearest train neighbour was its index twin
    (measured on digits pixels at t=250: 1-NN accuracy 8.9 % instead of 76.7 %)."""
    blob = f"{split}\0{noise_seed}\0{draw}\0{index}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _signed(0x9E3779B97F4A7C15)  # SplitMix64 (Steele, Lea and Flood 2014; java.util)
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(B,) int64 seeds -> (B, count) int64: the first `count` outputs of each seed's SplitMix64
    stream (int64 arithmetic wraps modulo 2^64 on CPU and CUDA, as the algorithm needs)."""
    steps = torch.arange(1, count + 1, dtype=torch.int64, device=seeds.device)
    z = steps.mul_(_GAMMA)[None, :] + seeds[:, None]
    tmp = torch.empty_like(z)  # in place: three (B, count) int64 buffers, not a dozen
    for shift, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)
        z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - shift)) - 1))  # z ^= z >>> shift
        if factor is not None:
            z.mul_(factor)
    return z


def noise_for(
    indices: torch.Tensor,
    shape: Sequence[int],
    noise_seed: int,
    *,
    split: str,
    draw: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian noise [B,*shape] float32: image i of `split` always gets the same noise in draw
    `draw`, whatever the batch or device, and a different one in every other split, seed or
    draw. Box-Muller on uniforms from the top 53 bits of each image's SplitMix64 stream, in
    float64, for the whole batch at once."""
    seeds = torch.tensor(
        [noise_seed_of(split, int(i), noise_seed, draw) for i in indices.tolist()],
        dtype=torch.int64,
        device=device,
    )
    size = math.prod(shape)
    pairs = (size + 1) // 2
    bits = splitmix64(seeds, 2 * pairs)
    u = (_shr(bits, 11).double() + 0.5) * 2.0**-53  # in (0, 1): the log is finite
    radius = torch.sqrt(-2.0 * torch.log(u[:, :pairs]))
    angle = (2 * math.pi) * u[:, pairs:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :size]
    return z.float().reshape(len(seeds), *shape)


class _Filled(Exception):
    """Raised from a hook to end a forward pass once every requested block has its output."""


@dataclass(frozen=True)
class FeatureRequest:
    """What determines a feature tensor besides the weights and the images."""

    blocks: tuple[str, ...]
    noise_step: int = 0
    noise_seed: int = 0
    pool: str = "avg"
    split: str = ""  # the split's fingerprint: part of every image's noise seed
    noise_draws: int = 1  # features averaged over this many independent noise draws (t > 0)
    precision: str = "fp32"  # or "bf16": autocast on CUDA

    def draws(self) -> int:
        """Noise draws that differ: a clean image (t = 0) is the same in every draw."""
        return self.noise_draws if self.noise_step > 0 else 1


def block_dims(
    unet: UNet2DModel | None, req: FeatureRequest, image_shape: Sequence[int]
) -> dict[str, int]:
    """Feature dimension per block, from one tiny forward pass (none for pixels alone)."""
    x = torch.zeros(2, *image_shape)  # batch 2: group norm refuses one value per group
    if unet is None or all(b == PIXELS for b in req.blocks):
        return {PIXELS: int(pool_features(x, pixel_pool(req.pool)).shape[1])}
    device = next(unet.parameters()).device
    with torch.no_grad():
        feats = _forward_blocks(unet, x.to(device), torch.zeros(2, dtype=torch.long), req)
    return {b: int(f.shape[1]) for b, f in feats.items()}


def check_memory(dims: dict[str, int], n: int, available: int | None = None) -> int:
    """Bytes the features of n images need; UserError when that would not fit in memory."""
    need = sum(dims.values()) * n * 4
    available = available if available is not None else available_memory()
    if need > 0.7 * available:
        biggest = max(dims, key=lambda b: dims[b])
        raise UserError(
            f"the features of {n} images need {need / 2**30:.1f} GiB "
            f"({biggest}: {dims[biggest]} dims each) but only {available / 2**30:.1f} GiB is "
            "free: use --pool avg or avgN (e.g. avg2), or fewer blocks per request"
        )
    return need


def available_memory() -> int:
    """Available RAM in bytes (MemAvailable on Linux; a generous guess elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30


def _forward_blocks(
    unet: UNet2DModel | None, x_t: torch.Tensor, t: torch.Tensor, req: FeatureRequest
) -> dict[str, torch.Tensor]:
    """Pooled outputs of the requested blocks for one noised batch x_t [B,C,H,W] at steps t."""
    out: dict[str, torch.Tensor] = {}
    wanted = [b for b in req.blocks if b != PIXELS]
    if PIXELS in req.blocks:
        out[PIXELS] = pool_features(x_t.float(), pixel_pool(req.pool))
    if not wanted or unet is None:
        return out

    # Resolve every name before registering any hook, so an unknown one leaves none behind.
    modules = [(b, resolve_block(unet, b)) for b in wanted]
    out.update(
        hooked_pass(
            modules,
            lambda: unet(x_t, t.to(x_t.device)),
            lambda h: pool_features(h.float(), req.pool),  # stays on the device
        )
    )
    return out


def hooked_pass(
    modules: list[tuple[str, torch.nn.Module]],
    forward: Callable[[], object],
    pool: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Run `forward` with a hook on each named module: {name: pool(its first output)}, the
    pass stopped once the last one has fired (every backbone kind's extraction)."""
    out: dict[str, torch.Tensor] = {}
    names = [b for b, _ in modules]

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: torch.nn.Module, _inp: object, output: object) -> None:
            # A module called more than once in a pass (a ResNet's shared `nonlinearity` runs
            # three times) gives its first output: with a later one, a block's features would
            # depend on which other blocks the request holds, as the pass stops at the last.
            if name in out:
                return
            h = output[0] if isinstance(output, tuple) else output  # down blocks: (h, residuals)
            assert isinstance(h, torch.Tensor)
            out[name] = pool(h)
            if all(b in out for b in names):
                raise _Filled

        return fn

    handles = [m.register_forward_hook(hook(b)) for b, m in modules]
    try:
        forward()
    except _Filled:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [b for b in names if b not in out]
    if missing:
        raise UserError(f"block(s) {', '.join(missing)} produced no output in a forward pass")
    return out


@torch.no_grad()
def extract(
    unet: UNet2DModel | None,
    dataset: Dataset[tuple[torch.Tensor, int]],
    req: FeatureRequest,
    *,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({block: features [N,D]}, labels [N]) for every requested block, one pass per batch.

    Images are noised to `req.noise_step` with the training schedule (q_sample), image i of the
    split with noise seeded by (split, noise_seed, draw, i) (see `noise_for`), and the model is
    called with that timestep; features are averaged over `req.noise_draws` draws. Step 0 is
    the clean image.
    """
    diffusion.validate_noise_step(req.noise_step)
    validate_pool(req.pool)
    if unet is not None:
        for b in req.blocks:
            if b != PIXELS:
                resolve_block(unet, b)
        unet.eval()
        device = next(unet.parameters()).device
    elif any(b != PIXELS for b in req.blocks):
        raise UserError("U-Net blocks need a backbone: pass --run or --backbone")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and isinstance(dataset, data.DecodedImages | data.TensorImages):
        dataset = dataset.to(device)  # the whole split goes to the device once
    scheduler = diffusion.make_scheduler()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=data.batch_collate(dataset)
    )
    copies = _Copies(len(dataset), req.blocks, device)  # type: ignore[arg-type]
    labels: list[torch.Tensor] = []
    start = 0
    for x0, y in loader:
        idx = torch.arange(start, start + len(x0))
        copies.add(start, _batch_features(unet, scheduler, x0, idx, req, device))
        start += len(x0)
        labels.append(torch.as_tensor(y))
        if on_batch is not None:
            on_batch(len(x0))
    return copies.result(), torch.cat(labels).cpu() if labels else torch.empty(0, dtype=torch.long)


class _Copies:
    """Pooled features from the device into one [N, D] host tensor per block: on CUDA one
    non-blocking copy per batch (every block at once) into pinned memory, read once the next
    batch is queued, so the device never waits for the host; on the CPU, written in place."""

    def __init__(self, n: int, blocks: Sequence[str], device: torch.device) -> None:
        self.n, self.blocks, self.cuda = n, tuple(blocks), device.type == "cuda"
        self.out: dict[str, torch.Tensor] = {}
        self.pending: list[tuple[int, torch.Tensor, Any]] = []

    def add(self, start: int, feats: dict[str, torch.Tensor]) -> None:
        if not self.out:
            self.out = {b: torch.empty(self.n, feats[b].shape[1]) for b in self.blocks}
        if not self.cuda:
            for b in self.blocks:
                self.out[b][start : start + len(feats[b])] = feats[b]
            return
        flat = torch.cat([feats[b].float() for b in self.blocks], dim=1)
        host = torch.empty(flat.shape, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((start, host, done))
        while len(self.pending) > 1:
            self._land(*self.pending.pop(0))

    def _land(self, start: int, host: torch.Tensor, done: Any) -> None:
        done.synchronize()
        col = 0
        for b in self.blocks:
            d = self.out[b].shape[1]
            self.out[b][start : start + len(host)] = host[:, col : col + d]
            col += d

    def result(self) -> dict[str, torch.Tensor]:
        """{block: features [N, D]} on the host, every copy landed."""
        for item in self.pending:
            self._land(*item)
        self.pending.clear()
        return self.out or {b: torch.empty(0, 0) for b in self.blocks}


def _batch_features(
    unet: UNet2DModel | None,
    scheduler: Any,
    x0: torch.Tensor,
    idx: torch.Tensor,
    req: FeatureRequest,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Pooled block features of one batch x0 [B,C,H,W], averaged over the request's draws."""
    t = torch.full((len(x0),), req.noise_step, dtype=torch.long)
    total: dict[str, torch.Tensor] = {}
    for draw in range(req.draws()):
        x_t = x0
        if req.noise_step > 0:  # drawn where the network runs: no per-image host loop
            noise = noise_for(
                idx, x0.shape[1:], req.noise_seed, split=req.split, draw=draw, device=device
            )
            x_t = diffusion.q_sample(scheduler, x0.to(device), noise, t.to(device))
        bf16 = req.precision == "bf16" and device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = _forward_blocks(unet, x_t.to(device), t, req)
        for b, f in feats.items():
            total[b] = f if b not in total else total[b] + f
    return {b: f / req.draws() for b, f in total.items()}


# --- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """Everything a feature tensor depends on; its hash names the cache entry."""

    checkpoint: str  # content hash of the weights file
    weights: str
    split: str  # data.split_fingerprint: dataset, split, resolution, split rule
    resolution: int
    noise_step: int
    noise_seed: int
    pool: str
    block: str
    noise_draws: int = 1
    precision: str = "fp32"  # bf16 (autocast on CUDA) features are never served as float32 ones
    noise: str = NOISE_SCHEME
    stored: str = STORED  # how the file holds the features: a float16 entry is another key
    data_scheme: str = data.DATA_SCHEME  # how the split's images were read (decoded once, since v1)

    def digest(self) -> str:
        """A stable file name for this key."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


_TEMP_PREFIX = ".tmp-"


class FeatureCache:
    """Pooled features on disk as safetensors; atomic writes, LRU eviction under a size cap."""

    def __init__(self, root: Path | None = None, max_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else paths.cache_dir()
        self.max_bytes = max_bytes if max_bytes is not None else paths.cache_cap_bytes()

    def path(self, key: CacheKey) -> Path:
        """The entry file of `key`."""
        return self.root / f"{key.digest()}.safetensors"

    def get(self, key: CacheKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features float32 [N,D], labels [N]) or None on a miss (an entry of another dtype is
        one); a hit refreshes its LRU age."""
        from safetensors import SafetensorError

        path = self.path(key)
        # Absent or evicted meanwhile: a miss. Damaged (torn, cut, edited, not a file): named,
        # removed, and a miss, so the extraction that follows writes it again.
        blob = integrity.read_sealed(path, "feature-cache entry")
        if blob is None:
            return None
        try:
            tensors = integrity.load_torch(blob)
            features, labels = tensors["features"], tensors["labels"]
            if features.dtype != torch.float32:  # written by another scheme: never served
                return None
            if features.ndim != 2 or labels.shape != (len(features),):
                raise ValueError(f"features {tuple(features.shape)}, labels {tuple(labels.shape)}")
        except (ValueError, RuntimeError, KeyError, SafetensorError) as err:
            integrity.discard(path, "feature-cache entry", str(err).splitlines()[0])
            return None
        with contextlib.suppress(OSError):  # evicted since it was read: the tensors stand
            os.utime(path)
        return features, labels

    def get_many(self, keys: dict[str, CacheKey]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The hits among `keys`, by block."""
        found = {b: self.get(k) for b, k in keys.items()}
        return {b: v for b, v in found.items() if v is not None}

    @contextlib.contextmanager
    def lock(self, key: CacheKey) -> Iterator[None]:
        """An exclusive inter-process lock named after `key` (filelock: POSIX and Windows)."""
        from filelock import FileLock

        paths.make_folder(self.root, "the feature cache (DDSWEEP_CACHE)")
        with FileLock(self.root / f".lock-{key.digest()}"):
            yield

    def put(self, key: CacheKey, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Store an entry atomically (temp file + rename) in float32 (`STORED`); returns the
        features as stored, so a miss hands out exactly what a hit will."""
        paths.make_folder(self.root, "the feature cache (DDSWEEP_CACHE)")
        stored = features.float()
        meta = {k: str(v) for k, v in asdict(key).items()}
        # The temp file is named after its entry: a writer killed before the rename leaves one
        # that the next writer of the entry (under the same lock) removes.
        prefix = f"{_TEMP_PREFIX}{key.digest()}-"
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=prefix, suffix=".safetensors")
        os.close(fd)
        try:
            # Sealed with its digest, and on disk before it is named: a power cut tears nothing.
            tensors = {"features": stored.contiguous(), "labels": labels.contiguous()}
            integrity.save_torch(tensors, tmp, meta)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.evict()
        return stored.float()

    def remove_leftovers(self, key: CacheKey) -> int:
        """Delete temp files of `key` that killed writers left; call only while holding the
        lock every writer of `key` takes (no live writer has one then)."""
        n = 0
        for p in self.root.glob(f"{_TEMP_PREFIX}{key.digest()}-*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        return n

    def evict(self) -> None:
        """Delete least-recently-used entries until the cache is under its cap."""
        if self.max_bytes is None:
            return
        entries = []
        for p in self.root.glob("*.safetensors"):
            if p.name.startswith("."):  # another writer's temp file: deleting it would fail
                continue  # its os.replace; pathlib's glob matches dot files too
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= size


def cached_features(
    unet_loader: Callable[[], UNet2DModel | None],
    checkpoint_hash: str,
    weights: str,
    dataset: Dataset[tuple[torch.Tensor, int]] | Callable[[], Dataset[tuple[torch.Tensor, int]]],
    split_fingerprint: str,
    resolution: int,
    req: FeatureRequest,
    cache: FeatureCache,
    *,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, bool]:
    """({block: (features, labels)}, extraction seconds, whether `extract` ran): cache hits
    are read, all misses are filled by one `extract` over the split. `dataset` may be a
    zero-argument loader, called only on a miss (a cache hit never opens the data).

    Processes sharing the cache take a lock per (checkpoint, split, noise step, pooling) while
    they extract, so concurrent workers run the backbone once and the others read the result.
    """
    req = dataclasses.replace(
        req, split=split_fingerprint
    )  # the noise of an image depends on its split
    keys = {
        b: CacheKey(
            checkpoint_hash,
            weights,
            split_fingerprint,
            resolution,
            req.noise_step,
            req.noise_seed,
            req.pool,
            b,
            req.draws(),
            req.precision if b != PIXELS else "fp32",  # no network, no precision
        )
        for b in req.blocks
    }
    out = cache.get_many(keys)
    if len(out) == len(keys):
        return out, 0.0, False
    # One lock per request kind, whichever block comes first: every writer of an entry takes
    # the same lock (a pixels entry is fp32 in every request), which remove_leftovers needs.
    group = dataclasses.replace(next(iter(keys.values())), block="*", precision=req.precision)
    with cache.lock(group):
        out = cache.get_many(keys)  # another worker may have filled it meanwhile
        missing = tuple(b for b in req.blocks if b not in out)
        if not missing:
            return out, 0.0, False
        for b in missing:
            cache.remove_leftovers(keys[b])
        return _fill(unet_loader, dataset, req, missing, keys, out, cache, batch_size, on_batch)


def _fill(
    unet_loader: Callable[[], UNet2DModel | None],
    dataset: Dataset[tuple[torch.Tensor, int]] | Callable[[], Dataset[tuple[torch.Tensor, int]]],
    req: FeatureRequest,
    missing: tuple[str, ...],
    keys: dict[str, CacheKey],
    out: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cache: FeatureCache,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, bool]:
    """Extract the missing blocks in one pass and store them."""
    t0 = time.perf_counter()
    unet = unet_loader()
    sub = dataclasses.replace(req, blocks=missing)
    if callable(dataset) and not isinstance(dataset, torch.utils.data.Dataset):
        dataset = dataset()
    first_image = dataset[0][0]
    check_memory(block_dims(unet, sub, first_image.shape), len(dataset))  # type: ignore[arg-type]
    feats, labels = extract(unet, dataset, sub, batch_size=batch_size, on_batch=on_batch)
    for b in missing:
        out[b] = (cache.put(keys[b], feats[b], labels), labels)
    return out, time.perf_counter() - t0, True
