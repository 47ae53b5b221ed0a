"""The report read from a real MLflow store of new trials: predictions artifacts give every cell
an interval and every "best" a paired test, val metrics make the choice, the header counts
finished and failed trials, and `experiment` narrows where the study is looked for."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from ddsweep import predictions, report, tracking
from ddsweep.errors import UserError
from ddsweep.tracking.schema import POINT_TAG

if TYPE_CHECKING:
    from conftest import IsolatedStore

N = 360
LABELS = np.arange(N, dtype=np.int32) % 10
# hits per block at epoch 5: up4 and mid one example apart (a tie), down3 far behind
HITS = {"up4": 300, "mid": 299, "down3": 200}
VAL = {"up4": 0.80, "mid": 0.85, "down3": 0.5}  # mid is chosen on val


def log_trial(exp: str, parent: str, folder: Path, block: str) -> str:
    hit = np.arange(N) < HITS[block]
    pred = np.where(hit, LABELS, (LABELS + 1) % 10).astype(np.int32)
    pid = f"dataset=digits&resolution=16&attention=true&epoch=5&block={block}&probe=linear"
    params = {
        "dataset": "digits",
        "resolution": "16",
        "attention": "true",
        "epoch": "5",
        "block": block,
        "noise_step": "0",
        "probe": "linear",
        "k": "0",
        "pool": "avg",
        "weights": "ema",
        "backbone": "trainrun@5",
        "linear.epochs": "30",
    }
    metrics = {"top1": float(hit.mean()), "val_top1": VAL[block]}
    tags = {tracking.KIND_TAG: "trial", POINT_TAG: pid}
    run = tracking.log_run(exp, block, params, metrics, tags, parent_run_id=parent)
    folder.mkdir(parents=True, exist_ok=True)
    path = predictions.save(folder / predictions.FILE, {"test": (pred, LABELS)})
    MlflowClient().log_artifact(run, str(path))
    return run


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, isolated_store: IsolatedStore
) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("report-store")
    with isolated_store(root):
        client = MlflowClient()
        exp = client.create_experiment("probes")
        tags = {tracking.KIND_TAG: "study", report.STUDY_TAG: "new"}
        parent = tracking.log_run(exp, "new", {}, {}, tags)
        for block in HITS:
            log_trial(exp, parent, root / "files" / block, block)
        failed = tracking.log_run(
            exp, "x", {"block": "up1"}, {}, {tracking.KIND_TAG: "trial"}, parent_run_id=parent
        )
        client.set_terminated(failed, "FAILED")
        fid = {"backbone_run": "trainrun", "epoch": "5", "sampler": "ddpm", "steps": "100"}
        tracking.log_run(exp, "fid", fid, {"fid": 42.0}, {tracking.KIND_TAG: "fid"})
        other = {**fid, "backbone_run": "otherrun"}
        tracking.log_run(exp, "fid", other, {"fid": 7.0}, {tracking.KIND_TAG: "fid"})
        yield root


def test_report_of_new_trials_has_intervals_ties_val_choice_and_counts(store: Path) -> None:
    out = store / "out"
    buf = StringIO()
    report.write_report("new", out, ["all"], Console(file=buf, width=220), experiment="probes")
    printed = buf.getvalue()
    assert printed.splitlines()[0] == "study new: 3 trials finished, 1 failed"
    assert " ± " in printed and "tied with" in printed

    md = (out / "report.md").read_text()
    assert "study new: 3 trials finished, 1 failed" in md
    assert "best cell: up4 @ 5, 83.3 ± " in md and "tied with mid @ 5 (p = 1.00)" in md
    assert "chosen on the test split" not in md  # every trial has val_top1
    assert "FID (ddpm 100 steps) by epoch: 5: 42.0" in md and "7.0" not in md

    slug = "digits-16px-attn-linear-t0-avg-ema"
    with (out / f"{slug}.csv").open(newline="") as fh:
        rows = {(r[0], r[1]): r[2:] for r in csv.reader(fh)}
    low, high = float(rows[("top1 low %", "up4")][0]), float(rows[("top1 high %", "up4")][0])
    assert low < 83.3 < high
    with (out / "summary.csv").open(newline="") as fh:
        [line] = list(csv.DictReader(fh))
    assert (line["best_block"], line["chosen_on"], line["best_top1 %"]) == ("mid", "val", "83.1")
    assert line["best_on_test_block"] == "up4" and line["best_on_test_top1 %"] == "83.3"
    assert line["verdict"].startswith("tied with up4 @ 5")
    assert float(line["best_low %"]) < 83.1 < float(line["best_high %"])


def test_experiment_narrows_where_the_study_is_found(store: Path) -> None:
    client = MlflowClient()
    client.create_experiment("elsewhere")
    assert report.find_study("new", "probes") == report.find_study("new")
    with pytest.raises(UserError, match="no study 'new' in experiment 'elsewhere'"):
        report.find_study("new", "elsewhere")
    with pytest.raises(UserError, match="no experiment 'nosuch'"):
        report.find_study("new", "nosuch")
