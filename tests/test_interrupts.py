"""Ctrl-C (SIGINT) and SIGTERM of `ddsweep train`, `ddsweep study train-grid`, `ddsweep study
fid-grid` and `ddsweep study probe-grid --follow` (issue 26): exit status 130 (SIGTERM ends a
command as Ctrl-C does, see `ddsweep.cli`), no training or trial run left RUNNING, and the re-run
reaches what an uninterrupted run of the same seed reaches: the same weights bit for bit (every
tensor of the last checkpoint's safetensors files, torch.equal), the same FID and top-1 values.

Each command runs as a real `python -c HOOK ...` process that stops at a deterministic point (a
training step, or the N-th evaluation of a study) and writes a marker there; the signal is sent
once the marker is there, so no signal races the work it interrupts.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import hooked  # pytest puts tests/ on the path
import pytest
import test_study
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddsweep import checkpoints
from ddsweep.cli import app
from ddsweep.tracking import runs
from ddsweep.tracking.schema import KIND_TAG, POINT_TAG, STUDY_TAG

IsolatedStore = Callable[[Path], AbstractContextManager[str]]  # conftest's isolated_store

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

# A 3-level, 32-wide U-Net at 8 px, two epochs of 22 steps: seconds on one CPU thread.
EPOCHS = 2
BATCH = 64
STEPS_PER_EPOCH = 1437 // BATCH  # digits' 80 % train split, drop_last
CUT_AT_STEP = STEPS_PER_EPOCH + 5  # inside epoch 2, after epoch 1's checkpoint and resume state
TRAIN = {
    "epochs": EPOCHS,
    "batch_size": BATCH,
    "checkpoint_every": 1,
    "lr": 0.001,
    "resolution": 8,
    "channels": [32, 32, 32],
    "sample_every": 0,
}
TRAIN_ARGS = ["train", "digits", "--device", "cpu"]
for _key, _value in TRAIN.items():
    _flag = "--" + _key.replace("_", "-")
    TRAIN_ARGS += [_flag, ",".join(map(str, _value)) if isinstance(_value, list) else str(_value)]
STUDY = "cut"
SIGNALS = [signal.SIGINT, signal.SIGTERM]

# `python -c HOOK WHERE N MARKER ARGS...` runs `ddsweep ARGS...` and, at its N-th training step
# (WHERE "step"), at the start of its N-th study evaluation (WHERE "evaluate") or at its N-th
# sleep between a follower's looks (WHERE "sleep"), writes MARKER and waits there until a signal
# ends it.
HOOK = r"""
import sys, time
from pathlib import Path
where, n, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
del sys.argv[1:4]
from ddsweep import cli, objectives, train
calls = [0]
def hold():
    calls[0] += 1
    if calls[0] == n:
        marker.with_suffix(".tmp").write_text(str(n))
        marker.with_suffix(".tmp").rename(marker)  # whole, or not there yet
        while True:
            time.sleep(0.01)
if where == "step":
    real_step = train.batch_step
    def batch_step(job, x0):
        hold()
        return real_step(job, x0)
    train.batch_step = batch_step
elif where == "sleep":
    import ddsweep.study
    real_sleep = time.sleep
    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)
        def sleep(self, seconds):
            hold()
            real_sleep(seconds)
    ddsweep.study.time = Clock()
else:
    real_evaluate = objectives.Objective.evaluate
    def evaluate(self, point):
        hold()
        return real_evaluate(self, point)
    objectives.Objective.evaluate = evaluate
cli.main()
"""


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def all_runs(query: str = "") -> list[Any]:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(exps, query, max_results=1000))


def interrupt(where: str, n: int, sig: signal.Signals, folder: Path, *args: str) -> str:
    """Run `ddsweep ARGS` until its hook (see HOOK), send `sig`; its stderr. It must end with
    exit status 130, the interrupted line and no traceback."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "at"
    with hooked.processes() as start:
        proc = start(HOOK, where, str(n), str(marker), *args)
        hooked.reach(proc, marker, timeout=600)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; what was recorded is kept" in err
    assert "Traceback" not in err
    return err


