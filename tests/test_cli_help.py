"""The command line's surface: --version, shell completion, a help text on every option that
shows its default (or says what it depends on) and loses nothing to Rich markup, and `report
--experiment` looking for a study only where it is told."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ddsweep import __version__, tracking
from ddsweep.cli import app
from ddsweep.tracking.schema import STUDY_TAG

# Options that do something instead of taking a value: they have no default to show.
ACTIONS = {"--help", "--version", "--install-completion", "--show-completion"}
# Words by which a help text says where an option's value comes from when it has no fixed one.
SAYS_WHERE = ("default", "none")


def commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(argv path, command) of every command under `group`, sub-apps included."""
    out: list[tuple[tuple[str, ...], Any]] = []
    ctx = typer.Context(group)  # typer vendors its own click
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        if hasattr(cmd, "list_commands"):
            out += commands(cmd, (*path, name))
        else:
            out.append(((*path, name), cmd))
    return out


ROOT = typer.main.get_command(app)
COMMANDS = commands(ROOT)


def flat(text: str) -> str:
    """Rendered help without the panels' borders, on one line with single spaces."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def rendered_help(*path: str) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return flat(result.output)


def test_every_command_is_walked() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"train", "probe", "sample", "fid", "report", "quickstart"} <= names
    assert {"study probe-grid", "study fid-grid", "study train-grid", "study status"} <= names


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"ddsweep {__version__}\n"


def test_shell_completion_is_on() -> None:
    text = rendered_help()
    assert "--install-completion" in text
    assert "--show-completion" in text


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_every_option_has_help_that_shows_its_default_and_loses_nothing(
    path: tuple[str, ...],
) -> None:
    cmd = dict(COMMANDS)[path]
    text = rendered_help(*path)
    assert flat(cmd.help or "").split(".")[0] in text  # the command's own description
    for param in cmd.params:
        name = max(param.opts, key=len)
        if name in ACTIONS:
            continue
        declared = getattr(param, "help", None)
        assert declared, f"{' '.join(path)} {name}: no help text"
        help_text = flat(declared)
        # Rich reads `[...]` as a style tag and drops it: the declared text must show whole.
        assert help_text in text, f"{' '.join(path)} {name}: help lost a part: {declared!r}"
        after = text[text.index(help_text) + len(help_text) :].lstrip()
        shown = after.startswith(("[default:", "[required]"))
        assert shown or any(w in help_text.lower() for w in SAYS_WHERE), (
            f"{' '.join(path)} {name}: neither shows a default nor says where its value comes from"
        )


def test_reads_and_searches_take_an_experiment() -> None:
    for path in (("train",), ("probe",), ("fid",), ("report",), ("quickstart",)):
        assert "--experiment" in rendered_help(*path), path
    for path in (("study", "probe-grid"), ("study", "fid-grid"), ("study", "status")):
        assert "--experiment" in rendered_help(*path), path


def plant_study(name: str, experiment: str) -> str:
    """A study's parent run (no trials yet) in `experiment`; its id."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    tags = {tracking.KIND_TAG: "study", STUDY_TAG: name}
    run = client.create_run(exp_id, tags=tags, run_name=name)
    client.set_terminated(run.info.run_id)
    return str(run.info.run_id)


def one_line_error(result: Any, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddsweep: error: "), result.output
    for word in words:
        assert word in lines[0], result.output


@pytest.mark.usefixtures("workdir")
def test_report_looks_for_the_study_only_in_the_experiment_given() -> None:
    plant_study("grid", "probes")
    MlflowClient().create_experiment("other")
    runner = CliRunner()

    found = runner.invoke(app, ["report", "--study", "grid"])  # every experiment
    assert found.exit_code == 0, found.output
    assert "no finished trials yet" in found.output
    here = runner.invoke(app, ["report", "--study", "grid", "--experiment", "probes"])
    assert here.exit_code == 0, here.output
    assert "no finished trials yet" in here.output

    one_line_error(
        runner.invoke(app, ["report", "--study", "grid", "--experiment", "other"]),
        "no study 'grid'",
        "'other'",
    )
    one_line_error(
        runner.invoke(app, ["report", "--study", "grid", "--experiment", "missing"]),
        "no experiment 'missing'",
    )
    # The same name in a second experiment: each experiment's own study is the one reported.
    second = plant_study("grid", "other")
    other = runner.invoke(app, ["report", "--study", "grid", "--experiment", "other"])
    assert other.exit_code == 0, other.output
    from ddsweep.report import loader

    assert loader.find_study("grid", "other") == second != loader.find_study("grid", "probes")
