"""Issue 26's missing tests: a worker killed inside trial logging once its child run exists,
the validation fit seeing no validation row (1-NN against scikit-learn), DDSWEEP_CACHE_MAX_GB
evicting and recomputing, and a PostgreSQL store reached with a password from ~/.pgpass."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import hooked  # pytest puts tests/ on the path
import numpy as np
import pytest
import test_scale_out
import test_signals
import test_study
import torch
from test_scale_out import DECODED, Postgres
from test_signals import FAST, POINTS
from test_study import (
    STUDY,
    assert_each_point_evaluated_once,
    children,
    expected_ids,
    grid,
    summary,
)

from ddsweep import evaluate
from ddsweep.config import probe as probecfg
from ddsweep.config.points import Point
from ddsweep.features import FeatureCache

# The tiny trained backbone of test_study, and a fresh working folder per test.
backbone = test_study.backbone
home = test_signals.home  # test_study's working folder, with epoch 1's 4 points
postgres = test_scale_out.postgres  # a throwaway PostgreSQL cluster on 127.0.0.1
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- a kill inside trial logging, after the child run exists --------------------------------

# `python -c IN_LOGGING N MARKER study probe-grid ...`: in its N-th trial's logging, once the
# child run of the point exists (RUNNING, its metrics logged, not its inputs and predictions),
# write the child's run id to MARKER and wait for the signal.
IN_LOGGING = r"""
import sys, time
from pathlib import Path
n, marker = int(sys.argv[1]), Path(sys.argv[2])
del sys.argv[1:3]
from ddsweep import cli
from ddsweep.tracking import recorder
real_log_inputs, calls = recorder.log_inputs, []
def log_inputs(run_id, inputs):
    calls.append(1)
    if len(calls) == n:
        marker.with_suffix(".tmp").write_text(run_id)
        marker.with_suffix(".tmp").rename(marker)
        while True:
            time.sleep(1)
    return real_log_inputs(run_id, inputs)
