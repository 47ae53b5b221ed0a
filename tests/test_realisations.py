"""Noise realisations as replicates: a t > 0 cell is the mean over `noise_seeds`, its interval
resamples test images and realisations together, paired tests pair on both, the predictions
file keeps one row per realisation, and files of one realisation still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ddsweep import evaluate, predictions
from ddsweep.config import probe as probecfg
from ddsweep.config.points import Point, point_id
from ddsweep.errors import UserError
from ddsweep.report import build_tables, stats
from ddsweep.tracking.recorder import POINT_TAG

N = 400  # test images
LABELS = np.arange(N, dtype=np.int32) % 10


def planted(accuracies: list[float], seed: int = 0) -> np.ndarray:
    """Hits [R, N]: realisation r gets exactly accuracies[r] of the images right (which ones
    drawn per realisation, seeded)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(accuracies), N), bool)
    for r, acc in enumerate(accuracies):
        out[r, rng.permutation(N)[: round(acc * N)]] = True
    return out


def as_preds(hits: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"test": (np.where(hits, LABELS, (LABELS + 1) % 10).astype(np.int32), LABELS)}


def row(block: str, hits: np.ndarray, seeds: str = "0,1,2,3") -> dict[str, object]:
    pid = f"dataset=digits&resolution=16&attention=true&epoch=8&block={block}&noise_step=50"
    pid += f"&probe=linear&noise_seeds={seeds.replace(',', '%2C')}"
    return {
        "dataset": "digits", "resolution": "16", "attention": "True", "epoch": "8",
        "block": block, "noise_step": "50", "probe": "linear", "k": "0", "pool": "avg",
        "weights": "ema", "backbone": "runA@8", "noise_seeds": seeds,
        f"tags.{POINT_TAG}": pid, "top1": float(hits.mean()), "predictions": as_preds(hits),
    }  # fmt: skip


# --------------------------------------------------------------------------- the interval


def test_the_interval_covers_a_planted_realisation_effect_the_old_one_misses() -> None:
    # Four realisations whose accuracies differ by +-12 points around 50 %: the noise drawn, not
    # the images, moves the cell (as on digits at t = 50: 37.1 +- 1.8 over ten draws).
    truth = 0.5
    hits = planted([0.38, 0.46, 0.54, 0.62])
    assert hits.mean() == pytest.approx(truth)
    new = stats.bootstrap_interval(hits)
    assert new[0] <= truth <= new[1]
    # The old cell: one realisation (seed 0) and an interval over its test images alone.
    old = stats.bootstrap_interval(hits[0])
    assert not old[0] <= truth <= old[1]
    # Pooling the realisations as if they were more images is too narrow for the realisations.
    pooled = stats.bootstrap_interval(hits.reshape(-1))
    assert (new[1] - new[0]) > 2 * (pooled[1] - pooled[0])
    # Without a realisation effect the two-way interval is about the images' own width.
    calm = planted([0.5, 0.5, 0.5, 0.5])
    lo, hi = stats.bootstrap_interval(calm)
    assert lo <= truth <= hi and (hi - lo) < 1.5 * (old[1] - old[0])


def test_two_way_means_match_resampling_both_indices() -> None:
    hits = planted([0.6, 0.7, 0.8], seed=1)
    fast = stats.two_way_means(hits, resamples=2000)
    rng = np.random.default_rng(5)
    slow = np.array(
        [hits[rng.integers(0, 3, 3)][:, rng.integers(0, N, N)].mean() for _ in range(2000)]
    )
    assert fast.mean() == pytest.approx(slow.mean(), abs=0.005)
    assert fast.std() == pytest.approx(slow.std(), rel=0.15)
    assert np.array_equal(stats.two_way_means(hits), stats.two_way_means(hits))  # seeded


