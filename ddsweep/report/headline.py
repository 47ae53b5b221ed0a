"""The headline of each table and the study's answer, by one rule (`ddsweep.selection`): the
best cell of the network's blocks at trained epochs, chosen on the validation split when the
trials scored one and reported with its test accuracy, interval and a paired test against the
runner-up, with pixels and the untrained net beside it as baselines; and the FID curves of the
networks a table probed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ddsweep import selection
from ddsweep.config.model import PIXELS
from ddsweep.report.fidcurves import FidCurve
from ddsweep.report.tables import (
    Cell,
    Claim,
    Epoch,
    Facet,
    FacetKey,
    Spot,
    contest,
    withhold,
)


@dataclass(frozen=True)
class SummaryRow:
    """The headline of one facet: its best block of the net (the study's question), the pixels
    baseline beside it, and the untrained net.

    `chosen_on` is "val" when the best cell (and the epoch-0 block) was chosen by val_top1 (every
    cell of the net has it), else "test". `best_top1` is always the test top1 of the chosen cell,
    `best_low`/`best_high` its 95 % bootstrap interval, `best_val` what it was chosen by;
    `runner_up` is the second-best cell by the same measure and `p` the exact McNemar test of
    the two on the test examples, `tied` whether the runner-up is not significantly worse and
    `more_tied` how many other cells are not either. `val_tie` lists every cell whose measure
    equals the best's exactly (the best first), when more than one: `selection.TIE_RULE` broke
    it. `test_best_*` is the cell with the highest test top1: an optimistic figure when chosen
    on val.
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
    best_val: float | None = None
    more_tied: int = 0
    val_tie: tuple[Spot, ...] = ()

    @property
    def baseline_wins(self) -> bool:
        """The pixels baseline scores higher on test than the chosen cell of the net."""
        if self.pixels_top1 is None:
            return False
        return self.best_top1 is None or self.pixels_top1 > self.best_top1


def choice_metric(facet: Facet) -> str:
    """val_top1 when every cell of the net has it, else top1 (trials of ddsweep 0.1)."""
    net = [c for (b, _), c in facet.cells.items() if b != PIXELS]
    return "val_top1" if net and all(c.val_top1 is not None for c in net) else "top1"


def trained(facet: Facet) -> bool:
    """Whether the facet probed a trained epoch (then epoch 0 is a baseline, not a candidate)."""
    return any(e for e in facet.epochs if e is not None)


def candidates(facet: Facet) -> dict[Spot, Cell]:
    """The cells the answer is chosen among, in tie order (`selection.tie_order`)."""
    t = trained(facet)
    spots = [
        (b, e) for (b, e) in facet.cells if e is not None and not selection.is_baseline(b, e, t)
    ]
    spots.sort(key=lambda s: selection.tie_order(*s))
    return {s: facet.cells[s] for s in spots}


def summary(facets: Iterable[Facet]) -> list[SummaryRow]:
    """One row per facet: the best block of the net (block, epoch, test top1 and interval, the
    paired test against its runner-up, any tie on validation), the pixels top1, the best
    epoch-0 block and top1, and the best cell on test."""
    return [_row(f) for f in facets]


def _row(f: Facet) -> SummaryRow:
    by = choice_metric(f)
    claim: Claim | None = contest(candidates(f), by)
    if f.withheld:
        claim = withhold(claim)
    e0 = f.claim(0, pixels=False, by=by)
    on_test = f.best("top1", pixels=False)
    pixels = [v for e in f.epochs if (v := f.value(PIXELS, e)) is not None]
    cell = f.cells[claim.best] if claim else None
    runner_tied = claim is not None and claim.runner_up in claim.tied
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
        tied=runner_tied,
        test_best_block=on_test[0] if on_test else None,
        test_best_epoch=on_test[1] if on_test else None,
        test_best_top1=on_test[2] if on_test else None,
        best_val=cell.get(by) if cell else None,
        more_tied=len(claim.tied) - 1 - int(runner_tied) if claim else 0,
        val_tie=claim.level if claim and len(claim.level) > 1 else (),
    )


@dataclass(frozen=True)
class Answer:
    """The study's answer: the chosen row (its table and cell) of the tables whose cell scores
    highest on what it was chosen by, and every cell of any table tied with it there exactly
    (`tied`: (table, spot), the answer first), broken by `selection.TIE_RULE`, then table
    order."""

    row: SummaryRow
    tied: tuple[tuple[FacetKey, Spot], ...] = ()

    @property
    def chosen_on(self) -> str:
        return self.row.chosen_on


def study_answer(facets: Sequence[Facet], rows: Sequence[SummaryRow]) -> Answer | None:
    """The one answer of the study (None when no table has a cell of the net)."""
    found = [(f, r) for f, r in zip(facets, rows, strict=True) if r.best_block is not None]
    if not found:
        return None
    by_val = all(r.chosen_on == "val" for _, r in found)

    def score(f: Facet, r: SummaryRow) -> float:
        cell = f.cells[(r.best_block, r.best_epoch)]  # type: ignore[index]
        value = cell.val_top1 if by_val else cell.top1
        return -1.0 if value is None else value

    ranked = sorted(
        enumerate(found),
        key=lambda ifr: (
            -score(*ifr[1]),
            selection.tie_order(str(ifr[1][1].best_block), ifr[1][1].best_epoch),
            ifr[0],
        ),
    )
    best_f, best_r = ranked[0][1]
    top = score(best_f, best_r)
    tied: list[tuple[FacetKey, Spot]] = []
    for f, r in (fr for _, fr in ranked):
        by = "val_top1" if by_val else "top1"
        spots: tuple[Spot, ...] = r.val_tie or ((str(r.best_block), r.best_epoch),)
        tied += [(f.key, s) for s in spots if f.cells[s].get(by) == top]
    return Answer(best_r, tuple(tied) if len(tied) > 1 else ())


def attach_fid(facets: Iterable[Facet], curves: Mapping[str, list[FidCurve]]) -> None:
    """Give each facet the FID curves of exactly the training runs its trials probed
    (`curves` as `fidcurves.fid_by_backbone` gives them)."""
    for f in facets:
        f.fids = [c for run in f.backbones for c in curves.get(run, [])]
