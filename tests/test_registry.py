"""The probe registry: a probe kind defined here, in the test, is validated from its settings,
run through `ddsweep study probe-grid` and shown by `ddsweep report` with its own metric."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ddsweep import probes, report, tracking
from ddsweep.cli import app
from ddsweep.config.probe import ProbeConfig
from ddsweep.config.sweep import Axes, expand, parse_study
from ddsweep.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class CentroidSettings:
    """The sweep file's `probe.centroid:` section."""

    normalise: bool = False


CALLS: list[tuple[CentroidSettings, tuple[int, ...], int]] = []


def centroid_fit(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    s: CentroidSettings,
    ks: tuple[int, ...],
    seed: int,
) -> dict[int, probes.Scored]:
    """Nearest class mean: class scores, and `margin`, the mean gap between the two nearest means."""
    CALLS.append((s, ks, seed))
    (xtr, ytr), (xte, yte) = train, test
    if s.normalise:
        xtr, xte = (torch.nn.functional.normalize(x.float(), dim=1) for x in (xtr, xte))
    classes = int(max(ytr.max(), yte.max())) + 1
    means = torch.stack([xtr[ytr == c].float().mean(0) for c in range(classes)])
    dist = torch.cdist(xte.float(), means)
    two = dist.topk(2, dim=1, largest=False).values
    # Scores, higher is better: top1 and the predictions are taken from them by the caller.
    return {0: probes.Scored(-dist, {"margin": (two[:, 1] - two[:, 0]).mean().item()})}


CENTROID = probes.ProbeKind(
    name="centroid",
    settings=CentroidSettings,
    uses_k=False,
    metrics=("top1", "margin"),
    fit=centroid_fit,
    help="nearest class mean",
    label="nearest-mean",
)

SWEEP = """\
study: {study}
axes:
  dataset: [digits]
  resolution: [8]
  block: [pixels]
  probe: [centroid, knn, linear]
  k: [3, 5]
probe:
  centroid: {{normalise: true}}
  linear: {{epochs: 2}}
"""


@pytest.fixture
def centroid() -> Iterator[probes.ProbeKind]:
    with probes.registered(CENTROID) as kind:
        yield kind
    assert "centroid" not in probes.names()


def doc(probe_section: dict[str, Any], probe_axis: list[str]) -> dict[str, Any]:
    axes = {"dataset": ["digits"], "block": ["pixels"], "probe": probe_axis}
    return {"study": "s", "axes": axes, "probe": probe_section}


def test_registry_order_and_unknown_names_list_the_registered_kinds(
    centroid: probes.ProbeKind,
) -> None:
    assert probes.names() == ("linear", "knn", "logreg", "centroid")
    assert probes.get("centroid") is centroid
    with pytest.raises(
        UserError, match=r"unknown probe 'svm'; allowed: linear, knn, logreg, centroid$"
    ):
        probes.get("svm")
    with pytest.raises(
        UserError, match=r"axes\.probe.*'svm'.*allowed: linear, knn, logreg, centroid"
    ):
        parse_study(doc({}, ["svm"]), "x.yaml")
    with pytest.raises(ValueError, match="already registered"):
        probes.register(centroid)


def test_unregistered_kinds_are_unknown_again() -> None:
    with probes.registered(CENTROID):
        parse_study(doc({}, ["centroid"]), "x.yaml")
    with pytest.raises(UserError, match=r"'centroid'.*allowed: linear, knn, logreg$"):
        parse_study(doc({}, ["centroid"]), "x.yaml")
    with pytest.raises(UserError, match=r"x\.yaml: probe: unknown key 'centroid'"):
        parse_study(doc({"centroid": {"normalise": True}}, ["linear"]), "x.yaml")


