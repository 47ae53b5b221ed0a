"""The feature network of a Fréchet distance: the standard Inception (its weights checked with
`torch.load(weights_only=True)` wherever they come from) or a fixed random network, offline."""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ddsweep.config import paths
from ddsweep.config.fid import check_feature
from ddsweep.errors import UserError, first_line

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's URL_INCEPTION_V3, spelled out so the error message needs no import.
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
INCEPTION_DIMS: tuple[int, ...] = (64, 192, 768, 2048)
WEIGHTS_ENV = paths.INCEPTION_WEIGHTS_ENV


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
    elif paths.inception_weights() is not None:
        path, origin = Path(str(paths.inception_weights())), WEIGHTS_ENV
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


def feature_network(name: str) -> tuple[int | nn.Module, str | None]:
    """(torchmetrics `feature`, name for `metric_name`) of a feature network by name:
    `inception` is the standard FID (2048-d pool features); `randconv` needs no weights."""
    if name == "inception":
        return 2048, None
    if name == "randconv":
        return RandomConvFeatures(), "randconv"
    check_feature(name)
    raise AssertionError(name)  # check_feature raised
