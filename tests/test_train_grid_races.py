"""`ddsweep study train-grid` trains each backbone exactly once: under a race of two commands on
one study (the second waits for the first, then adopts its run) and after a trainer is killed
(its backbone is resumed, not trained anew). Real processes, a real journal, a real MLflow
store; every wait is on a marker or on what the storage says, never on a sleep."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import hooked  # pytest puts tests/ on the path
import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.usefixtures("workdir", "one_torch_thread"), pytest.mark.slow]

STUDY = "tiny"
SWEEP = """\
study: tiny
kind: probe-grid
axes:
  dataset: [digits]
  resolution: [16]
  attention: [true]
  block: [pixels, mid]
  probe: [knn]
  k: [5]
train:
  epochs: 2
  checkpoint_every: 1
  max_steps: 2
  channels: [32, 32, 32, 32]
  sample_every: 0
"""

# argv: WHERE (backbones: before the training starts; epochs: once its run exists), MARKER,
# RELEASE. The hook writes MARKER, then waits for RELEASE before going on; then train-grid.
TRAINER = """
import os, sys, time
from pathlib import Path
where, marker, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
from ddsweep import backbones, train
def hold():
    marker.write_text(str(os.getpid()))
    while not release.exists():
        time.sleep(0.01)
if where == "backbones":
    real = backbones.train
    def hooked(*a, **k):
        hold()
        return real(*a, **k)
    backbones.train = hooked
else:
    real_epochs = train.run_epochs
    def hooked_epochs(*a, **k):
        hold()
        return real_epochs(*a, **k)
    train.run_epochs = hooked_epochs
from ddsweep import cli
sys.argv = ["ddsweep", "study", "train-grid", "--study", "tiny"]
cli.main()
"""


@pytest.fixture
def sweep_file(workdir: str) -> None:
    Path("sweeps").mkdir()
    Path("sweeps", f"{STUDY}.yaml").write_text(SWEEP)


def training_runs() -> list[tuple[str, str]]:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, "tags.`ddsweep.kind` = 'train'")
    return sorted((r.info.run_id, r.info.status) for r in runs)


def test_two_train_grids_at_once_train_the_backbone_once(sweep_file: None, tmp_path: Path) -> None:
    with hooked.processes() as start:
        release = tmp_path / "release"
        first = start(TRAINER, "backbones", str(tmp_path / "first"), str(release))
        hooked.reach(first, tmp_path / "first")  # holds the backbone, not yet trained
        second = start(TRAINER, "backbones", str(tmp_path / "second"), str(release))
        # The second either says it waits for the first or, as before train-grid was
        # exactly-once, reaches its own training.
        deadline = time.monotonic() + 240
        while "waiting for it" not in second.output()[0] and not (tmp_path / "second").exists():
            assert second.poll() is None, second.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the second command did nothing"
            time.sleep(0.05)
        release.touch()
        said = []
        for proc in (first, second):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            said.append(out)
    assert not (tmp_path / "second").exists(), "the second command trained the backbone too"
    ((run_id, status),) = training_runs()
    assert status == "FINISHED"
    # Both say which run the backbone is.
    assert f"run {run_id} (trained)" in said[0] and f"run {run_id} (reused)" in said[1], said


def test_a_killed_trainers_backbone_is_resumed_by_the_next_command(
    sweep_file: None, tmp_path: Path
) -> None:
    from ddsweep import backbones, scheduler
    from ddsweep.config import sweep

    with hooked.processes() as start:
        first = start(TRAINER, "epochs", str(tmp_path / "first"), str(tmp_path / "never"))
        hooked.reach(first, tmp_path / "first")  # its run exists, epoch 0 is saved
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    ((killed, status),) = training_runs()
    assert status == "RUNNING"  # left by the dead trainer

    cfg = sweep.load_study(STUDY)
    assert cfg is not None
    fast = scheduler.Policy(heartbeat_interval=1, grace_period=2)  # the dead never beat again
    done = backbones.ensure_all(cfg, Path("data"), policy=fast)
    ((_, run_id, how),) = done
    assert (run_id, how) == (killed, "resumed")
    assert training_runs() == [(killed, "FINISHED")]
    # ...and a third command finds it done.
    assert [how for _, _, how in backbones.ensure_all(cfg, Path("data"), policy=fast)] == ["reused"]
