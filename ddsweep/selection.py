"""The one rule that gives a probe study's answer, shared by the report (its summary, the
parent run's tags) and the objective (Optuna's best trial), so that every place agrees.

The answer is the cell with the highest validation top-1 among the network's blocks at trained
epochs; `pixels` and the untrained net (epoch 0) are baselines shown beside it, never the
answer (epoch 0 is a candidate only where no trained epoch was probed). An exact tie on
validation goes to the earliest epoch, then the earliest block in forward order.
"""

from __future__ import annotations

from ddsweep.model import PIXELS, block_order

TIE_RULE = "the earliest epoch, then the earliest block in forward order"
RULE = (
    "chosen on validation top-1 among the network's blocks at trained epochs; pixels and "
    f"epoch 0 are baselines beside it; an exact tie goes to {TIE_RULE}"
)
# Optuna's name for the trial value (study.set_metric_names).
METRIC_NAME = "selection_val_top1"
BASELINE_VALUE = 0.0  # a baseline's trial value: it is never the best trial
# The tie order is folded into the trial value below the resolution of any accuracy: a step of
# 2^-44 times an order < 2^20 moves a value by < 1e-6 / 16, less than one image in 10^6.
_TIE_STEP = 2.0**-44
_MAX_EPOCH = 2**15 - 1


def is_baseline(block: str, epoch: int | None, trained: bool) -> bool:
    """pixels, and epoch 0 when the backbone has trained epochs (`trained`) in the study."""
    return block == PIXELS or (trained and epoch == 0)


def tie_order(block: str, epoch: int | None) -> int:
    """Lower wins an exact tie: earliest epoch, then earliest block in forward order."""
    return min(epoch or 0, _MAX_EPOCH) * 32 + (block_order(block) + 1)


def objective_value(score: float, block: str, epoch: int | None, trained: bool) -> float:
    """A trial's value for Optuna: its selection score (validation top-1, else test top-1) less
    its tie order in steps too small to reorder distinct accuracies, so the best trial is the
    report's answer; BASELINE_VALUE for a baseline."""
    if is_baseline(block, epoch, trained):
        return BASELINE_VALUE
    return score - _TIE_STEP * tie_order(block, epoch)
