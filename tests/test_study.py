"""Studies end to end: `ddsweep study probe-grid` on a real Optuna journal and a real MLflow
sqlite store, with a tiny digits backbone; exactly once across re-runs, concurrent workers,
killed workers and failing trials.

Every count of "evaluated" comes from MLflow's FINISHED child runs, not only from Optuna.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from ddsweep import checkpoints, evaluate, features, scheduler, selection, study, tracking
from ddsweep.cli import app
from ddsweep.config import points, sweep
from ddsweep.config.model import ModelConfig
from ddsweep.config.train import TrainConfig
from ddsweep.objectives import probe_settings
from ddsweep.tracking import recorder
from ddsweep.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDY = "tiny"
EPOCHS = (0, 1)  # what the tiny backbone saves: the untrained net and one optimiser step
SWEEP = """\
study: {study}
kind: probe-grid
axes:
  dataset: [digits]
  resolution: [8]
  attention: [true]
  block: [pixels, mid, up4]
  noise_step: {noise_steps}
  probe: [linear, knn]
  k: [5]
probe:
  linear: {{epochs: 2}}
"""
# 2 epochs x 2 blocks x 2 probes + pixels for each probe.
GRID = 2 * 2 * 2 + 2
NOISE_STEPS = (0, 10)  # the shared finished study's; the others have step 0 only
PARAMS = {"dataset", "resolution", "attention", "epoch", "block", "noise_step", "probe", "k"}


def point_k(run: Any) -> int:
    """The k of a child run's point (0: a probe without neighbours, which logs no k)."""
    return points.parse_point_id(run.data.tags[study.POINT_TAG]).k


ENV_DIRS = ("DDSWEEP_HOME", "DDSWEEP_CACHE", "DDSWEEP_CHECKPOINTS", "DDSWEEP_CACHE_MAX_GB")


# --- fixtures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    folder: Path  # holds mlflow.db (and mlruns/ with the checkpoints)
    run_id: str


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Work in `folder`, tracking to folder/mlflow.db, with every ddsweep folder under it."""
    from mlflow.tracking import _tracking_service, fluent

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        mp.setenv("DDSWEEP_DATA", str(folder / "data"))
        for name in ENV_DIRS:
            mp.delenv(name, raising=False)
        mp.setattr(_tracking_service.utils, "_tracking_uri", None)
        mp.setattr(fluent, "_active_experiment_id", None)
        yield


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory, isolated_store: Any) -> Backbone:
    """A tiny digits U-Net (8 px) trained for one step: checkpoints of epochs 0 and 1."""
    folder = tmp_path_factory.mktemp("backbone")
    with isolated_store(folder):
        tracking.setup(None, tracking.DEFAULT_EXPERIMENT)
        cfg = TrainConfig(
            dataset="digits",
            model=ModelConfig(resolution=8, channels=(32, 32, 64, 64)),
            epochs=2,
            batch_size=32,
            checkpoint_every=1,
            max_steps=1,  # stops in epoch 1, which is saved as the last
            sample_every=0,
            sample_count=0,
        )
        run_id = train(cfg, data_dir=folder / "data")
        assert evaluate.saved_epochs(run_id) == list(EPOCHS)
    return Backbone(folder, run_id)


def make_home(folder: Path, backbone: Backbone, noise_steps: tuple[int, ...] = (0,)) -> Path:
    """A fresh working folder: the backbone's MLflow store (its artifacts stay where they are),
    the tiny sweep file, and no Optuna journal, feature cache or local checkpoints yet."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(backbone.folder / "mlflow.db", folder / "mlflow.db")
    (folder / "sweeps").mkdir()
    text = SWEEP.format(study=STUDY, noise_steps=list(noise_steps))
    (folder / "sweeps" / f"{STUDY}.yaml").write_text(text)
    return folder


@pytest.fixture
def home(tmp_path: Path, backbone: Backbone) -> Iterator[Path]:
    """A test's own working folder (see make_home), entered."""
    folder = make_home(tmp_path / "home", backbone)
    with inside(folder):
        yield folder


