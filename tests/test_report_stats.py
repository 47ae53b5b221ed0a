"""Report statistics on plain rows: bootstrap intervals cover at the nominal rate, "best" is a
paired test against the runner-up, choices are made on validation and reported on test, every
setting makes its own table, and FID curves come from exactly the backbone a table probed."""

from __future__ import annotations

import numpy as np
import pytest

from ddsweep import predictions, report
from ddsweep.report import build_tables, fid_by_backbone, stats, summary
from ddsweep.tracking.schema import POINT_TAG

N = 360  # test examples
LABELS = np.arange(N, dtype=np.int32) % 10


def preds(hit: np.ndarray, labels: np.ndarray = LABELS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A predictions file's content whose test hits are `hit` (bool [N])."""
    pred = np.where(hit, labels, (labels + 1) % 10).astype(np.int32)
    return {"test": (pred, labels)}


def pair(both: int, only_a: int, only_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Hits of two classifiers on N examples: `both` right for both, `only_a` right for a alone,
    `only_b` for b alone, the rest wrong for both."""
    a, b = np.zeros(N, bool), np.zeros(N, bool)
    a[:both] = b[:both] = True
    a[both : both + only_a] = True
    b[both + only_a : both + only_a + only_b] = True
    return a, b


def trial(block: str, epoch: int, hit: np.ndarray | None = None, **extra: object) -> dict:
    row = {
        "dataset": "digits",
        "resolution": "16",
        "attention": "True",
        "epoch": str(epoch),
        "block": block,
        "noise_step": "0",
        "probe": "linear",
        "k": "0",
        "pool": "avg",
        "weights": "ema",
        "backbone": f"runA@{epoch}",
        f"tags.{POINT_TAG}": f"dataset=digits&resolution=16&attention=true&epoch={epoch}&block={block}"
        "&probe=linear",
    }
    if hit is not None:
        row |= {"top1": float(hit.mean()), "predictions": preds(hit)}
    return {**row, **extra}


# ------------------------------------------------------------------------------ intervals


def test_bootstrap_interval_covers_the_true_accuracy_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(1234)
    p, sets = 0.8, 200
    covered = 0
    for i in range(sets):
        hits = rng.random(N) < p  # a classifier of accuracy p on a fresh test set
        low, high = stats.bootstrap_interval(hits, seed=i)
        assert low <= hits.mean() <= high
        covered += low <= p <= high
    assert 0.90 <= covered / sets <= 0.99


def test_binomial_bootstrap_matches_resampling_indices_and_is_seeded() -> None:
    hits = np.random.default_rng(0).random(N) < 0.7
    fast = stats.bootstrap_interval(hits)
    slow = stats.bootstrap_indices(hits)
    assert fast == pytest.approx(slow, abs=0.01)
    assert stats.bootstrap_interval(hits) == fast  # the same hits, the same interval
    assert fast[1] - fast[0] == pytest.approx(2 * 1.96 * (0.7 * 0.3 / N) ** 0.5, abs=0.012)


def test_every_cell_gets_an_interval_from_its_predictions_and_old_cells_none() -> None:
    hit = np.arange(N) % 5 != 0  # 80 %
    [facet] = build_tables([trial("up4", 50, hit), trial("mid", 50, top1=0.7)])
    cell = facet.cells[("up4", 50)]
    assert cell.top1 == pytest.approx(0.8)
    assert cell.low is not None and cell.high is not None
    assert cell.low < 0.8 < cell.high and 0.02 < cell.high - cell.low < 0.1
    assert facet.cells[("mid", 50)].low is None  # a trial without predictions (ddsweep 0.1)
    md = report.markdown_table(facet)
    assert f"| up4 | **{report.pct_ci(0.8, cell.low, cell.high)}** * |" in md
    assert " ± " in md and "| mid | 70.0 |" in md


# ------------------------------------------------------------------------ best is a claim


def test_mcnemar_small_difference_is_a_tie_and_a_large_one_is_significant() -> None:
    a, b = pair(270, 11, 10)  # 78.1 % vs 77.8 %: one example apart
    assert 100 * (a.mean() - b.mean()) < 0.3
    assert stats.mcnemar_p(a, b) > 0.5
    a, b = pair(250, 40, 4)  # 80.6 % vs 70.6 %: ten points
    assert stats.mcnemar_p(a, b) < 1e-6
    assert stats.mcnemar_p(a, a) == 1.0


def test_a_best_cell_within_noise_of_the_runner_up_is_reported_as_a_tie() -> None:
    a, b = pair(270, 11, 10)
    facets = build_tables([trial("up4", 50, a), trial("mid", 50, b), trial("down3", 50, b & a)])
    [facet] = facets
    claim = facet.claim()
    assert claim is not None and claim.best == ("up4", 50) and claim.runner_up == ("mid", 50)
    assert claim.is_tie and claim.p is not None and claim.p > 0.05
    assert facet.best_blocks(50) == {"up4", "mid"}  # down3 (270/360) is significantly worse
    md = report.markdown_table(facet)
    assert " * " not in md and md.count("≈") == 2  # no single winner claimed
    text = report.markdown("s", facets, summary(facets), plots=False)
    assert "tied with mid @ 50 (p = " in text
    assert "50: up4 tied with mid (p = " in text
    [row] = summary(facets)
    assert row.tied and row.runner_up == ("mid", 50)


def test_a_ten_point_lead_is_a_significant_single_best() -> None:
    a, b = pair(250, 40, 4)
    facets = build_tables([trial("up4", 50, a), trial("mid", 50, b)])
    [facet] = facets
    claim = facet.claim()
    assert claim is not None and not claim.is_tie and claim.p is not None and claim.p < 0.001
    assert facet.best_blocks(50) == {"up4"}
    md = report.markdown_table(facet)
    assert md.count(" * ") == 1 and "≈" not in md
    assert "beats mid @ 50 (p < 0.001)" in report.markdown("s", facets, summary(facets), False)


# ----------------------------------------------------------- choose on val, report on test


def test_summary_chooses_on_validation_and_reports_test_with_the_optimistic_best_beside() -> None:
    a, b = pair(250, 40, 4)  # up4 is better on test ...
    rows = [
        trial("up4", 50, a, val_top1=0.70),
        trial("mid", 50, b, val_top1=0.75),
    ]  # ... mid on val
    facets = build_tables(rows)
    [row] = summary(facets)
    assert row.chosen_on == "val"
    assert (row.best_block, row.best_epoch) == ("mid", 50)
    assert row.best_top1 == pytest.approx(b.mean())  # the test accuracy of the chosen cell
    assert row.best_low is not None and row.best_low < b.mean() < (row.best_high or 0)
    assert (row.test_best_block, row.test_best_top1) == ("up4", pytest.approx(a.mean()))
    assert "best on test (optimistic)" in report.markdown("s", facets, [row], plots=False)


def test_without_val_metrics_the_choice_is_on_test_and_said_once() -> None:
    facets = build_tables([trial("up4", 50, top1=0.8), trial("mid", 50, top1=0.7)])
    [row] = summary(facets)
    assert row.chosen_on == "test" and row.best_block == "up4" and row.best_low is None
    md = report.markdown("s", facets, [row], plots=False)
    assert md.count("chosen on the test split itself") == 1


# ----------------------------------------------------------------- a point is every setting


def test_trials_differing_in_one_setting_never_share_a_cell() -> None:
    tag = f"tags.{POINT_TAG}"
    knn = "dataset=digits&resolution=16&attention=true&epoch=50&block=up4&probe=knn&k=10"
    base = {**trial("up4", 50, top1=0.8), "probe": "knn", "k": "10", tag: knn}
    cosine = {**base, tag: knn + "&knn.metric=cosine", "top1": 0.6, "start_time": 9}
    old = {**base, tag: "digits|16|True|50|up4|0|knn|10", "pool": "max", "top1": 0.5}
    facets = build_tables([base, cosine, old])
    assert len(facets) == 3  # today the newest (cosine) overwrote the default metric's cell
    by_settings = {(f.key.settings, f.key.pool): f.value("up4", 50) for f in facets}
    assert by_settings == {
        ((), "avg"): 0.8,
        ((("knn.metric", "cosine"),), "avg"): 0.6,
        ((), "max"): 0.5,
    }
    slugs = {f.key.slug() for f in facets}
    assert len(slugs) == 3 and "digits-16px-attn-knn10-t0-avg-ema-knn.metric=cosine" in slugs
    assert any(f.key.title().endswith("ema weights, knn.metric=cosine") for f in facets)


def test_point_tag_name_is_the_recorders() -> None:
    assert report.POINT_TAG == POINT_TAG


# ------------------------------------------------------------------------ FID paired exactly


def fid_run(backbone: str, epoch: int, value: float, **settings: str) -> dict:
    return {
        "dataset": "digits",
        "resolution": "16",
        "attention": "True",
        "epoch": str(epoch),
        "backbone_run": backbone,
        "fid": value,
        "tags.ddsweep.kind": "fid",
        **settings,
    }


def test_a_facet_shows_only_the_fid_of_the_backbone_it_probed() -> None:
    ddpm = {"sampler": "ddpm", "steps": "1000", "samples": "2000", "weights": "ema"}
    ddim = {**ddpm, "sampler": "ddim", "steps": "50"}
    runs = [
        fid_run("runA", 50, 30.0, **ddpm),
        fid_run("runA", 50, 35.0, **ddim),
        fid_run("runB", 50, 5.0, start_time=9, **ddpm),  # another training run, newer
        fid_run("runB", 100, 4.0, **ddpm),
    ]
    [facet] = build_tables([trial("up4", 50, top1=0.8), trial("pixels", 50, top1=0.5)])
    assert facet.backbones == ("runA",)
    report.attach_fid([facet], fid_by_backbone(runs))
    assert [(c.label(), c.values) for c in facet.fids] == [
        ("FID (ddim 50 steps, 2000 samples, ema)", {50: 35.0}),
        ("FID (ddpm 1000 steps, 2000 samples, ema)", {50: 30.0}),
    ]
    assert all(c.backbone_run == "runA" for c in facet.fids)


def test_status_line_counts_finished_and_failed_trials() -> None:
    line = report.status_line("g", {"FINISHED": 40, "FAILED": 2, "RUNNING": 1})
    assert line == "study g: 40 trials finished, 2 failed, 1 running"


def test_predictions_round_trip_feeds_the_cells(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hit = np.arange(N) % 4 != 0
    path = predictions.save(tmp_path / predictions.FILE, {"test": preds(hit)["test"]})
    [facet] = build_tables(
        [{**trial("up4", 50), "top1": 0.75, "predictions": predictions.load(path)}]
    )
    assert facet.cells[("up4", 50)].hits is not None and facet.cells[("up4", 50)].low is not None


def test_a_baseline_shown_in_every_epoch_column_is_not_tied_with_itself() -> None:
    from ddsweep.report.tables import Cell, contest

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 360)
    good = np.where(rng.random(360) < 0.95, labels, (labels + 1) % 10)
    poor = np.where(rng.random(360) < 0.70, labels, (labels + 1) % 10)

    def cell(pred: np.ndarray) -> Cell:
        hits = pred == labels
        return Cell(top1=float(hits.mean()), hits=hits, labels=labels)

    pixels = cell(good)  # one result, broadcast to three epoch columns
    cells = {("pixels", 0): pixels, ("pixels", 2): pixels, ("pixels", 4): pixels}
    cells[("mid", 2)] = cell(poor)
    claim = contest(cells)
    assert claim is not None
    assert claim.best == ("pixels", 0) and not claim.is_tie
    assert claim.runner_up == ("mid", 2) and claim.p is not None and claim.p < 0.05


@pytest.mark.parametrize("width", [80, 200])
def test_the_terminal_shows_every_cell_s_interval_whatever_its_width(width: int) -> None:
    from rich.console import Console

    from ddsweep.report.render import rich_tables
    from ddsweep.report.tables import Cell, Facet, FacetKey

    epochs = [0, 2, 4, 6, 8]
    cells = {
        (b, e): Cell(top1=0.5 + 0.01 * e, low=0.45 + 0.01 * e, high=0.56 + 0.01 * e)
        for b in ("mid", "up4")
        for e in epochs
    }
    key = FacetKey("digits", 16, True, "knn", 10, 0, "avg", "ema")
    facet = Facet(key, ["mid", "up4"], list(epochs), cells)
    console = Console(record=True, width=width)
    for table in rich_tables(facet, width):
        console.print(table)
    text = console.export_text()
    # Inline ("50.0 ± 5.5") when wide enough, else a table of the ± values of its own.
    assert text.count("± 5.5") + text.count("±5.5") == 2 * len(epochs)


# ------------------------------------------------------------------------------ marks


def three_cells() -> list[dict]:
    """Of 360 test images: A right on 324, B on A's less 7 (significant), C on A's less 12
    plus 4 others (not significant); every cell with a top3 and a train top1."""
    a = np.zeros(N, bool)
    a[:324] = True  # 90 %
    b = a.copy()
    b[317:324] = False
    c = a.copy()
    c[312:324] = False
    c[324:328] = True  # A minus 12 plus 4
    extra = {"top3": 0.99, "train_top1": 0.99}
    return [trial("down1", 2, a, **extra), trial("mid", 2, b, **extra), trial("up1", 2, c, **extra)]


def test_the_runner_up_is_the_second_best_cell_and_ties_come_from_the_paired_test() -> None:
    (facet,) = build_tables(three_cells())
    claim = facet.claim()
    assert claim is not None
    assert claim.best == ("down1", 2)
    assert claim.runner_up == ("mid", 2)  # second-best, though up1 is the one tied
    assert claim.p is not None and claim.p < stats.ALPHA
    assert claim.tied == {("down1", 2), ("up1", 2)}
    assert report.render.claim_verdict(claim) == "beats mid @ 2 (p = 0.02) but tied with 1 other"


def test_only_top1_tables_carry_marks_and_they_are_the_paired_tests() -> None:
    (facet,) = build_tables(three_cells())
    top1 = report.markdown_table(facet, "top1")
    assert "**" in top1 and "≈" in top1
    assert "| mid | 88.1 ± 3.5 |" in top1  # significantly worse: not bold, no mark
    for metric in ("top3", "train_top1"):  # no per-example predictions: no marks at all
        table = report.markdown_table(facet, metric)
        assert "**" not in table and "*" not in table and "≈" not in table, table
