"""The logistic-regression probe: multinomial, L2-penalised, fitted to convergence with
full-batch L-BFGS (the linear-probe protocol of CLIP's paper), its L2 strength chosen on
held-out training data.

The loss is the MEAN cross entropy plus (l2 / 2) * |W|² (the bias is not penalised), the
objective scikit-learn's `LogisticRegression` minimises at C = 1 / (n_train * l2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ddsweep.config.probekinds import Scored, Split
from ddsweep.config.probesettings import LogregSettings, check_logreg
from ddsweep.probes.common import accuracy, check_pair, count_classes, standardise

__all__ = [
    "LogregFit",
    "LogregSettings",
    "choose_l2",
    "fit",
    "fit_logreg",
    "l2_grid",
    "logreg_probe",
    "sklearn_c",
]

HISTORY = 10  # L-BFGS memory: scipy's (and so scikit-learn's) default maxcor


@dataclass(frozen=True)
class LogregFit:
    """A fitted multinomial logistic regression on standardised features."""

    weight: Tensor  # (C, D)
    bias: Tensor  # (C,)
    l2: float
    loss: float  # final mean cross entropy on the data it was fitted on (no penalty)
    iterations: int
    converged: bool  # every gradient entry below tol when it stopped

    def logits(self, x: Tensor) -> Tensor:
        """(N, D) standardised features -> (N, C) class scores."""
        return torch.addmm(self.bias, x, self.weight.T)


def sklearn_c(l2: float, n_train: int) -> float:
    """scikit-learn's C for the same objective: C = 1 / (n_train * l2)."""
    return 1.0 / (n_train * l2)


def l2_grid(s: LogregSettings) -> list[float]:
    """The L2 strengths tried, strongest first (each fit warm-starts the next, weaker one)."""
    if s.l2_steps == 1:
        return [s.l2_max]
    lo, hi = math.log10(s.l2_min), math.log10(s.l2_max)
    step = (hi - lo) / (s.l2_steps - 1)
    return [10 ** (hi - i * step) for i in range(s.l2_steps)]


def fit_logreg(
    x: Tensor,
    y: Tensor,
    n_classes: int,
    l2: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    init: LogregFit | None = None,
) -> LogregFit:
    """Fit W, b to (N, D) standardised features and (N,) labels by full-batch L-BFGS.

    Minimises mean CE(x W^T + b, y) + l2/2 |W|², from zeros or from `init` (warm start).
    torch.optim.LBFGS with a strong-Wolfe line search: one closure is one pass over all of x,
    so on a GPU the whole fit stays on it.
    """
    y = y.to(x.device, torch.long)
    d = x.shape[1]
    if init is None:
        w = torch.zeros(n_classes, d, dtype=x.dtype, device=x.device)
        b = torch.zeros(n_classes, dtype=x.dtype, device=x.device)
    else:
        w, b = init.weight.clone(), init.bias.clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(objective)
    iterations = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
    with torch.enable_grad():  # the caller may hold no_grad; the final gradient is measured
        objective()
    with torch.no_grad():
        grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))  # type: ignore[union-attr]
        w, b = w.detach(), b.detach()
        loss = float(F.cross_entropy(torch.addmm(b, x, w.T), y))
    return LogregFit(w, b, l2, loss, iterations, grad <= tol)


def _held_out(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit rows, held-out rows): the stratified seeded split of ddsweep's validation split."""
    from ddsweep import data

    fit, val = data.validation_split(y.cpu(), fraction, seed)
    return fit.to(y.device), val.to(y.device)


def choose_l2(
    x: Tensor, y: Tensor, n_classes: int, s: LogregSettings, seed: int
) -> tuple[float, dict[float, float]]:
    """(the chosen L2 strength, {l2: held-out top1}) for (N, D) standardised features.

    Each strength of `l2_grid(s)` is fitted on the training rows outside a stratified seeded
    `s.val_fraction` (at the defaults and the same seed: the point's own validation split) and
    scored on that part; the best top-1 wins, ties to the stronger penalty.
    """
    if len(l2_grid(s)) == 1:
        return s.l2_max, {}
    fit, val = _held_out(y, s.val_fraction, seed)
    scores: dict[float, float] = {}
    previous: LogregFit | None = None
    for l2 in l2_grid(s):  # strongest first: the fits get easier as warm starts
        previous = fit_logreg(
            x[fit], y[fit], n_classes, l2, max_iter=s.max_iter, tol=s.tol, init=previous
        )
        scores[l2] = accuracy(previous.logits(x[val]), y[val].to(x.device, torch.long), 1)
    best = max(scores.values())
    return next(l2 for l2 in scores if scores[l2] == best), scores


def logreg_fit(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, n_classes: int, s: LogregSettings, seed: int
) -> tuple[Tensor, LogregFit, float]:
    """(test logits (N_test, C), the fit on all of train at the chosen L2, train top1)."""
    xtr, xte = standardise(train_x, test_x.to(train_x.device))
    ytr = train_y.to(xtr.device, torch.long)
    l2, _ = choose_l2(xtr, ytr, n_classes, s, seed)
    fitted = fit_logreg(xtr, ytr, n_classes, l2, max_iter=s.max_iter, tol=s.tol)
    return fitted.logits(xte), fitted, accuracy(fitted.logits(xtr), ytr, 1)


def logreg_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    settings: LogregSettings = LogregSettings(),
    seed: int = 0,
) -> dict[str, float]:
    """Logistic regression on (N, D) features: top1, top3, train_top1, train_loss, chosen_l2."""
    check_pair(train_x, train_y, test_x, test_y)
    check_logreg(settings)
    logits, fitted, train_top1 = logreg_fit(
        train_x, train_y, test_x, count_classes(train_y, test_y), settings, seed
    )
    yte = test_y.to(logits.device, torch.long)
    return {
        "top1": accuracy(logits, yte, 1),
        "top3": accuracy(logits, yte, 3),
        "train_top1": train_top1,
        "train_loss": fitted.loss,
        "chosen_l2": fitted.l2,
    }


def fit(
    train: Split, test: Split, s: LogregSettings, ks: tuple[int, ...], seed: int
) -> dict[int, Scored]:
    del ks  # one fit per point: `k` does not apply
    check_pair(*train, *test)
    logits, fitted, train_top1 = logreg_fit(
        train[0], train[1], test[0], count_classes(train[1], test[1]), s, seed
    )
    extra = {"train_top1": train_top1, "train_loss": fitted.loss, "chosen_l2": fitted.l2}
    return {0: Scored(logits, extra)}
