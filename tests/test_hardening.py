"""Hardening: no unpickling from any cache, no credential in a message, bounded inputs, folder
datasets that cannot lie. Every refusal is one UserError line naming the problem."""

from __future__ import annotations

import contextlib
import pickle
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy.engine import make_url

from ddsweep import data, fid
from ddsweep.config import sweep
from ddsweep.errors import UserError, first_line, redact

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- no credential in any message -----------------------------------------------------------------

# (url, password as the user meant it, texts that must still show)
TRICKY_URLS = [
    (
        "postgresql://alice:s3cr/t@db.example.org:5432/optuna",
        "s3cr/t",
        ["db.example.org", "optuna"],
    ),
    (
        "postgresql://alice:p#ss?w0rd@db.example.org/optuna",
        "p#ss?w0rd",
        ["db.example.org", "optuna"],
    ),
    (
        "postgresql+psycopg2://alice:p@ss@db.example.org/optuna",
        "p@ss",
        ["db.example.org", "optuna"],
    ),
    ("mysql+pymysql://bob:a:b@c/d@mysql.local:3306/grid", "a:b@c/d", ["mysql.local", "grid"]),
    ("postgresql://alice:p%40ss%2Fw@db.example.org/optuna", "p%40ss%2Fw", ["db.example.org"]),
    ("http://carol:hunter2#/x@mlflow.example.org:5000", "hunter2#/x", ["mlflow.example.org"]),
    ("https://carol:pa ss@mlflow.example.org/", "pa ss", ["mlflow.example.org"]),
    ("postgresql://alice@db.example.org/optuna?password=topsecret1", "topsecret1", ["optuna"]),
    (
        "postgresql://db.example.org/optuna?sslmode=require&password=p/q#r",
        "p/q#r",
        ["db.example.org", "sslmode=require"],
    ),
    ("http://mlflow.example.org/?token=abcdef123", "abcdef123", ["mlflow.example.org"]),
]


@pytest.mark.parametrize(("url", "password", "kept"), TRICKY_URLS)
def test_redact_hides_every_password_and_keeps_the_host(
    url: str, password: str, kept: list[str]
) -> None:
    out = redact(url)
    assert password not in out
    assert "***" in out
    for text in kept:
        assert text in out
    # Read back by the engine's own parser, the output holds no password but ***.
    assert make_url(out).password in (None, "***")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///mlflow.db",
        "sqlite:////home/me@lab/runs/optuna.db",
        "http://mlflow.example.org:5000",
        "postgresql://alice@db.example.org/optuna",
        "file:///tmp/mlruns",
        "databricks",
    ],
)
def test_redact_leaves_urls_without_a_password_alone(url: str) -> None:
    assert redact(url) == url


def test_first_line_redacts_a_url_quoted_in_an_error() -> None:
    err = ValueError(
        "Could not parse SQLAlchemy URL from string 'postgresql://a:p@ss/x@h/db'\nmore"
    )
    line = first_line(err)
    assert "p@ss" not in line and "ss/x" not in line
    assert "postgresql://a:***@h/db" in line


# --- no unpickling from any cache -----------------------------------------------------------------


class Payload:
    """Unpickled, it would create `marker`: the stand-in for any code a planted file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (self.marker, "the payload ran"))  # type: ignore[return-value]


def plant(path: Path, marker: Path, *, as_torch: bool = True) -> None:
    """A file at `path` whose unpickling creates `marker`: a torch.save zip, or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_torch:
        torch.save({"conv.weight": torch.zeros(1), "x": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"data": Payload(marker)}))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt is a network error (and a test failure if it was meant to be none)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(inception, "load_state_dict_from_url", no_network)


