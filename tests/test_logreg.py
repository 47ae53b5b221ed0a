"""The `logreg` probe against scikit-learn, its L2 choice, and the train loss and train top-1
that every linear-type trial records."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from ddsweep import data, probes
from ddsweep.config.probe import ProbeConfig
from ddsweep.config.probesettings import LogregSettings
from ddsweep.errors import UserError
from ddsweep.evaluate import run_probe
from ddsweep.probes.common import standardise
from ddsweep.probes.logreg import choose_l2, fit_logreg, l2_grid, logreg_probe, sklearn_c


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> Iterator[None]:
    yield


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


def sklearn_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, l2: float) -> np.ndarray:
    scaler = StandardScaler().fit(xtr)
    model = LogisticRegression(C=sklearn_c(l2, len(ytr)), max_iter=10_000, tol=1e-6)
    return model.fit(scaler.transform(xtr), ytr).predict(scaler.transform(xte))


@pytest.mark.parametrize("l2", [1e-4, 1e-3, 1e-2])
def test_logreg_matches_scikit_learn_on_digits_pixels(
    digits: tuple[np.ndarray, ...], l2: float
) -> None:
    xtr, xte, ytr, yte = digits
    tr, te = standardise(torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte))
    fitted = fit_logreg(tr, torch.tensor(ytr), 10, l2)
    ours = fitted.logits(te).argmax(1).numpy()
    theirs = sklearn_predict(xtr, ytr, xte, l2)
    assert fitted.converged
    assert abs((ours == yte).mean() - (theirs == yte).mean()) <= 0.005
    assert (ours == theirs).mean() >= 0.99


def test_the_probe_chooses_l2_on_the_points_validation_split_and_records_it(
    digits: tuple[np.ndarray, ...],
) -> None:
    xtr, xte, ytr, yte = digits
    s = LogregSettings(l2_min=1e-4, l2_max=1.0, l2_steps=5)
    assert l2_grid(s) == pytest.approx([1.0, 1e-1, 1e-2, 1e-3, 1e-4])
    x = standardise(torch.tensor(xtr, dtype=torch.float32))[0]
    y = torch.tensor(ytr)
    chosen, scores = choose_l2(x, y, 10, s, seed=3)
    # Each score is that strength fitted on the fit part of ddsweep's validation split (seed 3)
    # and scored on its held-out part; scikit-learn, fitted on the same rows, agrees.
    fit, val = data.validation_split(y, 0.1, 3)
    for l2, score in scores.items():
        theirs = sklearn_predict(xtr[fit], ytr[fit], xtr[val], l2)
        assert score == pytest.approx((theirs == ytr[val.numpy()]).mean(), abs=2 / len(val))
    assert scores[chosen] == max(scores.values())
    assert chosen == max(l2 for l2 in scores if scores[l2] == scores[chosen])  # ties: stronger

    got = logreg_probe(
        torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte),
        settings=s, seed=3,
    )  # fmt: skip
    assert got["chosen_l2"] == chosen
    theirs = sklearn_predict(xtr, ytr, xte, chosen)
    assert got["top1"] == pytest.approx((theirs == yte).mean(), abs=0.005)
    assert 0.9 < got["top1"] <= got["train_top1"] <= 1.0
    assert got["train_loss"] > 0


def test_linear_type_trials_record_train_loss_and_train_top1() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen) * 2
    y = torch.arange(400) % 5
    x = centres[y] + torch.randn(400, 16, generator=gen)
    train, test = (x[:300], y[:300]), (x[300:], y[300:])
    short = ProbeConfig().with_settings("linear", epochs=1)
    found = {
        "linear-1-epoch": run_probe(train, test, "linear", (), short)[0].metrics,
        "linear": run_probe(train, test, "linear", (), ProbeConfig())[0].metrics,
        "logreg": run_probe(train, test, "logreg", (), ProbeConfig())[0].metrics,
    }
    for metrics in found.values():
        assert {"train_loss", "train_top1"} <= set(metrics)
    # An underfitted probe shows it: one epoch leaves a higher loss than thirty, and the
    # converged logistic regression the lowest of the three.
    assert found["linear-1-epoch"]["train_loss"] > found["linear"]["train_loss"]
    assert found["logreg"]["train_loss"] < found["linear"]["train_loss"]
    assert "chosen_l2" in found["logreg"]
    assert probes.get("linear").metrics[2:] == ("train_top1", "train_loss")


def test_the_cosine_schedule_changes_the_fit_and_constant_is_the_seed_probe() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 8, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    seed = probes.linear_probe(x, y, x, y, epochs=3)
    assert probes.linear_probe(x, y, x, y, epochs=3, schedule="constant") == seed
    cosine = probes.linear_probe(x, y, x, y, epochs=3, schedule="cosine")
    assert cosine["train_loss"] != seed["train_loss"]
    with pytest.raises(ValueError, match="allowed: constant, cosine"):
        probes.linear_probe(x, y, x, y, schedule="step")


def test_bad_logreg_settings_are_user_errors() -> None:
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(UserError, match="l2_min"):
        logreg_probe(x, y, x, y, settings=LogregSettings(l2_min=0.0))
    with pytest.raises(UserError, match="val_fraction"):
        logreg_probe(x, y, x, y, settings=LogregSettings(val_fraction=0.9))