@dataclass(frozen=True)
class Finished:
    folder: Path
    output: str
    net_extracts: int  # calls of features.extract that ran the U-Net


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, backbone: Backbone) -> Finished:
    """The tiny study at two noise steps, run once to the end; tests that only read it share it."""
    folder = make_home(tmp_path_factory.mktemp("finished"), backbone, NOISE_STEPS)
    calls: list[bool] = []
    real = features.extract

    def counting(unet: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(unet is not None)
        return real(unet, *args, **kwargs)

    with inside(folder), pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "extract", counting)
        result = grid()
    assert result.exit_code == 0, result.output
    return Finished(folder, result.output, sum(calls))


# --- helpers ------------------------------------------------------------------------------------


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def grid(*args: str) -> Any:
    """`ddsweep study probe-grid --study tiny ARGS`, in-process."""
    return cli("study", "probe-grid", "--study", STUDY, *args)


def expected_ids(epochs: tuple[int, ...] = EPOCHS) -> set[str]:
    cfg = sweep.load_study(STUDY)
    assert cfg is not None
    return {
        points.point_id(dataclasses.replace(p, settings=probe_settings(cfg.probe, p.probe)))
        for p in sweep.expand(cfg.axes, lambda _key: epochs)
    }


def load(name: str = STUDY) -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=scheduler.make_storage(name, scheduler.Policy())
    )


def trials_by_point(s: optuna.Study) -> dict[str, list[optuna.trial.FrozenTrial]]:
    out: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in s.get_trials():
        pid = t.user_attrs.get("point_id")
        if pid is not None:
            out.setdefault(pid, []).append(t)
    return out


def experiment_id() -> str:
    exp = MlflowClient().get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert exp is not None
    return str(exp.experiment_id)


def parents(name: str = STUDY) -> list[Run]:
    return MlflowClient().search_runs(
        [experiment_id()],
        f"tags.`{tracking.KIND_TAG}` = 'study' and tags.`{study.STUDY_TAG}` = '{name}'",
    )


def children(status: str | None = None, name: str = STUDY) -> list[Run]:
    """The child runs of the study's single parent run (FINISHED, FAILED, ... or all)."""
    (parent,) = parents(name)
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return MlflowClient().search_runs([experiment_id()], query, max_results=10_000)


def finished_per_point(name: str = STUDY) -> Counter[str]:
    return Counter(r.data.tags[study.POINT_TAG] for r in children("FINISHED", name))


def assert_each_point_evaluated_once(ids: set[str]) -> None:
    """One FINISHED child per point, and one COMPLETE trial, which names that child."""
    done = finished_per_point()
    assert set(done) == ids
    assert set(done.values()) == {1}, {p: n for p, n in done.items() if n != 1}
    runs = {r.data.tags[study.POINT_TAG]: r.info.run_id for r in children("FINISHED")}
    for pid, trials in trials_by_point(load()).items():
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 1, (pid, [t.state for t in trials])
        assert complete[0].user_attrs["mlflow_run_id"] == runs[pid]


def status_rows(stdout: str) -> dict[str, list[int]]:
    """`study status` table rows: {"axis=value": [complete, running, failed, left]}."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[1].isdigit():
            rows[cells[0]] = [int(c) for c in cells[1:]]
    return rows


def evaluated_now(stdout: str) -> int:
    """N of the summary line's "(N evaluated now"; 0 when all was already complete."""
    match = re.search(r"\((\d+) evaluated now", stdout)
    return int(match.group(1)) if match else 0


def summary(result: Any) -> str:
    """The last line the grid printed on stdout."""
    return result.stdout.strip().splitlines()[-1]


# --- a whole grid -------------------------------------------------------------------------------