def assert_nothing_running() -> None:
    """No run of the store is left RUNNING but a study's parent, which stays RUNNING by design
    while points of its grid are left (StudyRecorder.close)."""
    left = [r for r in all_runs() if r.info.status == "RUNNING"]
    assert [r.data.tags.get(KIND_TAG) for r in left] in ([], ["study"]), [
        (r.data.tags.get(KIND_TAG), r.info.run_name) for r in left
    ]


# --- training: train and train-grid ----------------------------------------------------------


def write_study(folder: Path) -> None:
    """A train-grid study of one backbone trained as TRAIN_ARGS trains it."""
    doc = {
        "study": STUDY,
        "kind": "probe-grid",
        "axes": {"dataset": ["digits"], "resolution": [8], "attention": [True]},
        "train": {k: v for k, v in TRAIN.items() if k != "resolution"},
    }
    (folder / "sweeps").mkdir(exist_ok=True)
    (folder / "sweeps" / f"{STUDY}.yaml").write_text(yaml.safe_dump(doc))


COMMANDS = {
    "train": TRAIN_ARGS,
    "train-grid": ["study", "train-grid", "--study", STUDY],
}


def last_weights(run_id: str, dst: Path) -> dict[str, Any]:
    """Every tensor of the EMA and raw safetensors files of the run's last checkpoint."""
    folder = Path(runs.download_checkpoint(run_id, EPOCHS, dst))
    sub = {"ema": folder, "raw": folder / checkpoints.RAW}
    return {w: load_file(str(p / checkpoints.WEIGHTS_FILE)) for w, p in sub.items()}


def assert_same_tensors(got: dict[str, Any], want: dict[str, Any]) -> None:
    import torch

    for weights in ("ema", "raw"):
        assert got[weights].keys() == want[weights].keys()
        same = [k for k in got[weights] if torch.equal(got[weights][k], want[weights][k])]
        assert len(same) == len(want[weights]), f"{weights}: {len(same)} of {len(want)} equal"


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, isolated_store: IsolatedStore, one_torch_thread: None
) -> dict[str, dict[str, Any]]:
    """{command: the last checkpoint's tensors of an uninterrupted run of it}."""
    out = {}
    for name, args in COMMANDS.items():
        folder = tmp_path_factory.mktemp(f"uninterrupted-{name}")
        with isolated_store(folder):
            write_study(folder)
            invoke(*args)
            (run,) = all_runs(f"tags.`{KIND_TAG}` = 'train'")
            assert run.info.status == "FINISHED"
            out[name] = last_weights(run.info.run_id, folder / "weights")
    return out


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_interrupted_training_exits_130_and_resumes_to_the_uninterrupted_weights(
    command: str,
    sig: signal.Signals,
    uninterrupted: dict[str, dict[str, Any]],
    workdir: str,
    tmp_path: Path,
) -> None:
    write_study(tmp_path)
    interrupt("step", CUT_AT_STEP, sig, tmp_path / "hook", *COMMANDS[command])
    (cut,) = all_runs(f"tags.`{KIND_TAG}` = 'train'")
    assert cut.info.status in ("FAILED", "KILLED"), cut.info.status
    assert_nothing_running()
    run_id = cut.info.run_id

    if command == "train":
        invoke("train", "--resume", run_id)
    else:
        assert f"run {run_id} (resumed)" in invoke(*COMMANDS[command])
    (run,) = all_runs(f"tags.`{KIND_TAG}` = 'train'")  # the same run, resumed, and no other
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert_same_tensors(last_weights(run_id, tmp_path / "weights"), uninterrupted[command])


# --- studies: fid-grid and probe-grid --follow -----------------------------------------------


# The tiny trained backbone of test_study: an ended training with epochs 0 and 1.
backbone = test_study.backbone


