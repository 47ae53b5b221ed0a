"""Python subprocesses that stop at a deterministic point (a hook writes a marker file there),
for tests that signal them exactly at that point. Not a test module: imported by test_signals
and test_cache_kill (pytest puts tests/ on the path)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

Start = Callable[..., "subprocess.Popen[str]"]


@contextlib.contextmanager
def processes() -> Iterator[Start]:
    """start(SCRIPT, *ARGS) runs `python -c SCRIPT ARGS` with one thread per library and its
    output captured; any process still alive (or stopped) at the end is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(script: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


def reach(proc: subprocess.Popen[str], marker: Path, timeout: float = 180) -> str:
    """Wait until `proc` writes `marker` at its hook; the marker's text."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before its hook: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the process never reached its hook"
        time.sleep(0.01)
    return marker.read_text()


def seen_devices(folder: Path) -> None:
    """A spawned worker's body that imports nothing heavy (tests/test_devices.py): write the
    CUDA_VISIBLE_DEVICES it started with."""
    (folder / f"{os.getpid()}.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