def test_every_point_is_one_complete_trial_and_one_finished_child(
    finished: Finished, backbone: Backbone
) -> None:
    with inside(finished.folder):
        ids = expected_ids()
        n = len(NOISE_STEPS) * GRID
        assert len(ids) == n
        assert f"{n}/{n} points complete ({n} evaluated now" in finished.output
        s = load()
        assert Counter(t.state for t in s.trials) == Counter({TrialState.COMPLETE: n})
        assert_each_point_evaluated_once(ids)
        (parent,) = parents()
        assert parent.info.run_name == STUDY
        assert s.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
        assert s.user_attrs["backbone:digits/8/True"] == backbone.run_id  # pinned
        trials = {t.user_attrs["mlflow_run_id"]: t for t in s.trials}
        for run in children():
            assert run.info.status == "FINISHED"
            assert set(run.data.params) >= PARAMS - ({"k"} if not point_k(run) else set())
            trial = trials[run.info.run_id]
            point = points.parse_point_id(run.data.tags[study.POINT_TAG])
            assert run.data.params["block"] == point.block
            assert run.data.params["epoch"] == str(point.epoch)
            assert run.data.params.get("k", "0") == str(point.k)
            assert run.data.params["noise_step"] == str(point.noise_step)
            assert run.data.tags["optuna.trial_number"] == str(trial.number)
            # The trial's params are the axes themselves (what optuna-dashboard shows).
            assert trial.params == points.params_of(point)
            dists = trial.distributions
            for axis in ("dataset", "block", "probe", "attention"):
                if axis in dists:
                    assert isinstance(dists[axis], optuna.distributions.CategoricalDistribution)
            for axis in ("resolution", "epoch", "noise_step", "k"):
                if axis in dists:
                    assert isinstance(dists[axis], optuna.distributions.IntDistribution)
            for metric in ("top1", "top3", "val_top1", "val_top3"):
                assert 0.0 <= run.data.metrics[metric] <= 1.0
            assert run.data.metrics["top3"] >= run.data.metrics["top1"]
            # the selection score: val_top1 of a network block at a trained epoch, else 0
            assert trial.user_attrs["top1"] == run.data.metrics["top1"]
            if point.block == "pixels" or point.epoch == 0:
                assert trial.value == selection.BASELINE_VALUE
            else:
                assert trial.value == pytest.approx(run.data.metrics["val_top1"], abs=1e-6)


def test_every_trial_keeps_its_per_example_predictions_on_test_and_validation(
    finished: Finished, tmp_path: Path
) -> None:
    from ddsweep import predictions

    with inside(finished.folder):
        client = MlflowClient()
        for run in children("FINISHED"):
            path = client.download_artifacts(run.info.run_id, predictions.FILE, str(tmp_path))
            found = predictions.load(Path(path))
            assert set(found) == {"test", "val"}
            for split, metric in (("test", "top1"), ("val", "val_top1")):
                pred, label = found[split]
                assert predictions.hits(pred, label).mean() == pytest.approx(
                    run.data.metrics[metric]
                )
            # digits: 360 test images; validation is a tenth of the 1,437 train images.
            assert len(found["test"][0]) == 360 and len(found["val"][0]) == 144


def test_the_backbone_runs_once_per_checkpoint_noise_step_and_split(finished: Finished) -> None:
    passes = len(EPOCHS) * len(NOISE_STEPS) * 2  # checkpoints x noise steps x (train, test)
    assert finished.net_extracts == passes
    with inside(finished.folder):
        assert sum(r.data.metrics["backbone_passes"] for r in children("FINISHED")) == passes


def test_status_shows_complete_and_left_counts(finished: Finished) -> None:
    with inside(finished.folder):
        result = cli("study", "status", "--study", STUDY)
    assert result.exit_code == 0, result.output
    n = len(NOISE_STEPS) * GRID
    assert f"study {STUDY}: {n} points" in result.stdout
    rows = status_rows(result.stdout)
    assert rows["total"] == [n, 0, 0, 0]
    assert rows["block=pixels"] == [4, 0, 0, 0]
    assert rows["epoch=1"] == [8, 0, 0, 0]
    assert rows["noise_step=10"] == [GRID, 0, 0, 0]
    assert rows["probe=knn"] == [GRID, 0, 0, 0]


