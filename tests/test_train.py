"""Training as a library: config checks, the MLflow record of a run, exact resume, and the
self-describing checkpoints it writes (load_unet refuses anything it would have to unpickle)."""

from __future__ import annotations

import io
import json
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from ddsweep import checkpoints, tracking
from ddsweep.config.model import SEED_CHANNELS, ModelConfig
from ddsweep.config.train import TrainConfig
from ddsweep.errors import UserError
from ddsweep.model import build_unet
from ddsweep.tracking.training import NullTracker
from ddsweep.train import train
from ddsweep.trainrun import (
    config_from_params,
    resolve_device,
    study_batch_size,
    validate,
    with_dataset_defaults,
)

pytestmark = pytest.mark.usefixtures("workdir", "one_torch_thread")

TINY_MODEL = ModelConfig(resolution=8, channels=(32, 32, 32))
IMAGES_PER_CLASS = 24
BATCH = 16
STEPS_PER_EPOCH = 2 * IMAGES_PER_CLASS // BATCH  # 3


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"epochs": -1}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"checkpoint_every": 0}, "--checkpoint-every"),
        ({"sample_steps": 0}, "--sample-steps"),
        ({"sample_steps": 1001}, "--sample-steps"),
        ({"log_every": 0}, "--log-every"),
        ({"sample_every": -1}, "--sample-every"),
        ({"sample_count": -1}, "--sample-count"),
        ({"max_steps": -1}, "--max-steps"),
        ({"num_workers": -2}, "--num-workers"),
        ({"grad_clip": -0.5}, "--grad-clip"),
        ({"weight_decay": -1e-3}, "--weight-decay"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"ema_decay": 1.0}, "--ema-decay"),
        ({"ema_decay": -0.1}, "--ema-decay"),
    ],
)
def test_options_no_training_can_use_are_user_errors(change: dict[str, float], flag: str) -> None:
    with pytest.raises(UserError, match=flag):
        validate(TrainConfig(**change))  # type: ignore[arg-type]


def test_the_study_defaults_are_valid() -> None:
    validate(TrainConfig())
    cfg = TrainConfig()
    assert (cfg.lr, cfg.epochs, cfg.checkpoint_every) == (1e-4, 2000, 50)
    assert cfg.model == ModelConfig()


def test_dataset_defaults_fill_only_what_was_not_given() -> None:
    digits = with_dataset_defaults(TrainConfig(dataset="digits"))
    assert (digits.model.resolution, digits.model.channels, digits.batch_size) == (
        16,
        (32, 64, 64, 64),
        128,
    )
    cifar = with_dataset_defaults(TrainConfig(dataset="cifar10"))
    assert (cifar.model.resolution, cifar.model.channels, cifar.batch_size) == (
        32,
        SEED_CHANNELS,
        320,
    )
    noattn = TrainConfig(dataset="cifar10", model=ModelConfig(attention=False))
    assert with_dataset_defaults(noattn).batch_size == 1024
    given = with_dataset_defaults(
        TrainConfig(dataset="digits"), resolution=8, channels=(32, 32, 32), batch_size=7
    )
    assert (given.model.resolution, given.model.channels, given.batch_size) == (
        8,
        TINY_MODEL.channels,
        7,
    )


@pytest.mark.parametrize("name", ["batch_size", "resolution"])
def test_an_explicit_zero_is_kept_for_validation_to_refuse(name: str) -> None:
    # Regression: `given or default` turned --batch-size 0 into 128 and trained on.
    cfg = with_dataset_defaults(TrainConfig(dataset="digits"), **{name: 0})
    value = cfg.batch_size if name == "batch_size" else cfg.model.resolution
    assert value == 0


def test_study_batch_sizes() -> None:
    assert study_batch_size(32, True) == 320
    assert study_batch_size(32, False) == 1024
    assert study_batch_size(64, True) == 20
    assert study_batch_size(64, False) == 320


