"""The pure core of the report: block × epoch tables built from plain rows of trial results, and
the tested claims of which cell is best. Nothing here reads MLflow or writes files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ddsweep import predictions, probes
from ddsweep.config.model import PIXELS
from ddsweep.config.points import split_id
from ddsweep.model import block_order
from ddsweep.report import rows as rd
from ddsweep.report import stats
from ddsweep.report.fidcurves import FidCurve
from ddsweep.tracking.schema import POINT_TAG

if TYPE_CHECKING:
    import pandas as pd

# Trials logged before `pool` and `weights` were params used ProbeConfig's defaults.
DEFAULT_POOL, DEFAULT_WEIGHTS = "avg", "ema"

# A table column: a training epoch (0 = the untrained net). None only in a facet with no trained
# epoch at all (pixels results alone), as the one column that holds them.
Epoch = int | None
Spot = tuple[str, Epoch]  # (block, epoch): one cell of a table
Settings = tuple[tuple[str, str], ...]  # (name, value as text) of settings off their default
# A pretrained backbone's trials (their point names it as the setting `backbone`) have no epoch:
# their table is block x noise step, its columns the noise steps, its key's noise step BY_NOISE.
PRETRAINED = "backbone"
BY_NOISE = -1


@dataclass(frozen=True)
class FacetKey:
    """What one table holds fixed; its rows are blocks and its columns epochs. `settings` are
    the point's other settings off their defaults (from its id), e.g. (("knn.metric", "cos"),)."""

    dataset: str
    resolution: int
    attention: bool | None  # None: a facet of pixels results alone, which hold for either
    probe: str
    k: int
    noise_step: int
    pool: str
    weights: str
    settings: Settings = ()

    def slug(self) -> str:
        """File-name stem, e.g. digits-16px-attn-linear-t0-avg-ema or …-knn50-t0-avg-ema-seed=1"""
        attn = {True: "-attn", False: "-noattn", None: ""}[self.attention]
        probe = f"{self.probe}{self.k}" if self.k else self.probe
        extra = "".join(f"-{n}={v}" for n, v in self.settings)
        text = (
            f"{self.dataset}-{self.resolution}px{attn}-{probe}"
            f"-t{self.noise_step}-{self.pool}-{self.weights}{extra}"
        )
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)

    def pretrained(self) -> str | None:
        """The pretrained backbone (kind:hash) of a block x noise step table, else None."""
        return dict(self.settings).get(PRETRAINED) if self.noise_step == BY_NOISE else None

    def title(self) -> str:
        """Human heading, e.g. 'digits 16 px, attention: linear probe, t=0, avg pool, ema weights'
        then any other setting off its default ('…, knn.metric=cosine')."""
        backbone = self.pretrained()
        if backbone is not None:
            kind = probes.find(self.probe)
            name = kind.title() if kind else self.probe
            probe = f"{name} probe (k={self.k})" if self.k else f"{name} probe"
            rest = "".join(f", {n}={v}" for n, v in self.settings if n != PRETRAINED)
            return (
                f"{self.dataset} {self.resolution} px, {backbone}, by t (no epochs): {probe}, "
                f"{self.pool} pool{rest}; pretrained: columns are noise steps"
            )
        attn = {True: ", attention", False: ", no attention", None: ""}[self.attention]
        kind = probes.find(self.probe)
        name = kind.title() if kind else self.probe
        probe = f"{name} probe (k={self.k})" if self.k else f"{name} probe"
        extra = "".join(f", {n}={v}" for n, v in self.settings)
        return (
            f"{self.dataset} {self.resolution} px{attn}: {probe}, t={self.noise_step}, "
            f"{self.pool} pool, {self.weights} weights{extra}"
        )

    def sort_key(self) -> tuple[Any, ...]:
        """Probe kinds in registry order, kinds no longer registered last."""
        known = probes.names()
        probe_rank = known.index(self.probe) if self.probe in known else len(known)
        attn_rank = {True: 0, False: 1, None: 2}[self.attention]
        return (
            self.dataset,
            self.resolution,
            attn_rank,
            probe_rank,
            self.probe,
            self.k,
            self.noise_step,
            self.pool,
            self.weights,
            self.settings,
        )


