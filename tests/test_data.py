"""Dataset registry: tiny files in each dataset's own on-disk format, read by the real torchvision
classes with only their MD5 check bypassed; downloads always fail (no network in tests)."""

from __future__ import annotations

import os
import pickle
import shutil
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.datasets import cifar, flowers102, stl10

from ddsweep import data
from ddsweep.config import datasets
from ddsweep.errors import UserError

TORCHVISION_MODULES = (cifar, stl10, flowers102)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torchvision download in these tests fails as it would offline."""

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise URLError(f"offline test: {url}")

    for module in TORCHVISION_MODULES:
        for fn in ("download_url", "download_and_extract_archive"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, offline)


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our made-up files cannot match the real MD5 sums: check only that each file exists."""

    def exists(fpath: str | Path, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    for module in TORCHVISION_MODULES:
        monkeypatch.setattr(module, "check_integrity", exists)


def assert_image(image: torch.Tensor, resolution: int) -> None:
    assert image.shape == (3, resolution, resolution)
    assert image.dtype == torch.float32
    assert image.min() >= -1.0
    assert image.max() <= 1.0


# --- CIFAR-10 ---------------------------------------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> dict[str, list[int]]:
    """cifar-10-batches-py/ with pickled batches; image i of a batch is filled with value 10*i."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels: dict[str, list[int]] = {"train": [], "test": []}

    def batch(path: Path, n: int, offset: int) -> list[int]:
        pixels = np.repeat(np.arange(n, dtype=np.uint8)[:, None] * 10, 3072, axis=1)
        batch_labels = [(offset + i) % 10 for i in range(n)]
        # The real files are Python 2 pickles whose str keys load as str with latin1.
        with open(path, "wb") as f:
            pickle.dump({"data": pixels, "labels": batch_labels}, f)
        return batch_labels

    for b in range(1, 6):
        labels["train"] += batch(folder / f"data_batch_{b}", per_batch, offset=b)
    labels["test"] = batch(folder / "test_batch", n_test, offset=0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return labels


def test_cifar10_splits_labels_and_values(tmp_path: Path, skip_md5: None) -> None:
    labels = write_cifar10(tmp_path)
    train = data.labelled_split("cifar10", "train", 32, tmp_path)
    test = data.labelled_split("cifar10", "test", 32, tmp_path)
    assert (len(train), len(test)) == (20, 6)
    assert [train[i][1] for i in range(len(train))] == labels["train"]
    assert [test[i][1] for i in range(len(test))] == labels["test"]
    image, _ = test[5]  # filled with 50
    assert_image(image, 32)
    assert torch.allclose(image, torch.full_like(image, 50 / 255 * 2 - 1))
    assert torch.equal(test[0][0], torch.full((3, 32, 32), -1.0))

    training = data.training_set("cifar10", 16, tmp_path)
    assert len(training) == 20
    assert_image(training[0][0], 16)


def test_cifar10_offline_without_files_names_the_archive(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz") as caught:
        data.labelled_split("cifar10", "test", 32, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "DDSWEEP_DATA" in message
    assert str(tmp_path) in message


# --- STL-10 -----------------------------------------------------------------------------------


def stl10_images(n: int) -> np.ndarray:
    """n images [3,96,96]: left half white, right half black (to check orientation)."""
    images = np.zeros((n, 3, 96, 96), dtype=np.uint8)
    images[:, :, :, :48] = 255
    return images


def write_stl10(root: Path) -> dict[str, list[int]]:
    """stl10_binary/ with 3 train, 4 unlabelled and 5 test images; labels 1-based on disk."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    labels = {"train": [1, 10, 5], "test": [2, 3, 4, 9, 10]}

    def write_images(name: str, images: np.ndarray) -> None:
        # STL-10 stores each channel column-major: [N, 3, W, H].
        images.transpose(0, 1, 3, 2).tofile(folder / name)

    for split in ("train", "test"):
        write_images(f"{split}_X.bin", stl10_images(len(labels[split])))
        np.asarray(labels[split], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    write_images("unlabeled_X.bin", stl10_images(4))
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    return {split: [label - 1 for label in labels[split]] for split in labels}


def test_stl10_splits_labels_and_orientation(tmp_path: Path, skip_md5: None) -> None:
    labels = write_stl10(tmp_path)
    train = data.labelled_split("stl10", "train", 64, tmp_path)
    test = data.labelled_split("stl10", "test", 64, tmp_path)
    assert [train[i][1] for i in range(len(train))] == labels["train"]
    assert [test[i][1] for i in range(len(test))] == labels["test"]
    image, _ = test[0]
    assert_image(image, 64)
    assert torch.all(image[:, :, :28] == 1.0)  # the left half stays on the left
    assert torch.all(image[:, :, 36:] == -1.0)


def test_stl10_training_set_includes_unlabelled_images(tmp_path: Path, skip_md5: None) -> None:
    labels = write_stl10(tmp_path)
    training = data.training_set("stl10", 32, tmp_path)
    assert len(training) == 3 + 4
    assert [training[i][1] for i in range(len(training))] == [*labels["train"], -1, -1, -1, -1]
    assert_image(training[6][0], 32)


def test_stl10_offline_without_files_names_the_archive(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"stl10_binary\.tar\.gz"):
        data.training_set("stl10", 64, tmp_path)


# --- Flowers-102 ------------------------------------------------------------------------------

FLOWERS_LABELS = [3, 1, 102, 7, 7, 2, 3, 50, 1, 9]  # 1-based, for image ids 1..10
FLOWERS_SETID = {"trnid": [1, 2, 3], "valid": [4, 5], "tstid": [6, 7, 8, 9, 10]}


def write_flowers102(root: Path) -> None:
    """flowers-102/ with 10 non-square JPEGs (one grayscale) and the two .mat files."""
    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    for image_id in range(1, 11):
        mode = "L" if image_id == 6 else "RGB"
        image = Image.new(mode, (60 + image_id, 40), color=128 if mode == "L" else (200, 30, 90))
        image.save(folder / "jpg" / f"image_{image_id:05d}.jpg")
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.asarray(FLOWERS_LABELS)})
    scipy.io.savemat(
        folder / "setid.mat", {key: np.asarray(ids) for key, ids in FLOWERS_SETID.items()}
    )