@pytest.mark.parametrize("as_torch", [True, False], ids=["torch-zip", "bare-pickle"])
def test_the_planted_files_do_run_their_payload_when_fully_unpickled(
    as_torch: bool, tmp_path: Path
) -> None:
    # What the tests below guard against: a full unpickle (torch-fidelity's) runs it.
    marker = tmp_path / "pwned"
    plant(tmp_path / "planted.pth", marker, as_torch=as_torch)
    # A bare pickle is read as the legacy format's magic number: it runs, then fails.
    with contextlib.suppress(RuntimeError):
        torch.load(tmp_path / "planted.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("as_torch", [True, False], ids=["torch-zip", "bare-pickle"])
def test_a_planted_inception_file_in_the_hub_cache_never_runs(
    as_torch: bool, offline: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    planted = tmp_path / "torch" / "hub" / "checkpoints" / fid.INCEPTION_FILE
    marker = tmp_path / "pwned"
    plant(planted, marker, as_torch=as_torch)
    assert fid.hub_weights_path() == planted
    with pytest.raises(UserError) as err:
        fid.make_metric(2048, fid.inception_weights_path(None))
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message
    assert str(planted) in message and "not a PyTorch state dict" in message
    assert "delete it" in message


@pytest.mark.parametrize("origin", ["option", "environment"])
def test_a_planted_inception_file_given_by_path_never_runs(
    origin: str, offline: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    planted = tmp_path / "weights.pth"
    marker = tmp_path / "pwned"
    plant(planted, marker)
    if origin == "environment":
        monkeypatch.setenv(fid.WEIGHTS_ENV, str(planted))
        path = fid.inception_weights_path(None)
    else:
        monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
        path = fid.inception_weights_path(planted)
    with pytest.raises(UserError, match="not a PyTorch state dict") as err:
        fid.make_metric(64, path)
    assert not marker.exists()
    assert str(planted) in str(err.value)


def test_torch_fidelity_is_never_left_to_find_the_weights_itself(
    offline: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A good state dict in the hub cache: torch-fidelity gets a private copy of the checked
    # bytes, by path, and never calls torch.hub itself.
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None)
    state = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["64"]).state_dict()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    cached = fid.hub_weights_path()
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    seen: list[str] = []
    real_load = torch.load

    def spy(f: object, *args: object, **kwargs: object) -> object:
        seen.append(str(f))
        return real_load(f, *args, **kwargs)  # type: ignore[arg-type]

    def hub_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch-fidelity went to torch.hub")

    monkeypatch.setattr(inception, "load_state_dict_from_url", hub_called)
    monkeypatch.setattr(torch, "load", spy)
    fid.make_metric(64, None)
    loaded_by_library = [p for p in seen if p.endswith(fid.INCEPTION_FILE)]
    assert loaded_by_library and all(str(cached) != p for p in loaded_by_library)


def test_a_planted_cifar10_batch_never_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # torchvision unpickles CIFAR-10's batches, but only after their MD5 matched the published
    # ones: a planted batch fails that check, and offline the user gets one UserError line.
    import torchvision.datasets.cifar as cifar

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    marker = tmp_path / "pwned"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    for name in names:
        plant(tmp_path / "data" / "cifar-10-batches-py" / name, marker, as_torch=False)
    for split in ("train", "test"):
        with pytest.raises(UserError, match="cifar10 is not in") as err:
            data.labelled_split("cifar10", split, 32, tmp_path / "data")  # type: ignore[arg-type]
        assert "\n" not in str(err.value)
    assert not marker.exists()


# --- folder datasets that cannot lie ----------------------------------------------------------------


def save_png(path: Path, value: int = 100, *, mode: str = "RGB", size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        pixels = np.full((size, size), value, dtype=np.uint16)
        Image.fromarray(pixels).save(path)  # uint16: mode I;16
    else:
        Image.new(mode, (size, size), value if mode != "RGB" else (value,) * 3).save(path)


def image_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> str:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                save_png(root / split / name / f"{i}.png", 40 * c + 10 * i)
    return f"folder:{root}"


@pytest.mark.parametrize("where", ["loop", "out-of-root", "class-folder"])
def test_a_folder_dataset_with_a_link_is_refused(where: str, tmp_path: Path) -> None:
    name = image_tree(tmp_path / "ds")
    train = tmp_path / "ds" / "train"
    outside = tmp_path / "elsewhere"
    save_png(outside / "secret.png")
    if where == "loop":  # the case: every image again, under "cat"
        link = train / "cat" / "again"
        link.symlink_to(train, target_is_directory=True)
    elif where == "out-of-root":
        link = train / "dog" / "secret.png"
        link.symlink_to(outside / "secret.png")
    else:  # a class folder that is a link: the test split's images under train
        (train / "dog").rename(tmp_path / "dog")
        link = train / "dog"
        link.symlink_to(tmp_path / "dog", target_is_directory=True)
    for call in (
        lambda: data.labelled_split(name, "train", 8, tmp_path),
        lambda: data.training_set(name, 8, tmp_path),
        lambda: data.split_fingerprint(name, "train", 8),
    ):
        with pytest.raises(UserError, match="symbolic link") as err:
            call()
        assert str(link) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("level", "expected"), [(32768, 0.0), (65535, 1.0), (0, -1.0)])
def test_a_16_bit_png_keeps_its_grey_level(level: int, expected: float, tmp_path: Path) -> None:
    name = image_tree(tmp_path / "ds")
    save_png(tmp_path / "ds" / "test" / "cat" / "deep.png", level, mode="I;16")
    split = data.labelled_split(name, "test", 8, tmp_path)
    paths = [p for p, _ in split.samples]  # type: ignore[attr-defined]
    image, label = split[paths.index(str(tmp_path / "ds" / "test" / "cat" / "deep.png"))]
    assert label == 0
    # 32768 is mid-grey, not white: RGB conversion alone clips everything above 255.
    assert torch.allclose(image, torch.full_like(image, expected), atol=1 / 127)


@pytest.mark.parametrize("classes", [("cat",), ("only",)])
def test_a_one_class_folder_dataset_is_refused(classes: tuple[str, ...], tmp_path: Path) -> None:
    name = image_tree(tmp_path / "ds", classes)
    with pytest.raises(UserError, match="at least two classes") as err:
        data.dataset_info(name)
    assert "100 %" in str(err.value)


@pytest.mark.parametrize(
    "content", [b"this is not a png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b""]
)
def test_a_corrupt_image_is_one_user_error_naming_it(content: bytes, tmp_path: Path) -> None:
    name = image_tree(tmp_path / "ds")
    bad = tmp_path / "ds" / "train" / "dog" / "broken.png"
    bad.write_bytes(content)
    split = data.labelled_split(name, "train", 8, tmp_path)
    loader = torch.utils.data.DataLoader(split, batch_size=8)
    with pytest.raises(UserError, match="not a readable image") as err:
        list(loader)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_the_folder_fingerprint_covers_content_and_only_what_is_loaded(tmp_path: Path) -> None:
    name = image_tree(tmp_path / "ds")
    image = tmp_path / "ds" / "train" / "cat" / "flat.bmp"  # BMP: its size is its shape
    save_png(image, 10)
    before = data.split_fingerprint(name, "train", 8)
    # Ignored by ImageFolder: not an image, or not inside a class folder.
    (tmp_path / "ds" / "train" / "notes.txt").write_text("hello")
    (tmp_path / "ds" / "train" / "cat" / "README").write_text("hello")
    assert data.split_fingerprint(name, "train", 8) == before
    # Same size, other pixels: another split.
    size = image.stat().st_size
    save_png(image, 11)
    assert image.stat().st_size == size
    assert data.split_fingerprint(name, "train", 8) != before


# --- bounded inputs ---------------------------------------------------------------------------------


def write_sweep(folder: Path, text: str, name: str = "s") -> str:
    (folder / "sweeps").mkdir(exist_ok=True)
    (folder / "sweeps" / f"{name}.yaml").write_text(text)
    return name


@pytest.mark.parametrize(
    ("axis", "raw"),
    [
        ("epoch", "0:1000000000:1"),  # the example: it filled the host's memory
        ("noise_step", {"start": 0, "stop": 10**30}),
        ("k", ["1:60000", "60001:120000"]),  # two ranges, each under the limit
    ],
)
def test_an_axis_over_the_limit_is_refused_before_it_is_built(axis: str, raw: object) -> None:
    with pytest.raises(UserError, match="limit of 100,000") as err:
        sweep.parse_axis(axis, raw, sweep.CLI_SOURCE)
    assert sweep.MAX_POINTS_ENV in str(err.value)


def test_the_limit_is_overridable_and_the_parser_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sweep.MAX_POINTS_ENV, "2000000")
    started = time.perf_counter()
    epochs = sweep.parse_axis("epoch", ["0:1000000:1", "0:1000000:2"], sweep.CLI_SOURCE)
    assert len(epochs) == 1_000_001 and epochs[:3] == (0, 1, 2)
    assert time.perf_counter() - started < 10  # the quadratic parser took minutes
    monkeypatch.setenv(sweep.MAX_POINTS_ENV, "many")
    with pytest.raises(UserError, match="DDSWEEP_MAX_POINTS='many'"):
        sweep.parse_axis("epoch", "0:10", sweep.CLI_SOURCE)


def test_a_grid_over_the_limit_is_refused_from_yaml_and_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    # Each axis fits; their product (3,000 epochs x 9 blocks x 2 probes x 1,000 steps) does not.
    name = write_sweep(
        tmp_path, "study: s\naxes:\n  dataset: [digits]\n  epoch: '1:3000'\n  noise_step: '0:999'\n"
    )
    with pytest.raises(UserError, match=r"grid of study s has [\d,]+ points"):
        sweep.load_study(name)
    with pytest.raises(UserError, match="the grid of study cli has"):
        sweep.with_overrides(
            None, "cli", {"dataset": ["digits"], "epoch": ["1:3000"], "noise_step": ["0:999"]}
        )


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("study: s\naxes:\n  dataset: [digits]\n  epoch: [0]\n  epoch: [5]\n", "epoch", 5),
        ("study: s\nstudy: t\naxes: {dataset: [digits]}\n", "study", 2),
        ("study: s\naxes: {dataset: [digits]}\nprobe:\n  linear: {lr: 0.1, lr: 0.2}\n", "lr", 4),
    ],
)
def test_a_duplicate_yaml_key_is_refused_with_file_key_and_line(
    text: str, key: str, line: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    name = write_sweep(tmp_path, text)
    with pytest.raises(UserError) as err:
        sweep.load_study(name)
    message = str(err.value)
    assert f"sweeps/{name}.yaml" in message
    assert f"duplicate key {key!r}" in message and f"line {line}" in message


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"study: s\n\x00\xff\xfe binary\x89PNG", "not a UTF-8 text file"),
        (("x: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested deeper than"),
        (("x:\n" + "".join(" " * i + f"a{i}:\n" for i in range(1, 60))).encode(), "nested deeper"),
        (b"# " + b"x" * (2 << 20) + b"\n", "too large for a sweep file"),
    ],
    ids=["binary", "deep-flow", "deep-block", "huge"],
)
def test_binary_deep_or_huge_yaml_is_one_user_error(
    content: bytes, words: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "s.yaml").write_bytes(content)
    with pytest.raises(UserError, match=words) as err:
        sweep.load_study("s")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("length", [101, 249, 5000])
