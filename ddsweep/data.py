"""Datasets by name: images as float tensors [3, R, R] in [-1, 1] with integer labels.

Known names are `cifar10`, `stl10`, `flowers102` (read by torchvision from the data folder, and
downloaded there when absent), `digits` (scikit-learn's bundled 8x8 digits: no network, for
quick runs on a CPU) and `folder:PATH` (an ImageFolder tree PATH/{train,test}/<class>/<image>).

Two views of every dataset: `training_set` feeds the diffusion model (labels unused, random
horizontal flip), `labelled_split` feeds the probes (no augmentation). `split_fingerprint` names
exactly which images and preprocessing a split holds, for cache keys and MLflow params.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from ddsweep.config import paths
from ddsweep.config.datasets import (
    FOLDER_PREFIX,
    dataset_info,
    folder_layout,
    link_refused,
)
from ddsweep.errors import UserError, first_line

Split = Literal["train", "test", "val"]  # val: Flowers-102's own validation split only
Item = tuple[torch.Tensor, int]

# The fixed digits split: stratified 80/20, seed 0. Part of every digits fingerprint.
DIGITS_TEST_SIZE = 0.2
DIGITS_SEED = 0


# What to put where when a download fails; {data_dir} is filled in.
_MANUAL_DOWNLOAD: dict[str, str] = {
    "cifar10": "put cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/) into "
    "{data_dir}/ (https://www.cs.toronto.edu/~kriz/cifar.html)",
    "stl10": "put stl10_binary.tar.gz (or the extracted stl10_binary/) into "
    "{data_dir}/ (https://cs.stanford.edu/~acoates/stl10/)",
    "flowers102": "put 102flowers.tgz (or its extracted jpg/), imagelabels.mat and setid.mat into "
    "{data_dir}/flowers-102/ (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/)",
}


def default_data_dir() -> Path:
    """The data folder: $DDSWEEP_DATA if set, else ./data."""
    return paths.data_dir()


def validate_resolution(resolution: int) -> None:
    """Raise UserError unless `resolution` is a positive multiple of 8."""
    if resolution <= 0 or resolution % 8 != 0:
        raise UserError(
            f"--resolution {resolution} is not a positive multiple of 8: "
            "the U-Net halves it three times; use e.g. 32"
        )


def training_set(
    name: str, resolution: int, data_dir: Path | str, *, flip: bool = True
) -> Dataset[Item]:
    """Images for training the diffusion model: items (image [3,R,R] in [-1,1], label int).

    Labels are not used by training; STL-10 includes its unlabelled images (label -1).
    """
    validate_resolution(resolution)
    info = dataset_info(name)
    data_dir = Path(data_dir)
    transform = _image_transform(resolution, flip=flip)
    if info.name == "cifar10":
        return _cifar10(data_dir, train=True, transform=transform)
    if info.name == "stl10":
        return _stl10(data_dir, "train+unlabeled", transform)
    if info.name == "flowers102":
        # train+val only: the test images must stay unseen by the backbone too, or probe
        # accuracy on them would measure memorisation as well as features.
        return ConcatDataset(
            [_flowers102(data_dir, split, transform) for split in ("train", "val")]
        )
    if info.name == "digits":
        images, labels = _digits_tensors(resolution)["train"]
        return TensorImages(images, labels, flip=flip)
    return _image_folder(info.name, "train", transform)


def labelled_split(
    name: str,
    split: Split,
    resolution: int,
    data_dir: Path | str,
    *,
    flowers_add_val: bool = False,
) -> Dataset[Item]:
    """Labelled images for probing, without augmentation: items (image [3,R,R] in [-1,1], label).

    `flowers_add_val` adds Flowers-102's validation images to its probe train split; other
    datasets and the test split ignore it.
    """
    validate_resolution(resolution)
    info = dataset_info(name)
    if split not in ("train", "test") and not (split == "val" and has_own_val(info.name)):
        raise UserError(f"unknown split {split!r} of {info.name}: use train or test")
    data_dir = Path(data_dir)
    transform = _image_transform(resolution, flip=False)
    if info.name == "cifar10":
        return _cifar10(data_dir, train=split == "train", transform=transform)
    if info.name == "stl10":
        return _stl10(data_dir, split, transform)
    if info.name == "flowers102":
        splits = _flowers_splits(split, flowers_add_val)
        parts = [_flowers102(data_dir, part, transform) for part in splits]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if info.name == "digits":
        images, labels = _digits_tensors(resolution)[split]
        return TensorImages(images, labels, flip=False)
    return _image_folder(info.name, split, transform)


def has_own_val(name: str) -> bool:
    """Whether a dataset ships its own validation split (Flowers-102: 10 images a class)."""
    return name == "flowers102"


def validation_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, validation indices) of a train split: a stratified, seeded `fraction` held
    out for choosing (block, epoch) before the test split is looked at."""
    from sklearn.model_selection import train_test_split

    index = torch.arange(len(labels))
    y = labels.numpy()
    counts = torch.bincount(labels)
    # Stratify when every class can give one image to each side; else a plain seeded split.
    n_classes = int((counts > 0).sum())
    held = round(fraction * len(labels))
    stratify = y if int(counts[counts > 0].min()) >= 2 and held >= n_classes else None
    fit, val = train_test_split(
        index.numpy(), test_size=fraction, random_state=seed, stratify=stratify
    )
    return torch.as_tensor(sorted(fit)), torch.as_tensor(sorted(val))