@dataclass(frozen=True)
class Cell:
    """One grid point's metrics: top1 and top3 (test accuracies, fractions in [0, 1]), the other
    metrics its probe kind reports (e.g. train_top1), in the kind's order; the 95 % bootstrap
    interval (low, high) of top1 and val_top1 when the trial logged them; and its per-example
    test hits ([N], or [R, N] over R noise realisations) and labels [N] (for paired tests; not
    part of equality)."""

    top1: float
    top3: float | None = None
    others: tuple[tuple[str, float], ...] = ()
    low: float | None = None
    high: float | None = None
    val_top1: float | None = None
    hits: np.ndarray | None = field(default=None, compare=False, repr=False)
    labels: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Its predictions exist but could not be read: no comparison with it is a finding.
    untested: bool = field(default=False, compare=False)

    def get(self, metric: str) -> float | None:
        """The metric's value, or None when the trial did not report it."""
        if metric in ("top1", "top3", "val_top1"):
            return getattr(self, metric)
        return dict(self.others).get(metric)


def paired_p(a: Cell, b: Cell) -> float | None:
    """p-value of two cells' top1 on the same test examples (exact McNemar), or on the same
    examples and noise realisations (paired two-way bootstrap, `stats.paired_p`); None when
    either has no per-example predictions or they were scored on different test sets or
    numbers of realisations."""
    if a.hits is None or b.hits is None or a.labels is None or b.labels is None:
        return None
    if a.labels.shape != b.labels.shape or not np.array_equal(a.labels, b.labels):
        return None
    if a.hits.shape != b.hits.shape:
        return None
    return stats.paired_p(a.hits, b.hits)


@dataclass(frozen=True)
class Claim:
    """The best of some cells by `by` (top1, or val_top1 to choose on validation), tested
    against the others on the same test examples by exact McNemar's test (`stats.mcnemar_p`).

    The runner-up is the second-best cell by `by`; `p` is the best cell's p-value against it,
    None when untested. `tied` holds the best cell and every cell not significantly different
    from it on test (p >= 5 %; for a cell without predictions: an exactly equal value), so the
    best is "significantly better than every other cell" exactly when `tied` is the best alone.
    `level` holds the cells whose `by` equals the best's exactly (the best first, then in the
    order that broke the tie): with more than one, `by` itself could not choose.
    """

    best: Spot
    runner_up: Spot | None
    p: float | None
    tied: frozenset[Spot]
    level: tuple[Spot, ...] = ()

    @property
    def is_tie(self) -> bool:
        return len(self.tied) > 1

    @property
    def others_tied(self) -> tuple[Spot, ...]:
        """The cells tied with the best on test, the runner-up first when it is one."""
        rest = sorted(self.tied - {self.best}, key=lambda s: s != self.runner_up)
        return tuple(rest)


def contest(cells: Mapping[Spot, Cell], by: str = "top1") -> Claim | None:
    """The claim over `cells` (in preference order: an exact tie goes to the first); None when
    no cell has `by`. A result shown in several cells (the pixels baseline, broadcast to every
    epoch column) takes part once, at its first cell: it is not tied with itself."""
    firsts: dict[int, Spot] = {}
    for spot, c in cells.items():
        firsts.setdefault(id(c), spot)
    unique = {s: cells[s] for s in firsts.values()}
    ranked = [(v, i, s) for i, (s, c) in enumerate(unique.items()) if (v := c.get(by)) is not None]
    ranked.sort(key=lambda t: (-t[0], t[1]))
    if not ranked:
        return None
    top_value, _, best = ranked[0]
    others = []
    for _, _, spot in ranked[1:]:
        p = paired_p(cells[best], cells[spot])
        same = cells[spot].top1 == cells[best].top1
        # Untested against a cell whose predictions were unreadable: no claim of a difference.
        same = same or cells[best].untested or cells[spot].untested
        others.append((spot, p, same if p is None else p >= stats.ALPHA))
    runner = others[0] if others else None
    return Claim(
        best=best,
        runner_up=runner[0] if runner else None,
        p=runner[1] if runner else None,
        tied=frozenset([best, *(o[0] for o in others if o[2])]),
        level=tuple(s for v, _, s in ranked if v == top_value),
    )


