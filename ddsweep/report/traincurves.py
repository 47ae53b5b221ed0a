"""The probe curves a training logged while it ran (`ddsweep train --probe-every`), for the
backbones a study probed: one row per `probe/<probe>/top1/<block>` metric, one column per probed
epoch. Pure: metric histories in, a Rich table, CSV and Markdown out."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep.config.paths import make_folder
from ddsweep.model import block_order
from ddsweep.report.text import pct

if TYPE_CHECKING:
    from rich.table import Table

PREFIX = "probe"  # probe/<probe>/top1/<block> (earlier runs: probe/<block>/<probe>/top1 and
# probe.<block>.<probe>.top1)


def split_metric(metric: str) -> tuple[str, str] | None:
    """(block, probe) of a probe metric of a training run, in any of its namings, else None."""
    parts = metric.split("/")
    if len(parts) == 4 and parts[0] == PREFIX and parts[2] == "top1":
        return parts[3], parts[1]
    if len(parts) == 4 and parts[0] == PREFIX and parts[3] == "top1":
        return parts[1], parts[2]
    parts = metric.split(".")
    if len(parts) == 4 and parts[0] == PREFIX:
        return parts[1], parts[2]
    return None


CSV_FILE, MD_FILE = "training_probes.csv", "training_probes.md"
MAX_COLUMNS = 12  # epochs shown in the terminal; the files hold every one


@dataclass(frozen=True)
class TrainCurve:
    """One probe metric of one training run against its epoch."""

    run_id: str
    metric: str  # probe/knn50/top1/up3
    values: dict[int, float]

    @property
    def block(self) -> str:
        return (split_metric(self.metric) or ("", ""))[0]

    @property
    def probe(self) -> str:
        return (split_metric(self.metric) or ("", ""))[1]

    def best(self) -> tuple[int, float]:
        """(epoch, value) of the highest value, the earliest epoch among equals."""
        epoch = min(self.values, key=lambda e: (-self.values[e], e))
        return epoch, self.values[epoch]


def backbone_runs(backbones: Iterable[Any]) -> list[str]:
    """The training run ids in trials' `backbone` params (`RUN@EPOCH`), first seen first."""
    out: dict[str, None] = {}
    for label in backbones:
        if isinstance(label, str) and "@" in label:
            out.setdefault(label.split("@", 1)[0], None)
    return list(out)


def curves(histories: Mapping[str, Mapping[str, Mapping[int, float]]]) -> list[TrainCurve]:
    """{run id: {metric: {epoch: value}}} -> the probe curves, by run, probe, block order."""
    found = [
        TrainCurve(run, metric, dict(sorted(values.items())))
        for run, metrics in histories.items()
        for metric, values in metrics.items()
        if split_metric(metric) is not None and values
    ]
    runs = list(histories)
    return sorted(found, key=lambda c: (runs.index(c.run_id), c.probe, block_order(c.block)))


def _shown_epochs(epochs: list[int]) -> list[int]:
    if len(epochs) <= MAX_COLUMNS:
        return epochs
    step = (len(epochs) - 1) / (MAX_COLUMNS - 1)
    return sorted({epochs[round(i * step)] for i in range(MAX_COLUMNS)})


def _epochs(found: list[TrainCurve]) -> list[int]:
    return sorted({e for c in found for e in c.values})


def rich_tables(found: list[TrainCurve]) -> list[Table]:
    """One table per training run: top-1 in % by block and probe (rows) and epoch (columns)."""
    from rich.table import Table

    out = []
    for run in dict.fromkeys(c.run_id for c in found):
        mine = [c for c in found if c.run_id == run]
        epochs = _shown_epochs(_epochs(mine))
        table = Table(title=f"probes while training (run {run}): top-1 % by epoch")
        table.add_column("block")
        table.add_column("probe")
        for e in epochs:
            table.add_column(str(e), justify="right")
        table.add_column("best (epoch)", justify="right")
        for c in mine:
            epoch, value = c.best()
            cells = [pct(c.values.get(e)) for e in epochs]
            table.add_row(c.block, c.probe, *cells, f"{pct(value)} ({epoch})")
        out.append(table)
    return out


def write_files(found: list[TrainCurve], out_dir: Path, formats: set[str]) -> list[Path]:
    """training_probes.csv (every value) and .md (one table per run) as `formats` ask."""
    paths = []
    make_folder(out_dir, "report --out")
    if "csv" in formats:
        path = out_dir / CSV_FILE
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["run_id", "block", "probe", "epoch", "top1"])
            for c in found:
                writer.writerows([c.run_id, c.block, c.probe, e, v] for e, v in c.values.items())
        paths.append(path)
    if "md" in formats:
        lines = ["# Probes while training", ""]
        for run in dict.fromkeys(c.run_id for c in found):
            mine = [c for c in found if c.run_id == run]
            epochs = _epochs(mine)
            lines += [f"Training run `{run}`: top-1 in % on the test split, by epoch.", ""]
            lines.append("| block | probe | " + " | ".join(map(str, epochs)) + " | best (epoch) |")
            lines.append("|---|---|" + "---:|" * (len(epochs) + 1))
            for c in mine:
                epoch, value = c.best()
                cells = " | ".join(pct(c.values.get(e)) for e in epochs)
                lines.append(f"| {c.block} | {c.probe} | {cells} | {pct(value)} ({epoch}) |")
            lines.append("")
        path = out_dir / MD_FILE
        path.write_text("\n".join(lines))
        paths.append(path)
    return paths