def split_fingerprint(
    name: str, split: Split, resolution: int, *, flowers_add_val: bool = False
) -> str:
    """A short stable string naming a probe split, e.g. "digits:test:16:seed0:80-20"."""
    info = dataset_info(name)
    if info.name == "flowers102":
        return f"flowers102:{'+'.join(_flowers_splits(split, flowers_add_val))}:{resolution}"
    if info.name == "digits":
        train_pct = round(100 * (1 - DIGITS_TEST_SIZE))
        return f"digits:{split}:{resolution}:seed{DIGITS_SEED}:{train_pct}-{100 - train_pct}"
    if info.name.startswith(FOLDER_PREFIX):
        # A folder can change under the same path: name its content too.
        root = Path(info.name[len(FOLDER_PREFIX) :])
        return f"{info.name}:{split}:{resolution}:{_tree_digest(root / split)}"
    return f"{info.name}:{split}:{resolution}"


class TensorImages(Dataset[Item]):
    """In-memory images [N,3,R,R] in [-1,1] and labels [N], with optional random horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, flip: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Item:
        image = self.images[index]
        # torch's generator, so torch.manual_seed and DataLoader worker seeding apply.
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[index])


def _image_transform(resolution: int, *, flip: bool) -> v2.Compose:
    """PIL image of any mode and size -> float tensor [3,R,R] in [-1,1]."""
    steps: list[Callable[..., object]] = [
        v2.RGB(),
        # Resize the short side, then crop: Flowers-102 images are not square.
        v2.Resize(resolution),
        v2.CenterCrop(resolution),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ]
    return v2.Compose(steps)


def _flowers_splits(split: Split, add_val: bool) -> tuple[str, ...]:
    """Flowers-102's own splits that make up our `split`."""
    if split in ("test", "val"):
        return (split,)
    return ("train", "val") if add_val else ("train",)


def _open_or_download(
    name: str, data_dir: Path, make: Callable[[bool], Dataset[Item]]
) -> Dataset[Item]:
    """make(download=False); if the files are absent, make(download=True); offline: UserError."""
    try:
        return make(False)
    except RuntimeError:
        pass  # torchvision's "Dataset not found or corrupted": try to download it
    try:
        return make(True)
    except (OSError, RuntimeError, tarfile.TarError) as error:
        where = _MANUAL_DOWNLOAD[name].format(data_dir=data_dir)
        raise UserError(
            f"{name} is not in {data_dir} and could not be downloaded: {where}, "
            f"or point --data-dir or {paths.DATA_ENV} at the folder that holds it"
        ) from error


def _cifar10(data_dir: Path, *, train: bool, transform: v2.Compose) -> Dataset[Item]:
    """torchvision's CIFAR-10 train (50,000) or test (10,000) split."""
    return _open_or_download(
        "cifar10",
        data_dir,
        lambda download: tv_datasets.CIFAR10(
            data_dir, train=train, transform=transform, download=download
        ),
    )


def _stl10(data_dir: Path, split: str, transform: v2.Compose) -> Dataset[Item]:
    """torchvision's STL-10: train (5,000), test (8,000) or train+unlabeled (105,000)."""
    return _open_or_download(
        "stl10",
        data_dir,
        lambda download: tv_datasets.STL10(
            data_dir, split=split, transform=transform, download=download
        ),
    )


def _flowers102(data_dir: Path, split: str, transform: v2.Compose) -> Dataset[Item]:
    """torchvision's Flowers-102: train (1,020), val (1,020) or test (6,149)."""
    return _open_or_download(
        "flowers102",
        data_dir,
        lambda download: tv_datasets.Flowers102(
            data_dir, split=split, transform=transform, download=download
        ),
    )