def expected_flowers_labels(*keys: str) -> list[int]:
    return [FLOWERS_LABELS[image_id - 1] - 1 for key in keys for image_id in FLOWERS_SETID[key]]


def test_flowers102_splits_labels_and_add_val(tmp_path: Path, skip_md5: None) -> None:
    write_flowers102(tmp_path)
    train = data.labelled_split("flowers102", "train", 32, tmp_path)
    train_val = data.labelled_split("flowers102", "train", 32, tmp_path, flowers_add_val=True)
    test = data.labelled_split("flowers102", "test", 32, tmp_path, flowers_add_val=True)
    assert [train[i][1] for i in range(len(train))] == expected_flowers_labels("trnid")
    assert [train_val[i][1] for i in range(len(train_val))] == expected_flowers_labels(
        "trnid", "valid"
    )
    assert [test[i][1] for i in range(len(test))] == expected_flowers_labels("tstid")
    for dataset in (train, test):
        for i in range(len(dataset)):
            assert_image(dataset[i][0], 32)


def test_flowers102_training_set_is_train_plus_val_only(tmp_path: Path, skip_md5: None) -> None:
    write_flowers102(tmp_path)
    training = data.training_set("flowers102", 16, tmp_path)
    assert [training[i][1] for i in range(len(training))] == expected_flowers_labels(
        "trnid", "valid"
    )


def test_flowers102_offline_without_files_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"102flowers\.tgz.*setid\.mat.*flowers-102"):
        data.labelled_split("flowers102", "test", 64, tmp_path)


# --- digits -----------------------------------------------------------------------------------


