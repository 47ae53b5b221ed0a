"""Probing while training (`ddsweep train --probe-every`) and the plateau stop: a tiny digits
U-Net on the real MLflow store, the values compared with `ddsweep probe` of the checkpoint."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddsweep import checkpoints, tracking, trainprobe
from ddsweep.cli import app
from ddsweep.config.model import ModelConfig
from ddsweep.config.train import TrainConfig
from ddsweep.errors import UserError
from ddsweep.tracking import runs
from ddsweep.tracking.schema import STOP_TAG
from ddsweep.train import train
from ddsweep.trainrun import config_from_params, validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCKS = ("mid", "up3")
PROBES = ("knn10", "linear")


def tiny(**change: object) -> TrainConfig:
    """Digits at 8 px, a 4-level U-Net (so the study's block names exist), 2 epochs."""
    base = TrainConfig(
        dataset="digits",
        model=ModelConfig(resolution=8, channels=(32, 32, 64, 64)),
        epochs=2,
        batch_size=256,
        lr=1e-3,
        checkpoint_every=2,
        sample_every=0,
        sample_count=0,
        device="cpu",
        probe_every=1,
        probe_block=BLOCKS,
        probe=PROBES,
    )
    return replace(base, **change)  # type: ignore[arg-type]


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


# --- the plateau rule: pure ---------------------------------------------------------------------


def test_plateau_fires_after_patience_evaluations_without_a_gain_beyond_the_interval() -> None:
    # (value, upper end of its interval): 0.80 is the reference (upper 0.85); 0.84 is inside
    # its interval (no gain), 0.90 beats it (new reference, upper 0.93), then three within.
    seq = [(0.80, 0.85), (0.84, 0.88), (0.90, 0.93), (0.92, 0.95), (0.93, 0.96), (0.91, 0.94)]
    waits = [trainprobe.since_improvement(seq[: i + 1]) for i in range(len(seq))]
    assert waits == [0, 1, 0, 1, 2, 3]
    fired = [trainprobe.plateaued(seq[: i + 1], patience=3) for i in range(len(seq))]
    assert fired == [False] * 5 + [True]


@pytest.mark.parametrize("patience", [1, 2, 5])
def test_plateau_never_fires_before_patience_plus_one_evaluations(patience: int) -> None:
    flat = [(0.5, 0.6)] * 10  # never improves
    first = next(i for i in range(1, 11) if trainprobe.plateaued(flat[:i], patience))
    assert first == patience + 1  # the first evaluation is only the reference
    rising = [(0.1 * i, 0.1 * i + 0.05) for i in range(10)]  # every step beats the last bound
    assert not any(trainprobe.plateaued(rising[:i], patience) for i in range(1, 11))


def test_probe_labels_and_bad_options() -> None:
    assert trainprobe.parse_probe("knn") == ("knn", trainprobe.DEFAULT_K)
    assert trainprobe.parse_probe("knn20") == ("knn", 20)
    assert trainprobe.parse_probe("linear") == ("linear", 0)
    # `mlflow ui` makes a section of what precedes a metric's last `/`: one per probe, the
    # blocks' charts in it (as a browser showed: probe/up3/knn50/top1 made one per block).
    assert trainprobe.metric_name("up3", "knn", 50) == "probe/knn50/top1/up3"
    assert trainprobe.metric_name("down_blocks.1", "linear", 0) == "probe/linear/top1/down_blocks.1"
    for old in ("probe.up3.knn50.top1", "probe/up3/knn50/top1", "probe/knn50/top1/up3"):
        assert trainprobe.canonical_metric(old) == "probe/knn50/top1/up3"
    for bad in ("svm", "linear3", "knn0", "Knn"):
        with pytest.raises(UserError, match="--probe"):
            trainprobe.parse_probe(bad)
    with pytest.raises(UserError, match="not logged by this training"):
        validate(tiny(stop_when_probe_plateaus="probe.up2.knn10.top1"))
    with pytest.raises(UserError, match="needs --probe-every"):
        validate(tiny(probe_every=0, stop_when_probe_plateaus="probe.up3.knn10.top1"))
    with pytest.raises(UserError, match="--patience"):
        validate(tiny(patience=0))
    with pytest.raises(UserError, match="--probe-every"):
        validate(tiny(probe_every=-1))


def test_the_probe_options_read_back_from_the_run_params() -> None:
    cfg = tiny(probe_block=("mid", "pixels"), stop_when_probe_plateaus="probe.mid.knn10.top1")
    assert config_from_params(tracking.flat_params(cfg)) == cfg


# --- in a training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probed(
    tmp_path_factory: pytest.TempPathFactory, isolated_store: object
) -> Iterator[tuple[Path, str]]:
    """A 2-epoch digits training with --probe-every 1 (mid and up3, knn10 and linear); the
    module's tests run in its folder, with its store."""
    folder = tmp_path_factory.mktemp("probed")
    with isolated_store(folder):  # type: ignore[operator]
        tracking.setup()
        yield folder, train(tiny(), data_dir=folder / "data")


