"""Hardening: no unpickling from any cache, no credential in a message, bounded inputs, folder
datasets that cannot lie. Every refusal is one UserError line naming the problem."""

from __future__ import annotations

import contextlib
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from sqlalchemy.engine import make_url

from ddsweep import fid
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