def test_digits_split_sizes_and_stratification() -> None:
    train = data.labelled_split("digits", "train", 16, "unused")
    test = data.labelled_split("digits", "test", 16, "unused")
    assert (len(train), len(test)) == (1437, 360)
    all_counts = Counter(load_digits().target.tolist())
    test_counts = Counter(int(test[i][1]) for i in range(len(test)))
    for label, count in all_counts.items():
        assert abs(test_counts[label] - 0.2 * count) < 1
    image, label = test[0]
    assert_image(image, 16)
    assert isinstance(label, int)
    assert torch.equal(image[0], image[1])
    assert torch.equal(image[0], image[2])


def test_digits_values_match_sklearn_at_native_resolution() -> None:
    digits = load_digits()
    _, test_idx = train_test_split(
        np.arange(len(digits.target)), stratify=digits.target, test_size=0.2, random_state=0
    )
    test = data.labelled_split("digits", "test", 8, "unused")
    for i in (0, 1, 359):
        image, label = test[i]
        expected = torch.as_tensor(digits.images[test_idx[i]], dtype=torch.float32) / 8 - 1
        assert torch.allclose(image[0], expected)
        assert label == digits.target[test_idx[i]]


def test_digits_are_deterministic_and_upsampled() -> None:
    first = data.labelled_split("digits", "train", 32, "unused")
    data._digits_tensors.cache_clear()
    second = data.labelled_split("digits", "train", 32, "unused")
    assert isinstance(first, data.TensorImages)
    assert isinstance(second, data.TensorImages)
    assert first.images is not second.images
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.images.shape == (1437, 3, 32, 32)
    assert first.images.min() >= -1.0
    assert first.images.max() <= 1.0


def test_digits_training_set_flips_at_random() -> None:
    plain = data.training_set("digits", 16, "unused", flip=False)
    flipping = data.training_set("digits", 16, "unused")
    assert len(flipping) == 1437
    original = plain[0][0]
    torch.manual_seed(0)
    seen = {torch.equal(flipping[0][0], original) for _ in range(30)}
    assert seen == {True, False}
    assert torch.equal(plain[0][0], original)


# --- folder:PATH ------------------------------------------------------------------------------


def write_folder(root: Path) -> None:
    """root/{train,test}/{cat,dog,eel}/ with PNGs in RGB, grayscale and RGBA."""
    for split, n in (("train", 3), ("test", 2)):
        for cls, mode in (("cat", "RGB"), ("dog", "L"), ("eel", "RGBA")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new(mode, (20, 30)).save(root / split / cls / f"{i}.png")


def test_folder_dataset(tmp_path: Path) -> None:
    write_folder(tmp_path)
    name = f"folder:{tmp_path}"
    info = data.dataset_info(name)
    assert info.num_classes == 3
    assert info.default_resolution == 32
    train = data.labelled_split(name, "train", 24, tmp_path)
    test = data.labelled_split(name, "test", 24, tmp_path)
    assert (len(train), len(test)) == (9, 6)
    assert [test[i][1] for i in range(len(test))] == [0, 0, 1, 1, 2, 2]
    for i in range(len(test)):
        assert_image(test[i][0], 24)
    assert len(data.training_set(name, 24, tmp_path)) == 9


def test_folder_fingerprint_follows_content(tmp_path: Path) -> None:
    write_folder(tmp_path)
    name = f"folder:{tmp_path}"
    before = data.split_fingerprint(name, "test", 32)
    assert before.startswith(f"folder:{tmp_path.resolve()}:test:32:")
    assert data.split_fingerprint(name, "test", 32) == before
    Image.new("RGB", (5, 5)).save(tmp_path / "test" / "cat" / "new.png")
    assert data.split_fingerprint(name, "test", 32) != before


@pytest.mark.parametrize("missing", ["train", "test"])
def test_folder_without_split_names_the_layout(tmp_path: Path, missing: str) -> None:
    write_folder(tmp_path)
    shutil.rmtree(tmp_path / missing)
    with pytest.raises(UserError, match=r"train/<class>/<images> and test/<class>/<images>"):
        data.labelled_split(f"folder:{tmp_path}", "test", 32, tmp_path)


def test_folder_with_mismatched_classes(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "test" / "fox").mkdir()
    with pytest.raises(UserError, match="same class subfolders"):
        data.dataset_info(f"folder:{tmp_path}")


# --- registry ---------------------------------------------------------------------------------


def test_dataset_info_defaults() -> None:
    assert data.dataset_info("cifar10") == datasets.DatasetInfo(
        "cifar10", 32, 10, (128, 256, 256, 256)
    )
    assert data.dataset_info("stl10").default_resolution == 64
    assert data.dataset_info("flowers102").num_classes == 102
    assert data.dataset_info("digits").default_channels == (32, 64, 64, 64)
    assert set(datasets.KNOWN_DATASETS) == {"cifar10", "stl10", "flowers102", "digits"}


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UserError, match="unknown dataset 'mnist'") as caught:
        data.training_set("mnist", 32, "unused")
    for name in (*datasets.KNOWN_DATASETS, "folder:PATH"):
        assert name in str(caught.value)


