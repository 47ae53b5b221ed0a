"""The terminal summary names the key columns that hold one value in every row in its title, so
a summary fits a terminal; the columns that tell rows apart stay."""

from __future__ import annotations

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