def test_params_read_back_into_the_same_config() -> None:
    cfg = TrainConfig(
        dataset="folder:/some/where",
        model=ModelConfig(resolution=64, channels=(64, 128), attention=False, layers_per_block=1),
        epochs=7,
        batch_size=3,
        lr=3e-4,
        weight_decay=0.01,
        ema_decay=0.99,
        grad_clip=0.0,
        checkpoint_every=2,
        sample_every=0,
        sample_count=5,
        sample_steps=9,
        max_steps=11,
        seed=42,
        device="cpu",
        num_workers=2,
        log_every=4,
    )
    params = tracking.flat_params(cfg)
    assert params["channels"] == "64,128"
    assert params["attention"] == "False"
    assert config_from_params(params) == cfg


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown --device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda:0")


# --- training runs on a tiny image folder ---------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path: Path) -> str:
    """folder:PATH with two classes of 24 random 8x8 images: epochs of 3 steps at batch 16."""
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", IMAGES_PER_CLASS), ("test", 1)):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return f"folder:{tmp_path / 'images'}"


def tiny_config(dataset: str, **change: int) -> TrainConfig:
    base = TrainConfig(
        dataset=dataset,
        model=TINY_MODEL,
        epochs=4,
        batch_size=BATCH,
        lr=1e-3,
        checkpoint_every=2,
        sample_every=0,
        sample_count=0,  # grids go through MLflow's async queue: ~1 s more per run (CLI tests)
        device="cpu",
        log_every=2,
    )
    return TrainConfig(**{**base.__dict__, **change})


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def artifact_dirs(run_id: str, path: str) -> list[str]:
    return sorted(a.path for a in MlflowClient().list_artifacts(run_id, path))


def raw_weights(run_id: str, epoch: int, dst: Path) -> dict[str, torch.Tensor]:
    folder = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=checkpoints.epoch_dir(epoch), dst_path=str(dst)
    )
    return load_file(Path(folder) / checkpoints.RAW / checkpoints.WEIGHTS_FILE)