def test_a_finished_study_does_no_work_and_says_so(finished: Finished) -> None:
    with inside(finished.folder):
        before = len(load().trials)
        result = grid()
        assert result.exit_code == 0, result.output
        assert "already complete" in summary(result)
        assert len(load().trials) == before
        assert len(children()) == len(NOISE_STEPS) * GRID


# --- growing, failing, dying --------------------------------------------------------------------


def test_a_grown_grid_evaluates_only_its_new_points(home: Path) -> None:
    first = grid("--epoch", "0")
    assert first.exit_code == 0, first.output
    assert len(finished_per_point()) == GRID // 2 + 1
    grown = grid("--epoch", "0:1")
    assert grown.exit_code == 0, grown.output
    assert f"{GRID}/{GRID} points complete ({GRID // 2 - 1} evaluated now" in summary(grown)
    assert_each_point_evaluated_once(expected_ids())
    # No trial at all for a point done before: the sampler knows points by value.
    assert len(load().trials) == GRID
    new = [r for r in children("FINISHED") if r.data.params["epoch"] == "1"]
    assert sum(r.data.metrics["backbone_passes"] for r in new) == 2  # one checkpoint, 2 splits
    # Shrinking the grid again is complete at once.
    again = grid("--epoch", "1")
    assert "already complete" in summary(again)
    assert len(load().trials) == GRID


