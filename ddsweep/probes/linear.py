"""The linear probe: one nn.Linear fitted on standardised frozen features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsweep.config.probekinds import Scored, Split
from ddsweep.config.probesettings import SCHEDULES, LinearSettings
from ddsweep.probes.common import accuracy, check_pair, count_classes, standardise

__all__ = ["SCHEDULES", "LinearSettings", "fit", "linear_logits", "linear_probe"]


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    epochs: int = LinearSettings.epochs,
    lr: float = LinearSettings.lr,
    batch_size: int = LinearSettings.batch_size,
    schedule: str = LinearSettings.schedule,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Train one nn.Linear on (N, D) features, (N,) labels; top1/top3/train_top1 in [0, 1] and
    train_loss (the final mean cross entropy on all of train).

    Features are standardised with the TRAIN mean and std (a zero std is left at 1), then a
    linear layer is fitted with Adam and cross entropy for `epochs` passes over shuffled
    mini-batches, the learning rate constant or cosine-annealed to 0 over the epochs (stepped
    once an epoch, as DDAE's probe does). Initialisation and shuffling draw from a generator seeded with `seed`, so a
    run is repeatable (on CPU bit for bit). With fewer than 3 classes top3 is the top-C
    accuracy, i.e. 1.0.
    """
    check_pair(train_x, train_y, test_x, test_y)
    test_logits, train_top1, train_loss = linear_logits(
        train_x, train_y, test_x, count_classes(train_y, test_y),
        epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule, seed=seed, device=device,
    )  # fmt: skip
    yte = test_y.to(test_logits.device, torch.long)
    return {
        "top1": accuracy(test_logits, yte, 1),
        "top3": accuracy(test_logits, yte, 3),
        "train_top1": train_top1,
        "train_loss": train_loss,
    }


def linear_logits(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    n_classes: int,
    *,
    epochs: int = LinearSettings.epochs,
    lr: float = LinearSettings.lr,
    batch_size: int = LinearSettings.batch_size,
    schedule: str = LinearSettings.schedule,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, float, float]:
    """(test logits (N_test, n_classes), train top1, train loss) of the linear probe (see
    linear_probe)."""
    if epochs < 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(
            f"need epochs >= 0, batch_size > 0, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    dev = torch.device(device) if device is not None else train_x.device
    xtr, xte = standardise(train_x.to(dev), test_x.to(dev))
    ytr = train_y.to(dev, torch.long)

    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(xtr.shape[1], n_classes)
    # nn.Linear's own init (uniform in ±1/sqrt(fan_in)), drawn from our generator.
    bound = 1.0 / math.sqrt(xtr.shape[1])
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    layer.to(dev)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    # DDAE's CosineAnnealingLR(T_max=epochs), stepped after each epoch; "constant" never steps
    # one, so the seed probe's arithmetic is unchanged.
    cosine = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if schedule == "cosine" else None
    )

    n = xtr.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(layer(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cosine is not None:
            cosine.step()

    with torch.no_grad():
        train_logits = layer(xtr)
        train_loss = float(F.cross_entropy(train_logits, ytr))
        return layer(xte), accuracy(train_logits, ytr, 1), train_loss


def fit(
    train: Split, test: Split, s: LinearSettings, ks: tuple[int, ...], seed: int
) -> dict[int, Scored]:
    del ks  # one fit per point: `k` does not apply
    check_pair(*train, *test)
    logits, train_top1, train_loss = linear_logits(
        train[0], train[1], test[0], count_classes(train[1], test[1]),
        epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, schedule=s.schedule, seed=seed,
    )  # fmt: skip
    return {0: Scored(logits, {"train_top1": train_top1, "train_loss": train_loss})}
