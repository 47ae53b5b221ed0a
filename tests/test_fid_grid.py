"""The generative side through the CLI: `sample`, `fid`, and `study fid-grid`, which reuses the
probe grid's exactly-once machinery and feeds the report's FID curve."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ddsweep.cli import app

pytestmark = pytest.mark.usefixtures("workdir", "one_torch_thread")

FAST = ["--feature", "randconv", "--samples", "16", "--sampler", "ddim", "--steps", "3"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def trained_run() -> str:
    invoke(
        "train", "digits", "--resolution", "8", "--channels", "32,32,32", "--epochs", "1",
        "--checkpoint-every", "1", "--sample-count", "0",
    )  # fmt: skip
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(exps, "tags.`ddsweep.kind` = 'train'")
    return str(run.info.run_id)


def fid_runs() -> list:  # type: ignore[type-arg]
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(exps, "tags.`ddsweep.kind` = 'fid'"))


def test_fid_grid_scores_every_checkpoint_once_and_resumes_like_the_probe_grid() -> None:
    from ddsweep import report

    train_run = trained_run()
    grid = ["study", "fid-grid", "--study", "gen", "--dataset", "digits", "--resolution", "8"]
    invoke(*grid, *FAST)
    runs = fid_runs()
    assert sorted(r.data.params["epoch"] for r in runs) == ["0", "1"]
    for r in runs:
        assert r.data.params["backbone_run"] == train_run
        assert r.data.params["feature"] == "randconv"
        assert r.data.metrics["fd_randconv"] > 0
        assert "fid" not in r.data.metrics  # a randconv distance is never called FID
        assert r.data.tags["mlflow.parentRunId"]

    again = invoke(*grid, *FAST)
    assert "already complete" in again
    assert len(fid_runs()) == 2  # nothing evaluated twice

    # A grown grid (a new checkpoint) would add only its own point; the report reads the curve.
    curves = report.gather_fid()
    curve = curves[("digits", 8, True)]
    assert curve.metric == "fd_randconv"
    assert sorted(curve.values) == [0, 1]


def test_fid_grid_without_inception_weights_offline_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    monkeypatch.delenv("DDSWEEP_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # ddsweep downloads it
    trained_run()
    result = CliRunner().invoke(app, ["study", "fid-grid", "--study", "g2", "--dataset", "digits"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--inception-weights" in lines[0]
    assert fid_runs() == []


def test_fid_and_sample_commands_log_to_the_training_run(tmp_path: Path) -> None:
    run = trained_run()
    out = invoke("fid", "--run", run, "--epoch", "1", *FAST)
    assert "fd_randconv" in out
    history = MlflowClient().get_metric_history(run, "fd_randconv")
    assert [m.step for m in history] == [1]
    assert len(fid_runs()) == 1

    png = tmp_path / "grid.png"
    invoke("sample", "--run", run, "--n", "4", "--steps", "2", "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.path for a in MlflowClient().list_artifacts(run, "samples")] == ["samples/grid.png"]
    again = CliRunner().invoke(app, ["sample", "--run", run, "--n", "4", "--out", str(png)])
    assert again.exit_code == 2 and "exists" in again.stderr  # nothing is overwritten
