"""Damaged caches are never served: a feature-cache entry cut short, with its labels shifted or
its bytes flipped, an FID-statistics file with flipped bytes, a FIFO in an entry's place, each
is named in one warning line, removed and recomputed (built from the reproducers of issue 26).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ddsweep import features, integrity, predictions
from ddsweep.data import TensorImages
from ddsweep.fid import stats as fid_stats

REQ = features.FeatureRequest(("pixels",), pool="flatten")
SPLIT = "integrity-test:test:4"


def images() -> TensorImages:
    g = torch.Generator().manual_seed(0)
    return TensorImages(torch.rand(32, 3, 4, 4, generator=g) * 2 - 1, torch.arange(32) % 4)


def read(cache: features.FeatureCache) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features, labels, whether they were computed) of the test images through `cache`."""
    out, _secs, ran = features.cached_features(
        lambda: None, "pixels", "ema", images(), SPLIT, 4, REQ, cache
    )
    feats, labels = out["pixels"]
    return feats, labels, ran


def the_entry(cache: features.FeatureCache) -> Path:
    (entry,) = [p for p in cache.root.glob("*.safetensors") if not p.name.startswith(".")]
    return entry


def resave(
    path: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> None:
    """Rewrite a valid safetensors file with changed tensors and its metadata (digest too) kept,
    as a hand edit, a crash or another tool would leave it."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(change(load_file(str(path))), str(path), metadata=meta)


def flip(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "cut to 10 rows": lambda p: resave(p, lambda t: {k: v[:10] for k, v in t.items()}),
    "labels shifted by one": lambda p: resave(
        p, lambda t: {**t, "labels": torch.roll(t["labels"], 1)}
    ),
    "a data byte flipped": lambda p: flip(p, p.stat().st_size - 3),
    "a header byte flipped": lambda p: flip(p, 20),
    "the length prefix flipped": lambda p: flip(p, 6),
    "cut in half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_feature_cache_entry_is_named_removed_and_recomputed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    cache = features.FeatureCache(tmp_path / "cache")
    clean, labels, ran = read(cache)
    assert ran
    entry = the_entry(cache)
    DAMAGES[damage](entry)
    capsys.readouterr()

    again, again_labels, ran = read(cache)
    assert ran  # recomputed, never served
    assert torch.equal(again, clean) and torch.equal(again_labels, labels)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ddsweep: warning: feature-cache entry ") and str(entry) in line
    assert "removed" in line
    # What was written back is whole again: the next read is a silent hit.
    hit, _, ran = read(cache)
    assert not ran and torch.equal(hit, clean)
    assert capsys.readouterr().err == ""


def test_an_entry_without_a_digest_is_not_trusted(tmp_path: Path) -> None:
    cache = features.FeatureCache(tmp_path / "cache")
    clean, _, _ = read(cache)
    entry = the_entry(cache)
    tensors = load_file(str(entry))
    save_file(tensors, str(entry))  # the same tensors, as a writer without digests left them
    again, _, ran = read(cache)
    assert ran and torch.equal(again, clean)


def test_a_fifo_in_an_entry_s_place_is_refused_without_blocking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = features.FeatureCache(tmp_path / "cache")
    clean, _, _ = read(cache)
    entry = the_entry(cache)
    entry.unlink()
    os.mkfifo(entry)  # opening it for reading would block until a writer came
    results: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    reader = threading.Thread(target=lambda: results.append(read(cache)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the reader blocked on the FIFO"
    ((again, _, ran),) = results
    assert ran and torch.equal(again, clean)
    assert "not a regular file" in capsys.readouterr().err
    assert entry.is_file()  # the FIFO is gone, the recomputed entry in its place


def stats(seed: int = 0) -> fid_stats.RealStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    return fid_stats.RealStats(x.mean(0), torch.cov(x.T), 20)


def test_fid_statistics_with_flipped_bytes_are_recomputed_not_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fid" / "stats.safetensors"
    fid_stats.save_stats(path, stats(), {"version": "1"})
    loaded = fid_stats.load_stats(path, 4)
    assert loaded is not None and torch.equal(loaded.cov, stats().cov)
    flip(path, path.stat().st_size - 20)  # inside the covariance: it would give fd = nan
    assert fid_stats.load_stats(path, 4) is None
    assert "FID statistics file" in capsys.readouterr().err
    assert not path.exists()


def test_fid_statistics_that_are_not_finite_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    bad = dataclasses.replace(stats(), cov=torch.full((4, 4), float("nan"), dtype=torch.float64))
    fid_stats.save_stats(path, bad, {"version": "1"})
    assert fid_stats.load_stats(path, 4) is None


def test_predictions_are_checked_before_use(tmp_path: Path) -> None:
    path = tmp_path / predictions.FILE
    pred, label = np.arange(10) % 3, np.arange(10) % 2
    predictions.save(path, {"test": (pred, label)})
    got = predictions.load(path)
    assert np.array_equal(got["test"][0], pred) and np.array_equal(got["test"][1], label)
    flip(path, path.stat().st_size - 5)
    with pytest.raises(integrity.Damaged, match="digest"):
        predictions.load(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(integrity.Damaged):
        predictions.load(path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(integrity.Damaged, match="not a regular file"):
        predictions.load(path)


def test_predictions_of_before_digests_are_read_on_their_format(tmp_path: Path) -> None:
    from safetensors.numpy import save_file as save_numpy

    path = tmp_path / predictions.FILE
    pred = np.arange(6, dtype=np.int32)
    save_numpy({"test.pred": pred, "test.label": pred}, str(path))
    assert np.array_equal(predictions.load(path)["test"][0], pred)
    save_numpy({"test.pred": pred, "test.label": pred[:3]}, str(path))
    with pytest.raises(integrity.Damaged, match="disagree"):
        predictions.load(path)


def test_seal_keeps_the_data_and_safetensors_reads_the_result(tmp_path: Path) -> None:
    from safetensors.torch import save

    tensors = {"a": torch.arange(5, dtype=torch.int16), "b": torch.ones(2, 3)}
    blob = integrity.seal(save(tensors, metadata={"x": "1"}))
    meta = integrity.check(blob)
    assert meta["x"] == "1" and integrity.DIGEST_KEY in meta
    path = tmp_path / "t.safetensors"
    path.write_bytes(blob)
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