def test_paired_test_pairs_on_images_and_realisations() -> None:
    a = planted([0.6, 0.62, 0.64, 0.66], seed=2)
    assert stats.paired_p(a, a) == 1.0
    better = a.copy()
    better[:, : N // 5] = True  # right on 80 more images in every realisation
    assert stats.paired_p(better, a) < stats.ALPHA
    # A difference that lives in one realisation only is not established over realisations.
    once = a.copy()
    once[0, :] = True
    assert stats.paired_p(once, a) >= stats.ALPHA
    assert stats.mcnemar_p(once.reshape(-1), a.reshape(-1)) < stats.ALPHA  # pooled would claim


def test_cells_of_several_realisations_in_a_table(tmp_path: Path) -> None:
    strong = planted([0.78, 0.8, 0.82, 0.84], seed=3)
    weak = planted([0.38, 0.46, 0.54, 0.62], seed=4)
    path = predictions.save(tmp_path / predictions.FILE, as_preds(strong))
    loaded = predictions.load(path)
    assert loaded["test"][0].shape == (4, N) and loaded["test"][1].shape == (N,)
    [facet] = build_tables([{**row("up4", strong), "predictions": loaded}, row("down1", weak)])
    assert facet.has_realisations()
    assert facet.key.settings == (("noise_seeds", "0,1,2,3"),)
    cell = facet.cells[("down1", 8)]
    assert cell.low is not None and cell.high is not None and cell.low <= 0.5 <= cell.high
    claim = facet.claim()
    assert claim is not None and claim.best == ("up4", 8) and not claim.is_tie
    from ddsweep.report import render, summary

    text = render.markdown("s", [facet], summary([facet]), plots=False)
    assert "two-way bootstrap resampling test images and realisations" in text


def test_old_single_realisation_predictions_still_read(tmp_path: Path) -> None:
    hits = planted([0.7])[0]
    path = predictions.save(tmp_path / predictions.FILE, as_preds(hits))
    [facet] = build_tables([{**row("up4", hits), "predictions": predictions.load(path)}])
    cell = facet.cells[("up4", 8)]
    assert cell.hits is not None and cell.hits.shape == (N,) and cell.low is not None
    assert not facet.has_realisations()


# ------------------------------------------------------------------- settings and points


def test_noise_seeds_enter_the_id_at_t_above_zero_only() -> None:
    cfg = probecfg.ProbeConfig(noise_seeds=(0, 1, 2))
    assert "noise_seeds" not in probecfg.ProbeConfig().params()  # old params unchanged
    assert cfg.params()["noise_seeds"] == "0,1,2"
    axes = {"dataset": "digits", "resolution": 16, "attention": True, "epoch": 8, "block": "up4"}
    clean = Point(**axes, noise_step=0, probe="linear")
    noisy = Point(**axes, noise_step=50, probe="linear")
    assert probecfg.point_settings(cfg, clean) == ()  # the same id as a study without them
    assert probecfg.point_settings(cfg, noisy) == (("noise_seeds", "0,1,2"),)
    assert cfg.realisations(0) == (0,) and cfg.realisations(50) == (0, 1, 2)
    assert probecfg.ProbeConfig(noise_seed=4).realisations(50) == (4,)
    one = probecfg.point_settings(probecfg.ProbeConfig(), noisy)
    assert point_id(Point(**{**noisy.__dict__, "settings": one})) == point_id(noisy)


@pytest.mark.parametrize(
    ("value", "message"),
    [([0, 0], "distinct"), ([-1], "distinct"), ([], "non-empty list"), ("0,1", "list")],
)
def test_bad_noise_seeds_are_one_line(value: object, message: str) -> None:
    from ddsweep.config.sweep import parse_probe_section

    with pytest.raises(UserError, match=message) as err:
        parse_probe_section({"noise_seeds": value}, "s.yaml")
    assert "\n" not in str(err.value)
    assert parse_probe_section({"noise_seeds": [2, 0, 1]}, "s.yaml").noise_seeds == (2, 0, 1)


def test_shipped_noise_studies_use_three_realisations() -> None:
    from ddsweep.config.sweep import load_study, shipped_sweep_dir

    names = [p.stem for p in shipped_sweep_dir().glob("*.yaml")]
    noisy = 0
    for name in names:
        cfg = load_study(name)
        assert cfg is not None
        if any(t > 0 for t in cfg.axes.noise_step) or "ddae" in cfg.axes.protocol:  # ddae: t=10
            noisy += 1
            assert len(cfg.probe.noise_seeds) >= 3, name
    assert noisy >= 3


# ------------------------------------------------------------------------ one evaluation


def test_a_noisy_point_is_the_mean_of_its_realisations(tmp_path: Path) -> None:
    from ddsweep.features import FeatureCache

    digits_dir = tmp_path / "data"  # digits ship with scikit-learn: nothing is read

    point = Point(
        dataset="digits", resolution=8, attention=None, epoch=None, block="pixels",
        noise_step=100, probe="knn", k=10,
    )  # fmt: skip
    cache = FeatureCache(tmp_path / "cache")
    cfg = probecfg.ProbeConfig(noise_seeds=(0, 1, 2))
    both = evaluate.evaluate_point(None, point, cfg, cache, digits_dir)
    singles = [
        evaluate.evaluate_point(None, point, probecfg.ProbeConfig(noise_seed=s), cache, digits_dir)
        for s in (0, 1, 2)
    ]
    assert both.metrics["noise_realisations"] == 3
    for m in ("top1", "top3", "val_top1"):
        assert both.metrics[m] == pytest.approx(np.mean([s.metrics[m] for s in singles]))
    pred, label = both.predictions["test"]
    assert tuple(pred.shape) == (3, len(label))
    for r, s in enumerate(singles):
        assert np.array_equal(pred[r].numpy(), s.predictions["test"][0].numpy())
    assert len({s.metrics["top1"] for s in singles}) > 1  # the realisations differ