def test_resume_after_max_steps_continues_the_same_run_exactly(
    tiny_folder: str, tmp_path: Path
) -> None:
    tracking.setup()
    data_dir = tmp_path / "data"
    full = train(tiny_config(tiny_folder), data_dir=data_dir)

    cut_cfg = tiny_config(tiny_folder, max_steps=2 * STEPS_PER_EPOCH)
    cut = train(cut_cfg, data_dir=data_dir)
    run = MlflowClient().get_run(cut)
    assert run.info.status == "FINISHED"
    assert run.data.tags["last_epoch"] == "2"
    assert [s for s, _ in history(cut, "loss")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert artifact_dirs(cut, checkpoints.CHECKPOINTS) == [
        checkpoints.epoch_dir(0),
        checkpoints.epoch_dir(2),
    ]

    # What `ddsweep train --resume` does: the config recorded in the run, max_steps included.
    resumed = train(config_from_params(run.data.params), data_dir=data_dir, resume_run_id=cut)
    assert resumed == cut
    run = MlflowClient().get_run(cut)
    assert run.info.status == "FINISHED"
    assert run.data.tags["last_epoch"] == "4"
    assert artifact_dirs(cut, checkpoints.CHECKPOINTS) == [
        checkpoints.epoch_dir(e) for e in (0, 2, 4)
    ]
    # Same steps, same losses, same weights as the run that was never interrupted: the model,
    # EMA, optimizer, RNG and step counter all came back.
    losses = history(cut, "loss")
    assert [s for s, _ in losses] == list(range(1, 4 * STEPS_PER_EPOCH + 1))
    assert losses == history(full, "loss")
    assert history(cut, "epoch_loss") == history(full, "epoch_loss")
    cut_weights = raw_weights(cut, 4, tmp_path / "cut")
    full_weights = raw_weights(full, 4, tmp_path / "full")
    assert cut_weights.keys() == full_weights.keys()
    assert all(torch.equal(cut_weights[k], full_weights[k]) for k in cut_weights)

    # Resuming a finished run trains nothing and changes nothing.
    train(config_from_params(run.data.params), data_dir=data_dir, resume_run_id=cut)
    assert history(cut, "loss") == losses
    assert MlflowClient().get_run(cut).info.status == "FINISHED"


def test_a_run_without_resume_state_cannot_be_resumed(tiny_folder: str, tmp_path: Path) -> None:
    exp = tracking.setup()
    other = MlflowClient().create_run(exp).info.run_id
    with pytest.raises(UserError, match="no resume state"):
        train(tiny_config(tiny_folder), data_dir=tmp_path, resume_run_id=other)
    assert MlflowClient().get_metric_history(other, "loss") == []


def test_a_damaged_resume_state_is_a_user_error(tiny_folder: str, tmp_path: Path) -> None:
    tracking.setup()
    cfg = tiny_config(tiny_folder, epochs=1)
    run_id = train(cfg, data_dir=tmp_path)
    root = Path(urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path)
    for slot in (root / checkpoints.RESUME).glob("optimizer*.pt"):  # whichever slot is named
        slot.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read the resume state"):
        train(cfg, data_dir=tmp_path, resume_run_id=run_id)


def test_a_disk_full_inside_the_resume_state_resumes_the_last_whole_one_bit_for_bit(
    tiny_folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC after epoch 4's optimizer file reached the store but before its RNG file and
    state: the run ends FAILED, and --resume continues from epoch 2's whole state (not epoch
    2's weights with epoch 4's optimizer), reaching the uninterrupted run's weights exactly."""
    import errno

    tracking.setup()
    data_dir = tmp_path / "data"
    cfg = tiny_config(tiny_folder, epochs=6)
    full = train(cfg, data_dir=data_dir)

    real_log = mlflow.log_artifact
    sent: list[str] = []

    def disk_full(local_path: str, artifact_path: str | None = None, **kw: object) -> None:
        name = Path(local_path).name
        if name.startswith("rng"):
            sent.append(name)
            if len(sent) == 3:  # epochs 0, 2, then 4: its optimizer file is already sent
                raise OSError(errno.ENOSPC, "No space left on device", local_path)
        real_log(local_path, artifact_path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mlflow, "log_artifact", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, data_dir=data_dir)
    monkeypatch.setattr(mlflow, "log_artifact", real_log)
    cut = next(r for r in all_runs() if r != full)
    run = MlflowClient().get_run(cut)
    assert run.info.status == "FAILED"
    state = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=cut,
                artifact_path=f"{checkpoints.RESUME}/{checkpoints.STATE}",
                dst_path=str(tmp_path / "state"),
            )
        ).read_text()
    )
    assert state["epoch"] == 2

    resumed = train(config_from_params(run.data.params), data_dir=data_dir, resume_run_id=cut)
    assert resumed == cut and MlflowClient().get_run(cut).info.status == "FINISHED"
    cut_weights = raw_weights(cut, 6, tmp_path / "cut")
    full_weights = raw_weights(full, 6, tmp_path / "full")
    assert all(torch.equal(cut_weights[k], full_weights[k]) for k in full_weights)


# --- checkpoints ----------------------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (io.open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ddsweep checkpoint whose EMA and raw weights differ."""
    torch.manual_seed(0)
    raw = build_unet(TINY_MODEL)
    ema = build_unet(TINY_MODEL)
    folder = tmp_path_factory.mktemp("ckpt") / "epoch_0003"
    checkpoints.save(folder, ema, raw, {"epoch": 3, "step": 9})
    return folder


