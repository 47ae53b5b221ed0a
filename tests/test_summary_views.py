"""The terminal summary names the key columns that hold one value in every row in its title, so
a summary fits a terminal; the columns that tell rows apart stay."""

from __future__ import annotations

import pytest

from ddsweep.report.summary_views import HEADERS, shown_columns


def row(probe: str, t: str, settings: str = "") -> list[str]:
    key = {"dataset": "digits", "res": "16", "attn": "yes", "probe": probe, "t": t}
    key |= {"pool": "avg", "weights": "ema", "settings": settings}
    rest = ["x"] * (len(HEADERS) - len(key))
    return [key[h] for h in HEADERS[: len(key)]] + rest


def test_constant_key_columns_move_to_the_title_and_varying_ones_stay() -> None:
    keep, same = shown_columns([row("linear", "0"), row("knn k=10", "50")])
    shown = [HEADERS[i] for i in keep]
    assert shown[:2] == ["probe", "t"] and "best block" in shown
    assert [(HEADERS[i], v) for i, v in same] == [
        ("dataset", "digits"),
        ("res", "16"),
        ("attn", "yes"),
        ("pool", "avg"),
        ("weights", "ema"),
    ]  # settings: empty everywhere, dropped and not named
    assert "settings" not in shown


def test_result_columns_stay_even_when_equal_and_one_row_keeps_its_varying_nothing() -> None:
    keep, _ = shown_columns([row("linear", "0", "linear.epochs=15")])
    shown = [HEADERS[i] for i in keep]
    assert shown == list(HEADERS[HEADERS.index("best block") :])
    keep, same = shown_columns([row("linear", "0", "a=1"), row("linear", "0", "a=2")])
    assert "settings" in [HEADERS[i] for i in keep]
    assert ("probe", "linear") in [(HEADERS[i], v) for i, v in same]


def _answer_text(width: int) -> list[str]:
    """The answer at a glance of four tables (linear and k-NN, t=0 and t=50, the t=50 ones
    with a setting off its default, as the quickstart's), drawn at `width` columns."""
    from io import StringIO

    from rich.console import Console

    from ddsweep import report
    from ddsweep.report import print_answer

    rows = []
    for probe, k in (("linear", "0"), ("knn", "10")):
        for t, pid in (("0", ""), ("50", "dataset=digits&noise_seeds=0%2C1%2C2")):
            for b, e, top1, val in (("mid", 8, 0.80, 0.9), ("down4", 8, 0.86, 0.95)):
                rows.append(
                    {"dataset": "digits", "resolution": "16", "attention": "True", "epoch": str(e),
                     "block": b, "noise_step": t, "probe": probe, "k": k, "top1": top1,
                     "val_top1": val, "tags.ddsweep.point": pid}
                )  # fmt: skip
            rows.append({**rows[-1], "block": "pixels", "epoch": "None", "attention": "None"})
    facets = report.build_tables(rows)
    assert len(facets) == 4
    buf = StringIO()
    print_answer(Console(file=buf, width=width, color_system=None), "s", report.summary(facets))
    return buf.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 200])
def test_every_line_of_the_answer_reads_cleanly(width: int) -> None:
    """No space before a label's colon, no line past the width, the rule that chose in the
    title rather than on a line of its own, and each table's key whole."""
    lines = _answer_text(width)
    assert all(len(line) <= width for line in lines), lines
    assert not [ln for ln in lines if " :" in ln], lines
    assert lines[0] == "study s: the answer, chosen on validation", lines
    assert "chosen on validation" not in "\n".join(lines[1:])
    keys = ("linear t=0 ", "linear t=50 noise_seeds=0,1,2 ", "knn k=10 t=0 ", "knn k=10 t=50 ")
    for key in keys:
        assert any(ln.startswith(key) for ln in lines), (key, lines)
