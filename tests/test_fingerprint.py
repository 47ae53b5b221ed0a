"""A folder dataset's fingerprint follows its pixels, not its file names and sizes: uncompressed
BMP images of a fixed size are rewritten with other pixels, at the same size and with their
modification time put back (as `cp -p` or `rsync -t` would leave them), and the feature cache
must serve the new pixels' features."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddsweep import data
from ddsweep.config.probe import ProbeConfig
from ddsweep.evaluate import split_features
from ddsweep.features import FeatureCache

SIZE = 8  # 8x8 RGB BMP: 246 bytes whatever the pixels


def write_bmp(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="BMP")


def write_folder(root: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                write_bmp(root / split / cls / f"{i}.bmp", seed=100 * c + 10 * i + len(split))


def rewrite_in_place(path: Path, seed: int) -> None:
    """Other pixels, same size, the old modification time put back."""
    st = path.stat()
    write_bmp(path, seed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def pixel_features(name: str, cache: FeatureCache, root: Path) -> torch.Tensor:
    """The pooled `pixels` features of the test split, through the feature cache."""
    cfg = ProbeConfig(pool="flatten")  # every pixel a feature
    feats, _secs, _passes = split_features(
        None, name, SIZE, ("pixels",), 0, cfg, cache, root, on_batch=None
    )
    return feats["test"]["pixels"][0]


def test_the_feature_cache_never_serves_features_of_pixels_since_changed(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_folder(root)
    name = f"folder:{root}"
    cache = FeatureCache(tmp_path / "cache")
    before = pixel_features(name, cache, tmp_path)
    assert len(list(cache.root.glob("*.safetensors"))) == 2  # train and test
    assert torch.equal(pixel_features(name, cache, tmp_path), before)  # a hit, the same

    changed = root / "test" / "cat" / "0.bmp"  # the first test image (ImageFolder sorts)
    rewrite_in_place(changed, seed=999)
    after = pixel_features(name, cache, tmp_path)
    fresh = pixel_features(name, FeatureCache(tmp_path / "fresh-cache"), tmp_path)
    assert torch.equal(after, fresh)  # what a cache that never saw the old pixels computes
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[1:], before[1:])
    # A new test entry; the old one stays, and the unchanged train split is a hit.
    assert len(list(cache.root.glob("*.safetensors"))) == 3


def test_the_fingerprint_trusts_a_file_s_stat_only_while_its_ctime_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each process hashes a folder's content once and then trusts the stat of its files; a
    # file rewritten at the same size with its mtime put back keeps size and mtime but not its
    # ctime (or its inode, when replaced by a rename).
    monkeypatch.setattr(data, "_RACY_NS", 200_000_000)
    root = tmp_path / "images"
    write_folder(root)
    name = f"folder:{root}"
    time.sleep(0.3)  # the files' ctimes now lie outside the racy window: their stat is trusted
    first = data.split_fingerprint(name, "test", SIZE)
    calls: list[Path] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        calls.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    assert data.split_fingerprint(name, "test", SIZE) == first
    assert calls == []  # nothing changed: the stat answered, no file was read

    rewrite_in_place(root / "test" / "dog" / "1.bmp", seed=7)
    second = data.split_fingerprint(name, "test", SIZE)
    assert second != first and len(calls) == 4  # the whole split hashed again

    # Replaced by a rename with the same size and mtime: a new inode.
    other = tmp_path / "other.bmp"
    target = root / "test" / "cat" / "0.bmp"
    st = target.stat()
    write_bmp(other, seed=8)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, target)
    assert data.split_fingerprint(name, "test", SIZE) not in (first, second)


def test_a_folder_changed_seconds_ago_is_hashed_on_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Within one timestamp tick a file can change again with an unchanged stat (git's "racy
    # clean" entries): a tree with a file that recent is never trusted to its stat.
    # "Recent" is an hour here, so a slow machine cannot carry the files out of the window.
    monkeypatch.setattr(data, "_RACY_NS", 3600 * 10**9)
    root = tmp_path / "images"
    write_folder(root)
    name = f"folder:{root}"
    data.split_fingerprint(name, "test", SIZE)
    calls: list[Path] = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: calls.append(self) or real(self))
    data.split_fingerprint(name, "test", SIZE)
    assert len(calls) == 4
