"""Fréchet distances of generated images to a dataset's test split, through torchmetrics.

With the standard Inception network (an int `feature`: 64, 192, 768 or 2048 dims) the distance is
the FID; with any other `nn.Module` it is named `fd_<name>`, never FID, since its values are on
another scale. The statistics of the real images (mean, covariance, count) are computed once per
(dataset split, resolution, feature network) and kept on disk, so every checkpoint of a study
pays only for its own samples.

The study scores 2,000 samples per checkpoint against the test set but does not name its
sampler. The default here is DDPM ancestral sampling over all 1000 steps: the process the network
was trained to reverse, the sampler DDPM FIDs are usually reported with (Ho et al. 2020) and the
default of diffusers' DDPMPipeline. DDIM (`sampler="ddim"`, 100 steps unless `steps` says
otherwise) is ten times faster but scores worse, so the two must not be compared: Song et al.
(2021, table 1) report CIFAR-10 FID 4.16 at 100 DDIM steps against 3.17 for DDPM (50k samples).
A DDPM image set depends on the seed *and* the batch size (one generator draws all the noise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ddsweep import data, diffusion
from ddsweep.errors import UserError, first_line
from ddsweep.features import default_cache_dir

if TYPE_CHECKING:
    from diffusers import UNet2DModel
    from torchmetrics.image.fid import FrechetInceptionDistance

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's URL_INCEPTION_V3, spelled out so the error message needs no import.
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
INCEPTION_DIMS: tuple[int, ...] = (64, 192, 768, 2048)
WEIGHTS_ENV = "DDSWEEP_INCEPTION_WEIGHTS"
REFERENCE_SPLIT: data.Split = "test"  # the study: "2,000 generated images against the test set"
DDIM_STEPS = 100  # DDIM steps when `steps` is not given
_STATS_VERSION = 1  # part of every cache key: bump when the statistics change meaning


@dataclass(frozen=True)
class FIDConfig:
    """How the generated images are made: 2,000 as in the study, DDPM ancestral by default."""

    samples: int = 2000
    sampler: str = "ddpm"
    steps: int | None = None  # DDIM only (None: 100); DDPM always runs all 1000 steps
    seed: int = 0
    batch_size: int = 256
    feature: str = "inception"  # or "randconv": see feature_network


def sampler_steps(cfg: FIDConfig) -> int:
    """The number of network evaluations per image that `cfg` asks for."""
    if cfg.sampler == "ddpm":
        return diffusion.NUM_TRAIN_TIMESTEPS
    return cfg.steps if cfg.steps is not None else DDIM_STEPS


def run_params(
    cfg: FIDConfig,
    *,
    dataset: str,
    resolution: int,
    attention: bool,
    epoch: int,
    backbone_run: str,
    weights: str,
) -> dict[str, str]:
    """The params of one FID run: the checkpoint it scored and how its images were made."""
    settings = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k != "steps"}
    return {
        "dataset": dataset,
        "resolution": str(resolution),
        "attention": str(attention),
        "epoch": str(epoch),
        "backbone_run": backbone_run,
        "weights": weights,
        "steps": str(sampler_steps(cfg)),
        **settings,
    }


def validate_config(cfg: FIDConfig) -> None:
    """Raise UserError for settings that cannot give a Fréchet distance."""
    if cfg.sampler not in diffusion.SAMPLERS:
        raise UserError(
            f"unknown sampler {cfg.sampler!r}: use one of {', '.join(diffusion.SAMPLERS)}"
        )
    if cfg.sampler == "ddpm" and cfg.steps not in (None, diffusion.NUM_TRAIN_TIMESTEPS):
        raise UserError(
            f"DDPM ancestral sampling runs all {diffusion.NUM_TRAIN_TIMESTEPS} steps, not "
            f"{cfg.steps}: use --sampler ddim to choose the number of steps"
        )
    steps = sampler_steps(cfg)
    if not 1 <= steps <= diffusion.NUM_TRAIN_TIMESTEPS:
        raise UserError(
            f"DDIM sampling takes 1 to {diffusion.NUM_TRAIN_TIMESTEPS} steps, got {steps}"
        )
    if cfg.samples < 2:
        raise UserError(f"a Fréchet distance needs at least 2 samples, got {cfg.samples}")
    if cfg.batch_size < 1:
        raise UserError(f"the batch size must be positive, got {cfg.batch_size}")


# --- the feature network ------------------------------------------------------------------------


def _how_to_get_weights() -> str:
    return (
        f"download {INCEPTION_URL} where there is network and pass it with "
        f"--inception-weights PATH or {WEIGHTS_ENV}=PATH"
    )


def inception_weights_path(explicit: Path | None = None) -> Path | None:
    """The Inception weights file: `explicit` (--inception-weights), else $DDSWEEP_INCEPTION_WEIGHTS,
    else None (torch.hub's cache, downloaded there when absent: see `make_metric`)."""
    if explicit is not None:
        path, origin = Path(explicit), "--inception-weights"
    elif os.environ.get(WEIGHTS_ENV):
        path, origin = Path(os.environ[WEIGHTS_ENV]), WEIGHTS_ENV
    else:
        return None
    path = path.expanduser()
    if not path.is_file():
        raise UserError(f"{origin} {path} is not a file: {_how_to_get_weights()}")
    return path


def hub_weights_path() -> Path:
    """Where torch.hub keeps the Inception weights ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _hub_weights() -> Path:
    """The Inception weights in torch.hub's cache, downloaded there first when absent.

    Downloaded here rather than by torch-fidelity, which would unpickle whatever file it finds
    under that name with weights_only=False."""
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # download_url_to_file writes a temporary file and renames it: never a partial file.
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        raise UserError(
            f"the Inception weights for FID are not in {cached.parent} and could not be "
            f"downloaded ({first_line(err)}): {_how_to_get_weights()}"
        ) from err
    return cached


def _check_weights_file(path: Path, hub: bool = False) -> bytes:
    """The bytes of `path`, once torch.load(weights_only=True) has read them as a state dict of
    tensors; else UserError naming the file. torch-fidelity loads its file with
    weights_only=False (a full unpickle): it gets a private copy of exactly these bytes, so
    nothing it unpickles was not checked, even if `path` changes meanwhile."""
    fix = (
        f"it is not the file torch.hub downloaded: delete it to download it again, or "
        f"{_how_to_get_weights()}"
        if hub
        else _how_to_get_weights()
    )
    try:
        blob = path.read_bytes()
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": our one line says it all
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    # weights_only refuses any object but tensors and plain containers with UnpicklingError.
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(
            f"{path} is not a PyTorch state dict of tensors ({first_line(err)}); {fix}"
        ) from err
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict; {fix}")
    return blob


def make_metric(
    feature: int | nn.Module = 2048, weights: Path | None = None
) -> FrechetInceptionDistance:
    """torchmetrics' FrechetInceptionDistance taking images in [0, 1] (normalize=True).

    An int is the standard Inception pool of that many dims: its weights come from `weights`,
    else torch.hub's cache, else a download into it; offline without them it is one UserError
    line. Whichever file it is, it must pass torch.load(weights_only=True) before torch-fidelity
    reads it. A module must map float images [B,3,H,W] in [0,1] to features [B,D]; torchmetrics
    calls it once at construction on a random (1, 3, 299, 299) image to learn D (unless it has
    an int `num_features`). Download progress is not shown.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ModuleNotFoundError as err:  # pragma: no cover - a declared dependency
        raise UserError(f"FID needs torchmetrics: pip install torchmetrics ({err})") from err

    if isinstance(feature, nn.Module):
        return FrechetInceptionDistance(feature=feature, normalize=True)
    if feature not in INCEPTION_DIMS:
        raise UserError(
            f"the Inception network gives {', '.join(map(str, INCEPTION_DIMS))} features, "
            f"not {feature}"
        )
    hub = weights is None
    path = _hub_weights() if weights is None else weights
    blob = _check_weights_file(path, hub=hub)
    try:
        # Never None: torch-fidelity must not look in torch.hub's cache itself.
        with tempfile.TemporaryDirectory(prefix="ddsweep-inception-") as private:
            copy = Path(private) / INCEPTION_FILE
            copy.write_bytes(blob)
            del blob
            return FrechetInceptionDistance(
                feature=feature, normalize=True, feature_extractor_weights_path=str(copy)
            )
    except ModuleNotFoundError as err:
        raise UserError(
            "FID with the Inception network needs torch-fidelity: pip install torch-fidelity"
        ) from err
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise UserError(
            f"{path} is not the Inception weights file {INCEPTION_FILE} "
            f"({first_line(err)}): {_how_to_get_weights()}"
        ) from err


def metric_name(feature: int | nn.Module, name: str | None = None) -> str:
    """The metric's name: `fid` for the standard 2048-dim Inception (`fid64` etc. for its smaller
    pools), `fd_<name>` for any other network (`name` defaults to its class name, lower case)."""
    if isinstance(feature, int):
        return "fid" if feature == 2048 else f"fid{feature}"
    label = name or type(feature).__name__
    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "net"
    return f"fd_{slug}"


def network_id(net: nn.Module) -> str:
    """Class name and a SHA-256 of the state dict: names a feature network's exact weights."""
    h = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(value.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return f"{type(net).__name__}-{h.hexdigest()[:16]}"


# --- statistics of the real images ----------------------------------------------------------------


@dataclass(frozen=True)
class RealStats:
    """Feature statistics of a set of images: mean [D] and covariance [D,D] (float64), count."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int


def default_stats_dir() -> Path:
    """Where real statistics are kept: <DDSWEEP_CACHE or ./.ddsweep/cache>/fid."""
    return default_cache_dir() / "fid"


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
    """The statistics in `path`, or None when absent, unreadable or of another size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        stats = RealStats(t["mean"].double(), t["cov"].double(), int(t["count"]))
    # SafetensorError (a damaged file) is none of the builtin kinds.
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError):
        return None
    if stats.mean.shape != (dims,) or stats.cov.shape != (dims, dims) or stats.count < 2:
        return None
    return stats


def save_stats(path: Path, stats: RealStats, key: dict[str, str]) -> None:
    """Write `stats` to `path` atomically (temp file + rename), with `key` as metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        tensors = {
            "mean": stats.mean.double().cpu().contiguous(),
            "cov": stats.cov.double().cpu().contiguous(),
            "count": torch.tensor([stats.count], dtype=torch.int64),
        }
        save_file(tensors, tmp, metadata=key)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `path` (fcntl where available)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: concurrent workers may compute the statistics twice
            pass
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
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False)
    metric.reset()
    for images, _ in loader:
        _update(metric, images, real=True, batch_size=batch_size)
        if on_batch is not None:
            on_batch(len(images))
    return stats_of_state(metric)


# --- one checkpoint ----------------------------------------------------------------------------


def fid_of_checkpoint(
    unet: UNet2DModel,
    dataset: str,
    resolution: int,
    data_dir: Path | str,
    cfg: FIDConfig | None = None,
    *,
    feature: int | nn.Module = 2048,
    feature_name: str | None = None,
    weights: Path | None = None,
    cache_root: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_real_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Fréchet distance of `cfg.samples` images generated by `unet` to the test split of
    `dataset`, on the U-Net's device. Returns {metric_name: value, "samples", "real_samples",
    "sample_s", "features_s", "real_stats_s", "real_cached" (1.0 on a cache hit), "images_per_s"}.

    `on_batch(n)` follows the generated images, `on_real_batch(n)` the real ones (only when
    their statistics are not cached yet).
    """
    cfg = cfg or FIDConfig()
    validate_config(cfg)
    if int(unet.config.sample_size) != resolution:
        raise UserError(
            f"the backbone generates {unet.config.sample_size} px images, not {resolution} px"
        )
    if int(unet.config.in_channels) != 3:
        raise UserError(f"FID needs RGB images; the backbone makes {unet.config.in_channels}")
    name = metric_name(feature, feature_name)
    device = next(unet.parameters()).device
    metric = make_metric(feature, weights).to(device)

    t0 = time.perf_counter()
    stats, computed = real_stats(
        metric,
        dataset,
        resolution,
        data_dir,
        batch_size=cfg.batch_size,
        cache_root=cache_root,
        on_batch=on_real_batch,
    )
    real_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = diffusion.sample(
        unet,
        cfg.samples,
        sampler=cfg.sampler,  # type: ignore[arg-type]
        steps=sampler_steps(cfg),
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        on_batch=on_batch,
    )
    sample_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    _update(metric, images, real=False, batch_size=cfg.batch_size)
    value = float(metric.compute())
    features_s = time.perf_counter() - t0
    return {
        name: value,
        "samples": float(cfg.samples),
        "real_samples": float(stats.count),
        "sample_s": sample_s,
        "features_s": features_s,
        "real_stats_s": real_s,
        "real_cached": 0.0 if computed else 1.0,
        "images_per_s": cfg.samples / sample_s if sample_s > 0 else float("inf"),
    }


class RandomConvFeatures(nn.Module):
    """A fixed, seeded random conv net with global pooling: [B,3,H,W] in [0,1] -> [B,64].

    Needs no download, so it works offline (tests, the digits demo). Its Fréchet distance is
    logged as `fd_randconv`: it ranks checkpoints of one model, but it is no FID and is never
    comparable with published FIDs.
    """

    def __init__(self, dims: int = 64, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, dims, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return torch.tanh(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3))


FEATURES: tuple[str, ...] = ("inception", "randconv")


def feature_network(name: str) -> tuple[int | nn.Module, str | None]:
    """(torchmetrics `feature`, name for `metric_name`) of a feature network by name:
    `inception` is the standard FID (2048-d pool features); `randconv` needs no weights."""
    if name == "inception":
        return 2048, None
    if name == "randconv":
        return RandomConvFeatures(), "randconv"
    raise UserError(f"unknown feature network {name!r}: use one of {', '.join(FEATURES)}")
