"""benchmarks/gpu_check.py --smoke: the GPU check's code paths, run on the CPU at tiny sizes.

The whole smoke run goes through a subprocess, as on the device (`python benchmarks/gpu_check.py`),
with one torch thread (about 40 s: marked slow); a single section runs in this process through
the script's `main`. Both read back the JSON file the script writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = (
    "training", "data", "extraction", "placement", "probes", "sampling", "sanity", "compile"
)  # fmt: skip


def run_check(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, results | {"_stderr": proc.stderr, "_stdout": proc.stdout}


def load_script(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The script as a module (it imports its neighbours bench_probes and bench_sampling)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def numbers(node: Any) -> list[float]:
    """Every int or float in a JSON tree (bools excluded)."""
    if isinstance(node, dict):
        return [x for v in node.values() for x in numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in numbers(v)]
    return [float(node)] if isinstance(node, int | float) and not isinstance(node, bool) else []


def goal(results: dict[str, Any], prefix: str) -> dict[str, Any]:
    (row,) = [g for g in results["goals"] if g["goal"].startswith(prefix)]
    return row


@pytest.mark.slow
def test_smoke_runs_every_section_and_the_bf16_checks_pass(tmp_path: Path) -> None:
    rc, results = run_check(tmp_path)
    assert rc == 0, results["_stderr"][-3000:]
    for section in SECTIONS:
        assert section in results, section
        assert "error" not in results[section], results[section]
        for row in results[section].get("variants", {}).values():
            assert "error" not in row, (section, row)
        values = numbers(results[section])
        assert values and all(math.isfinite(v) for v in values), section

    training = results["training"]["variants"]
    assert {"fp32", "bf16", "default", "all_four"} <= set(training)
    assert all(r["images_per_s"] > 0 and r["projected_h"] > 0 for r in training.values())
    loaders = results["data"]["train_loader"]
    assert set(loaders) == {"0", "2"} and all(r["images"] == 5 * 200 for r in loaders.values())
    assert results["data"]["probe_split_loader"]["images"] == 5 * 200
    # The decoded candidate reads the same images as the per-image PIL path, up to rounding.
    decoded = results["data"]["decoded"]
    assert decoded["max_abs_diff_vs_pil"] <= 1e-6 and decoded["probe_images_per_s"] > 0
    assert decoded["decode_s"] > 0 and decoded["train_images_per_s"] > 0
    # Placement: one worker, then two spawned on the same device, each timed.
    place = results["placement"]
    assert place["one_worker"]["images_per_s"] > 0
    assert [w["device"] for w in place["two_on_one_device"]["workers"]] == ["cpu", "cpu"]
    assert results["extraction"]["variants"]["on_device"]["images_per_s"] > 0
    assert set(results["extraction"]["blocks"]) == {
        "down1", "down2", "down3", "down4", "mid", "up4", "up3", "up2", "up1"
    }  # fmt: skip
    assert results["compile"]["status"] == "ok"  # the eager backend traces the U-Net in seconds
    assert results["sampling"]["variants"]["ddpm_bf16"]["steps"] == 1000

    # The bf16 sanity checks are real in smoke mode too: autocast runs on the CPU.
    loss = results["sanity"]["loss"]
    assert loss["steps"] == 200 and loss["finite"]
    assert loss["last20_mean"]["bf16"] <= 0.8 * loss["first20_mean"]["bf16"]
    feats = results["sanity"]["features"]
    assert len(feats["error_vs_spread"]) == 9
    # bf16 changes the features (autocast did run) but stays within the stated tolerance.
    assert 0 < max(feats["error_vs_spread"].values()) <= feats["tolerance"]
    for prefix in ("bf16: the training loss", "bf16: the loss tracks", "bf16: features"):
        assert goal(results, prefix)["status"] == "PASS", goal(results, prefix)
    assert goal(results, "k-NN on the device agrees")["status"] == "PASS"
    # Speed goals mean nothing at smoke sizes.
    assert goal(results, "training:")["status"] == "SKIP"
    assert goal(results, "extraction:")["status"] == "SKIP"


def test_one_section_in_process_and_the_goals_of_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "gpu_check.json"
    rc = load_script(monkeypatch).main(["--smoke", "--sections", "probes", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert "probes" in results and "training" not in results
    knn = results["probes"]["knn_probe"]
    assert knn["ks"] == [5, 10, 20, 50, 100, 200] and knn["seconds"] > 0
    assert set(knn["top1"]) == {"5", "10", "20", "50", "100", "200"}
    assert 0 < knn["top1"]["50"] <= 1
    linear = results["probes"]["kinds"]["linear"]
    assert linear["seconds"] > 0 and 0 < linear["top1"] <= 1
    # A kind that is not registered is named and skipped, not an error.
    logreg = results["probes"]["kinds"]["logreg"]
    assert "skipped" in logreg or logreg["seconds"] > 0
    # Goals of sections that did not run say so.
    row = goal(results, "training:")
    assert row["status"] == "SKIP" and "not measured" in row["note"]
    assert goal(results, "k-NN on the device agrees")["status"] == "PASS"
    assert any(f["measured_by"] == "training.pinned" for f in results["candidate_fixes"])


def test_an_unknown_section_is_one_line_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = load_script(monkeypatch).main(["--smoke", "--sections", "probes,bogus"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "unknown section(s) bogus: use training, data, extraction, placement, probes, sampling, sanity, compile"
    ]
