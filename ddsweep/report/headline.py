"""The headline of each table, the study's answer: its best block of the net, chosen on the
validation split when the trials scored one and reported with its test accuracy, interval and a
paired test against the runner-up; and the FID curves of the networks a table probed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ddsweep.config.model import PIXELS
from ddsweep.report.fidcurves import FidCurve
from ddsweep.report.tables import Claim, Epoch, Facet, FacetKey, Spot


@dataclass(frozen=True)
class SummaryRow:
    """The headline of one facet: its best block of the net (the study's question), the pixels
    baseline beside it, and the untrained net.

    `chosen_on` is "val" when the best cell (and the epoch-0 block) was chosen by val_top1 (every
    cell of the net has it), else "test". `best_top1` is always the test top1 of the chosen cell,
    `best_low`/`best_high` its 95 % bootstrap interval; `runner_up`, `p` and `tied` compare it
    with the next cell (exact McNemar on the test examples, see `tables.Claim`). `test_best_*`
    is the cell with the highest test top1: an optimistic figure when chosen on val.
    """

    key: FacetKey
    best_block: str | None
    best_epoch: Epoch
    best_top1: float | None
    pixels_top1: float | None  # None when the facet has no pixels baseline
    epoch0_block: str | None  # best block of the untrained net (epoch 0), pixels not counted
    epoch0_top1: float | None
    best_low: float | None = None
    best_high: float | None = None
    chosen_on: str = "test"
    runner_up: Spot | None = None
    p: float | None = None
    tied: bool = False
    test_best_block: str | None = None
    test_best_epoch: Epoch = None
    test_best_top1: float | None = None

    @property
    def baseline_wins(self) -> bool:
        """The pixels baseline beats every block of the net at every epoch."""
        if self.pixels_top1 is None:
            return False
        return self.best_top1 is None or self.pixels_top1 > self.best_top1


def choice_metric(facet: Facet) -> str:
    """val_top1 when every cell of the net has it, else top1 (trials of ddsweep 0.1)."""
    net = [c for (b, _), c in facet.cells.items() if b != PIXELS]
    return "val_top1" if net and all(c.val_top1 is not None for c in net) else "top1"


def summary(facets: Iterable[Facet]) -> list[SummaryRow]:
    """One row per facet: the best block of the net (block, epoch, test top1 and interval, the
    paired test against its runner-up), the pixels top1, the best epoch-0 block and top1, and
    the best cell on test."""
    return [_row(f) for f in facets]


def _row(f: Facet) -> SummaryRow:
    by = choice_metric(f)
    claim: Claim | None = f.claim(pixels=False, by=by)
    e0 = f.claim(0, pixels=False, by=by)
    on_test = f.best("top1", pixels=False)
    pixels = [v for e in f.epochs if (v := f.value(PIXELS, e)) is not None]
    cell = f.cells[claim.best] if claim else None
    return SummaryRow(
        key=f.key,
        best_block=claim.best[0] if claim else None,
        best_epoch=claim.best[1] if claim else None,
        best_top1=cell.top1 if cell else None,
        pixels_top1=max(pixels) if pixels else None,
        epoch0_block=e0.best[0] if e0 else None,
        epoch0_top1=f.cells[e0.best].top1 if e0 else None,
        best_low=cell.low if cell else None,
        best_high=cell.high if cell else None,
        chosen_on="val" if by == "val_top1" else "test",
        runner_up=claim.runner_up if claim else None,
        p=claim.p if claim else None,
        tied=claim.is_tie if claim else False,
        test_best_block=on_test[0] if on_test else None,
        test_best_epoch=on_test[1] if on_test else None,
        test_best_top1=on_test[2] if on_test else None,
    )


def attach_fid(facets: Iterable[Facet], curves: Mapping[str, list[FidCurve]]) -> None:
    """Give each facet the FID curves of exactly the training runs its trials probed
    (`curves` as `fidcurves.fid_by_backbone` gives them)."""
    for f in facets:
        f.fids = [c for run in f.backbones for c in curves.get(run, [])]
