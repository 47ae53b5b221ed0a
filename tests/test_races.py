"""Commands started together: MLflow's first migration of a new store is done once, under a
lock, and every command works (issue 26)."""

from __future__ import annotations

import time
from pathlib import Path

import hooked  # pytest puts tests/ on the path
import pytest

# `python -c SETUP FOLDER I`: imports MLflow, says so (FOLDER/readyI), waits for FOLDER/go, then
# opens the folder's default tracking store (./mlflow.db) as every command does: all of them
# make their first query at the same moment.
SETUP = r"""
import os, sys, time
from pathlib import Path
folder, i = Path(sys.argv[1]), sys.argv[2]
os.chdir(folder)
import mlflow
from ddsweep import tracking
(folder / f"ready{i}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
tracking.setup()
print("tracking ready")
"""


@pytest.mark.slow  # three MLflow imports and a migration: ~15 s quiet, ~90 s on a busy machine
def test_three_commands_started_together_on_a_new_store_all_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with hooked.processes() as start:
        procs = [start(SETUP, str(tmp_path), str(i)) for i in range(3)]
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
            for p in procs:
                assert p.poll() is None, p.output()[1][-2000:]
            assert time.monotonic() < deadline, "the processes never got ready"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "tracking ready" in out
    assert (tmp_path / "mlflow.db").is_file()
