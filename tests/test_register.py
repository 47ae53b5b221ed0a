"""`ddsweep train --system-metrics --register NAME` on a tiny digits U-Net, read back through
MLflow: system metrics, the dataset input and context tags on the run, and a registered model
version whose files load with `UNet2DModel.from_pretrained` (no pickle)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ddsweep import checkpoints
from ddsweep.cli import app
from ddsweep.tracking import runs, training

pytestmark = pytest.mark.usefixtures("one_torch_thread", "workdir")

REPO = Path(__file__).resolve().parent.parent
TINY = ["digits", "--resolution", "8", "--channels", "32,32,64,64", "--epochs", "1"]
TINY += ["--max-steps", "3", "--sample-count", "0", "--batch-size", "32"]
HAS_PSUTIL = importlib.util.find_spec("psutil") is not None


def train(*extra: str) -> tuple[Any, str]:
    result = CliRunner().invoke(app, ["train", *TINY, *extra])
    assert result.exit_code == 0, result.output
    found = re.search(r"training run (\w+) finished", result.output)
    assert found, result.output
    return result, found.group(1)


def test_a_registered_backbone_loads_with_from_pretrained(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    result, run_id = train("--register", "tiny-digits")
    assert "registered epoch 1 as models:/tiny-digits/1" in result.output
    version = MlflowClient().get_model_version("tiny-digits", "1")
    assert version.run_id == run_id
    assert "from_pretrained" in version.description  # the loader, where the registry shows it
    files = Path(
        mlflow.artifacts.download_artifacts("models:/tiny-digits/1", dst_path=str(tmp_path / "m"))
    )
    assert not list(files.rglob("*.bin")) and not list(files.rglob("*.pt"))  # nothing pickled
    unet = UNet2DModel.from_pretrained(files)
    # the EMA weights of the run's last checkpoint, exactly
    ckpt = runs.download_checkpoint(run_id, 1, tmp_path / "run")
    expected = checkpoints.load_unet(ckpt, "ema").state_dict()
    got = unet.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    # registering again adds a version of the same model
    assert training.register_backbone(run_id, "tiny-digits") == ("models:/tiny-digits/2", 1)


def test_a_training_run_records_its_dataset_and_context() -> None:
    _, run_id = train()
    run = MlflowClient().get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "digits:train"
    assert json.loads(inp.dataset.profile) == {"num_rows": int(run.data.tags["train_images"])}
    source = json.loads(inp.dataset.source)["tags"]
    assert source["fingerprint"] == "digits:train:8:seed0:80-20"
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "train"}
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.user"]
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if head:
        assert run.data.tags["mlflow.source.git.commit"] == head
    # off by default
    assert not [k for k in run.data.metrics if k.startswith("system/")]


@pytest.mark.skipif(not HAS_PSUTIL, reason="psutil (the `system` extra) is not installed")
def test_system_metrics_with_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    # restored after the test: the flag switches MLflow's process-wide setting on
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    # The run ends only once the monitor has published a sample: however slow the machine, the
    # short run cannot end before the monitor's first one (a hook, not a race against 20 steps).
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import fluent

    published = threading.Event()
    real_publish, real_end_run = SystemMetricsMonitor.publish_metrics, fluent.end_run

    def publish(self: Any, metrics: Any) -> None:
        real_publish(self, metrics)
        published.set()

    def end_run(*args: Any, **kwargs: Any) -> None:
        assert published.wait(timeout=120), "no system metrics sample within 120 s"
        real_end_run(*args, **kwargs)

    monkeypatch.setattr(SystemMetricsMonitor, "publish_metrics", publish)
    monkeypatch.setattr(fluent, "end_run", end_run)
    monkeypatch.setattr(mlflow, "end_run", end_run)
    _, run_id = train("--system-metrics", "--max-steps", "3")
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_system_metrics_without_psutil_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psutil" else real(name, *a)
    )
    result = CliRunner().invoke(app, ["train", *TINY, "--system-metrics"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "psutil" in lines[0] and "ddsweep[system]" in lines[0]
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.parametrize("name", ["", "a/b", "a:b"])
def test_a_name_the_registry_refuses_is_one_line_before_any_training(name: str) -> None:
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from ddsweep.cli import app

    result = CliRunner().invoke(app, ["train", "digits", "--register", name])
    assert result.exit_code == 2
    assert "--register" in result.output and "Traceback" not in result.output
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(exps)  # refused before any run was made