FID = ["--feature", "randconv", "--samples", "16", "--sampler", "ddim", "--steps", "3"]
STUDIES = {
    "fid-grid": ["study", "fid-grid", "--study", STUDY, "--dataset", "digits", "--resolution", "8",
                 *FID],
    "follow": ["study", "probe-grid", "--study", STUDY, "--dataset", "digits", "--resolution",
               "8", "--block", "mid", "--block", "up4", "--probe", "knn", "--k", "5", "--follow",
               "--follow-interval", "0.5", "--heartbeat-interval", "1", "--grace-period", "3"],
}  # fmt: skip
POINTS = {"fid-grid": 2, "follow": 4}  # epochs 0 and 1 (x 2 blocks for the probe grid)
METRIC = {"fid-grid": "fd_randconv", "follow": "top1"}


@contextlib.contextmanager
def home_from(backbone: Any, folder: Path, isolated_store: IsolatedStore) -> Iterator[Path]:
    """Work in `folder` on a copy of the backbone's store (its artifacts stay where they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    with isolated_store(folder):
        shutil.copyfile(backbone.folder / "mlflow.db", folder / "mlflow.db")
        yield folder


@pytest.fixture
def study_home(backbone: Any, tmp_path: Path, isolated_store: IsolatedStore) -> Iterator[Path]:
    with home_from(backbone, tmp_path / "home", isolated_store) as folder:
        yield folder


def point_values(kind: str) -> dict[str, float]:
    """{point: its metric} over the study's FINISHED trial runs, each point once."""
    found = all_runs(f"tags.`{STUDY_TAG}` = '{STUDY}' and attributes.status = 'FINISHED'")
    trials = [r for r in found if POINT_TAG in r.data.tags]
    values = {r.data.tags[POINT_TAG]: r.data.metrics[METRIC[kind]] for r in trials}
    assert len(values) == len(trials) == POINTS[kind], sorted(
        r.data.tags[POINT_TAG] for r in trials
    )
    return values


@pytest.fixture(scope="module")
def uninterrupted_values(
    backbone: Any, tmp_path_factory: pytest.TempPathFactory, isolated_store: IsolatedStore,
    one_torch_thread: None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    out = {}
    for kind, args in STUDIES.items():
        with home_from(backbone, tmp_path_factory.mktemp(kind), isolated_store):
            invoke(*args)
            out[kind] = point_values(kind)
    return out


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(STUDIES))
def test_an_interrupted_study_exits_130_and_its_rerun_reaches_the_uninterrupted_values(
    kind: str,
    sig: signal.Signals,
    study_home: Path,
    uninterrupted_values: dict[str, dict[str, float]],
) -> None:
    interrupt("evaluate", 2, sig, study_home / "hook", *STUDIES[kind])
    assert_nothing_running()
    done = all_runs(f"tags.`{STUDY_TAG}` = '{STUDY}' and attributes.status = 'FINISHED'")
    assert len([r for r in done if POINT_TAG in r.data.tags]) == 1  # the first point only

    again = invoke(*STUDIES[kind])
    assert (
        f"{POINTS[kind]}/{POINTS[kind]} points complete ({POINTS[kind] - 1} evaluated now"
        in (again.strip().splitlines()[-1])
    )
    assert point_values(kind) == uninterrupted_values[kind]
    assert_nothing_running()
    (parent,) = all_runs(f"tags.`{KIND_TAG}` = 'study'")
    assert parent.info.status == "FINISHED"


def test_a_follower_interrupted_while_it_waits_for_a_training_exits_130(
    workdir: str, tmp_path: Path
) -> None:
    """No training run yet: the follower waits (sleeps between looks) and Ctrl-C ends it."""
    interrupt("sleep", 1, signal.SIGINT, tmp_path / "hook", *STUDIES["follow"])
    assert_nothing_running()


# --- a follower between a checkpoint's files and its resume state ------------------------------

