"""Hardening: no unpickling from any cache, no credential in a message, bounded inputs, folder
datasets that cannot lie. Every refusal is one UserError line naming the problem."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from ddsweep.errors import first_line, redact

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