recorder.log_inputs = log_inputs
cli.main()
"""


@pytest.mark.slow  # a fresh Python process importing torch, MLflow and Optuna
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
def test_a_kill_inside_trial_logging_leaves_each_point_counted_once(
    home: Path, sig: signal.Signals
) -> None:
    marker = home / "hook" / "at"
    marker.parent.mkdir()
    with hooked.processes() as start:
        proc = start(IN_LOGGING, "2", str(marker), "study", "probe-grid", "--study", STUDY, *FAST)
        partial = hooked.reach(proc, marker, timeout=600)
        # The child run of the point exists and is RUNNING: the signal comes inside the logging.
        assert [r.info.run_id for r in children("RUNNING")] == [partial]
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    if sig == signal.SIGINT:  # the interrupted logging removes its own half-written child
        assert [r.info.run_id for r in children("RUNNING")] == []

    result = grid(*FAST)
    assert result.exit_code == 0, result.output
    assert f"{POINTS}/{POINTS} points complete" in summary(result)
    ids = expected_ids((1,))
    assert len(ids) == POINTS
    assert_each_point_evaluated_once(ids)
    # The half-written child is gone: no RUNNING child is left for ever, and the report's
    # count is one trial per point.
    assert [r.info.run_id for r in children("RUNNING")] == []
    assert partial not in {r.info.run_id for r in children()}
    report = test_study.cli("report", "--study", STUDY, "--out", str(home / "out"))
    assert report.exit_code == 0, report.output
    assert f"{POINTS} trials finished, 0 failed" in report.output
    assert "running" not in report.output.split("\n", 3)[0].lower()


# --- the validation fit sees no validation row -------------------------------------------------


def test_the_validation_1nn_equals_scikit_learn_fitted_on_train_minus_validation(
    tmp_path: Path,
) -> None:
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier

    point = Point(
        dataset="digits", resolution=8, attention=None, epoch=None, block="pixels",
        noise_step=0, probe="knn", k=1,
    )  # fmt: skip
    cfg = probecfg.ProbeConfig()
    assert cfg.val_fraction > 0
    cache = FeatureCache(tmp_path / "cache")
    found = evaluate.evaluate_point(None, point, cfg, cache, tmp_path / "data")

    # The same features (the cache's), the validation rows chosen as documented: a stratified
    # split of train by scikit-learn with the probe's seed; the 1-NN by scikit-learn.
    feats, *_ = evaluate.split_features(
        None, "digits", 8, ("pixels",), 0, cfg, cache, tmp_path / "data"
    )
    x, y = (t.numpy() for t in feats["train"]["pixels"])
    x = x.astype(np.float64)
    fit, val = train_test_split(
        np.arange(len(y)), test_size=cfg.val_fraction, random_state=cfg.seed, stratify=y
    )
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute")
    expected = knn.fit(x[fit], y[fit]).score(x[val], y[val])
    assert found.metrics["val_top1"] == pytest.approx(expected, abs=1e-12)
    pred, label = found.predictions["val"]
    assert np.array_equal(label.numpy(), y[np.sort(val)])
    assert np.array_equal(pred.numpy(), knn.predict(x[np.sort(val)]))
    # What a fit that saw the validation rows would score: each row is its own nearest
    # neighbour. The probe's value is far below, so the check above can tell the two apart.
    leaked = knn.fit(x, y).score(x[val], y[val])
    assert leaked == 1.0 and found.metrics["val_top1"] < 0.999


# --- DDSWEEP_CACHE_MAX_GB evicts and recomputes --------------------------------------------------


def probe_pixels(resolution: int, data_dir: Path) -> evaluate.Evaluation:
    """A 5-NN probe of the raw pixels, through the cache that DDSWEEP_CACHE(_MAX_GB) names."""
    point = Point(
        dataset="digits", resolution=resolution, attention=None, epoch=None, block="pixels",
        noise_step=0, probe="knn", k=5,
    )  # fmt: skip
    return evaluate.evaluate_point(None, point, probecfg.ProbeConfig(), FeatureCache(), data_dir)


def entries(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}


def test_the_cache_cap_evicts_the_oldest_entries_and_they_are_recomputed_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    # How large the 16 px entries are: measured in a cache of their own, with no cap.
    monkeypatch.setenv("DDSWEEP_CACHE", str(tmp_path / "measure"))
    monkeypatch.delenv("DDSWEEP_CACHE_MAX_GB", raising=False)
    probe_pixels(16, data_dir)
    big = sum(entries(tmp_path / "measure").values())

    cache = tmp_path / "cache"
    monkeypatch.setenv("DDSWEEP_CACHE", str(cache))
    first = probe_pixels(8, data_dir)  # no cap yet: its train and test entries are kept
    small = entries(cache)
    assert len(small) == 2
    for name in small:  # written an hour ago: the least recently used, whatever the clock
        old = (cache / name).stat().st_mtime - 3600
        os.utime(cache / name, (old, old))

    # Room for the 16 px entries only: writing them evicts the 8 px ones.
    monkeypatch.setenv("DDSWEEP_CACHE_MAX_GB", repr(big / 2**30))
    probe_pixels(16, data_dir)
    now = entries(cache)
    assert not set(small) & set(now), "the oldest entries were not evicted"
    assert sum(now.values()) == big  # what fits is kept
    for name in now:  # older than the 8 px entries about to be written again
        old = (cache / name).stat().st_mtime - 1800
        os.utime(cache / name, (old, old))

    # Asked for again, the 8 px features are a miss, extracted and written anew (evicting
    # 16 px ones in turn, as far as needed): the same predictions.
    again = probe_pixels(8, data_dir)
    assert set(small) <= set(entries(cache))
    for split in ("test", "val"):
        for a, b in zip(first.predictions[split], again.predictions[split], strict=True):
            assert torch.equal(a, b)
    assert again.metrics["top1"] == first.metrics["top1"]


# --- ~/.pgpass ----------------------------------------------------------------------------------


@pytest.mark.slow  # a PostgreSQL cluster of its own: initdb and a server start
def test_a_postgres_url_without_a_password_works_with_a_pgpass_in_home(
    postgres: Postgres, workdir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from ddsweep.cli import app

    home = tmp_path / "user-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("PGPASSFILE", raising=False)
    port = postgres.bare_url.rsplit(":", 1)[1].split("/")[0]
    # A pixels-only study needs no backbone: one trial, in this process.
    grid = ["study", "probe-grid", "--study", "pgpassfile", "--dataset", "digits"]
    grid += ["--block", "pixels", "--probe", "knn", "--k", "3", "--storage", postgres.bare_url]
    refused = CliRunner().invoke(app, grid)  # no ~/.pgpass yet: no password at all
    assert refused.exit_code == 2, refused.output
    assert "cannot open Optuna storage" in refused.output

    pgpass = home / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:optuna:postgres:{DECODED}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file others can read
    result = CliRunner().invoke(app, grid)
    assert result.exit_code == 0, result.output
    assert "1/1 points complete" in result.output
    assert DECODED not in result.output
