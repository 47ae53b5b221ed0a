"""How the report writes values and claims in words, the same in every view: percentages, their
intervals, p-values and "tied with X" verdicts."""

from __future__ import annotations

from ddsweep import probes
from ddsweep.config.model import PIXELS
from ddsweep.report.tables import Epoch, Spot


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; blank for a missing cell."""
    return "" if value is None else f"{100 * value:.1f}"


def is_accuracy(metric: str) -> bool:
    """Accuracies (top1, top3, train_top1, ...) are fractions, shown in %; the metrics a probe
    kind declares plain (train_loss, chosen_l2) are shown as they are, and none of them is
    best."""
    return metric not in probes.plain_metrics()


def metric_value(metric: str, value: float | None) -> str:
    """A cell's value: an accuracy in % (one decimal), any other metric to 4 digits."""
    if is_accuracy(metric) or value is None:
        return pct(value)
    return f"{value:.4g}"


def metric_heading(metric: str) -> str:
    """'top1 %', or the bare name of a metric that is no accuracy ('train_loss')."""
    return f"{metric} %" if is_accuracy(metric) else metric


def pct_ci(value: float | None, low: float | None, high: float | None) -> str:
    """'81.3 ± 0.8' (half the interval's width), or the value alone without an interval."""
    if value is None or low is None or high is None:
        return pct(value)
    return f"{pct(value)} ± {100 * (high - low) / 2:.1f}"


def p_text(p: float) -> str:
    """'p = 0.41', 'p = 0.004', 'p < 0.001'."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def block_label(block: str) -> str:
    return f"{PIXELS} (baseline)" if block == PIXELS else block


def epoch_label(epoch: Epoch) -> str:
    return "any" if epoch is None else str(epoch)


def spot_label(spot: Spot, with_epoch: bool = True) -> str:
    """'mid @ 50', or 'mid' alone."""
    block, epoch = spot
    return f"{block_label(block)} @ {epoch_label(epoch)}" if with_epoch else block_label(block)


def verdict(
    runner_up: Spot | None, p: float | None, tied: bool, with_epoch: bool = True, more: int = 0
) -> str:
    """The best cell against the runner-up (the second-best cell): 'tied with mid @ 50
    (p = 0.41)', 'beats mid @ 50 (p < 0.001)', 'untested vs mid @ 50' or '' (no runner-up).
    `tied`: the runner-up is not significantly worse; `more` other cells are tied with the best
    too ('tied with mid @ 50 and 2 more'; 'beats mid @ 50 (…) but tied with 2 others')."""
    if runner_up is None:
        return ""
    who = spot_label(runner_up, with_epoch)
    if tied:
        who += f" and {more} more" if more > 0 else ""
        said = "(equal, untested)" if p is None else f"({p_text(p)})"
        return f"tied with {who} {said}"
    said = f"untested vs {who}" if p is None else f"beats {who} ({p_text(p)})"
    return said + (f" but tied with {more} other{'s' if more > 1 else ''}" if more > 0 else "")