def test_every_epoch_logs_one_value_per_block_and_probe(probed: tuple[Path, str]) -> None:
    _, run_id = probed
    for name in trainprobe.metric_names(BLOCKS, PROBES):
        steps = history(run_id, name)
        assert [s for s, _ in steps] == [1, 2], name
        assert all(0.0 <= v <= 1.0 for _, v in steps)
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert 0 < metrics["probe_overhead"] < 1
    assert STOP_TAG not in MlflowClient().get_run(run_id).data.tags  # no stop asked for


@pytest.mark.parametrize(("block", "probe", "k"), [("up3", "knn", 10), ("mid", "linear", 0)])
def test_the_logged_value_is_what_ddsweep_probe_gives_for_that_checkpoint(
    probed: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    block: str,
    probe: str,
    k: int,
) -> None:
    _, run_id = probed
    # A fresh feature cache: the command extracts the features itself.
    monkeypatch.setenv("DDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DDSWEEP_CHECKPOINTS", str(tmp_path / "ckpts"))
    args = ["probe", "--run", run_id, "--epoch", "2", "--block", block, "--probe", probe]
    result = CliRunner().invoke(app, [*args, "--k", str(k)] if k else args)
    assert result.exit_code == 0, result.output
    found = re.search(r"logged as MLflow run (\w+)", result.output)
    assert found is not None, result.output
    given = MlflowClient().get_run(found.group(1)).data.metrics["top1"]
    assert list(Path(tmp_path / "cache").glob("*.safetensors"))  # it did extract
    logged = dict(history(run_id, trainprobe.metric_name(block, probe, k)))[2]
    assert logged == pytest.approx(given, abs=1e-12)


def test_the_report_reads_the_curves_of_the_training_run(probed: tuple[Path, str]) -> None:
    from ddsweep.report import loader, traincurves

    _, run_id = probed
    found = traincurves.curves(loader.load_training_probes([run_id]))
    assert sorted((c.block, c.probe) for c in found) == sorted(
        (b, p) for b in BLOCKS for p in ("knn10", "linear")
    )
    for c in found:
        assert list(c.values) == [1, 2]
        assert c.values == dict(history(run_id, c.metric))


def test_a_backbone_s_identity_leaves_out_what_only_watches_training(
    probed: tuple[Path, str],
) -> None:
    """A study (or the quickstart) that asks for a backbone with or without --probe-every finds
    the same run; one that differs in what training does (lr) does not."""
    from ddsweep import backbones
    from ddsweep.config.train import WATCH_FIELDS
    from ddsweep.trainrun import identity_params

    _, run_id = probed
    assert backbones.matching_run(tiny(probe_every=0)) == (run_id, "FINISHED")
    assert backbones.matching_run(tiny(probe_every=2, probe_block=("mid",))) == (run_id, "FINISHED")
    assert backbones.matching_run(tiny(lr=2e-3)) is None
    params, optional = identity_params(tiny())
    assert not set(WATCH_FIELDS) & set(params)
    # A run recorded before the plateau stop existed lacks its params: it trained as the
    # defaults do, so it matches them, and only them.
    assert {"stop_when_probe_plateaus", "patience"} <= set(optional)
    assert "lr" not in optional  # off its default here: a run must say it
    _, changed = identity_params(tiny(patience=2))
    assert "patience" not in changed