def copy_of(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_checkpoints_round_trip_ema_and_raw(saved: Path) -> None:
    ema = checkpoints.load_unet(saved)
    raw = checkpoints.load_unet(saved, "raw")
    assert not ema.training and not raw.training
    meta = checkpoints.read_meta(saved)
    hashes = meta.pop(checkpoints.HASHES)  # what its weights files hold, checked on every use
    assert meta == {"epoch": 3, "step": 9}
    assert hashes == {w: checkpoints.content_hash(saved, w) for w in checkpoints.WEIGHTS}
    assert not torch.equal(ema.conv_in.weight, raw.conv_in.weight)
    assert checkpoints.content_hash(saved) != checkpoints.content_hash(saved, "raw")
    # Plain diffusers reads them too: the EMA weights from the folder, the raw ones from raw/
    # (not with subfolder="raw": for a local folder diffusers 0.42 takes the top-level
    # weights file first, so that gives the EMA weights under the raw config).
    plain_ema = UNet2DModel.from_pretrained(saved)
    plain_raw = UNet2DModel.from_pretrained(saved / checkpoints.RAW)
    assert torch.equal(plain_ema.conv_in.weight, ema.conv_in.weight)
    assert torch.equal(plain_raw.conv_in.weight, raw.conv_in.weight)


def test_a_foreign_diffusers_folder_loads_for_either_weights(saved: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    checkpoints.load_unet(saved).save_pretrained(foreign)  # no raw/, no ddsweep.json
    assert checkpoints.read_meta(foreign) == {}
    a, b = checkpoints.load_unet(foreign), checkpoints.load_unet(foreign, "raw")
    assert torch.equal(a.conv_in.weight, b.conv_in.weight)


def test_our_checkpoint_without_raw_weights_is_a_user_error(saved: Path, tmp_path: Path) -> None:
    folder = copy_of(saved, tmp_path)
    shutil.rmtree(folder / checkpoints.RAW)
    with pytest.raises(UserError, match="no raw/ weights"):
        checkpoints.load_unet(folder, "raw")


def test_unknown_weights_is_a_user_error(saved: Path) -> None:
    with pytest.raises(UserError, match="ema, raw"):
        checkpoints.load_unet(saved, "best")  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, b"\x08" + b"\x00" * 7 + b"{}"])
def test_corrupt_safetensors_is_a_user_error(saved: Path, tmp_path: Path, content: bytes) -> None:
    folder = copy_of(saved, tmp_path)
    (folder / checkpoints.WEIGHTS_FILE).write_bytes(content)
    with pytest.raises(UserError, match="cannot load the U-Net"):
        checkpoints.load_unet(folder)


def test_truncated_safetensors_is_a_user_error(saved: Path, tmp_path: Path) -> None:
    folder = copy_of(saved, tmp_path)
    weights = folder / checkpoints.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot load the U-Net"):
        checkpoints.load_unet(folder)


def test_missing_config_is_a_user_error(saved: Path, tmp_path: Path) -> None:
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"no config\.json"):
        checkpoints.load_unet(folder)
    with pytest.raises(UserError, match=r"no config\.json"):
        checkpoints.load_unet(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ("{not json", "not readable JSON"),
        ('"google/ddpm-cifar10-32"', "not a diffusers config"),
        ("[]", "not a diffusers config"),
        ('{"_class_name": "UNet2DConditionModel"}', "not a UNet2DModel"),
        ('{"block_out_channels": [64, 64, 64]}', "cannot load the U-Net"),
        ('{"layers_per_block": "two"}', "cannot load the U-Net"),
    ],
)
def test_bad_config_is_a_user_error_and_never_goes_online(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, words: str
) -> None:
    # Regression: a config that is a bare string made diffusers look it up on the Hub.
    lookups: list[object] = []

    def offline(*args: object, **kwargs: object) -> None:
        lookups.append(args)
        raise socket.gaierror("offline test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").write_text(config)
    with pytest.raises(UserError, match=words):
        checkpoints.load_unet(folder)
    assert lookups == []


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_pickled_weights_are_refused_unread(saved: Path, tmp_path: Path, weights: str) -> None:
    folder = copy_of(saved, tmp_path)
    sub = folder / checkpoints.RAW if weights == "raw" else folder
    marker = tmp_path / "unpickled"
    (sub / checkpoints.WEIGHTS_FILE).unlink()
    torch.save({"conv_in.weight": Payload(marker)}, sub / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors only"):
        checkpoints.load_unet(folder, weights)  # type: ignore[arg-type]
    assert not marker.exists()


def resume_folder(tmp_path: Path) -> Path:
    unet = build_unet(TINY_MODEL)
    optimizer = torch.optim.AdamW(unet.parameters())
    folder = tmp_path / "resume"
    checkpoints.save_resume_state(folder, optimizer, {"epoch": 2, "step": 6, "ema_step": 6})
    return folder


def test_resume_state_round_trips(tmp_path: Path) -> None:
    folder = resume_folder(tmp_path)
    rng = torch.get_rng_state()  # as saved: saving draws nothing
    torch.rand(3)
    state, optim, saved_rng = checkpoints.load_resume_state(folder)
    assert state == {"epoch": 2, "step": 6, "ema_step": 6}
    assert set(optim) == {"state", "param_groups"}
    assert torch.equal(saved_rng, rng)


def test_a_pickled_object_in_the_resume_state_is_refused_unrun(tmp_path: Path) -> None:
    folder = resume_folder(tmp_path)
    marker = tmp_path / "unpickled"
    torch.save({"state": Payload(marker)}, folder / "optimizer.pt")
    with pytest.raises(UserError, match="cannot read the resume state"):
        checkpoints.load_resume_state(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / "state.json").unlink(),
        lambda f: (f / "state.json").write_text(json.dumps({"epoch": 2})),
        lambda f: (f / "rng.pt").write_bytes(b""),
        lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:100]),
    ],
    ids=["no-state", "state-lacks-keys", "empty-rng", "truncated-optimizer"],
)
def test_a_damaged_resume_folder_is_a_user_error(tmp_path: Path, damage: object) -> None:
    folder = resume_folder(tmp_path)
    damage(folder)  # type: ignore[operator]
    with pytest.raises(UserError, match="cannot read the resume state"):
        checkpoints.load_resume_state(folder)


