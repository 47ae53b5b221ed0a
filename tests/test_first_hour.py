"""A new user's first hour: progress rows that fit 80 columns, mistakes that suggest the right
name, and commands that fail or only read leaving the folder as they found it."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ddsweep.cli import app
from ddsweep.cli._options import bar

POINT = "dataset=digits&resolution=16&attention=true&epoch=8&block=up4&noise_step=50&probe=knn&k=10"


@pytest.mark.parametrize("width", [80, 200])
def test_progress_rows_stay_one_line_each(width: int) -> None:
    buf = StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    progress = bar(console)
    progress.add_task(
        "digits_blocks", total=184, completed=90, state=f"1 running, 0 failed | {POINT}"
    )
    progress.add_task("digits-16px-attn", total=8, completed=3, loss=0.0506, ips=951.0)
    console.print(progress.make_tasks_table(progress.tasks))
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 2, lines  # one row per task: nothing wrapped onto a line of its own
    assert all(len(ln) <= width for ln in lines)
    assert "951 img/s" in lines[1] and "90/184" in lines[0]


# --- an empty folder, as a new user has it --------------------------------------------------


@pytest.fixture
def empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder with every default in place: mlflow.db, .ddsweep/ and data/
    would land in it."""
    from mlflow.tracking import _tracking_service

    folder = tmp_path / "fresh"
    folder.mkdir()
    monkeypatch.chdir(folder)
    for name in ("MLFLOW_TRACKING_URI", "DDSWEEP_HOME", "DDSWEEP_DATA", "DDSWEEP_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DDSWEEP_CHECKPOINTS", raising=False)
    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", None)
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def fails(*args: str) -> str:
    """The one line a mistake prints (exit 2)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    return " ".join(lines)


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["study", "status", "--study", "digits_blokcs"], "did you mean 'digits_blocks'?"),
        (["report", "--study", "digits_blokcs"], "did you mean 'digits_blocks'?"),
        (["study", "status", "--study", "digits_blocks"], "study train-grid --study digits_blocks"),
        (["report", "--study", "digits_blocks"], "ddsweep quickstart"),
        (["study", "status", "--study", "digits_blocks", "--block", "mdi"], "did you mean 'mid'?"),
        (["study", "status", "--study", "digits_blocks", "--probe", "knm"], "did you mean 'knn'?"),
        (["study", "status", "--study", "x", "--dataset", "digts"], "did you mean 'digits'?"),
        (["study", "probe-grid", "--study", "digits_blocks", "--bogus"], "No such option"),
        (["train", "digits", "--probe-every", "1", "--probe-block", "mdi"], "'mid'?"),
        (["train", "--resume", "nosuch"], "no MLflow run 'nosuch'"),
        (["sample", "--run", "nosuch"], "no MLflow run 'nosuch'"),
        # no trained backbone yet: refused before any store is opened
        (["probe", "--dataset", "digits"], "no finished training run for digits"),
        (["probe", "--run", "nosuch"], "no MLflow run 'nosuch'"),
        (["study", "probe-grid", "--study", "digits_blocks"], "study train-grid --study digits"),
    ],
)
def test_mistakes_and_looks_leave_the_folder_as_they_found_it(
    empty_folder: Path, args: list[str], wanted: str
) -> None:
    before = listing(empty_folder)
    said = fails(*args)
    assert wanted in said, said
    assert "INFO" not in said  # no MLflow or Optuna line before ddsweep's
    assert listing(empty_folder) == before == []


def test_a_typo_d_study_lists_the_shipped_ones(empty_folder: Path) -> None:
    said = fails("study", "status", "--study", "digits_blokcs")
    assert "shipped studies: " in said and "cifar_blocks" in said and "digits_blocks" in said


def test_help_leaves_nothing(empty_folder: Path) -> None:
    for args in (["--help"], ["report", "--help"], ["study", "status", "--help"]):
        assert CliRunner().invoke(app, args).exit_code == 0
    assert listing(empty_folder) == []


def test_train_without_its_data_offline_leaves_no_data_store_or_experiment(
    empty_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline (every download refused) `train cifar10` fails on one line: no data/, no
    mlflow.db, so no experiment."""
    import urllib.request

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    said = fails("train", "cifar10")
    assert "could not be downloaded" in said
    assert listing(empty_folder) == []


def test_protocol_and_probe_names_get_a_suggestion_too() -> None:
    from ddsweep import probes
    from ddsweep.config import protocols
    from ddsweep.errors import UserError

    with pytest.raises(UserError, match=r"'dnio' \(did you mean 'dino'\?\); allowed: "):
        protocols.protocol("dnio")
    with pytest.raises(UserError, match=r"did you mean 'linear'\?"):
        probes.get("lniear")
    with pytest.raises(UserError) as far:
        probes.get("zzzz")
    assert "did you mean" not in str(far.value)  # nothing close: no guess


TINY = """\
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
  epochs: 1
  checkpoint_every: 1
  max_steps: 2
  channels: [32, 32, 32, 32]
  sample_every: 0
"""


@pytest.mark.slow
def test_the_hints_of_a_fresh_folder_lead_to_the_answer(
    empty_folder: Path, one_torch_thread: None
) -> None:
    """status of a study never run names the commands that run it; running them, as named,
    gives a report (tested by running the hint, not by reading it)."""
    import re
    import shlex

    (empty_folder / "sweeps").mkdir()
    (empty_folder / "sweeps" / "tiny.yaml").write_text(TINY)
    said = fails("study", "status", "--study", "tiny")
    commands = re.findall(r"`ddsweep ([^`]+)`", said)
    assert commands == ["study train-grid --study tiny", "study probe-grid --study tiny"], said
    for command in commands:
        result = CliRunner().invoke(app, shlex.split(command))
        assert result.exit_code == 0, (command, result.output, result.exception)
    grid_end = result.stdout
    result = CliRunner().invoke(app, ["report", "--study", "tiny", "--format", "table"])
    assert result.exit_code == 0, result.output
    assert "study tiny: the answer" in result.output
    # probe-grid's end prints the report's answer block, word for word and line for line:
    # from its first line ("answer: ...") to the end of the table at a glance
    lines = result.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("answer: "))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("every table: `"))
    block = "\n".join(lines[start:end])
    assert "study tiny: the answer" in block and "untested" not in block, block
    assert block in grid_end, (block, grid_end)
    assert grid_end.startswith(block), grid_end  # first, before the outcome lines