@pytest.mark.parametrize("resolution", [30, 0, -8, 4])
def test_bad_resolution(resolution: int) -> None:
    with pytest.raises(UserError, match=f"--resolution {resolution} .*multiple of 8"):
        data.labelled_split("digits", "test", resolution, "unused")
    with pytest.raises(UserError, match="multiple of 8"):
        data.training_set("digits", resolution, "unused")


def test_split_fingerprints() -> None:
    assert data.split_fingerprint("digits", "test", 16) == "digits:test:16:seed0:80-20"
    assert data.split_fingerprint("cifar10", "train", 32) == "cifar10:train:32"
    assert data.split_fingerprint("flowers102", "train", 64) == "flowers102:train:64"
    assert (
        data.split_fingerprint("flowers102", "train", 64, flowers_add_val=True)
        == "flowers102:train+val:64"
    )
    assert (
        data.split_fingerprint("flowers102", "test", 64, flowers_add_val=True)
        == "flowers102:test:64"
    )


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DDSWEEP_DATA", raising=False)
    assert data.default_data_dir() == Path("data")
    monkeypatch.setenv("DDSWEEP_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path


# --- the validation split --------------------------------------------------------------------


def test_the_validation_split_is_stratified_seeded_and_disjoint_from_fit_and_test(
    tmp_path: Path,
) -> None:
    train = data.labelled_split("digits", "train", 8, tmp_path)
    test = data.labelled_split("digits", "test", 8, tmp_path)
    labels = torch.tensor([int(train[i][1]) for i in range(len(train))])
    fit, val = data.validation_split(labels, 0.1, seed=0)
    assert len(val) == round(0.1 * len(labels)) and len(fit) + len(val) == len(labels)
    assert not set(fit.tolist()) & set(val.tolist())
    # Stratified: every class holds about a tenth of its images out.
    counts, held = torch.bincount(labels), torch.bincount(labels[val], minlength=10)
    assert ((held - 0.1 * counts).abs() <= 1).all()
    # Seeded: the same split again, another with another seed.
    assert torch.equal(data.validation_split(labels, 0.1, seed=0)[1], val)
    assert not torch.equal(data.validation_split(labels, 0.1, seed=1)[1], val)
    # No validation image is a test image (choices on validation never peek at test).
    test_images = {tuple(test[i][0].flatten().tolist()) for i in range(len(test))}
    assert not any(tuple(train[i][0].flatten().tolist()) in test_images for i in val.tolist())


def test_only_flowers_has_its_own_validation_split(tmp_path: Path) -> None:
    assert data.has_own_val("flowers102") and not data.has_own_val("digits")
    with pytest.raises(UserError, match="unknown split 'val' of digits"):
        data.labelled_split("digits", "val", 8, tmp_path)
