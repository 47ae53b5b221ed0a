"""Datasets decoded once into uint8 files: the same images as the per-image PIL path, read from
the file afterwards (the source is not opened again), decoded again when the source changes.
Tiny files in each dataset's own format, as tests/test_data.py writes them."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_data import skip_md5, write_cifar10, write_flowers102, write_folder, write_stl10

from ddsweep import data
from ddsweep.errors import UserError

__all__ = ["skip_md5"]  # the fixture, imported for the tests below


def items(ds: Any) -> tuple[torch.Tensor, list[int]]:
    got = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in got]), [int(y) for _, y in got]


def assert_same(decoded: Any, pil: Any) -> None:
    assert isinstance(decoded, data.DecodedImages)
    x_dec, y_dec = items(decoded)
    x_pil, y_pil = items(pil)
    assert y_dec == y_pil
    assert torch.equal(x_dec, x_pil)  # bit for bit: same PIL steps, same float arithmetic


def no_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, opening a dataset's files fails: only a decoded file can serve it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was opened again")

    monkeypatch.setattr(data, "_split_source", refuse)
    monkeypatch.setattr(data, "_training_source", refuse)


def test_cifar10_decoded_once_equals_the_pil_path(
    tmp_path: Path, skip_md5: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar10(tmp_path)
    for split in ("train", "test"):
        assert_same(
            data.probe_images("cifar10", split, 32, tmp_path),
            data.labelled_split("cifar10", split, 32, tmp_path),
        )
    assert_same(
        data.training_images("cifar10", 16, tmp_path, flip=False),
        data.training_set("cifar10", 16, tmp_path, flip=False),
    )
    files = sorted(p.name for p in data.decoded_dir().glob("*.json"))
    assert len(files) == 3  # train 32 px is shared by the probe split and training; 16 px
    no_source(monkeypatch)
    again = data.probe_images("cifar10", "test", 32, tmp_path)
    assert isinstance(again, data.DecodedImages)
    assert isinstance(again.pixels, np.memmap)  # memory-mapped, not read into memory
    assert len(again) == 6


def test_stl10_labelled_and_unlabelled(tmp_path: Path, skip_md5: None) -> None:
    labels = write_stl10(tmp_path)
    for split in ("train", "test"):
        assert_same(
            data.probe_images("stl10", split, 64, tmp_path),
            data.labelled_split("stl10", split, 64, tmp_path),
        )
    training = data.training_images("stl10", 32, tmp_path, flip=False)
    assert_same(training, data.training_set("stl10", 32, tmp_path, flip=False))
    assert items(training)[1] == [*labels["train"], -1, -1, -1, -1]


def test_flowers102_splits_and_training_set(tmp_path: Path, skip_md5: None) -> None:
    write_flowers102(tmp_path)
    for split, add_val in (("train", False), ("train", True), ("val", False), ("test", False)):
        assert_same(
            data.probe_images("flowers102", split, 32, tmp_path, flowers_add_val=add_val),  # type: ignore[arg-type]
            data.labelled_split("flowers102", split, 32, tmp_path, flowers_add_val=add_val),  # type: ignore[arg-type]
        )
    assert_same(
        data.training_images("flowers102", 16, tmp_path, flip=False),
        data.training_set("flowers102", 16, tmp_path, flip=False),
    )


def test_folder_dataset_and_a_changed_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    write_folder(root)
    name = f"folder:{root}"
    assert_same(
        data.probe_images(name, "test", 24, tmp_path),
        data.labelled_split(name, "test", 24, tmp_path),
    )
    before = items(data.probe_images(name, "test", 24, tmp_path))[0]
    from PIL import Image

    Image.new("RGB", (20, 30), (255, 0, 0)).save(root / "test" / "cat" / "0.png")
    after = data.probe_images(name, "test", 24, tmp_path)
    assert_same(after, data.labelled_split(name, "test", 24, tmp_path))
    assert not torch.equal(items(after)[0], before)  # not served from the old file


def test_a_changed_cifar_file_is_decoded_again(tmp_path: Path, skip_md5: None) -> None:
    write_cifar10(tmp_path)
    first = items(data.probe_images("cifar10", "test", 32, tmp_path))[0]
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    pixels = np.full((6, 3072), 77, dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump({"data": pixels, "labels": [0] * 6}, f)
    os.utime(path, ns=(1, 1))  # another time stamp, whatever the clock's resolution
    second = items(data.probe_images("cifar10", "test", 32, tmp_path))
    assert second[1] == [0] * 6 and not torch.equal(second[0], first)


def test_a_torn_decoded_file_is_decoded_again(tmp_path: Path, skip_md5: None) -> None:
    write_cifar10(tmp_path)
    data.probe_images("cifar10", "test", 32, tmp_path)
    (images,) = data.decoded_dir().glob("*.images.npy")
    images.write_bytes(images.read_bytes()[:-100])
    assert_same(
        data.probe_images("cifar10", "test", 32, tmp_path),
        data.labelled_split("cifar10", "test", 32, tmp_path),
    )


def test_offline_without_files_is_still_one_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz"):
        data.probe_images("cifar10", "test", 32, tmp_path)
    assert not list(data.decoded_dir().glob("*.json")) if data.decoded_dir().exists() else True


def test_batches_read_at_once_equal_item_by_item_with_flips(tmp_path: Path, skip_md5: None) -> None:
    write_cifar10(tmp_path, per_batch=4)
    rng = np.random.default_rng(0)  # pixels that a flip changes
    for b in range(1, 6):
        with open(tmp_path / "cifar-10-batches-py" / f"data_batch_{b}", "wb") as f:
            pixels = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
            pickle.dump({"data": pixels, "labels": [b] * 4}, f)
    ds = data.training_images("cifar10", 32, tmp_path, flip=True)
    torch.manual_seed(3)
    one_by_one = items(ds)
    torch.manual_seed(3)
    # A generator of its own, as train.make_loader gives: no draw from torch's global one.
    gen = torch.Generator()
    loader = torch.utils.data.DataLoader(
        ds, batch_size=len(ds), collate_fn=data.batch_collate(ds), generator=gen
    )
    ((x, y),) = list(loader)
    assert torch.equal(x, one_by_one[0]) and y.tolist() == one_by_one[1]
    flipped = sum(
        not torch.equal(a, b)
        for a, b in zip(
            x, items(data.probe_images("cifar10", "train", 32, tmp_path))[0], strict=True
        )
    )
    assert 0 < flipped < len(ds)


def test_features_cached_before_the_data_scheme_are_not_served(tmp_path: Path) -> None:
    """An entry stored under the key of ddsweep before decoded images (no data_scheme field)
    is never read as a feature of the new scheme: the lookup misses and extracts."""
    import dataclasses
    import hashlib
    import json

    from safetensors.torch import save_file

    from ddsweep.features import CacheKey, FeatureCache, FeatureRequest, cached_features

    split = data.labelled_split("digits", "test", 8, tmp_path)
    fp = data.split_fingerprint("digits", "test", 8)
    cache = FeatureCache(tmp_path / "cache")
    req = FeatureRequest(("pixels",))
    key = CacheKey("pixels", "ema", fp, 8, 0, 0, "avg", "pixels")
    assert key.data_scheme == data.DATA_SCHEME
    old_fields = {k: v for k, v in dataclasses.asdict(key).items() if k != "data_scheme"}
    old_digest = hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode()).hexdigest()[:32]
    assert old_digest != key.digest()
    n = len(split)  # type: ignore[arg-type]
    cache.root.mkdir(parents=True)
    stale = {"features": torch.full((n, 192), 7.0), "labels": torch.zeros(n, dtype=torch.long)}
    save_file(stale, str(cache.root / f"{old_digest}.safetensors"))
    got, _, ran = cached_features(lambda: None, "pixels", "ema", split, fp, 8, req, cache)
    assert ran  # extracted, not read from the old entry
    features, _ = got["pixels"]
    assert not torch.all(features == 7.0)
    assert torch.equal(features[0], split[0][0].flatten())  # type: ignore[index]
    assert cache.path(key).is_file()