# --- MLflow at a glance ---------------------------------------------------------------------


def test_a_trial_logs_only_the_settings_that_apply_and_keeps_its_identity() -> None:
    from ddsweep import evaluate
    from ddsweep.config import points

    cfg = evaluate.ProbeConfig()  # the library default
    knn = points.Point(
        dataset="digits",
        resolution=16,
        attention=True,
        epoch=8,
        block="up4",
        noise_step=0,
        probe="knn",
        k=10,
    )
    linear = points.Point(
        dataset="digits",
        resolution=16,
        attention=True,
        epoch=8,
        block="up4",
        noise_step=0,
        probe="linear",
    )
    on_knn = evaluate.point_params(knn, cfg, None)
    on_linear = evaluate.point_params(linear, cfg, None)
    assert on_knn["k"] == "10" and "knn.metric" in on_knn
    assert not [n for n in on_knn if n.startswith(("logreg.", "linear.", "centroid."))]
    assert "k" not in on_linear and "linear.epochs" in on_linear
    assert not [n for n in on_linear if n.startswith(("logreg.", "knn.", "centroid."))]
    assert "settings" not in on_knn and "settings" not in on_linear
    # The ids, which name the points in Optuna, MLflow tags and the report, are unchanged.
    assert points.point_id(knn) == (
        "dataset=digits&resolution=16&attention=true&epoch=8&block=up4&probe=knn&k=10"
    )
    assert points.point_id(linear) == (
        "dataset=digits&resolution=16&attention=true&epoch=8&block=up4&probe=linear"
    )


# --- Optuna at a glance ---------------------------------------------------------------------


class Echo:
    """An evaluator that scores every point 1.0 and records nothing."""

    def adopt(self, pid: str) -> None:
        return None

    def compute(self, pid: str) -> str:
        return pid

    def record(self, pid: str, trial_number: int, result: object) -> object:
        from ddsweep.scheduler.types import Outcome

        return Outcome(1.0)

    def fail(self, pid: str, trial_number: int, message: str) -> None:
        raise AssertionError(message)


def epochs_grid(*epochs: int) -> object:
    from ddsweep.config.points import id_of
    from ddsweep.scheduler.types import Grid

    params = [{"block": "mid", "epoch": e, "resolution": 16} for e in epochs]
    return Grid({id_of(p): p for p in params})


def test_an_integer_axis_keeps_its_grid_s_step_and_a_value_off_it_widens_the_lattice() -> None:
    from optuna.distributions import IntDistribution

    from ddsweep.scheduler.grid import _distribution, int_ranges

    ranges = int_ranges(epochs_grid(0, 2, 8))  # type: ignore[arg-type]
    assert ranges == {"epoch": (0, 8, 2), "resolution": (16, 16, 0)}
    assert _distribution("epoch", 4, {}, ranges) == IntDistribution(0, 8, step=2)
    assert _distribution("resolution", 16, {}, ranges) == IntDistribution(16, 16)
    # a retry from another grid: the distribution holds its value, on a step that fits both
    assert _distribution("epoch", 5, {}, ranges) == IntDistribution(0, 8, step=1)
    assert _distribution("epoch", 12, {}, ranges) == IntDistribution(0, 12, step=2)
    assert _distribution("epoch", -2, {}, ranges) == IntDistribution(-2, 8, step=2)
    assert _distribution("k", 50, {}, ranges) == IntDistribution(50, 50)  # not in this grid


def test_integer_axes_span_their_values_in_a_new_study_and_an_old_one_keeps_its_range(
    tmp_path: Path,
) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from ddsweep import scheduler
    from ddsweep.scheduler.grid import INT_HIGH

    policy = scheduler.Policy(storage=str(tmp_path / "s.journal"))
    new = scheduler.open_study("new", policy, "maximize")
    assert new is not None
    new.use(epochs_grid(0, 2, 8))
    for _ in range(3):
        new.run_trial(Echo(), None)
    dists = [t.distributions for t in new.study.get_trials()]
    # spread over its values, on their step (PED-ANOVA's importance reads the step)
    assert {d["epoch"] for d in dists} == {IntDistribution(0, 8, step=2)}
    assert all(d["resolution"].single() for d in dists)  # constant: out of importance rankings

    # A study begun by an earlier ddsweep, trials at 0..INT_HIGH: it keeps that range.
    storage = scheduler.make_storage("old", policy)
    old_study = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    old_study.add_trial(
        optuna.trial.create_trial(
            params={"block": "mid", "epoch": 0, "resolution": 16},
            distributions={
                "block": CategoricalDistribution(("mid",)),
                "epoch": IntDistribution(0, INT_HIGH),
                "resolution": IntDistribution(0, INT_HIGH),
            },
            value=1.0,
        )
    )
    old = scheduler.open_study("old", policy, "maximize", create=False)
    assert old is not None
    old.use(epochs_grid(0, 2))
    assert not old.spreads_ints()
    old.run_trial(Echo(), None)
    assert old.study.get_trials()[-1].distributions["epoch"] == IntDistribution(0, INT_HIGH)
