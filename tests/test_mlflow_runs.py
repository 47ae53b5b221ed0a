"""Runs as `mlflow ui` shows them, read back through MLflow's own client: a study's children
last as long as their work and carry MLflow's context tags and their datasets; the parent holds
the answer (chosen on validation), the sweep file and the report tables; under `mlflow run` the
project's run is the study's parent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ddsweep import evaluate
from ddsweep.cli import app
from ddsweep.config.model import BLOCKS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
STUDY = "runs"
SWEEP = f"""\
study: {STUDY}
kind: probe-grid
axes: {{dataset: [digits], resolution: [8], attention: [true], block: [pixels, mid, up4],
       noise_step: [0], probe: [linear]}}
probe: {{linear: {{epochs: 2}}}}
"""
SLUG = "digits-8px-attn-linear-t0-avg-ema-linear.epochs=2"  # FacetKey.slug of its one table
SLUG_KEY = SLUG.replace("=", "_")  # as a metric-name prefix
ENV_DIRS = ("DDSWEEP_HOME", "DDSWEEP_CACHE", "DDSWEEP_CHECKPOINTS")


def git_head() -> str | None:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def runs(query: str) -> list[Run]:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, query, max_results=1000)


@pytest.fixture(scope="module")
def studied(tmp_path_factory: pytest.TempPathFactory, isolated_store: Any) -> Iterator[Path]:
    """A tiny digits backbone (epochs 0 and 1) and the study above run twice to its end."""
    folder = tmp_path_factory.mktemp("studied")
    (folder / "sweeps").mkdir()
    (folder / "sweeps" / f"{STUDY}.yaml").write_text(SWEEP)
    with isolated_store(folder), pytest.MonkeyPatch.context() as mp:
        for name in ENV_DIRS:
            mp.delenv(name, raising=False)
        tiny = ["digits", "--resolution", "8", "--channels", "32,32,64,64", "--epochs", "2"]
        steps = ["--checkpoint-every", "1", "--max-steps", "1", "--batch-size", "32"]
        done = cli("train", *tiny, *steps, "--sample-every", "0", "--sample-count", "0")
        assert done.exit_code == 0, done.output
        (trained,) = runs("tags.`ddsweep.kind` = 'train'")
        run_id = trained.info.run_id
        assert evaluate.saved_epochs(run_id) == [0, 1]
        for _ in range(2):  # the second finds every point complete and republishes the answer
            result = cli("study", "probe-grid", "--study", STUDY)
            assert result.exit_code == 0, result.output
        yield folder


def parent_and_children() -> tuple[Run, list[Run]]:
    (parent,) = runs(f"tags.`ddsweep.kind` = 'study' and tags.`ddsweep.study` = '{STUDY}'")
    kids = runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, kids


def test_children_last_as_long_as_their_extraction_and_fit(studied: Path) -> None:
    _, kids = parent_and_children()
    assert len(kids) == 5  # pixels + 2 blocks x 2 epochs
    for r in kids:
        work_ms = 1000 * (r.data.metrics["extract_s"] + r.data.metrics["fit_s"])
        assert r.info.end_time - r.info.start_time >= int(work_ms) - 1, r.info.run_name
    # the network's extraction is real work: some child lasts far beyond a bare log_batch
    assert max(r.info.end_time - r.info.start_time for r in kids) > 50


def test_children_carry_mlflows_context_tags(studied: Path) -> None:
    _, kids = parent_and_children()
    for r in kids:
        tags = r.data.tags
        assert tags["mlflow.user"]
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"] == sys.argv[0]  # what start_run would record
        if git_head():
            assert tags["mlflow.source.git.commit"] == git_head()


def test_a_probe_trial_records_the_splits_it_read(studied: Path) -> None:
    import json

    _, kids = parent_and_children()
    run = next(r for r in kids if r.data.params["block"] == "mid")
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"digits:train", "digits:test", "digits:val"}
    sizes = {n: json.loads(d.dataset.profile)["num_rows"] for n, d in inputs.items()}
    # digits: 1,797 images split 80/20, then 10 % of train held out as validation
    assert sizes["digits:train"] + sizes["digits:test"] == 1797
    assert sizes["digits:val"] == pytest.approx(0.1 * sizes["digits:train"], abs=1)
    for name, d in inputs.items():
        split = name.split(":")[1]
        assert {t.key: t.value for t in d.tags} == {"mlflow.data.context": split}
        fingerprint = json.loads(d.dataset.source)["tags"]["fingerprint"]
        assert fingerprint.startswith(f"digits:{'train' if split == 'val' else split}:8:")
    test_preds = next(d for n, d in inputs.items() if n == "digits:test")
    assert test_preds.dataset.digest  # a short hash of the fingerprint


def test_the_parent_holds_the_answer_chosen_on_validation(studied: Path) -> None:
    parent, kids = parent_and_children()
    # The report's rule, restated: the net's best cell at a trained epoch by val_top1 (pixels
    # and epoch 0 are baselines); an exact tie goes to the earliest epoch, then the earliest
    # block in forward order.
    net = [r for r in kids if r.data.params["block"] != "pixels" and r.data.params["epoch"] != "0"]
    order = {b: i for i, b in enumerate(BLOCKS)}
    best = min(
        net,
        key=lambda r: (
            -r.data.metrics["val_top1"],
            int(r.data.params["epoch"]),
            order[r.data.params["block"]],
        ),
    )
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["best_block"] == best.data.params["block"]
    assert tags["best_epoch"] == best.data.params["epoch"]
    assert tags["chosen_on"] == "val"
    assert metrics["best_top1"] == pytest.approx(best.data.metrics["top1"])
    assert metrics["best_epoch"] == float(best.data.params["epoch"])
    # per table too, named after it (the probe's settings off their defaults included)
    assert metrics[f"{SLUG_KEY}/best_top1"] == pytest.approx(best.data.metrics["top1"])
    assert tags[f"{SLUG_KEY}/best_block"] == tags["best_block"]
    # its description says the same, and methods.md is among its artifacts
    assert tags["mlflow.note.content"].count(f"answer: {tags['best_block']} @ {tags['best_epoch']}")
    assert "methods.md" in {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    history = MlflowClient().get_metric_history(parent.info.run_id, "best_top1")
    assert [m.step for m in history] == [5, 5]  # once per probe-grid command: 5 points complete


def test_the_parent_holds_the_sweep_file_and_the_tables(studied: Path) -> None:
    import json

    parent, _ = parent_and_children()
    client = MlflowClient()
    rid = parent.info.run_id
    sweep = {a.path for a in client.list_artifacts(rid, "sweep")}
    assert sweep == {f"sweep/{STUDY}.yaml", "sweep/as_run.yaml"}
    shipped = Path(client.download_artifacts(rid, f"sweep/{STUDY}.yaml", str(studied / "dl")))
    assert shipped.read_text() == SWEEP
    logged = json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    slug = SLUG
    assert {"path": f"tables/{slug}.json", "type": "table"} in logged
    assert {"path": "tables/summary.json", "type": "table"} in logged
    summary = client.load_table(parent.info.experiment_id, "tables/summary.json", [rid])
    assert len(summary) == 1  # replaced, not appended to, by the second probe-grid command
    assert summary["best block"][0] == parent.data.tags["best_block"]
    assert list(summary.columns)[:2] == ["best block", "best epoch"]  # the answer first
    # Every trial says in its description what it is and what it scored, with its interval.
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
    notes = [k.data.tags.get("mlflow.note.content", "") for k in kids]
    assert kids and all(re.match(r"\*\*top1 \d+\.\d ± \d+\.\d %", n) for n in notes), notes
    grid = client.load_table(parent.info.experiment_id, f"tables/{slug}.json", [rid])
    top1 = grid[grid["metric"] == "top1 %"]
    assert list(top1["block"]) == ["pixels", "mid", "up4"]
    assert {"0", "1"} <= set(grid.columns)


# --- mlflow run ---------------------------------------------------------------------------------


def mlflow_run_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
        DDSWEEP_DATA=str(folder / "data"),
        DDSWEEP_HOME=str(folder / ".ddsweep"),
        DDSWEEP_CACHE=str(folder / ".ddsweep" / "cache"),
        DDSWEEP_CHECKPOINTS=str(folder / ".ddsweep" / "checkpoints"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(REPO),  # this checkout's ddsweep behind the console script
        OMP_NUM_THREADS="1",
        GIT_PYTHON_REFRESH="quiet",
    )
    return env


# 11 s alone, 44 s on a loaded 2-core machine (mlflow's CLI, then a fresh ddsweep process);
# test_quickstart's mlflow-run test checks the nesting in the fast suite.
@pytest.mark.slow
def test_under_mlflow_run_the_project_run_is_the_studys_parent(
    workdir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = ["-P", "dataset=digits", "-P", "resolution=8", "-P", "block=pixels"]
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "study"]
    cmd += ["--env-manager", "local", "-P", "study=pix", *pixels, "-P", "probe=knn", "-P", "k=3"]
    env = mlflow_run_env(tmp_path)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    (parent,) = runs("tags.`ddsweep.kind` = 'study'")
    assert parent.data.tags["mlflow.project.entryPoint"] == "study"  # the project's own run
    assert parent.data.tags["ddsweep.study"] == "pix"
    assert parent.info.run_name == "pix"
    kids = runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [r.data.params["k"] for r in kids] == ["3"]
    assert {r.info.experiment_id for r in kids} == {parent.info.experiment_id}  # nested in the UI
    assert len(runs("")) == 2  # no empty sibling

    # A plain run of the same study in the same store grows the same parent.
    for name in ("DDSWEEP_HOME", "DDSWEEP_CACHE", "DDSWEEP_CHECKPOINTS"):
        monkeypatch.setenv(name, env[name])
    args = ["--dataset", "digits", "--resolution", "8", "--block", "pixels", "--probe", "knn"]
    result = cli("study", "probe-grid", "--study", "pix", *args, "--k", "3", "--k", "5")
    assert result.exit_code == 0, result.output
    kids = runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.params["k"] for r in kids) == ["3", "5"]
    assert len(runs("tags.`ddsweep.kind` = 'study'")) == 1


def readme_filters() -> dict[str, str]:
    """The search-box filters of the README's "Browsing results", by what they find."""
    section = (REPO / "README.md").read_text().split("## Browsing results", 1)[1]
    section = section.split("\n## ", 1)[0]
    study = re.search(r"`(tags\.ddsweep\.study = '[^']+')`", section)
    trials = re.search(r"add `and (tags\.ddsweep\.kind = 'trial')`", section)
    train = re.search(r"\*\*The training run\*\*: `([^`]+)`", section)
    assert study and trials and train, section
    mine = study.group(1).replace("digits_blocks", STUDY)
    return {"study": mine, "trials": f"{mine} and {trials.group(1)}", "train": train.group(1)}


def test_the_readmes_filters_find_the_training_run_and_the_studys_runs(studied: Path) -> None:
    """Typed as the README gives them into `mlflow ui`'s search box (mlflow.search_runs)."""
    import mlflow

    from ddsweep.tracking import schema

    found = {
        what: mlflow.search_runs(filter_string=q, search_all_experiments=True, output_format="list")
        for what, q in readme_filters().items()
    }
    (trained,) = found["train"]
    assert trained.data.tags[schema.KIND_TAG] == schema.TRAIN_KIND
    assert trained.data.tags[schema.DATASET_TAG] == "digits"
    assert len(found["trials"]) == 5  # pixels + 2 blocks x 2 epochs
    assert len(found["study"]) == 6  # and the parent
    assert trained.info.run_id not in {r.info.run_id for r in found["study"]}
