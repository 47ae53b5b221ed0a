"""FID (or another network's Fréchet distance) against training epoch, from `ddsweep fid` runs:
one curve per backbone training run and generation setting, so a probe table is drawn beside the
FID of exactly the network it probed. Pure: plain rows in, curves out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddsweep.report import rows as rd

if TYPE_CHECKING:
    import pandas as pd

# The params of a FID run that make two of its curves different measurements.
SETTINGS = ("sampler", "steps", "samples", "weights", "feature")


@dataclass(frozen=True)
class FidCurve:
    """A generative-quality metric of one backbone against its training epoch, with the
    generation settings it was measured under (None: not recorded)."""

    metric: str  # "fid", or "fd_<network>" for a Fréchet distance in another network's features
    values: dict[int, float]
    backbone_run: str = ""
    sampler: str | None = None
    steps: str | None = None
    samples: str | None = None
    weights: str | None = None
    feature: str | None = None

    def label(self) -> str:
        """E.g. 'FID (ddpm 1000 steps, 2000 samples, ema)'; 'FID' when no setting is known."""
        name = "FID" if self.metric == "fid" else self.metric
        how = " ".join(
            x for x in (self.sampler, f"{self.steps} steps" if self.steps else None) if x
        )
        parts = [p for p in (how, self.samples and f"{self.samples} samples", self.weights) if p]
        return f"{name} ({', '.join(parts)})" if parts else name


_Run = tuple[tuple[float, int], int, dict[str, float]]  # (when, epoch, {metric: value})


def _runs(
    fid_runs: pd.DataFrame | Iterable[Mapping[str, Any]],
) -> list[tuple[dict[str, Any], _Run]]:
    """(bare row, run) of each finished FID run with an epoch and a fid or fd_* metric."""
    out = []
    for i, raw in enumerate(rd.records(fid_runs)):
        row = rd.bare(raw)
        if not rd.kept(row, "fid"):
            continue
        try:
            epoch = rd.opt_int(row.get("epoch"))
        except ValueError:
            continue
        values = {
            name: v
            for name, raw_v in row.items()
            if isinstance(name, str)
            and (name == "fid" or name.startswith("fd_"))
            and (v := rd.number(raw_v)) is not None
        }
        if epoch is not None and values:
            out.append((row, (rd.when(row, i), epoch, values)))
    return out


def _curve(runs: list[_Run]) -> tuple[str, dict[int, float]]:
    """The metric (`fid` when any run has it, else the first `fd_*` by name) and its values by
    epoch, the newest run of an epoch winning."""
    names = {n for _, _, values in runs for n in values}
    metric = "fid" if "fid" in names else min(names)
    by_epoch: dict[int, float] = {}
    for _, epoch, values in sorted(runs, key=lambda r: r[0]):
        if metric in values:
            by_epoch[epoch] = values[metric]
    return metric, dict(sorted(by_epoch.items()))


def fid_by_backbone(
    fid_runs: pd.DataFrame | Iterable[Mapping[str, Any]],
) -> dict[str, list[FidCurve]]:
    """{backbone run id: its curves}, one curve per (sampler, steps, samples, weights, feature)
    in that order. Takes the same shapes as `build_tables`; runs without `backbone_run` are left
    out (nothing pairs them with a probed network)."""
    groups: dict[tuple[str, ...], list[_Run]] = {}
    for row, run in _runs(fid_runs):
        backbone = rd.text(row.get("backbone_run"))
        if backbone:
            key = (backbone, *(rd.text(row.get(n)) or "" for n in SETTINGS))
            groups.setdefault(key, []).append(run)
    curves: dict[str, list[FidCurve]] = {}
    for key in sorted(groups):
        metric, values = _curve(groups[key])
        backbone, *settings = key
        named = dict(zip(SETTINGS, (s or None for s in settings), strict=True))
        curves.setdefault(backbone, []).append(FidCurve(metric, values, backbone, **named))
    return curves


def fid_curves(
    fid_runs: pd.DataFrame | Iterable[Mapping[str, Any]],
) -> dict[tuple[str, int, bool], FidCurve]:
    """An overview: FID (or FD) against epoch per (dataset, resolution, attention), whatever the
    backbone run or generation settings (the newest run of an epoch wins). The report pairs
    curves with tables by `fid_by_backbone` instead.

    Takes the same shapes as `build_tables`. The metric is `fid` when any run of the group has
    it, else the first `fd_*` name in alphabetical order.
    """
    groups: dict[tuple[str, int, bool], list[_Run]] = {}
    for row, run in _runs(fid_runs):
        try:
            dataset = rd.text(row.get("dataset"))
            resolution = rd.opt_int(row.get("resolution"))
            attention = rd.opt_bool(row.get("attention"))
        except ValueError:
            continue
        if dataset is not None and resolution is not None and attention is not None:
            groups.setdefault((dataset, resolution, attention), []).append(run)
    return {key: FidCurve(*_curve(runs)) for key, runs in groups.items()}