def test_probing_does_not_change_what_is_trained(
    probed: tuple[Path, str], tmp_path: Path, isolated_store: object
) -> None:
    folder, probed_run = probed

    def weights(run: str) -> dict[str, torch.Tensor]:
        ckpt = runs.download_checkpoint(run, 2, tmp_path / run)
        return load_file(Path(ckpt / checkpoints.RAW / checkpoints.WEIGHTS_FILE))

    probed_loss, probed_weights = history(probed_run, "loss"), weights(probed_run)
    # The same backbone without probes, in a store of its own: in the module's store it would
    # be a second run of the module's identity, and `matching_run` of other tests would depend
    # on the order the tests ran in.
    (tmp_path / "plain").mkdir()
    with isolated_store(tmp_path / "plain"):  # type: ignore[operator]
        tracking.setup()
        plain = train(tiny(probe_every=0), data_dir=folder / "data")
        assert history(plain, "loss") == probed_loss
        plain_weights = weights(plain)
    assert all((plain_weights[k] == probed_weights[k]).all() for k in plain_weights)


def image_folder(root: Path) -> str:
    """folder:ROOT with train and test splits of two classes of random 8x8 images."""
    from torchvision.utils import save_image

    gen = torch.Generator().manual_seed(1)
    for split, count in (("train", 16), ("test", 4)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i, img in enumerate(torch.rand(count, 3, 8, 8, generator=gen)):
                save_image(img, root / split / label / f"{i}.png")
    return f"folder:{root}"


def test_a_plateau_stops_training_keeps_its_checkpoint_and_resume_goes_on(
    tmp_path: Path, isolated_store: object
) -> None:
    # The raw pixels' accuracy never changes, so with patience 1 the rule must fire at the
    # second evaluation: epoch 2, with checkpoints every 3 epochs (epoch 2's is the stop's own).
    metric = "probe/knn10/top1/pixels"
    cfg = tiny(
        dataset=image_folder(tmp_path / "images"), batch_size=16, epochs=4, checkpoint_every=3, probe_block=("pixels",), probe=("knn10",),
        stop_when_probe_plateaus=metric, patience=1,
    )  # fmt: skip
    with isolated_store(tmp_path):  # type: ignore[operator]
        tracking.setup()
        run_id = train(cfg, data_dir=tmp_path / "data")
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["last_epoch"] == "2"
        assert run.data.tags[STOP_TAG].startswith(f"{metric} plateaued")
        assert [s for s, _ in history(run_id, metric)] == [1, 2]
        assert runs.saved_epochs(run_id) == [0, 2]
        # Resume counts its patience afresh: probes at 3 and 4, and the rule fires at 4 (the end).
        train(config_from_params(run.data.params), data_dir=tmp_path / "data", resume_run_id=run_id)
        run = MlflowClient().get_run(run_id)
        assert run.data.tags["last_epoch"] == "4"
        assert [s for s, _ in history(run_id, metric)] == [1, 2, 3, 4]
        assert runs.saved_epochs(run_id) == [0, 2, 3, 4]
        assert run.data.tags[STOP_TAG].startswith(f"{metric} plateaued")


def test_a_saved_checkpoint_s_features_wait_in_the_cache_for_the_study(
    probed: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, run_id = probed
    # Epoch 2 is saved (checkpoint_every=2), epoch 1 is not: only epoch 2's features are kept,
    # two blocks of two splits.
    assert len(list((folder / ".ddsweep" / "cache").glob("*.safetensors"))) == 2 * 2
    monkeypatch.setenv("DDSWEEP_CHECKPOINTS", str(tmp_path / "ckpts"))
    args = ["probe", "--run", run_id, "--epoch", "2", "--block", "mid", "--probe", "knn"]
    result = CliRunner().invoke(app, [*args, "--k", "10"])
    assert result.exit_code == 0, result.output
    found = re.search(r"logged as MLflow run (\w+)", result.output)
    assert found is not None, result.output
    # The checkpoint's weights file hashes as the probed weights did: no pass of the network.
    assert MlflowClient().get_run(found.group(1)).data.metrics["backbone_passes"] == 0
