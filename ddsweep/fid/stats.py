"""The statistics of the real images (mean, covariance, count) per (dataset split, resolution,
feature network), computed once and kept on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddsweep import data, integrity
from ddsweep.config import paths
from ddsweep.errors import UserError

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance
from ddsweep.fid.network import network_id

REFERENCE_SPLIT: data.Split = "test"  # the study: "2,000 generated images against the test set"
_STATS_VERSION = 1  # part of every cache key: bump when the statistics change meaning


@dataclass(frozen=True)
class RealStats:
    """Feature statistics of a set of images: mean [D] and covariance [D,D] (float64), count."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int


def default_stats_dir() -> Path:
    """Where real statistics are kept: <the feature cache>/fid."""
    return paths.cache_dir() / "fid"


def stats_key(dataset: str, resolution: int, metric: FrechetInceptionDistance) -> dict[str, str]:
    """Everything the real statistics depend on: the split's images and the feature network."""
    net = metric.inception
    return {
        "version": str(_STATS_VERSION),
        "split": data.split_fingerprint(dataset, REFERENCE_SPLIT, resolution),
        "network": network_id(net),
        "antialias": str(getattr(net, "use_antialias", "")),
        "normalize": str(metric.normalize),
    }


def _digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def load_stats(path: Path, dims: int) -> RealStats | None:
    """The statistics in `path`, or None when absent, damaged (then named and removed, see
    `integrity.read_sealed`) or of another size."""
    from safetensors import SafetensorError

    blob = integrity.read_sealed(path, "FID statistics file")
    if blob is None:
        return None
    try:
        t = integrity.load_torch(blob)
        stats = RealStats(t["mean"].double(), t["cov"].double(), int(t["count"]))
        finite = bool(torch.isfinite(stats.mean).all() and torch.isfinite(stats.cov).all())
    # SafetensorError (a damaged file) is none of the builtin kinds.
    except (ValueError, RuntimeError, KeyError, SafetensorError) as err:
        integrity.discard(path, "FID statistics file", str(err).splitlines()[0])
        return None
    if not finite:
        integrity.discard(path, "FID statistics file", "its statistics are not finite")
        return None
    if stats.mean.shape != (dims,) or stats.cov.shape != (dims, dims) or stats.count < 2:
        return None
    return stats


def save_stats(path: Path, stats: RealStats, key: dict[str, str]) -> None:
    """Write `stats` to `path` atomically (temp file + rename), with `key` as metadata."""
    paths.make_folder(path.parent, "the FID statistics cache (DDSWEEP_CACHE)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        tensors = {
            "mean": stats.mean.double().cpu().contiguous(),
            "cov": stats.cov.double().cpu().contiguous(),
            "count": torch.tensor([stats.count], dtype=torch.int64),
        }
        integrity.save_torch(tensors, tmp, key)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `path` (filelock: POSIX and Windows)."""
    from filelock import FileLock

    paths.make_folder(path.parent, "the FID statistics cache (DDSWEEP_CACHE)")
    with FileLock(path):
        yield


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """Our images in [-1, 1] to the [0, 1] that torchmetrics takes with normalize=True."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def _device(metric: FrechetInceptionDistance) -> torch.device:
    return metric.real_features_sum.device


@torch.no_grad()
def _update(
    metric: FrechetInceptionDistance,
    images: torch.Tensor,
    *,
    real: bool,
    batch_size: int,
) -> None:
    """Feed images [N,3,H,W] in [-1,1] to the metric, batch by batch, on its device."""
    for chunk in images.split(batch_size):
        metric.update(_to_unit(chunk.to(_device(metric))), real=real)


def stats_of_state(metric: FrechetInceptionDistance) -> RealStats:
    """Mean and covariance of the real features accumulated in `metric` (torchmetrics' formulas)."""
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise UserError(f"a Fréchet distance needs at least 2 real images, got {n}")
    mean = metric.real_features_sum / n
    cov = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return RealStats(mean.double().cpu(), cov.double().cpu(), n)


def set_real_stats(metric: FrechetInceptionDistance, stats: RealStats) -> None:
    """Put `stats` into the metric's real-image state, as if it had seen those images."""
    device = _device(metric)
    mean = stats.mean.to(device, torch.float64)
    n = stats.count
    metric.real_features_sum.copy_(mean * n)
    metric.real_features_cov_sum.copy_(stats.cov.to(device, torch.float64) * (n - 1))
    metric.real_features_cov_sum.add_(torch.outer(mean, mean), alpha=n)
    metric.real_features_num_samples.fill_(n)


def real_stats(
    metric: FrechetInceptionDistance,
    dataset: str,
    resolution: int,
    data_dir: Path | str,
    *,
    batch_size: int = 256,
    cache_root: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[RealStats, bool]:
    """(statistics of the test split under the metric's network, whether they were computed
    now rather than read from the cache). Leaves them in the metric's real state."""
    root = Path(cache_root) if cache_root is not None else default_stats_dir()
    key = stats_key(dataset, resolution, metric)
    digest = _digest(key)
    path = root / f"{digest}.safetensors"
    dims = int(metric.real_features_sum.shape[0])
    stats = load_stats(path, dims)
    computed = False
    if stats is None:
        with _lock(root / f".lock-{digest}"):
            stats = load_stats(path, dims)  # another worker may have written it meanwhile
            if stats is None:
                stats = _compute_real_stats(
                    metric, dataset, resolution, data_dir, batch_size, on_batch
                )
                save_stats(path, stats, key)
                computed = True
    # Also after computing: a hit and a miss then give bit-identical distances.
    set_real_stats(metric, stats)
    return stats, computed


def _compute_real_stats(
    metric: FrechetInceptionDistance,
    dataset: str,
    resolution: int,
    data_dir: Path | str,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
) -> RealStats:
    """One pass of the feature network over the reference split."""
    split = data.labelled_split(dataset, REFERENCE_SPLIT, resolution, data_dir)
    loader = torch.utils.data.DataLoader(
        split, batch_size=batch_size, shuffle=False, collate_fn=data.batch_collate(split)
    )
    metric.reset()
    for images, _ in loader:
        _update(metric, images, real=True, batch_size=batch_size)
        if on_batch is not None:
            on_batch(len(images))
    return stats_of_state(metric)


# --- one checkpoint ----------------------------------------------------------------------------