# `python -c HELD MARKERS ddsweep train ...`: holds the training twice, each time writing a marker
# and waiting for a "go" file: once epoch 1's checkpoint files are logged but not the resume state
# that vouches for them (MARKERS/held, MARKERS/go), and once more before the run ends, its
# checkpoints all complete (MARKERS/ending, MARKERS/go2).
HELD = r"""
import json, sys, time
from pathlib import Path
markers = Path(sys.argv[1])
del sys.argv[1]
from ddsweep import cli
from ddsweep.tracking.training import TrainingTracker
def hold(name, go):
    (markers / f"{name}.tmp").touch()
    (markers / f"{name}.tmp").rename(markers / name)
    while not (markers / go).exists():
        time.sleep(0.01)
real_resume, real_finish = TrainingTracker.log_resume_state, TrainingTracker.finish
def log_resume_state(self, folder):
    if json.loads((folder / "state.json").read_text())["epoch"] == 1:
        hold("held", "go")
    return real_resume(self, folder)
def finish(self, last_epoch):
    hold("ending", "go2")
    return real_finish(self, last_epoch)
TrainingTracker.log_resume_state, TrainingTracker.finish = log_resume_state, finish
cli.main()
"""
# `python -c LOOKS MARKERS ddsweep study probe-grid --follow ...`: a follower that appends one line
# per look at the training run (backbones.ready_epochs) to MARKERS/looks: the epochs it found
# ready, and whether the trainer was held between the files and the state for the whole look.
LOOKS = r"""
import json, sys
from pathlib import Path
markers = Path(sys.argv[1])
del sys.argv[1]
from ddsweep import backbones, cli
real = backbones.ready_epochs
def held():
    return (markers / "held").exists() and not (markers / "go").exists()
def ready_epochs(run_id):
    before = held()
    epochs, ended = real(run_id)
    with open(markers / "looks", "a") as f:
        f.write(json.dumps({"epochs": list(epochs), "held": before and held()}) + "\n")
    return epochs, ended
backbones.ready_epochs = ready_epochs
cli.main()
"""
FOLLOW = [
    "study", "probe-grid", "--study", STUDY, "--dataset", "digits", "--resolution", "8",
    "--block", "mid", "--probe", "knn", "--k", "5", "--follow", "--follow-interval", "0.2",
]  # fmt: skip
FOLLOWED_TRAINING = ["train", "digits", "--device", "cpu", "--resolution", "8", "--channels",
                     "32,32,32", "--epochs", "2", "--batch-size", "1024", "--checkpoint-every",
                     "1", "--sample-every", "0"]  # fmt: skip


def looks(markers: Path) -> list[dict[str, Any]]:
    import json

    path = markers / "looks"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def probed_epochs() -> list[int]:
    found = all_runs(f"tags.`{STUDY_TAG}` = '{STUDY}' and attributes.status = 'FINISHED'")
    return sorted(int(r.data.params["epoch"]) for r in found if POINT_TAG in r.data.tags)


def until(what: Callable[[], bool], *procs: Any, timeout: float = 600) -> None:
    """Wait until `what()` holds (each process still running), at most `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not what():
        for p in procs:
            assert p.poll() is None, p.output()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_follower_probes_no_checkpoint_before_its_resume_state_then_probes_it_in_time(
    workdir: str, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    with hooked.processes() as start:
        trainer = start(HELD, str(markers), *FOLLOWED_TRAINING)
        follower = start(LOOKS, str(markers), *FOLLOW)
        hooked.reach(trainer, markers / "held", timeout=600)
        (run,) = all_runs(f"tags.`{KIND_TAG}` = 'train'")
        assert runs.saved_epochs(run.info.run_id) == [0, 1]  # epoch 1's files are there
        # Epoch 0 probed, and two whole looks taken while the trainer is held.
        until(lambda: 0 in probed_epochs() and sum(x["held"] for x in looks(markers)) >= 2,
              trainer, follower)  # fmt: skip
        assert all(x["epochs"] == [0] for x in looks(markers) if x["held"])
        assert probed_epochs() == [0]  # epoch 1 not probed: its resume state is not there

        (markers / "go").touch()
        hooked.reach(trainer, markers / "ending", timeout=600)
        # The training has not ended (the trainer is held before it ends its run): the follower
        # probes epochs 1 and 2 now, not once the training is over.
        until(lambda: probed_epochs() == [0, 1, 2], trainer, follower)
        (run,) = all_runs(f"tags.`{KIND_TAG}` = 'train'")
        assert run.info.status == "RUNNING"
        (markers / "go2").touch()
        for proc in (trainer, follower):
            _out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    assert probed_epochs() == [0, 1, 2]
