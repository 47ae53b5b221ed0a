"""A process killed (SIGKILL) while it writes a feature-cache entry, or while it holds the
entry's lock: the next reader waits for a live holder, recomputes after a dead one, and never
reads a torn entry. The writer stops at a deterministic point (a hook that writes a marker file
and waits), so the kill lands exactly there."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hooked  # pytest puts tests/ on the path
import pytest
import torch
from safetensors.torch import save_file

from ddsweep import features
from ddsweep.data import TensorImages

REQ = features.FeatureRequest(("pixels",), pool="flatten")
SPLIT = "kill-test:test:8"

# `python -c WRITER MODE DIR`: fills the cache DIR/cache for the images in DIR/images.safetensors
# and stops, having written DIR/at:
# MODE "writing": with the entry's temp file half written, for good;
# MODE "locked": holding the lock, before extracting, until DIR/go exists (then it goes on).
WRITER = r"""
import sys, time
from pathlib import Path
from safetensors.torch import load_file
from ddsweep import features
from ddsweep.data import TensorImages
mode, folder = sys.argv[1], Path(sys.argv[2])
def stop_here(wait_for_go):
    (folder / "at.tmp").write_text(mode)
    (folder / "at.tmp").rename(folder / "at")
    while not (wait_for_go and (folder / "go").exists()):
        time.sleep(0.01)
if mode == "writing":
    from ddsweep import integrity
    def torn(filename, blob):
        Path(filename).write_bytes(blob[: len(blob) // 2])  # the kill lands mid-write
        stop_here(False)
    integrity.write = torn
else:
    real_extract = features.extract
    def held(*a, **k):
        stop_here(True)
        return real_extract(*a, **k)
    features.extract = held
t = load_file(str(folder / "images.safetensors"))
req = features.FeatureRequest(("pixels",), pool="flatten")
cache = features.FeatureCache(folder / "cache")
features.cached_features(
    lambda: None, "pixels", "ema", TensorImages(t["images"], t["labels"]), "kill-test:test:8",
    8, req, cache,
)
"""


def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    return x, torch.arange(64) % 4


def read(cache: features.FeatureCache) -> tuple[torch.Tensor, bool]:
    """The features of the test images through `cache`, and whether they were computed."""
    x, y = images()
    out, _secs, ran = features.cached_features(
        lambda: None, "pixels", "ema", TensorImages(x, y), SPLIT, 8, REQ, cache
    )
    return out["pixels"][0], ran


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Any]:
    """writer(MODE) -> the process (see WRITER), stopped at its hook; killed at the end."""
    x, y = images()
    save_file({"images": x.contiguous(), "labels": y.contiguous()}, tmp_path / "images.safetensors")
    with hooked.processes() as run:

        def start(mode: str) -> subprocess.Popen[str]:
            proc = run(WRITER, mode, str(tmp_path))
            hooked.reach(proc, tmp_path / "at", timeout=120)
            return proc

        yield start


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def expected(tmp_path: Path) -> torch.Tensor:
    feats, ran = read(features.FeatureCache(tmp_path / "reference"))
    assert ran
    return feats


def test_a_writer_killed_mid_write_leaves_no_entry_and_no_temp_file(
    tmp_path: Path, writer: Any
) -> None:
    cache = features.FeatureCache(tmp_path / "cache")
    kill(writer("writing"))
    (torn,) = [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]
    assert torn.stat().st_size > 0  # half an entry, under a name no reader looks up
    assert [p for p in cache.root.iterdir() if not p.name.startswith(".")] == []  # no entry
    feats, ran = read(cache)
    assert ran  # recomputed, not read from the torn file
    assert torch.equal(feats, expected(tmp_path))
    assert not torn.exists()  # the next writer of the entry removed what the dead one left
    again, ran = read(cache)
    assert not ran and torch.equal(again, feats)  # the entry written over the dead one's


@pytest.mark.parametrize("end", ["killed", "finishes"])
def test_a_reader_waits_for_the_lock_holder_and_recomputes_after_a_dead_one(
    tmp_path: Path, writer: Any, end: str
) -> None:
    cache = features.FeatureCache(tmp_path / "cache")
    holder = writer("locked")
    looked: list[int] = []
    real_get_many = cache.get_many

    def counting(keys: Any) -> Any:
        looked.append(1)
        return real_get_many(keys)

    cache.get_many = counting  # type: ignore[method-assign]
    results: list[tuple[torch.Tensor, bool]] = []
    reader = threading.Thread(target=lambda: results.append(read(cache)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not looked:  # a miss: the reader now asks for the lock
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)
    assert reader.is_alive() and looked == [1]  # blocked on the lock, not reading or computing

    if end == "killed":
        kill(holder)  # the kernel releases a dead process's lock
    else:
        (tmp_path / "go").touch()
        holder.communicate(timeout=60)
        assert holder.returncode == 0
    reader.join(timeout=60)
    ((feats, ran),) = results
    assert ran is (end == "killed")  # computed after a dead holder; read after a live one
    assert torch.equal(feats, expected(tmp_path))
