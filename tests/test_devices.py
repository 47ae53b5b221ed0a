"""One worker per GPU: each spawned worker of a study starts with its own CUDA_VISIBLE_DEVICES
(worker i on chosen GPU i mod G), tested with a faked device count in the spawning process; the
spawned processes are real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hooked import seen_devices

from ddsweep import devices, study
from ddsweep.errors import UserError


@pytest.fixture
def three_gpus(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """This process sees three GPUs; set_device is recorded instead of done."""
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return current


def spawned(tmp_path: Path, opts: study.RunOptions) -> list[str]:
    procs = study.start_workers(opts, seen_devices, (tmp_path,))
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return sorted(p.read_text() for p in tmp_path.glob("*.txt"))


@pytest.mark.slow  # spawns three Python processes
def test_each_spawned_worker_sees_its_own_gpu(tmp_path: Path, three_gpus: list[int]) -> None:
    # Worker 0 is this process (current device 0); workers 1..3 get GPUs 1, 2, 0.
    assert spawned(tmp_path, study.RunOptions(workers=4)) == ["0", "1", "2"]
    assert three_gpus == [0]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # this process's own is left as it was


def test_gpus_chooses_and_names_follow_the_parents_visible_devices(
    three_gpus: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert devices.plan(4, (2, 0)) == ["2", "0", "2", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,7")  # this process sees three of eight
    assert devices.plan(3) == ["4", "5", "7"]
    assert devices.plan(2, (2,)) == ["7", "7"]  # two workers share one GPU
    devices.use_here("7")
    assert three_gpus == [2]


@pytest.mark.slow
def test_gpus_spawned_with_a_choice(tmp_path: Path, three_gpus: list[int]) -> None:
    assert spawned(tmp_path, study.RunOptions(workers=3, gpus=(2, 0))) == ["0", "2"]
    assert three_gpus == [2]


def test_no_gpu_places_nothing_and_a_missing_gpu_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.plan(3) == [None, None, None]
    with pytest.raises(UserError, match="shows no GPU"):
        devices.plan(2, (0,))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"--gpus 1,3: this machine shows GPUs 0\.\.1"):
        devices.plan(2, (1, 3))
    for bad in ("a,b", "0,0", "-1"):
        with pytest.raises(UserError, match="--gpus"):
            devices.parse_gpus(bad)
    assert devices.parse_gpus("0, 2,3") == (0, 2, 3) and devices.parse_gpus(None) is None