@functools.lru_cache(maxsize=8)
def _digits_tensors(resolution: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits, split 80/20: {split: (images [N,3,R,R] in [-1,1], labels [N])}."""
    # Imported here: scikit-learn is slow to import and only digits needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32)  # [N, 8, 8], values 0..16
    images = (pixels / 8.0 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1)
    # Bilinear without antialias: deterministic, and stays within [-1, 1].
    images = F.interpolate(
        images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False
    ).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_SIZE,
        stratify=digits.target,
        random_state=DIGITS_SEED,
    )
    return {
        "train": (images[train_idx], labels[train_idx]),
        "test": (images[test_idx], labels[test_idx]),
    }


def _folder_files(split_root: Path) -> list[Path]:
    """The files ImageFolder loads from `split_root` (images with its extensions, in class
    subfolders, at any depth), sorted; UserError for a link or a file that is not a regular one.

    ImageFolder itself walks with followlinks=True: a link to a parent folder repeats every image
    under it (with the label of the folder holding the link), a link out of the tree reads files
    the fingerprint does not name. No link is allowed, so its walk and this one agree."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(split_root, followlinks=False):
        here = Path(dirpath)
        for entry in (*dirnames, *filenames):
            if (here / entry).is_symlink():
                raise UserError(link_refused(here / entry))
        if here == split_root:
            continue  # ImageFolder reads only inside class folders
        for entry in filenames:
            if has_file_allowed_extension(entry, IMG_EXTENSIONS):
                path = here / entry
                if not path.is_file():  # a FIFO or device would block or never end
                    raise UserError(f"{path} is not a regular file; remove it")
                files.append(path)
    return sorted(files)


def _load_image(path: str) -> Image.Image:
    """One image of a folder: dataset as 8-bit RGB; UserError naming a file PIL cannot read.

    16-bit images (PIL modes I;16 and I) are scaled to 8 bits: PIL's own convert("RGB"), which
    ImageFolder's loader uses, clips every value above 255 to white."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _SIXTEEN_BIT:
                levels = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
                gray = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
                return Image.fromarray(gray).convert("RGB")  # uint8: mode L
            if img.mode == "F":
                raise UserError(
                    f"{path} holds 32-bit float pixels, whose range is unknown: save it as an "
                    "8- or 16-bit image"
                )
            return img.convert("RGB")
    # UnidentifiedImageError (not an image) and "image file is truncated" are OSErrors.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(
            f"{path} is not a readable image ({first_line(err)}): replace or remove it"
        ) from err


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _image_folder(name: str, split: str, transform: v2.Compose) -> Dataset[Item]:
    """torchvision's ImageFolder over PATH/split, with links refused and a loader that keeps
    16-bit images' levels and names a bad file."""
    root, _ = folder_layout(name)
    _folder_files(root / split)
    try:
        return tv_datasets.ImageFolder(root / split, transform=transform, loader=_load_image)
    except FileNotFoundError as error:  # a class folder without images
        raise UserError(f"{name}: {error}; put at least one image in every class folder") from error


# (folder, stat digest) -> content digest: a study asks for a split's fingerprint per trial.
_CONTENT_DIGESTS: dict[tuple[str, str], str] = {}


def _tree_digest(folder: Path) -> str:
    """8 hex digits naming the content of every file ImageFolder loads from `folder`, under its
    relative path (hence its class), and the way it is decoded.

    Each process hashes the content on first use; later calls re-hash only when a file's stat
    changed. The stat names the inode and ctime besides size and mtime: pixels rewritten in
    place at the same size with the mtime put back (`cp -p`, `rsync -t`, `touch -r`) still
    change the ctime, which no user call can set. A file changed in the last seconds is never
    trusted to its stat (it could change again within one timestamp tick, as git's "racy clean"
    entries can): such a tree is hashed on every call."""
    files = _folder_files(folder)
    listing = hashlib.sha256(_LOADER_VERSION.encode())
    newest = 0
    for path in files:
        st = path.stat()
        newest = max(newest, st.st_ctime_ns, st.st_mtime_ns)
        stat = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"
        listing.update(f"{path.relative_to(folder)}\0{stat}\n".encode())
    key = (str(folder), listing.hexdigest())
    if key in _CONTENT_DIGESTS:
        return _CONTENT_DIGESTS[key]
    digest = hashlib.sha256(_LOADER_VERSION.encode())
    for path in files:
        digest.update(f"{path.relative_to(folder)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    if newest < time.time_ns() - _RACY_NS:
        _CONTENT_DIGESTS[key] = digest.hexdigest()[:8]
    return digest.hexdigest()[:8]


_RACY_NS = 3 * 10**9  # files changed more recently than this are hashed on every call


_LOADER_VERSION = "folder-loader-2"  # 2: 16-bit images scaled, not clipped
