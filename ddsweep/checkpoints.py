"""Self-describing checkpoints: diffusers folders (EMA weights, raw weights beside them) plus the
training state that resume needs. Nothing here unpickles arbitrary objects.

Plain diffusers loads them as `UNet2DModel.from_pretrained(folder)` (EMA) and
`from_pretrained(folder / "raw")`; not with `subfolder="raw"`, which for a local folder finds the
top-level (EMA) weights file first (diffusers 0.42, `_get_model_file`)."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ddsweep.config.probe import WEIGHTS
from ddsweep.errors import UserError, first_line

if TYPE_CHECKING:
    from diffusers import UNet2DModel

Weights = Literal["ema", "raw"]
CHECKPOINTS = "checkpoints"  # MLflow artifact folder of a training run
RESUME = "resume"  # artifact folder holding the latest optimizer state
RAW = "raw"  # subfolder of a checkpoint with the non-EMA weights
META = "ddsweep.json"
STATE = "state.json"  # in resume/: epoch, step and EMA step of the latest checkpoint
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def epoch_dir(epoch: int) -> str:
    """Artifact path of the checkpoint of `epoch`, e.g. checkpoints/epoch_0050."""
    return f"{CHECKPOINTS}/epoch_{epoch:04d}"


def save(folder: Path, ema: UNet2DModel, raw: UNet2DModel, meta: dict[str, Any]) -> None:
    """Write a diffusers folder with the EMA weights, `raw/` with the raw ones, and meta."""
    ema.save_pretrained(folder, safe_serialization=True)
    raw.save_pretrained(folder / RAW, safe_serialization=True)
    # What the weights files hold, so that a copy whose files were swapped is caught.
    hashes = {w: _sha256(folder / (RAW if w == "raw" else "") / WEIGHTS_FILE) for w in WEIGHTS}
    meta = {**meta, HASHES: hashes}
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


HASHES = "sha256"  # in ddsweep.json: {"ema": ..., "raw": ...}, content_hash of each weights file


def verify(folder: Path, epoch: int | None = None) -> str | None:
    """Why the ddsweep checkpoint `folder` is not what its ddsweep.json says (its weights'
    content hashes, its epoch, its architecture against config.json); None when it is, or for a
    folder of ddsweep before hashes or a foreign diffusers folder (nothing to check against)."""
    meta = read_meta(folder)
    if not meta:
        return None
    if epoch is not None and "epoch" in meta and int(meta["epoch"]) != epoch:
        return f"its ddsweep.json is of epoch {meta['epoch']}, not {epoch}"
    recorded = meta.get(HASHES) or {}
    for weights in ("ema", "raw"):
        sub = folder / RAW if weights == "raw" else folder
        if weights in recorded and (sub / WEIGHTS_FILE).is_file():
            got = content_hash(folder, weights)
            if got != recorded[weights]:
                return f"its {weights} weights hash to {got}, its ddsweep.json says {recorded[weights]}"
    return _architecture_mismatch(folder, meta)


def _architecture_mismatch(folder: Path, meta: dict[str, Any]) -> str | None:
    """How config.json contradicts ddsweep.json (resolution, channels, attention), or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
        said = {
            "resolution": str(config["sample_size"]),
            "channels": ",".join(map(str, config["block_out_channels"])),
            "attention": str(any("Attn" in t for t in config["down_block_types"])),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_unet names an unreadable config itself
    for key, value in said.items():
        if key in meta and str(meta[key]) != value:
            return f"its config.json has {key} {value}, its ddsweep.json {meta[key]}"
    return None


def check_finite(unet: torch.nn.Module, where: Path) -> None:
    """UserError when any weight is NaN or infinite: such a network's features are noise, and
    a probe of them would log chance as a finding."""
    for name, p in unet.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise UserError(
                f"the weights in {where} hold NaN or infinite values ({name}): "
                "not a usable backbone (the training diverged, or the file is damaged)"
            )


# resume/ holds two slots of optimizer and RNG files, written in turn: a save writes the slot
# the state does not name, then the state that names it, so a save cut short (a full disk, a
# kill) leaves the previous slot and the state naming it whole.
SLOTS = ("", "b")
_SLOT, _DIGESTS = "slot", "sha256"  # state.json's own keys (not returned as loop counters)


def _slot_files(slot: str) -> dict[str, str]:
    tail = f".{slot}" if slot else ""
    return {"optimizer": f"optimizer{tail}.pt", "rng": f"rng{tail}.pt"}


def next_slot(current: str | None) -> str:
    """The slot a save writes when the latest state names `current` (None: none yet)."""
    return SLOTS[1] if current == SLOTS[0] else SLOTS[0]


def save_resume_state(
    folder: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any], slot: str = ""
) -> None:
    """Write the optimizer state (tensors only) and the CPU RNG state into `slot`, then the
    loop counters needed to resume, naming the slot and the files' SHA-256 digests."""
    folder.mkdir(parents=True, exist_ok=True)
    names = _slot_files(slot)
    torch.save(optimizer.state_dict(), folder / names["optimizer"])
    torch.save({"cpu_rng": torch.get_rng_state()}, folder / names["rng"])
    digests = {n: _sha256(folder / n) for n in names.values()}
    meta = {**state, _SLOT: slot, _DIGESTS: digests}
    (folder / STATE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def state_slot(folder: Path) -> str:
    """The slot the resume state in `folder` names ("" for states written before slots)."""
    return str(json.loads((folder / STATE).read_text()).get(_SLOT, ""))


def load_resume_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor]:
    """(state, optimizer state dict, CPU RNG state) from a resume folder; weights_only loads,
    of files whose digests match what the state recorded (a torn write is refused)."""
    try:
        state = json.loads((folder / STATE).read_text())
        names = _slot_files(str(state.pop(_SLOT, "")))
        digests = state.pop(_DIGESTS, None) or {}
        for name in names.values():
            if name in digests and _sha256(folder / name) != digests[name]:
                raise ValueError(f"{name} is not the file its {STATE} recorded (a torn write?)")
        optim = torch.load(folder / names["optimizer"], map_location="cpu", weights_only=True)
        rng = torch.load(folder / names["rng"], map_location="cpu", weights_only=True)["cpu_rng"]
        missing = {"epoch", "step", "ema_step"} - set(state)
        if missing:
            raise KeyError(f"state.json lacks {', '.join(sorted(missing))}")
    # weights_only refuses anything but tensors and plain containers with UnpicklingError.
    except (
        OSError,
        ValueError,
        RuntimeError,
        KeyError,
        TypeError,
        EOFError,
        AttributeError,
        pickle.UnpicklingError,
    ) as err:
        raise UserError(f"cannot read the resume state in {folder}: {first_line(err)}") from err
    return state, optim, rng


