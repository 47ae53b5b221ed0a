"""The commit a run records is ddsweep's own: an installed package inside some other repository
(a project's .venv) records its version alone, never that repository's commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ddsweep import __version__, tracking


def git_repo(root: Path) -> None:
    run = ["git", "-C", str(root)]
    subprocess.run([*run, "init", "-q"], check=True, timeout=30)
    (root / "x").write_text("x")
    subprocess.run([*run, "add", "x"], check=True, timeout=30)
    subprocess.run(
        [*run, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
        check=True,
        timeout=30,
    )


def planted(root: Path, project: str | None) -> str:
    """A tracking/__init__.py path three folders down in `root`, as an install places it."""
    package = root / "site" / "ddsweep" / "tracking"
    package.mkdir(parents=True)
    if project is not None:
        (root / "site" / "pyproject.toml").write_text(project)
    return str(package / "__init__.py")


def test_an_installed_package_inside_another_repository_records_no_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git_repo(tmp_path)
    monkeypatch.setattr(tracking, "__file__", planted(tmp_path, None))
    assert tracking.source_checkout() is None
    assert tracking.code_version() == __version__


def test_a_checkout_of_ddsweep_records_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git_repo(tmp_path)
    monkeypatch.setattr(tracking, "__file__", planted(tmp_path, '[project]\nname = "ddsweep"\n'))
    assert tracking.source_checkout() == tmp_path / "site"
    assert tracking.code_version().startswith(f"{__version__}+g")
    monkeypatch.setattr(tracking, "__file__", planted(tmp_path / "b", '[project]\nname = "x"\n'))
    assert tracking.source_checkout() is None
