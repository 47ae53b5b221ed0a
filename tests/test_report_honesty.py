"""The report claims only what it tested (issue 26): a cell whose predictions file cannot be
read gets no `*` and wins no "beats"; a grid interrupted before its finish step is INCOMPLETE."""

from __future__ import annotations

import numpy as np
from test_report_stats import N, trial  # pytest puts tests/ on the path

from ddsweep import report
from ddsweep.report import build_tables
from ddsweep.report.loader import UNREADABLE


def test_a_cell_with_unreadable_predictions_is_never_significantly_better() -> None:
    clean = np.arange(N) % 5 != 0  # 80 %
    # The runner-up's 70 % would be "significantly worse" by value alone; its predictions are
    # there but unreadable, so no test was made.
    rows = [trial("up4", 50, clean), {**trial("mid", 50), "top1": 0.7, "predictions": UNREADABLE}]
    [facet] = build_tables(rows)
    claim = facet.claim()
    assert claim is not None and claim.is_tie
    table = report.markdown_table(facet)
    assert "** * |" not in table and "≈ |" in table  # tied, not starred
    # A best cell whose own predictions are unreadable claims nothing either.
    rows = [{**trial("up4", 50), "top1": 0.9, "predictions": UNREADABLE}, trial("mid", 50, clean)]
    [facet] = build_tables(rows)
    assert facet.claim() is not None and facet.claim().is_tie  # type: ignore[union-attr]


def test_a_cell_without_predictions_keeps_the_old_rule() -> None:
    clean = np.arange(N) % 5 != 0
    [facet] = build_tables([trial("up4", 50, clean), {**trial("mid", 50), "top1": 0.7}])
    claim = facet.claim()
    assert claim is not None and not claim.is_tie  # ddsweep 0.1 rows: equal values only tie


def test_an_incomplete_study_claims_no_cell_beats_another() -> None:
    """A grid cut short (Ctrl-C at 5 of 54 points): the cells there are shown, the best so far
    named, but no "beats" (its peers may be among the missing points) in the answer, the
    compact answer table, the claims under each table or the summary."""
    import io

    from rich.console import Console

    from ddsweep.report.render import column_claims, print_report, table_claim
    from ddsweep.report.tables import withhold_claims

    strong = np.arange(N) % 10 != 0  # 90 %
    weak = np.arange(N) % 2 == 0  # 50 %
    rows = [trial(b, e, strong if b == "up4" else weak) for b in ("mid", "up4") for e in (1, 2)]

    def printed(withheld: bool) -> str:
        facets = build_tables(rows)
        if withheld:
            withhold_claims(facets)
        out = io.StringIO()
        console = Console(file=out, width=200)
        print_report(console, "cut", facets, report.summary(facets), full=True)
        [facet] = facets
        return "\n".join([out.getvalue(), table_claim(facet), column_claims(facet)])

    assert "beats" in printed(False)  # the same cells in a complete study: a tested claim
    said = printed(True)
    assert "beats" not in said and "tied with" not in said, said
    assert "up4 @ 2" in said or "up4 @ 1" in said  # the best cell so far is still named
