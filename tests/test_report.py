"""Report: tables built from planted results (pure rows and a real MLflow sqlite store), the best
markers, the summary, FID curves, and the files written and logged back to the study's run."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from rich.console import Console

from ddsweep import report, tracking
from ddsweep.errors import UserError
from ddsweep.report import Cell, FidCurve, build_tables, fid_curves, summary

if TYPE_CHECKING:
    from conftest import IsolatedStore

STUDY = "grid"
TRIAL = {tracking.KIND_TAG: "trial"}
# Planted top1 per block and epoch; pixels (attention "None", epoch "None") is added for linear.
LINEAR_ATTN = {
    "down3": {0: 0.30, 50: 0.60, 100: 0.62},
    "mid": {0: 0.20, 50: 0.70, 100: 0.75},
    "up4": {0: 0.25, 50: 0.80, 100: 0.78},
    "up_blocks.1.resnets.2": {50: 0.79},
}
LINEAR_NOATTN = {  # partial: mid@100 still running, up4@100 failed
    "down3": {0: 0.31, 50: 0.61, 100: 0.63},
    "mid": {0: 0.21, 50: 0.71},
    "up4": {0: 0.26, 50: 0.72},
}
KNN_ATTN = {  # (top1, top3), k=5
    "down3": {50: (0.55, 0.80)},
    "up4": {50: (0.65, 0.85), 100: (0.66, 0.90)},
}
PIXELS_TOP1 = 0.50
BACKBONE = {True: "abc", False: "def", None: "abc"}  # training run id by attention


def params(block: str, epoch: int | None, attention: bool | None, probe: str = "linear") -> dict:
    return {
        "dataset": "digits",
        "resolution": "16",
        "attention": str(attention),
        "epoch": str(epoch),
        "block": block,
        "noise_step": "0",
        "probe": probe,
        "k": "5" if probe == "knn" else "0",
        "pool": "avg",
        "weights": "ema",
        "linear_epochs": "30",  # a param, not in the point id: not a setting of the facet
        "backbone": "none" if block == "pixels" else f"{BACKBONE[attention]}@{epoch}",
    }


@dataclass(frozen=True)
class Planted:
    root: Path
    parent: str
    fid_parent: str


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, isolated_store: IsolatedStore
) -> Iterator[Planted]:
    """A sqlite MLflow store holding study `grid`, an empty study and FID runs elsewhere."""
    root = tmp_path_factory.mktemp("report")
    with isolated_store(root):
        client = MlflowClient()
        exp = client.create_experiment("probes")
        fid_exp = client.create_experiment("generative")

        def study(name: str, experiment: str) -> str:
            tags = {tracking.KIND_TAG: "study", report.STUDY_TAG: name}
            return tracking.log_run(experiment, name, {}, {}, tags)

        parent = study(STUDY, exp)
        study(STUDY, fid_exp)  # a later parent of the same name: the oldest one is the study

        def trial(attention: bool | None, block: str, epoch: int | None, **metrics: float) -> str:
            probe = "knn" if "top3" in metrics else "linear"
            p = params(block, epoch, attention, probe)
            return tracking.log_run(exp, block, p, metrics, TRIAL, parent_run_id=parent)

        trial(None, "pixels", None, top1=PIXELS_TOP1)
        for attention, table in ((True, LINEAR_ATTN), (False, LINEAR_NOATTN)):
            for block, row in table.items():
                for epoch, top1 in row.items():
                    trial(attention, block, epoch, top1=top1)
        for block, knn_row in KNN_ATTN.items():
            for epoch, (top1, top3) in knn_row.items():
                trial(True, block, epoch, top1=top1, top3=top3)
        client.set_terminated(trial(False, "up4", 100, top1=0.99), "FAILED")
        running = client.create_run(
            exp, tags={**TRIAL, "mlflow.parentRunId": parent}, run_name="running"
        )
        client.log_metric(running.info.run_id, "top1", 0.98)
        for key, value in params("mid", 100, False).items():
            client.log_param(running.info.run_id, key, value)
        # A trial of another study must not leak in.
        other = study("other", exp)
        tracking.log_run(
            exp, "x", params("down3", 0, True), {"top1": 0.97}, TRIAL, parent_run_id=other
        )
        empty = study("empty", exp)
        client.set_terminated(
            tracking.log_run(
                exp, "x", params("down3", 0, True), {"top1": 0.9}, TRIAL, parent_run_id=empty
            ),
            "FAILED",
        )

        fid_parent = study("digits-fid", fid_exp)
        fid_tags = {tracking.KIND_TAG: "fid"}

        def fid(attention: bool, epoch: int, metrics: dict[str, float]) -> str:
            p = {
                "backbone_run": BACKBONE[attention],
                "dataset": "digits",
                "resolution": "16",
                "attention": str(attention),
                "epoch": str(epoch),
            }
            return tracking.log_run(fid_exp, "fid", p, metrics, fid_tags, parent_run_id=fid_parent)

        fid(True, 50, {"fid": 120.0})
        fid(True, 100, {"fid": 80.0})
        client.set_terminated(fid(True, 0, {"fid": 999.0}), "FAILED")
        fid(False, 50, {"fd_dinov2": 45.0})
        yield Planted(root, parent, fid_parent)


def facets_of(store: Planted) -> list[report.Facet]:
    return build_tables(report.load_trials(store.parent))


def test_cells_of_every_facet_are_exactly_the_planted_ones(store: Planted) -> None:
    attn, knn, noattn = facets_of(store)
    assert (attn.key.attention, attn.key.probe) == (True, "linear")
    assert (knn.key.attention, knn.key.probe, knn.key.k) == (True, "knn", 5)
    assert (noattn.key.attention, noattn.key.probe) == (False, "linear")

    assert attn.blocks == ["pixels", "down3", "mid", "up4", "up_blocks.1.resnets.2"]
    assert attn.epochs == [0, 50, 100]
    for facet, planted in ((attn, LINEAR_ATTN), (noattn, LINEAR_NOATTN)):
        expected: dict[tuple[str, int | None], Cell] = {
            (b, e): Cell(v) for b, row in planted.items() for e, v in row.items()
        }
        expected |= {("pixels", e): Cell(PIXELS_TOP1) for e in facet.epochs}  # baseline everywhere
        assert facet.cells == expected
    # partial study: blanks, not errors; the FAILED (0.99) and RUNNING (0.98) trials are ignored
    assert noattn.value("mid", 100) is None
    assert noattn.value("up4", 100) is None
    assert noattn.blocks == ["pixels", "down3", "mid", "up4"]

    assert knn.blocks == ["down3", "up4"]  # no pixels baseline planted for k-NN
    assert knn.epochs == [50, 100]
    assert knn.metrics() == ("top1", "top3")
    assert knn.cells == {(b, e): Cell(*v) for b, row in KNN_ATTN.items() for e, v in row.items()}


def test_best_block_per_epoch_and_best_overall(store: Planted) -> None:
    attn, knn, noattn = facets_of(store)
    # epoch 0: the raw pixels beat the untrained net, and that is marked like any winner
    assert [attn.best_blocks(e) for e in attn.epochs] == [{"pixels"}, {"up4"}, {"up4"}]
    assert attn.best() == ("up4", 50, 0.80)
    assert [noattn.best_blocks(e) for e in noattn.epochs] == [{"pixels"}, {"up4"}, {"down3"}]
    assert noattn.best() == ("up4", 50, 0.72)
    assert knn.best() == ("up4", 100, 0.66)
    assert knn.best("top3") == ("up4", 100, 0.90)


def test_summary_rows(store: Planted) -> None:
    rows = summary(facets_of(store))
    got = [
        (
            r.key.attention,
            r.key.probe,
            r.best_block,
            r.best_epoch,
            r.best_top1,
            r.pixels_top1,
            r.epoch0_block,
            r.epoch0_top1,
        )
        for r in rows
    ]
    assert got == [
        (True, "linear", "up4", 50, 0.80, 0.50, "down3", 0.30),
        (True, "knn", "up4", 100, 0.66, None, None, None),
        (False, "linear", "up4", 50, 0.72, 0.50, "down3", 0.31),
    ]
    assert not any(r.baseline_wins for r in rows)


def test_gather_fid_finds_planted_runs_in_any_experiment(store: Planted) -> None:
    assert report.gather_fid() == {
        ("digits", 16, True): FidCurve("fid", {50: 120.0, 100: 80.0}),  # FAILED epoch 0 left out
        ("digits", 16, False): FidCurve("fd_dinov2", {50: 45.0}),
    }


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def test_write_report_files_artifacts_and_overwrite(store: Planted) -> None:
    out = store.root / "reports" / STUDY
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "digits-16px-attn-linear-t0-avg-ema.csv").write_text("stale")
    buf = StringIO()
    paths = report.write_report(STUDY, out, {"all"}, Console(file=buf, width=200))

    slugs = [
        "digits-16px-attn-linear-t0-avg-ema",
        "digits-16px-attn-knn5-t0-avg-ema",
        "digits-16px-noattn-linear-t0-avg-ema",
    ]
    expected = {f"{s}.{ext}" for s in slugs for ext in ("csv", "png")} | {
        "summary.csv",
        "report.md",
        "methods.md",
    }
    assert {p.name for p in paths} == expected
    assert (out / "notes.txt").read_text() == "mine"  # other files are never touched

    assert read_csv(out / f"{slugs[0]}.csv") == [
        ["metric", "block", "0", "50", "100"],
        ["top1 %", "pixels", "50.0", "50.0", "50.0"],
        ["top1 %", "down3", "30.0", "60.0", "62.0"],
        ["top1 %", "mid", "20.0", "70.0", "75.0"],
        ["top1 %", "up4", "25.0", "80.0", "78.0"],
        ["top1 %", "up_blocks.1.resnets.2", "", "79.0", ""],
    ]
    assert read_csv(out / f"{slugs[1]}.csv") == [
        ["metric", "block", "50", "100"],
        ["top1 %", "down3", "55.0", ""],
        ["top1 %", "up4", "65.0", "66.0"],
        ["top3 %", "down3", "80.0", ""],
        ["top3 %", "up4", "85.0", "90.0"],
    ]
    assert read_csv(out / f"{slugs[2]}.csv") == [
        ["metric", "block", "0", "50", "100"],
        ["top1 %", "pixels", "50.0", "50.0", "50.0"],
        ["top1 %", "down3", "31.0", "61.0", "63.0"],
        ["top1 %", "mid", "21.0", "71.0", ""],
        ["top1 %", "up4", "26.0", "72.0", ""],
    ]
    summary_csv = read_csv(out / "summary.csv")
    header = summary_csv[0]
    columns = [
        "best_block",
        "best_epoch",
        "best_top1 %",
        "pixels_top1 %",
        "epoch0_block",
        "epoch0_top1 %",
        "chosen_on",
    ]
    assert [[r[header.index(c)] for c in columns] for r in summary_csv[1:]] == [
        ["up4", "50", "80.0", "50.0", "down3", "30.0", "test"],  # no val metrics: on test
        ["up4", "100", "66.0", "", "", "", "test"],
        ["up4", "50", "72.0", "50.0", "down3", "31.0", "test"],
    ]

    md = (out / "report.md").read_text()
    assert "| pixels (baseline) | **50.0** | 50.0 | 50.0 |" in md
    assert "| up4 | 25.0 | **80.0** * | **78.0** |" in md
    assert "| down3 | 31.0 | 61.0 | **63.0** |" in md
    assert "| mid | 21.0 | 71.0 |  |" in md  # a blank cell
    assert "FID by epoch: 50: 120.0, 100: 80.0" in md
    assert "fd_dinov2 by epoch: 50: 45.0" in md
    assert f"![{slugs[0]}]({slugs[0]}.png)" in md

    for slug in slugs:
        png = out / f"{slug}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()

    printed = buf.getvalue()
    assert "80.0 *" in printed and "pixels (baseline)" in printed
    assert f"study {STUDY}: best block and epoch per facet" in printed

    logged = {a.path for a in MlflowClient().list_artifacts(store.parent, "report")}
    assert logged == {f"report/{name}" for name in expected}


def test_table_only_writes_and_logs_nothing(store: Planted, tmp_path: Path) -> None:
    buf = StringIO()
    assert report.write_report(STUDY, tmp_path / "r", {"table"}, Console(file=buf, width=40)) == []
    assert not (tmp_path / "r").exists()
    assert "(rows: epochs)" in buf.getvalue()  # too narrow for block × epoch: transposed


def test_unknown_study_is_a_one_line_user_error(store: Planted, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ddsweep study probe-grid --study nosuch") as err:
        report.write_report("nosuch", tmp_path / "r", {"all"}, Console(file=StringIO()))
    assert "'nosuch'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()


def test_study_without_finished_trials_writes_nothing(store: Planted, tmp_path: Path) -> None:
    buf = StringIO()
    assert report.write_report("empty", tmp_path / "r", {"all"}, Console(file=buf)) == []
    assert "no finished trials yet" in buf.getvalue()
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------- the core, on plain rows


def row(block: str, epoch: object, top1: float, attention: object = True, **extra: object) -> dict:
    return {
        **params(block, None, None),
        "attention": str(attention),
        "epoch": str(epoch),
        "top1": top1,
        **extra,
    }


def test_newest_rerun_wins_and_a_specific_result_overrides_the_broadcast() -> None:
    [facet] = build_tables(
        [
            row("up4", 50, 0.7, start_time=2),
            row("up4", 50, 0.4, start_time=1),  # older rerun of the same cell
            row("pixels", None, 0.5, attention=None),
            row("pixels", 50, 0.55, attention=None),  # measured at epoch 50 itself
            row("down3", 50, 0.1, status="FAILED"),
            row("down3", 50, 0.1, **{"tags.ddsweep.kind": "fid"}),
        ]
    )
    assert facet.cells == {("up4", 50): Cell(0.7), ("pixels", 50): Cell(0.55)}


def test_baseline_winning_is_reported_as_such() -> None:
    facets = build_tables(
        [row("pixels", None, 0.9, attention=None), row("up4", 0, 0.3), row("up4", 50, 0.5)]
    )
    [r] = summary(facets)
    # The summary answers "which block of the net": up4 at 50, with the baseline beside it.
    assert (r.best_block, r.best_epoch, r.best_top1) == ("up4", 50, 0.5)
    assert r.pixels_top1 == 0.9
    assert r.baseline_wins
    assert facets[0].best("top1") == ("pixels", 0, 0.9)  # the table's best cell: earliest tie
    assert facets[0].best_blocks(50) == {"pixels"}


def test_pixels_only_facet_has_one_any_column_and_every_attention_gets_the_baseline() -> None:
    [only] = build_tables([row("pixels", None, 0.5, attention=None)])
    assert only.key.attention is None and only.epochs == [None]
    assert only.value("pixels", None) == 0.5
    both = build_tables(
        [row("pixels", None, 0.5, attention=None), row("up4", 0, 0.3), row("up4", 0, 0.2, False)]
    )
    assert [(f.key.attention, f.value("pixels", 0)) for f in both] == [(True, 0.5), (False, 0.5)]


def test_fid_curves_prefer_fid_and_keep_the_newest_run() -> None:
    base = {"dataset": "d", "resolution": "32", "attention": "False"}
    curves = fid_curves(
        [
            {**base, "epoch": "50", "fid": 30.0, "fd_dinov2": 9.0, "start_time": 1},
            {**base, "epoch": "50", "fid": 25.0, "start_time": 2},
            {**base, "epoch": "100", "fd_dinov2": 8.0},  # no fid at this epoch: left out
            {**base, "epoch": "None", "fid": 1.0},
        ]
    )
    assert curves == {("d", 32, False): FidCurve("fid", {50: 25.0})}


def test_parse_formats() -> None:
    assert report.parse_formats(["all"]) == set(report.FORMATS)
    assert report.parse_formats(["csv,md", "png"]) == {"csv", "md", "png"}
    with pytest.raises(UserError, match="unknown report format 'pdf'"):
        report.parse_formats(["pdf"])
