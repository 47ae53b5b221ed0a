"""A new user's first hour: progress rows that fit 80 columns, mistakes that suggest the right
name, and commands that fail or only read leaving the folder as they found it."""

from __future__ import annotations

from io import StringIO

import pytest
from rich.console import Console

from ddsweep.cli._options import bar

POINT = "dataset=digits&resolution=16&attention=true&epoch=8&block=up4&noise_step=50&probe=knn&k=10"


@pytest.mark.parametrize("width", [80, 200])
def test_progress_rows_stay_one_line_each(width: int) -> None:
    buf = StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    progress = bar(console)
    progress.add_task(
        "digits_blocks", total=184, completed=90, state=f"1 running, 0 failed | {POINT}"
    )
    progress.add_task("digits-16px-attn", total=8, completed=3, loss=0.0506, ips=951.0)
    console.print(progress.make_tasks_table(progress.tasks))
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 2, lines  # one row per task: nothing wrapped onto a line of its own
    assert all(len(ln) <= width for ln in lines)
    assert "951 img/s" in lines[1] and "90/184" in lines[0]
