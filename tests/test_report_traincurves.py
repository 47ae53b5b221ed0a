"""The report's view of the probe curves logged while training (pure: histories in)."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.console import Console

from ddsweep.report import traincurves as tc

HISTORIES = {
    "runB": {"probe.up3.knn50.top1": {2: 0.5, 1: 0.4}},
    "runA": {
        "probe.up3.knn50.top1": {1: 0.30, 2: 0.70, 3: 0.70},
        "probe/down4/knn50/top1": {1: 0.2, 2: 0.25, 3: 0.3},  # the naming of 0.1.x runs
        "probe/linear/top1/mid": {2: 0.9},  # today's
        "epoch_loss": {1: 0.1},  # not a probe curve
        "probe_s": {1: 2.0},  # nor this
    },
}


def test_curves_are_ordered_by_run_probe_and_block_and_know_their_best() -> None:
    found = tc.curves(HISTORIES)
    assert [(c.run_id, c.block, c.probe) for c in found] == [
        ("runB", "up3", "knn50"),
        ("runA", "down4", "knn50"),
        ("runA", "up3", "knn50"),
        ("runA", "mid", "linear"),
    ]
    assert list(found[0].values) == [1, 2]  # epochs ascending
    assert found[2].best() == (2, 0.70)  # the earliest of equal values


def test_backbone_runs_come_from_the_trials_backbone_params() -> None:
    labels = ["r1@2", "r2@0", "r1@4", "none", None, "/some/folder"]
    assert tc.backbone_runs(labels) == ["r1", "r2"]


def test_the_table_and_files_show_every_curve(tmp_path: Path) -> None:
    found = tc.curves(HISTORIES)
    console = Console(record=True, width=200)
    for table in tc.rich_tables(found):
        console.print(table)
    text = console.export_text()
    assert "run runA" in text and "run runB" in text
    assert "70.0 (2)" in text  # up3's best, with its epoch
    paths = tc.write_files(found, tmp_path, {"csv", "md"})
    assert [p.name for p in paths] == [tc.CSV_FILE, tc.MD_FILE]
    rows = list(csv.reader(paths[0].open()))
    assert rows[0] == ["run_id", "block", "probe", "epoch", "top1"]
    assert len(rows) - 1 == sum(len(c.values) for c in found)
    md = paths[1].read_text()
    assert "| down4 | knn50 | 20.0 | 25.0 | 30.0 | 30.0 (3) |" in md
    assert tc.write_files(found, tmp_path / "none", {"png"}) == []


def test_the_terminal_shows_at_most_a_dozen_epochs_first_and_last_kept() -> None:
    many = {"r": {"probe.up3.knn50.top1": {e: e / 100 for e in range(0, 100, 2)}}}
    (table,) = tc.rich_tables(tc.curves(many))
    epochs = [c.header for c in table.columns][2:-1]
    assert len(epochs) == tc.MAX_COLUMNS
    assert epochs[0] == "0" and epochs[-1] == "98"