@pytest.mark.usefixtures("centroid")
def test_the_probe_section_of_a_new_kind_is_checked_against_its_settings() -> None:
    cfg = parse_study(doc({"centroid": {"normalise": True}}, ["centroid"]), "x.yaml")
    assert cfg.probe.settings_for("centroid") == CentroidSettings(normalise=True)
    assert cfg.probe.settings_for("linear") == probes.LinearSettings()  # defaults elsewhere
    assert cfg.probe.params()["centroid.normalise"] == "True"
    # Left out: the registry's default, and a config equal to one that never mentions it.
    assert parse_study(doc({}, ["centroid"]), "x.yaml").probe == ProbeConfig()
    bad_key = {"centroid": {"normalize": True}}
    with pytest.raises(UserError) as err:
        parse_study(doc(bad_key, ["centroid"]), "x.yaml")
    for word in ("x.yaml", "probe.centroid", "'normalize'", "allowed: normalise"):
        assert word in str(err.value)
    with pytest.raises(UserError, match=r"probe\.centroid\.normalise must be true or false"):
        parse_study(doc({"centroid": {"normalise": "yes please"}}, ["centroid"]), "x.yaml")
    # The settings of every kind, new ones included, are the allowed keys of `probe:`.
    with pytest.raises(UserError, match=r"allowed: linear, knn, logreg, centroid, pool"):
        parse_study(doc({"svm": {}}, ["centroid"]), "x.yaml")


@pytest.mark.usefixtures("centroid")
def test_k_multiplies_only_kinds_that_use_it() -> None:
    axes = Axes(dataset=("digits",), block=("pixels",), probe=probes.names(), k=(3, 5))
    points = expand(axes, lambda _: ())
    assert sorted((p.probe, p.k) for p in points) == [
        ("centroid", 0),
        ("knn", 3),
        ("knn", 5),
        ("linear", 0),
        ("logreg", 0),
    ]


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def test_a_kind_defined_in_a_test_runs_in_a_study_and_its_report(
    workdir: str, centroid: probes.ProbeKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DDSWEEP_HOME", "DDSWEEP_CACHE", "DDSWEEP_CHECKPOINTS"):
        monkeypatch.delenv(name, raising=False)
    Path("sweeps").mkdir()
    Path("sweeps/reg.yaml").write_text(SWEEP.format(study="reg"))
    CALLS.clear()
    runner = CliRunner()
    result = runner.invoke(app, ["study", "probe-grid", "--study", "reg", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "4/4 points complete" in result.stdout  # centroid 1, knn 2 (k=3, 5), linear 1
    # The kind got its settings from the sweep file, no k, and the study's seed: fitted twice
    # for its one point, on train (scored on test) and on train minus validation.
    assert [(CentroidSettings(normalise=True), (), 0)] * 2 == CALLS

    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        filter_string=f"tags.`{tracking.KIND_TAG}` = 'trial' and params.probe = 'centroid'",
    )
    (run,) = runs
    assert run.data.params["centroid.normalise"] == "True"
    assert run.data.params["linear.epochs"] == "2" and run.data.params["k"] == "0"
    assert 0.5 < run.data.metrics["top1"] <= 1  # digits pixels: far better than chance
    margin = run.data.metrics["margin"]
    assert margin > 0

    result = runner.invoke(app, ["report", "--study", "reg"])
    assert result.exit_code == 0, result.output
    assert "nearest-mean probe" in result.stdout and "margin %" in result.stdout
    out = Path("reports") / "reg"
    # Tables are named for the settings off their defaults; each metric of the kind is a row,
    # then the 95 % interval of top1.
    centroid_csv = read_csv(out / "digits-8px-centroid-t0-avg-ema-centroid.normalise=True.csv")
    assert centroid_csv[:3] == [
        ["metric", "block", "any"],
        ["top1 %", "pixels", report.pct(run.data.metrics["top1"])],
        ["margin %", "pixels", report.pct(margin)],
    ]
    assert [row[0] for row in centroid_csv[3:]] == ["top1 low %", "top1 high %"]
    # Facets in registry order: linear, knn (k=3, 5), then the new kind.
    md = (out / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## digits")]
    assert [h.split(": ", 1)[1].split(",")[0] for h in headings] == [
        "linear probe",
        "k-NN probe (k=3)",
        "k-NN probe (k=5)",
        "nearest-mean probe",
    ]
    # top3 is shown for every kind that reports it: the linear facet has it too.
    linear_csv = read_csv(out / "digits-8px-linear-t0-avg-ema-linear.epochs=2.csv")
    assert [row[0] for row in linear_csv[1:4]] == ["top1 %", "top3 %", "train_top1 %"]
