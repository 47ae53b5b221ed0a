"""Python subprocesses that stop at a deterministic point (a hook writes a marker file there),
for tests that signal them exactly at that point. Not a test module: imported by test_signals
and test_cache_kill (pytest puts tests/ on the path)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

Start = Callable[..., "Logged"]


# First in every script: Ctrl-C as KeyboardInterrupt even when the suite runs in the background
# of a shell (`pytest &`), whose jobs inherit SIGINT ignored, which Python then leaves ignored.
CTRL_C_ON = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


class Logged:
    """A subprocess whose stdout and stderr go to files, not pipes: a chatty process never blocks
    on a full pipe that nobody reads. Everything but `communicate` is the Popen's own."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._out = (folder / "stdout").open("w+")
        self._err = (folder / "stderr").open("w+")
        self.popen = subprocess.Popen(args, env=env, stdout=self._out, stderr=self._err, text=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.popen, name)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (at most `timeout` s); (stdout, stderr) so far."""
        self.popen.wait(timeout=timeout)
        return self.output()

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) written so far, without waiting."""
        texts = []
        for f in (self._out, self._err):
            f.flush()
            texts.append(Path(f.name).read_text())
        return texts[0], texts[1]

    def close(self) -> None:
        self._out.close()
        self._err.close()


@contextlib.contextmanager
def processes() -> Iterator[Start]:
    """start(SCRIPT, *ARGS) runs `python -c SCRIPT ARGS` with one thread per library, its output
    written to files (see Logged); any process still alive (or stopped) at the end is killed."""
    started: list[Logged] = []
    logs = Path(tempfile.mkdtemp(prefix="hooked-"))

    def start(script: str, *args: str) -> Logged:
        proc = Logged(
            [sys.executable, "-c", CTRL_C_ON + script, *args],
            {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            logs / str(len(started)),
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.popen.wait(timeout=30)
            proc.close()
        shutil.rmtree(logs, ignore_errors=True)


def reach(proc: Logged, marker: Path, timeout: float = 180) -> str:
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
