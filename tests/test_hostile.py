"""Hostile inputs of issue 26, each from its reproducer: one clear line and exit 2 (no
traceback, nothing left behind), or a correct run."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ddsweep import errors, features, probes, tracking
from ddsweep.cli import app
from ddsweep.config import paths
from ddsweep.errors import UserError

pytestmark = pytest.mark.usefixtures("workdir")


def refused(args: list[str], *, env: dict[str, str] | None = None) -> str:
    """The one line `ddsweep ARGS` prints on its exit 2."""
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("ddsweep: error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def nothing_left(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"], list(folder.iterdir())


@pytest.mark.parametrize("command", ["probe-grid", "status", "train-grid", "fid-grid"])
def test_a_long_study_name_with_axes_is_one_line(tmp_path: Path, command: str) -> None:
    line = refused(["study", command, "--study", "a" * 300, "--dataset", "digits"])
    assert "300 characters is too long" in line
    nothing_left(tmp_path)


def test_sample_to_a_missing_folder_is_refused_before_sampling(tmp_path: Path) -> None:
    line = refused(["sample", "--run", "0" * 32, "--out", "/nonexistent/dir/x.png"])
    assert "/nonexistent/dir does not exist" in line
    nothing_left(tmp_path)


def test_a_linear_lr_that_overflows_float32_is_refused() -> None:
    args = ["probe", "--dataset", "digits", "--block", "pixels", "--probe", "linear"]
    assert "out of range" in refused([*args, "--linear-lr", "1e39"])


@pytest.mark.parametrize(
    ("kind", "settings"), [("linear", {"epochs": 10**9}), ("logreg", {"l2_steps": 10**6})]
)
def test_probe_settings_that_would_run_until_killed_are_refused(
    kind: str, settings: dict[str, int]
) -> None:
    kind_ = probes.get(kind)
    assert kind_.check is not None
    with pytest.raises(UserError, match=r"at most|out of range"):
        kind_.check(kind_.settings(**settings))


def test_a_sweep_file_with_linear_epochs_1e9_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "huge.yaml").write_text(
        "study: huge\naxes:\n  dataset: [digits]\n  block: [pixels]\n  probe: [linear]\n"
        "probe:\n  linear: {epochs: 1000000000}\n"
    )
    assert "out of range" in refused(["study", "probe-grid", "--study", "huge"])


def test_pool_finer_than_any_block_is_refused_up_front() -> None:
    with pytest.raises(UserError, match="at most avg64"):
        features.validate_pool("avg999999")
    features.validate_pool("avg4")


def test_a_duplicate_probe_block_is_one_line(tmp_path: Path) -> None:
    line = refused(["train", "digits", "--probe-every", "1", "--probe-block", "mid", "--probe-block", "mid"])  # fmt: skip
    assert "--probe-block mid given twice" in line
    nothing_left(tmp_path)


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_ddsweep_cache_max_gb_must_be_finite(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DDSWEEP_CACHE_MAX_GB", value)
    with pytest.raises(UserError, match="finite number of gigabytes"):
        paths.cache_cap_bytes()


@pytest.mark.parametrize("interval", ["nan", "inf"])
def test_follow_interval_nan_or_inf_is_one_line(interval: str) -> None:
    line = refused(
        ["study", "probe-grid", "--study", "f", "--dataset", "digits", "--block", "pixels",
         "--follow", "--follow-interval", interval]
    )  # fmt: skip
    assert "--follow-interval must be seconds" in line


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:pw@rd%41x@127.0.0.1:1/optuna",
        "postgresql://postgres:p@ss@word1@127.0.0.1:1/optuna",
    ],
)
def test_no_fragment_of_a_password_with_an_unencoded_at_is_printed(url: str) -> None:
    line = refused(["study", "status", "--study", "s", "--dataset", "digits", "--storage", url])
    password = url.split("postgres:", 1)[1].rsplit("@", 1)[0]
    for fragment in [password, *password.split("@")]:
        assert len(fragment) < 3 or fragment not in line, line  # shorter parts are left
    assert "***" in line


def test_password_fragments_cover_what_a_driver_shows() -> None:
    url = "postgresql://u:pw@rd%41x@127.0.0.1/db"
    text = "failed to resolve host 'rd%41x@127.0.0.1' for user 'u' (password 'pw@rdAx')"
    clean = errors.scrub(text, url)
    assert "rd%41x" not in clean and "rdAx" not in clean and "pw@" not in clean
    assert "127.0.0.1" in clean


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 whose /health answers 200; the Authorization headers seen."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_tracking_url_with_user_and_password_reaches_its_server(
    health_server: tuple[str, list[str]],
) -> None:
    import base64

    host, seen = health_server
    tracking.check_server(f"http://alice:s%40cret@{host}")
    assert seen == ["Basic " + base64.b64encode(b"alice:s@cret").decode()]


def test_a_folder_dataset_whose_root_is_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = refused(["probe", "--dataset", f"folder:{loop}", "--block", "pixels", "--probe", "knn"])
    assert "cannot be resolved" in line


@pytest.mark.parametrize("target", ["/proc/x", "regular-file"])
def test_a_cache_folder_that_is_no_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    if target == "regular-file":
        (tmp_path / target).write_text("not a folder")
        target = str(tmp_path / target)
    monkeypatch.setenv("DDSWEEP_CACHE", target)
    args = ["probe", "--dataset", "digits", "--block", "pixels", "--probe", "knn", "--k", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_a_home_or_journal_folder_that_is_a_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "home-file").write_text("not a folder")
    monkeypatch.setenv("DDSWEEP_HOME", str(tmp_path / "home-file"))
    args = ["study", "probe-grid", "--study", "h", "--dataset", "digits", "--block", "pixels"]
    assert "cannot be used as a folder" in refused(args)
    monkeypatch.delenv("DDSWEEP_HOME")
    line = refused([*args, "--storage", str(tmp_path / "home-file" / "s.journal")])
    assert "cannot be used as a folder" in line


def test_report_out_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    from ddsweep.report.render import write_files

    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(UserError, match="cannot be used as a folder"):
        write_files("s", [], [], tmp_path / "out", {"csv"})