def load_unet(folder: Path | str, weights: Weights = "ema") -> UNet2DModel:
    """A U-Net from a diffusers folder (ours or a downloaded one), safetensors only."""
    from diffusers import UNet2DModel

    folder = Path(folder)
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    sub = folder / RAW if weights == "raw" and (folder / RAW).is_dir() else folder
    if weights == "raw" and sub == folder and (folder / META).exists():
        raise UserError(f"{folder} has no raw/ weights beside its EMA weights")
    if not (sub / "config.json").is_file():
        raise UserError(
            f"{sub} is not a diffusers UNet2DModel folder (no config.json): pass a folder "
            "written by save_pretrained, e.g. a ddsweep checkpoint"
        )
    _check_config(sub)
    wrong = _architecture_mismatch(folder, read_meta(folder))
    if wrong is not None:
        raise UserError(f"{folder} contradicts itself: {wrong}; it is not the checkpoint it says")
    if not (sub / WEIGHTS_FILE).is_file():
        raise UserError(
            f"{sub} has no {WEIGHTS_FILE}: ddsweep loads safetensors only (never pickles); "
            "convert with UNet2DModel.from_pretrained(...).save_pretrained(..., "
            "safe_serialization=True) in a trusted environment"
        )
    try:
        # local_files_only: a folder is never a Hub id, so a bad folder must not go online.
        unet = UNet2DModel.from_pretrained(
            sub, use_safetensors=True, low_cpu_mem_usage=False, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"cannot load the U-Net in {sub}: {err}".splitlines()[0]) from err
    check_finite(unet, sub)
    return unet.eval()


def _check_config(sub: Path) -> None:
    """Raise UserError unless sub/config.json is a UNet2DModel config (a JSON object)."""
    # diffusers reads a config that is a bare string as a Hub id and tries to download it.
    try:
        config = json.loads((sub / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{sub}/config.json is not readable JSON: {err}".splitlines()[0]) from err
    if not isinstance(config, dict):
        raise UserError(f"{sub}/config.json is not a diffusers config (a JSON object)")
    kind = config.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise UserError(f"{sub} holds a {kind}, not a UNet2DModel: ddsweep probes UNet2DModel only")


def read_meta(folder: Path) -> dict[str, Any]:
    """The ddsweep metadata of a checkpoint, or {} for a foreign diffusers folder."""
    path = folder / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is not readable ddsweep metadata: {first_line(err)}") from err
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not readable ddsweep metadata: not a JSON object")
    return meta


def content_hash(folder: Path | str, weights: Weights = "ema") -> str:
    """SHA-256 (16 hex) of the weights file itself: a cache key that cannot go stale."""
    folder = Path(folder)
    sub = folder / RAW if weights == "raw" and (folder / RAW).is_dir() else folder
    path = (sub / WEIGHTS_FILE).resolve()
    # Every trial of a study asks again; reading 143 MB each time costs ~0.1 s here.
    return _file_hash(path)


# path -> (stat it was hashed under, hash). The stat names inode, device and ctime besides size
# and mtime: a file edited in place with its size and mtime put back (`touch -r`) still gets a
# new ctime, which no user call can set; a file replaced by a rename gets a new inode.
_HASHES: dict[str, tuple[tuple[int, ...], str]] = {}
_RACY_NS = 3 * 10**9  # a file changed more recently than this is hashed on every call


def _file_hash(path: Path) -> str:
    """SHA-256 (16 hex) of a file, remembered while its stat stays the same; a file written in
    the last seconds is never trusted to its stat (it could change again within one timestamp
    tick: git's "racy clean" entries), as for the folder fingerprint of `data`."""
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    memo = _HASHES.get(str(path))
    if memo is not None and memo[0] == stamp:
        return memo[1]
    digest = _sha256(path)
    if max(st.st_mtime_ns, st.st_ctime_ns) < time.time_ns() - _RACY_NS:
        if len(_HASHES) >= _MEMO_SIZE:
            _HASHES.pop(next(iter(_HASHES)))
        _HASHES[str(path)] = (stamp, digest)
    return digest


_MEMO_SIZE = 256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