def withhold(claim: Claim | None) -> Claim | None:
    """`claim` as an incomplete study may state it: its best cell so far, compared with no
    other (no runner-up, no test, no tie)."""
    if claim is None:
        return None
    return dataclasses.replace(claim, runner_up=None, p=None, tied=frozenset({claim.best}))


def withhold_claims(facets: list[Facet]) -> None:
    """Mark every facet of an incomplete study: its claims name a best cell so far and compare
    it with nothing (see `withhold`)."""
    for f in facets:
        f.withheld = True
        f._claims.clear()


@dataclass
class Facet:
    """One block × epoch table: `blocks` in forward order (pixels first), `epochs` ascending;
    `backbones` the training runs its trials probed, `fids` their generative-quality curves."""

    key: FacetKey
    blocks: list[str]
    epochs: list[Epoch]
    cells: dict[tuple[str, Epoch], Cell]
    fids: list[FidCurve] = field(default_factory=list)
    backbones: tuple[str, ...] = ()
    # The study is incomplete: cells' peers may be missing, so no comparison is claimed.
    withheld: bool = field(default=False, compare=False)
    _claims: dict[tuple[Any, ...], Claim | None] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def fid(self) -> FidCurve | None:
        """The first FID curve, or None."""
        return self.fids[0] if self.fids else None

    def metrics(self) -> tuple[str, ...]:
        """Each metric the facet's probe kind declares (top1 first) that some cell holds."""
        return tuple(
            m
            for m in kind_metrics(self.key.probe)
            if m == "top1" or any(c.get(m) is not None for c in self.cells.values())
        )

    def value(self, block: str, epoch: Epoch, metric: str = "top1") -> float | None:
        """The cell's accuracy, or None for a blank (a point not run, or not finished, yet)."""
        cell = self.cells.get((block, epoch))
        return None if cell is None else cell.get(metric)

    def has_intervals(self) -> bool:
        return any(c.low is not None for c in self.cells.values())

    def has_realisations(self) -> bool:
        """Whether some cell is a mean over several noise realisations (hits [R, N], R > 1)."""
        return any(
            c.hits is not None and c.hits.ndim == 2 and c.hits.shape[0] > 1
            for c in self.cells.values()
        )

    def claim(
        self, epoch: Epoch | str = "all", *, pixels: bool = True, by: str = "top1"
    ) -> Claim | None:
        """The tested best of one epoch column, or of the whole table (epoch "all"), by `by`;
        an exact tie goes to the earliest epoch, then the earliest block in forward order."""
        memo = (epoch, pixels, by)
        if memo not in self._claims:
            epochs = self.epochs if isinstance(epoch, str) else [epoch]
            blocks = self.blocks if pixels else [b for b in self.blocks if b != PIXELS]
            cells = {(b, e): c for e in epochs for b in blocks if (c := self.cells.get((b, e)))}
            found = contest(cells, by)
            self._claims[memo] = withhold(found) if self.withheld else found
        return self._claims[memo]

    def best_blocks(self, epoch: Epoch, metric: str = "top1") -> set[str]:
        """The best block(s) of one epoch column, pixels included: for top1, every block not
        significantly worse than the best (see `Claim`). Other metrics carry no per-example
        predictions to test on, so none of their cells is marked best."""
        if metric != "top1":
            return set()
        found = self.claim(epoch)
        return set() if found is None else {b for b, _ in found.tied}

    def best(self, metric: str = "top1", *, pixels: bool = True) -> tuple[str, Epoch, float] | None:
        """(block, epoch, value) of the best cell (of the net's blocks only when not `pixels`);
        a tie goes to the earliest epoch, then the earliest block in forward order."""
        found: tuple[str, Epoch, float] | None = None
        for epoch in self.epochs:
            for block in self.blocks if pixels else [b for b in self.blocks if b != PIXELS]:
                v = self.value(block, epoch, metric)
                if v is not None and (found is None or v > found[2]):
                    found = (block, epoch, v)
        return found