def test_a_study_name_too_long_for_a_file_name_is_refused(
    length: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    long_name = "s" * length
    with pytest.raises(UserError, match=f"{length} characters is too long") as err:
        sweep.with_overrides(None, long_name, {"dataset": ["digits"]})
    assert long_name not in str(err.value)
    write_sweep(tmp_path, f"study: {long_name}\naxes: {{dataset: [digits]}}\n")
    with pytest.raises(UserError, match="too long"):
        sweep.load_study("s")
    assert sweep.check_study_name("s" * 100, "--study") == "s" * 100


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_training_lr_is_refused(lr: float) -> None:
    from ddsweep.config.train import TrainConfig
    from ddsweep.trainrun import validate

    with pytest.raises(UserError, match="--lr must be a positive finite number"):
        validate(TrainConfig(lr=lr))


@pytest.mark.parametrize("lr", [".nan", ".inf", "-.inf", "'nan'", "'1e999'"])
def test_a_non_finite_lr_in_a_sweep_file_is_refused(
    lr: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for section in ("probe:\n  linear:\n    lr: ", "train:\n  lr: "):
        write_sweep(tmp_path, f"study: s\naxes: {{dataset: [digits]}}\n{section}{lr}\n")
        with pytest.raises(UserError, match="must be a number"):
            sweep.load_study("s")


# --- the environment: dead servers, unwritable paths, full disks --------------------------------


def one_error_line(result: object, *words: str) -> str:
    """The single `ddsweep: error:` line of a CLI result that exited 2 without a traceback."""
    exit_code, output = result.exit_code, result.output  # type: ignore[attr-defined]
    assert exit_code == 2, (exit_code, output)
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddsweep: error: "), output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound by this test and never listened on,
    so no other process can take it meanwhile."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["report", "--study", "s"], "no MLflow server answers"),
        # A study with no journal is answered before any server is asked (nothing to read).
        (["study", "status", "--study", "s", "--dataset", "digits"], "has not been started"),
        (
            ["probe", "--dataset", "digits", "--block", "pixels", "--probe", "knn", "--k", "3"],
            "no MLflow server answers",
        ),
    ],
)
def test_a_dead_tracking_server_is_one_line_at_once(
    args: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    from typer.testing import CliRunner

    from ddsweep.cli import app

    monkeypatch.chdir(tmp_path)
    uri = f"http://user:s3cret@127.0.0.1:{closed_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DDSWEEP_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, args)
    line = one_error_line(result, says)
    assert "s3cret" not in line


@pytest.mark.parametrize(
    "home",
    ["a-file/optuna-home", "a-file"],  # a folder under a file; a file where a folder should be
)
def test_an_unusable_ddsweep_home_is_one_line_naming_it(
    home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workdir: str
) -> None:
    from typer.testing import CliRunner

    from ddsweep.cli import app

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("DDSWEEP_HOME", str(tmp_path / home))
    args = ["study", "probe-grid", "--study", "s", "--dataset", "digits", "--block", "pixels"]
    result = CliRunner().invoke(app, [*args, "--probe", "knn", "--k", "3"])
    one_error_line(result, "a-file")


def test_a_full_disk_is_one_line_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workdir: str
) -> None:
    import errno

    from typer.testing import CliRunner

    from ddsweep import features
    from ddsweep.cli import app

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x"))

    monkeypatch.setattr(features.FeatureCache, "put", full)
    args = ["probe", "--dataset", "digits", "--resolution", "8", "--block", "pixels"]
    result = CliRunner().invoke(app, [*args, "--probe", "knn", "--k", "3"])
    one_error_line(result, "no space left", str(tmp_path / "cache" / "x"))


