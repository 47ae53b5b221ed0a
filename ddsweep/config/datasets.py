"""The datasets ddsweep knows by name, and what the rest of ddsweep needs to know about one
before loading it (its default resolution, classes and backbone channels); a `folder:PATH`
dataset's layout is checked here too, without reading an image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddsweep.config.model import SEED_CHANNELS  # the DDPM CIFAR-10 U-Net
from ddsweep.errors import UserError, did_you_mean

KNOWN_DATASETS: tuple[str, ...] = ("cifar10", "stl10", "flowers102", "digits")
FOLDER_PREFIX = "folder:"

SMALL_CHANNELS: tuple[int, ...] = (32, 64, 64, 64)  # fast enough for digits on a CPU


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of ddsweep needs to know about a dataset before loading it."""

    name: str
    default_resolution: int
    num_classes: int
    default_channels: tuple[int, ...]


_BUILTIN_INFO: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 32, 10, SEED_CHANNELS),
    "stl10": DatasetInfo("stl10", 64, 10, SEED_CHANNELS),
    "flowers102": DatasetInfo("flowers102", 64, 102, SEED_CHANNELS),
    "digits": DatasetInfo("digits", 16, 10, SMALL_CHANNELS),
}


def dataset_info(name: str) -> DatasetInfo:
    """Facts about dataset `name` (a known name or folder:PATH); unknown names raise UserError."""
    if name in _BUILTIN_INFO:
        return _BUILTIN_INFO[name]
    if name.startswith(FOLDER_PREFIX):
        root, classes = folder_layout(name)
        return DatasetInfo(f"{FOLDER_PREFIX}{root}", 32, len(classes), SEED_CHANNELS)
    known = ", ".join((*KNOWN_DATASETS, "folder:PATH"))
    raise UserError(
        f"unknown dataset {name!r}{did_you_mean(name, KNOWN_DATASETS)}: use one of {known}"
    )


def folder_layout(name: str) -> tuple[Path, list[str]]:
    """Resolve folder:PATH and check its layout: (absolute PATH, class names)."""
    given = Path(name[len(FOLDER_PREFIX) :]).expanduser()
    try:
        root = given.resolve()
    except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError before 3.13)
        raise UserError(f"{FOLDER_PREFIX}{given} cannot be resolved: {err}") from err
    layout = f"{FOLDER_PREFIX}{root} must hold train/<class>/<images> and test/<class>/<images>"
    classes: dict[str, list[str]] = {}
    for split in ("train", "test"):
        if (root / split).is_symlink():
            raise UserError(link_refused(root / split))
        if not (root / split).is_dir():
            raise UserError(f"{layout}, but {root / split} is not a folder")
        classes[split] = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        if not classes[split]:
            raise UserError(f"{layout}, but {root / split} has no class subfolders")
    if classes["train"] != classes["test"]:
        raise UserError(
            f"{layout} with the same class subfolders, but train has {classes['train']} "
            f"and test has {classes['test']}"
        )
    if len(classes["train"]) < 2:
        # One class: every probe scores 100 %, which says nothing about the features.
        raise UserError(
            f"{layout} with at least two classes, but it has only {classes['train']}: "
            "a probe of one class always scores 100 %"
        )
    return root, classes["train"]


def link_refused(path: Path) -> str:
    return (
        f"{path} is a symbolic link: a folder: dataset follows no links (one could repeat "
        "images under another class or leave the folder); copy the files in instead"
    )