@dataclass(frozen=True)
class _Result:
    group: tuple[Any, ...]  # the facet key without attention
    attention: bool | None
    epoch: Epoch
    block: str
    cell: Cell
    when: tuple[float, int]  # (start time, input position): the newest rerun of a cell wins
    backbone: str | None  # the training run probed (RUNID of the backbone param RUNID@EPOCH)


def build_tables(trials: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[Facet]:
    """Block × epoch tables from finished trials.

    `trials` is `mlflow.search_runs`' frame (columns `params.*`, `metrics.*`, `status`, `tags.*`)
    or rows with the bare param and metric names; a row's `predictions` ({split: (pred, label)},
    see `ddsweep.predictions`) gives its cell an interval and paired tests. Rows not FINISHED, of
    another kind than trial, or without a readable top1, dataset or block are left out. Trials
    that differ in any setting (the point id's settings, pool, weights) never share a table. A
    pixels result whose attention is "None" goes into every attention facet of its group, and
    one whose epoch is "None" into every epoch column, so the baseline reads alike wherever one
    looks; a result for one attention or one epoch overrides it there. When a cell was run more
    than once the newest run wins.
    """
    results = [r for i, raw in enumerate(rd.records(trials)) if (r := _result(raw, i)) is not None]
    results += _pixels_beside_pretrained(results)
    groups: dict[tuple[Any, ...], list[_Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)

    facets: list[Facet] = []
    for group, members in groups.items():
        known = sorted({r.attention for r in members if r.attention is not None}, reverse=True)
        attentions: list[bool | None] = [*known] or [None]
        for attention in attentions:
            mine = [r for r in members if r.attention is None or r.attention == attention]
            dataset, resolution, probe, k, noise_step, pool, weights, settings = group
            key = FacetKey(
                dataset, resolution, attention, probe, k, noise_step, pool, weights, settings
            )
            facets.append(_facet(key, mine))
    return sorted(facets, key=lambda f: f.key.sort_key())


def _pixels_beside_pretrained(results: list[_Result]) -> list[_Result]:
    """Copies of the pixels results into every block x noise step group of a pretrained
    backbone with the same other settings, one column per noise step: the baseline row."""
    out = []
    for g in {r.group for r in results if r.group[4] == BY_NOISE}:
        others = tuple((n, v) for n, v in g[7] if n != PRETRAINED)
        for r in results:
            d, res, probe, k, t, pool, weights, settings = r.group
            same = (d, res, probe, k) == g[:4] and (pool, weights) == g[5:7]
            if r.block == PIXELS and settings == others and same:
                out.append(dataclasses.replace(r, group=g, epoch=t))
    return out


def _block_key(block: str) -> tuple[Any, ...]:
    """Forward order: the study's blocks, then other names with their numbers as numbers
    (layer2 before layer10)."""
    parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"([0-9]+)", block))
    return (block_order(block), tuple((isinstance(p, str), p) for p in parts))