def test_an_oserror_that_is_not_the_environment_s_still_shows_its_traceback(
    monkeypatch: pytest.MonkeyPatch, workdir: str
) -> None:
    import errno

    from typer.testing import CliRunner

    from ddsweep import features
    from ddsweep.cli import app

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(features.FeatureCache, "put", broken)
    args = ["probe", "--dataset", "digits", "--resolution", "8", "--block", "pixels"]
    result = CliRunner().invoke(app, [*args, "--probe", "knn", "--k", "3"])
    assert result.exit_code == 1 and isinstance(result.exception, OSError)


def test_a_folder_dataset_with_a_quote_in_its_path_finds_its_training_runs(
    workdir: str,
) -> None:
    # Regression: the path was pasted into an MLflow filter string, which cannot escape a '.
    from mlflow.tracking import MlflowClient

    from ddsweep import tracking

    tracking.setup(None, tracking.DEFAULT_EXPERIMENT)
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert exp is not None
    for name in ("folder:/data/it's", "folder:/data/its"):
        tags = {tracking.KIND_TAG: "train", "dataset": name, "resolution": "8", "attention": "True"}
        client.set_terminated(client.create_run(exp.experiment_id, tags=tags).info.run_id)
    (found,) = tracking.training_runs("folder:/data/it's", 8, True, finished=True)
    assert found.dataset == "folder:/data/it's"
    (other,) = tracking.training_runs("folder:/data/its", 8, True)
    assert other.run_id != found.run_id