# --- the tracker seam: train records only through the tracker it is given -------------------


def all_runs() -> list[str]:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(exps)]


def artifact_files(folder: Path) -> list[Path]:
    return [p for p in (folder / "mlruns").rglob("*") if p.is_file()]


class CountingNullTracker(NullTracker):
    """A NullTracker that also counts the steps it was told about: proof that training ran."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_loss(self, step: int, loss: float) -> None:
        self.steps.append(step)


def test_a_null_tracker_trains_without_any_mlflow_run(tiny_folder: str, tmp_path: Path) -> None:
    tracking.setup()
    before = all_runs()
    tracker = CountingNullTracker()
    run_id = train(tiny_config(tiny_folder), data_dir=tmp_path / "data", tracker=tracker)
    assert run_id == ""
    assert tracker.steps == list(range(1, 4 * STEPS_PER_EPOCH + 1))  # it did train
    assert all_runs() == before == []
    assert mlflow.active_run() is None
    assert artifact_files(tmp_path) == []  # no checkpoint went anywhere


class RecordingTracker:
    """What train tells its tracker, in order, with what the checkpoint folders held."""

    records = True

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.losses: list[tuple[int, float]] = []

    def start(self, name: str | None, resume_run_id: str | None = None) -> str:
        self.events.append(("start", name, resume_run_id))
        return "fake-run"

    def log_config(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        self.params, self.tags = dict(params), dict(tags)
        self.events.append(("config",))

    def log_inputs(self, inputs: list[tuple[str, str, str, int]]) -> None:
        self.events.append(("inputs", *(split for _, split, _, _ in inputs)))

    def log_loss(self, step: int, loss: float) -> None:
        self.losses.append((step, loss))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.events.append(("metrics", step, tuple(sorted(metrics))))

    def log_samples(self, grid: np.ndarray, epoch: int) -> None:
        self.events.append(("samples", epoch, grid.shape))

    def log_checkpoint(self, folder: Path, epoch: int) -> None:
        meta = checkpoints.read_meta(folder)
        assert checkpoints.load_unet(folder, "raw").config.sample_size == 8
        self.events.append(("checkpoint", epoch, meta["epoch"], meta["step"]))

    def log_resume_state(self, folder: Path) -> None:
        state, _, _ = checkpoints.load_resume_state(folder)
        self.events.append(("resume", state["epoch"], state["step"]))

    def finish(self, last_epoch: int) -> None:
        self.events.append(("finish", last_epoch))

    def fail(self) -> None:
        self.events.append(("fail",))

    def download_resume_state(self, run_id: str, dst: Path) -> Path:
        raise AssertionError("nothing to resume")

    def download_checkpoint(self, run_id: str, epoch: int, dst: Path) -> Path:
        raise AssertionError("nothing to resume")


def test_a_tracker_sees_everything_a_run_records_in_order(tiny_folder: str, tmp_path: Path) -> None:
    tracking.setup()
    cfg = tiny_config(tiny_folder, sample_every=2, sample_count=2, sample_steps=2)
    fake = RecordingTracker()
    assert train(cfg, data_dir=tmp_path / "data", tracker=fake) == "fake-run"

    assert fake.params == {
        **tracking.flat_params(cfg),
        "world_size": "1",
        "effective_batch_size": str(BATCH),
    }
    assert fake.tags[tracking.KIND_TAG] == "train"
    assert fake.tags["train_images"] == str(2 * IMAGES_PER_CLASS)
    assert [s for s, _ in fake.losses] == list(range(1, 4 * STEPS_PER_EPOCH + 1))
    epoch_metrics = ("epoch_loss", "images_per_s")
    grid = (2 * 10 + 2, 1 * 10 + 2, 3)  # 2 samples of 8 px in a 2-wide, 1-high grid

    def saved(epoch: int) -> list[tuple[object, ...]]:
        step = epoch * STEPS_PER_EPOCH
        return [("checkpoint", epoch, epoch, step), ("resume", epoch, step)]

    assert fake.events == [
        ("start", f"{tiny_folder}-8px-attn", None),
        ("config",),
        ("inputs", "train"),
        *saved(0),
        ("metrics", 1, epoch_metrics),
        ("metrics", 2, epoch_metrics),
        *saved(2),
        ("samples", 2, grid),
        ("metrics", 3, epoch_metrics),
        ("metrics", 4, epoch_metrics),
        *saved(4),
        ("samples", 4, grid),
        ("finish", 4),
    ]
    # Nothing went to MLflow behind the tracker's back.
    assert all_runs() == []
    assert mlflow.active_run() is None
    assert artifact_files(tmp_path) == []


def test_a_failing_training_fails_its_record(tiny_folder: str, tmp_path: Path) -> None:
    class Breaks(RecordingTracker):
        def log_loss(self, step: int, loss: float) -> None:
            if step == STEPS_PER_EPOCH + 1:
                raise OSError("tracking store went away")

    fake = Breaks()
    with pytest.raises(OSError, match="went away"):
        train(tiny_config(tiny_folder), data_dir=tmp_path / "data", tracker=fake)
    assert fake.events[-2:] == [("metrics", 1, ("epoch_loss", "images_per_s")), ("fail",)]


def test_a_full_disk_fails_the_run_and_resume_continues_from_the_last_checkpoint(
    tiny_folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from ddsweep import train as train_mod

    tracking.setup()
    data_dir = tmp_path / "data"
    real_save = train_mod.save_checkpoint

    def disk_full_at_4(job: object, epoch: int, *args: object, **kwargs: object) -> None:
        if epoch == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt"))
        real_save(job, epoch, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "save_checkpoint", disk_full_at_4)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config(tiny_folder), data_dir=data_dir)
    (run,) = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        "tags.`ddsweep.kind` = 'train'",
    )
    assert run.info.status == "FAILED"  # not left RUNNING
    assert artifact_dirs(run.info.run_id, checkpoints.CHECKPOINTS) == [
        checkpoints.epoch_dir(e) for e in (0, 2)
    ]

    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)  # space again: resume
    resumed = train(
        config_from_params(run.data.params), data_dir=data_dir, resume_run_id=run.info.run_id
    )
    after = MlflowClient().get_run(resumed)
    assert resumed == run.info.run_id and after.info.status == "FINISHED"
    assert after.data.tags["last_epoch"] == "4"
    assert artifact_dirs(resumed, checkpoints.CHECKPOINTS) == [
        checkpoints.epoch_dir(e) for e in (0, 2, 4)
    ]