def _facet(key: FacetKey, mine: list[_Result]) -> Facet:
    trained = sorted({r.epoch for r in mine if r.epoch is not None})
    epochs: list[Epoch] = [*trained] or [None]
    cells: dict[tuple[str, Epoch], Cell] = {}
    # Broadcast results first, so a specific result (and a newer one) overwrites them.
    for r in sorted(mine, key=lambda r: (r.attention is not None, r.epoch is not None, r.when)):
        for epoch in epochs if r.epoch is None else [r.epoch]:
            cells[(r.block, epoch)] = r.cell
    return Facet(
        key=key,
        blocks=sorted({b for b, _ in cells}, key=_block_key),
        epochs=epochs,
        cells=cells,
        backbones=tuple(sorted({r.backbone for r in mine if r.backbone})),
    )


def kind_metrics(probe: str) -> tuple[str, ...]:
    """The metrics a probe kind reports, in report order; top1 and top3 for a kind no longer
    registered (results read from an older store)."""
    kind = probes.find(probe)
    return kind.metrics if kind is not None else ("top1", "top3")


def point_settings(row: Mapping[str, Any]) -> Settings:
    """The settings off their defaults that the trial's point id names, by name; pool and
    weights left out (they are fields of the key, read from params, which old runs have too).
    Positional ids of ddsweep 0.1, and rows without an id, name none."""
    pid = rd.text(row.get(f"tags.{POINT_TAG}"))
    if not pid:
        return ()
    try:
        _, named = split_id(pid)
    except (TypeError, ValueError):
        return ()
    return tuple(sorted((n, str(v)) for n, v in named.items() if n not in ("pool", "weights")))


def _cell(row: Mapping[str, Any], probe: str, top1: float) -> Cell:
    others = tuple(
        (m, v)
        for m in kind_metrics(probe)
        if m not in ("top1", "top3") and (v := rd.number(row.get(m))) is not None
    )
    top3, val_top1 = rd.number(row.get("top3")), rd.number(row.get("val_top1"))
    preds = row.get("predictions")
    if not isinstance(preds, Mapping) or "test" not in preds:
        untested = isinstance(preds, str) and preds == "unreadable"  # see loader.UNREADABLE
        return Cell(top1, top3, others, val_top1=val_top1, untested=untested)
    pred, label = preds["test"]
    hits = predictions.hits(pred, label)  # [N], or [R, N] over noise realisations
    low, high = stats.bootstrap_interval(hits)
    return Cell(top1, top3, others, low, high, val_top1, hits, np.asarray(label))


def _result(raw: Mapping[str, Any], position: int) -> _Result | None:
    row = rd.bare(raw)
    if not rd.kept(row, "trial"):
        return None
    top1 = rd.number(row.get("top1"))
    dataset, block, probe = (rd.text(row.get(n)) for n in ("dataset", "block", "probe"))
    if top1 is None or dataset is None or block is None or probe is None:
        return None
    try:
        resolution = rd.opt_int(row.get("resolution"))
        attention = rd.opt_bool(row.get("attention"))
        epoch = rd.opt_int(row.get("epoch"))
        k = rd.opt_int(row.get("k")) or 0
        noise_step = rd.opt_int(row.get("noise_step")) or 0
    except ValueError:
        return None  # not a trial this version of ddsweep wrote
    if resolution is None:
        return None
    pool = rd.text(row.get("pool")) or DEFAULT_POOL
    weights = rd.text(row.get("weights")) or DEFAULT_WEIGHTS
    kind = probes.find(probe)
    if kind is not None and not kind.uses_k:
        k = 0  # k does not multiply this kind: one facet whatever was logged
    backbone = rd.text(row.get("backbone"))
    settings = point_settings(row)
    if PRETRAINED in dict(settings):  # no epochs: its columns are the noise steps
        epoch, noise_step = noise_step, BY_NOISE
    return _Result(
        group=(dataset, resolution, probe, k, noise_step, pool, weights, settings),
        attention=attention,
        epoch=epoch,
        block=block,
        cell=_cell(row, probe, top1),
        when=rd.when(row, position),
        backbone=backbone.split("@")[0] if backbone and backbone != "none" else None,
    )