@pytest.mark.parametrize("meta", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_an_unreadable_ddsweep_json_is_one_line_naming_it(
    meta: bytes, tmp_path: Path, workdir: str
) -> None:
    import json

    from typer.testing import CliRunner

    from ddsweep.cli import app

    folder = tmp_path / "net"
    folder.mkdir()
    config = {"sample_size": 8, "down_block_types": ["DownBlock2D"]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "ddsweep.json").write_bytes(meta)
    result = CliRunner().invoke(app, ["probe", "--backbone", str(folder), "--dataset", "digits"])
    one_error_line(result, "ddsweep.json", "not readable")


@pytest.mark.parametrize(
    "password",
    ["p%2Fss%23w%40rd", "plain-s3cret", "p%40ss"],  # /, # and @ percent-encoded
)
def test_a_dead_storage_with_a_special_password_is_one_line_without_it(
    password: str, tmp_path: Path, workdir: str, closed_port: int
) -> None:
    from urllib.parse import unquote

    from typer.testing import CliRunner

    from ddsweep.cli import app

    url = f"postgresql://user:{password}@127.0.0.1:{closed_port}/optuna"
    args = ["study", "probe-grid", "--study", "s", "--dataset", "digits", "--block", "pixels"]
    result = CliRunner().invoke(app, [*args, "--probe", "knn", "--k", "3", "--storage", url])
    line = one_error_line(result, "cannot open Optuna storage", "127.0.0.1")
    assert password not in line and unquote(password) not in line


def test_probe_takes_noise_draws_and_val_fraction_and_refuses_bad_ones(workdir: str) -> None:
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from ddsweep.cli import app

    base = ["probe", "--dataset", "digits", "--resolution", "8", "--block", "pixels"]
    base += ["--probe", "knn", "--k", "3", "--noise-step", "50"]
    for bad, words in ((["--noise-draws", "0"], "noise_draws"), (["--val-fraction", "0.9"], "val")):
        one_error_line(CliRunner().invoke(app, [*base, *bad]), words)
    result = CliRunner().invoke(app, [*base, "--noise-draws", "2", "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["noise_draws"] == "2" and run.data.params["val_fraction"] == "0.0"
    assert "top1" in run.data.metrics and "val_top1" not in run.data.metrics  # no validation