def test_a_failing_trial_is_recorded_retried_and_then_given_up(
    home: Path, backbone: Backbone
) -> None:
    # A damaged local copy of one checkpoint: only the U-Net points of epoch 1 can fail.
    copy = evaluate.fetch_backbone(backbone.run_id, 1).folder
    (copy / checkpoints.WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    # ...whose ddsweep.json agrees (else the copy is seen as changed and fetched again): a
    # checkpoint that was written broken.
    meta = json.loads((copy / checkpoints.META).read_text())
    meta[checkpoints.HASHES]["ema"] = checkpoints.content_hash(copy)
    (copy / checkpoints.META).write_text(json.dumps(meta))
    broken = {p for p in expected_ids() if points.parse_point_id(p).epoch == 1}
    assert len(broken) == 4

    first = grid("--max-retries", "1")
    # Failed points make a failed run: exit status 1, how many, the first error, what to do.
    assert first.exit_code == 1, first.output
    assert f"{GRID - 4}/{GRID} points complete ({GRID - 4} evaluated now, 4 failed" in first.stdout
    assert f"4 of {GRID} points failed, 0 left" in first.stderr
    assert "cannot load" in first.stderr and "re-run the same command" in first.stderr
    assert "Traceback" not in first.output
    # The report says the study is incomplete in its first line, and in its files.
    report = cli("report", "--study", STUDY, "--format", "table", "--format", "md")
    assert report.exit_code == 0, report.output
    head = f"study {STUDY}: INCOMPLETE, {GRID - 4} of {GRID} points of its last grid complete"
    assert report.stdout.splitlines()[0].startswith(head)
    # ...and claims no cell beats another: the failed points may be the cells' peers.
    assert "compared with no other" in report.stdout and "beats" not in report.stdout
    assert head in (home / "reports" / STUDY / "report.md").read_text()
    failed = children("FAILED")
    assert {r.data.tags[study.POINT_TAG] for r in failed} == broken
    assert all(r.data.tags["error"] for r in failed)
    for run in failed:  # a probe without neighbours logs no k (only the settings that apply)
        assert set(run.data.params) >= PARAMS - {"k"}
        assert ("k" in run.data.params) == run.data.params["probe"].startswith("knn")
    s = load()
    fails = [t for t in s.trials if t.state == TrialState.FAIL]
    assert {t.user_attrs["point_id"] for t in fails} == broken
    assert all("cannot load" in t.user_attrs["error"] for t in fails), fails[0].user_attrs
    assert {r.data.tags["error"] for r in failed} == {t.user_attrs["error"] for t in fails}
    assert set(finished_per_point()) == expected_ids() - broken

    # The next run retries (and fails again); after --max-retries retries it gives up.
    second = grid("--max-retries", "1")
    assert "0 evaluated now, 4 failed" in second.stdout
    assert second.exit_code == 1 and "re-run with --max-retries 2" in second.stderr
    third = grid("--max-retries", "1")
    assert "0 evaluated now, 0 failed" in third.stdout
    # Given up on, the points still fail the run: it never says "done" for work not done.
    assert third.exit_code == 1 and "4 used up their 1 retries" in third.stderr
    assert len(children("FAILED")) == 8
    status = cli("study", "status", "--study", STUDY)
    assert status_rows(status.stdout)["total"] == [GRID - 4, 0, 4, 0]

    # Repaired (a fresh copy is fetched), a run with more retries finishes the grid.
    shutil.rmtree(copy)
    fourth = grid("--max-retries", "2")
    assert f"{GRID}/{GRID} points complete (4 evaluated now, 0 failed" in fourth.stdout
    report = cli("report", "--study", STUDY, "--format", "table")
    assert report.stdout.startswith(f"study {STUDY}: all {GRID} points of its last grid")
    assert_each_point_evaluated_once(expected_ids())
    assert len(children("FAILED")) == 8


def test_a_pixels_only_study_needs_no_backbone(home: Path) -> None:
    # Regression: the grid asked the (absent) backbone for its epochs and crashed.
    result = cli(
        "study", "probe-grid", "--study", "pix", "--dataset", "digits", "--resolution", "8",
        "--block", "pixels", "--probe", "knn", "--k", "3", "--k", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2/2 points complete (2 evaluated now" in result.stdout
    assert sorted(finished_per_point("pix").values()) == [1, 1]


def test_a_study_begun_by_version_0_1_keeps_its_finished_points(home: Path) -> None:
    # ddsweep 0.1 keyed a trial by one opaque int param `point` and kept the positional id as
    # the attribute `point_id`; its finished points must count as finished, never run again.
    old = optuna.create_study(
        study_name=STUDY, storage=scheduler.make_storage(STUDY, scheduler.Policy())
    )
    ids = sorted(expected_ids((0,)))
    done = [points.parse_point_id(pid) for pid in ids[:3]]
    for i, p in enumerate(done):
        old.add_trial(
            optuna.trial.create_trial(
                params={"point": 1000 + i},
                distributions={"point": optuna.distributions.IntDistribution(0, 2**48 - 1)},
                value=0.5,
                user_attrs={"point_id": points.legacy_id(p), "mlflow_run_id": "old"},
            )
        )
    old.enqueue_trial({"point": 7})  # a retry 0.1 left waiting: refused, nothing evaluated twice
    result = grid("--epoch", "0")
    assert result.exit_code == 0, result.output
    n = len(ids)
    assert f"{n}/{n} points complete ({n - 3} evaluated now" in summary(result)
    assert set(finished_per_point()) == set(ids) - {points.point_id(p) for p in done}
    status = cli("study", "status", "--study", STUDY, "--epoch", "0")
    assert status_rows(status.stdout)["total"] == [n, 0, 0, 0]


def test_a_categorical_value_new_to_a_study_is_refused_in_one_line(home: Path) -> None:
    first = grid("--epoch", "0", "--block", "pixels", "--probe", "knn")
    assert first.exit_code == 0, first.output
    before = len(load().trials)
    # Any of the nine blocks may join later (they are among the block param's choices), but a
    # module path the study has never seen cannot: Optuna's categorical choices are fixed.
    grown = grid("--epoch", "0", "--block", "pixels", "--block", "mid", "--probe", "knn")
    assert grown.exit_code == 0, grown.output
    refused = grid("--epoch", "0", "--block", "mid_block", "--probe", "knn")
    assert refused.exit_code == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "'mid_block' is new" in line and f"--study {STUDY}-2" in line
    assert len(load().trials) == before + 1  # mid at epoch 0: the only new point


def test_a_changed_setting_gives_new_points_of_the_kinds_it_changes(home: Path) -> None:
    first = grid("--epoch", "0")
    assert first.exit_code == 0, first.output
    before = finished_per_point()
    assert len(before) == GRID // 2 + 1
    path = home / "sweeps" / f"{STUDY}.yaml"
    path.write_text(path.read_text().replace("linear: {epochs: 2}", "linear: {epochs: 3}"))
    second = grid("--epoch", "0")
    assert second.exit_code == 0, second.output
    # The linear points (pixels, mid, up4) are new points; the k-NN ones are the same points.
    assert evaluated_now(second.stdout) == 3
    after = finished_per_point()
    assert set(before) < set(after) and len(after) == len(before) + 3
    new = [r for r in children("FINISHED") if r.data.tags[study.POINT_TAG] not in before]
    assert {r.data.params["probe"] for r in new} == {"linear"}
    assert {r.data.params["linear.epochs"] for r in new} == {"3"}
    assert all("linear.epochs=3" in r.data.tags[study.POINT_TAG] for r in new)
    # Going back to the first setting finds its points complete.
    path.write_text(path.read_text().replace("linear: {epochs: 3}", "linear: {epochs: 2}"))
    assert "already complete" in summary(grid("--epoch", "0"))


def test_a_retry_left_by_another_grid_is_not_evaluated(home: Path) -> None:
    # Regression: a WAITING retry of a point outside the current grid crashed the worker.
    first = grid("--epoch", "0", "--block", "pixels")
    assert first.exit_code == 0, first.output
    stray_point = points.Point(
        dataset="digits",
        resolution=8,
        attention=True,
        epoch=1,
        block="mid",
        noise_step=0,
        probe="linear",
        k=0,
    )
    load().enqueue_trial(points.params_of(stray_point))
    result = grid("--epoch", "0", "--block", "pixels")
    assert result.exit_code == 0, result.output
    assert "already complete" in summary(result)
    (stray,) = [t for t in load().trials if t.state == TrialState.PRUNED]
    assert stray.user_attrs["duplicate_of"] == "not in this grid"


# --- several workers ----------------------------------------------------------------------------

# `python -c WORKER MODE PATH N study probe-grid ...` runs ddsweep after its slow imports, and:
# MODE "together": waits until N workers have imported (touching PATH/ready-PID), so that all
#   start the study at the same moment;
# MODE "evaluating" / "logged": hangs in its N-th trial, inside the evaluation / after the
#   trial's MLflow child run is logged, having written the point to PATH.
WORKER = r"""
import os, sys, time
from pathlib import Path
from ddsweep import cli, evaluate
from ddsweep.config import points
from ddsweep.tracking import recorder
mode, path, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
del sys.argv[1:4]
calls = []
def hang(pid):
    path.with_suffix(".tmp").write_text(pid)
    path.with_suffix(".tmp").rename(path)  # whole, or not there yet
    time.sleep(600)
if mode == "together":
    (path / f"ready-{os.getpid()}").touch()
    while len(list(path.glob("ready-*"))) < n:
        time.sleep(0.005)
elif mode == "evaluating":
    real = evaluate.evaluate_point
    def patched(backbone, point, *a, **k):
        calls.append(1)
        if len(calls) == n:
            hang(points.point_id(point))
        return real(backbone, point, *a, **k)
    evaluate.evaluate_point = patched
else:
    real_log = recorder.StudyRecorder.log_trial
    def patched(self, pid, *a, **k):
        run_id = real_log(self, pid, *a, **k)
        calls.append(1)
        if len(calls) == n:
            hang(pid)
        return run_id
    recorder.StudyRecorder.log_trial = patched
cli.main()
"""


@pytest.fixture
def start_grid() -> Iterator[Any]:
    """start_grid(MODE, PATH, N, *ARGS): a worker process running the tiny grid (see WORKER),
    one torch thread each, its output in files (no pipe to fill); any still alive at the end of
    the test is killed."""
    import hooked  # pytest puts tests/ on the path

    with hooked.processes() as run:

        def start(mode: str, path: Path, n: int, *args: str) -> Any:
            ddsweep_args = ["study", "probe-grid", "--study", STUDY, *args]
            return run(WORKER, mode, str(path), str(n), *ddsweep_args)

        yield start


def test_two_workers_started_at_once_evaluate_every_point_once(home: Path, start_grid: Any) -> None:
    workers = [start_grid("together", home, 2) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (_out, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err[-3000:]
    assert_each_point_evaluated_once(expected_ids())
    assert len(parents()) == 1  # both found the one parent run, though both began at once
    # Every point evaluated by one worker or the other; how they shared it is up to the machine
    # (a loaded one may let the first worker finish before the second claims a point).
    evaluated = [evaluated_now(out) for out, _ in outputs]
    assert sum(evaluated) == GRID, outputs
    # The feature cache's lock: a checkpoint is never run twice, whoever asks for it.
    assert sum(r.data.metrics["backbone_passes"] for r in children("FINISHED")) == 2 * 2


@pytest.mark.slow  # a spawned worker imports torch, MLflow and Optuna afresh
def test_workers_option_shares_the_grid_with_a_spawned_process(home: Path) -> None:
    result = grid("--workers", "2")
    assert result.exit_code == 0, result.output
    assert f"{GRID}/{GRID} points complete" in summary(result)
    assert_each_point_evaluated_once(expected_ids())
    assert len(parents()) == 1


@pytest.mark.parametrize(
    "stage",
    [
        "evaluating",
        # The same state as the in-process test below, reached with a real SIGKILL.
        pytest.param("logged", marks=pytest.mark.slow),
    ],
)
def test_a_killed_worker_s_point_is_rerun_or_adopted_never_evaluated_twice(
    home: Path, start_grid: Any, stage: str
) -> None:
    marker = home / "hung"
    victim = start_grid(stage, marker, 3, "--heartbeat-interval", "1", "--grace-period", "2")
    deadline = time.time() + 120
    while not marker.exists():
        if victim.poll() is not None:
            pytest.fail(
                f"the worker ended before hanging: {victim.communicate(timeout=60)[1][-3000:]}"
            )
        assert time.time() < deadline, "the worker never reached its third trial"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    killed = marker.read_text()
    (running,) = [t for t in load().trials if t.state == TrialState.RUNNING]
    assert running.user_attrs["point_id"] == killed
    logged_before = finished_per_point()[killed]
    assert logged_before == (1 if stage == "logged" else 0)
    if stage == "evaluating":
        time.sleep(2.5)  # past the grace period: the next run finds the trial dead at once

    result = grid("--heartbeat-interval", "1", "--grace-period", "2")
    assert result.exit_code == 0, result.output
    assert f"{GRID}/{GRID} points complete" in summary(result)
    assert_each_point_evaluated_once(expected_ids())
    trials = trials_by_point(load())[killed]
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "FAIL"], states
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert dead.user_attrs["error"].startswith("stale")
    if stage == "logged":
        assert "1 adopted" in summary(result)


class Killed(BaseException):
    """Ends a worker at once, the way SIGKILL would: no handler of ddsweep's catches it."""


def test_a_point_logged_by_a_worker_that_died_is_adopted_not_evaluated_again(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = recorder.StudyRecorder.log_trial
    logged: list[str] = []

    def dies_after_the_third(self: Any, pid: str, *args: Any, **kwargs: Any) -> str:
        run_id = real(self, pid, *args, **kwargs)
        logged.append(pid)
        if len(logged) == 3:
            raise Killed  # after MLflow has the child run, before Optuna hears of it
        return run_id

    monkeypatch.setattr(recorder.StudyRecorder, "log_trial", dies_after_the_third)
    with pytest.raises(Killed):
        grid("--heartbeat-interval", "1", "--grace-period", "2")
    monkeypatch.setattr(recorder.StudyRecorder, "log_trial", real)
    killed = logged[-1]
    (running,) = [t for t in load().trials if t.state == TrialState.RUNNING]
    assert running.user_attrs["point_id"] == killed
    assert finished_per_point() == Counter(logged)

    # At once: the trial still looks alive, so the run does the rest and then waits for it.
    result = grid("--heartbeat-interval", "1", "--grace-period", "2")
    assert result.exit_code == 0, result.output
    assert f"{GRID}/{GRID} points complete ({GRID - 3} evaluated now" in summary(result)
    assert "1 adopted" in summary(result)
    assert_each_point_evaluated_once(expected_ids())
    states = sorted(t.state.name for t in trials_by_point(load())[killed])
    assert states == ["COMPLETE", "FAIL"], states


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--blocks", "mid"], ["--blocks"]),
        (["--block", "up9"], ["--block", "'up9'", "down1"]),
        (["--probe", "svm"], ["--probe", "'svm'", "linear, knn"]),
        (["--epoch", "7"], ["epoch", "7", "saved epochs: 0, 1"]),
        (["--heartbeat-interval", "5", "--grace-period", "5"], ["--heartbeat-interval"]),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    home: Path, args: list[str], words: list[str]
) -> None:
    result = grid(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    # The error is the last line and the only one, bar the progress bar that `probe-grid`
    # draws before it finds a checkpoint missing (for --epoch 7).
    errors = [line for line in lines if "error" in line]
    assert errors == lines[-1:] and lines[-1].startswith("ddsweep: error: "), result.stderr
    assert len(lines) == 1 or args == ["--epoch", "7"], result.stderr
    for word in words:
        assert word in lines[-1]
    # Nothing recorded: no Optuna study, no MLflow parent run.
    assert optuna.get_all_study_names(scheduler.make_storage(STUDY, scheduler.Policy())) == []
    assert parents() == []


def test_an_unknown_key_in_the_sweep_file_is_one_line_and_exit_status_2(home: Path) -> None:
    path = home / "sweeps" / f"{STUDY}.yaml"
    path.write_text(path.read_text().replace("  block:", "  blocks:"))
    result = grid()
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ddsweep: error: ")
    for word in (str(Path("sweeps") / f"{STUDY}.yaml"), "'blocks'", "allowed: dataset"):
        assert word in line
    assert not (home / scheduler.default_storage_path(STUDY)).parent.exists()  # nothing started


def test_status_of_a_study_never_run_is_a_user_error(home: Path) -> None:
    result = cli("study", "status", "--study", STUDY)
    assert result.exit_code == 2
    assert "has not been started" in result.stderr


# --- Optuna's own heartbeat (RDB storage) --------------------------------------------------------


def test_a_trial_is_visible_to_optunas_own_stale_check_from_its_start(tmp_path: Path) -> None:
    # Regression: the first heartbeat came one interval late and never reached Optuna (the study
    # holds its RDBStorage wrapped), so a worker killed early left a trial RUNNING forever.
    opts = scheduler.Policy(
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1
    )
    s = optuna.create_study(study_name="hb", storage=scheduler.make_storage("hb", opts))
    assert scheduler.uses_rdb_heartbeat(s._storage)
    trial = s.ask()
    beat = scheduler.Heartbeat(s, trial._trial_id, interval=600)
    beat.__enter__()  # and never leaves: the worker is killed within its first interval
    beat._stop.set()
    time.sleep(2.2)  # the database clock counts whole seconds
    optuna.storages.fail_stale_trials(s)
    assert s.trials[0].state == TrialState.FAIL


def test_a_study_defined_on_the_command_line_is_found_by_name_alone(home: Path) -> None:
    define = ["--dataset", "digits", "--resolution", "8", "--block", "pixels", "--probe", "knn"]
    result = cli("study", "probe-grid", "--study", "adhoc", *define, "--k", "3")
    assert result.exit_code == 0, result.output
    # No sweep file and no axes: the definition stored with the study is used.
    status = cli("study", "status", "--study", "adhoc")
    assert status.exit_code == 0, status.output
    assert status_rows(status.stdout)["total"] == [1, 0, 0, 0]
    again = cli("study", "probe-grid", "--study", "adhoc")
    assert again.exit_code == 0 and "already complete" in summary(again)
    report = cli("report", "--study", "adhoc", "--format", "table")
    assert report.exit_code == 0, report.output
    assert "pixels" in report.stdout
    # A name never run is still the one-line error it was.
    unknown = cli("study", "status", "--study", "never")
    assert unknown.exit_code == 2 and "no sweep file" in unknown.stderr
