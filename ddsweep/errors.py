"""The one exception type a user can cause (the CLI prints its message on one line and exits 2),
and the helpers that keep such a line short and free of credentials."""

from __future__ import annotations

import re


class UserError(Exception):
    """A mistake the user can fix (bad option, unknown dataset, missing file); never a bug."""


_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>.*)", re.DOTALL)
# Query parameters that carry a secret (`?password=`, `&sslpassword=`, `?token=`, ...).
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;][^=&;?#]*?(?:pass(?:word|wd)?|pwd|secret|token|api[_-]?key|access[_-]?key)"
    r"[^=&;?#]*=)[^&;]*",
    re.IGNORECASE,
)
# A URL with user:password@ inside free text (an exception's message); ends at a space or quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*")


def redact(url: str) -> str:
    """The URL with any password replaced by ***, safe to print or log.

    Not urllib's or SQLAlchemy's reading of the URL: both stop the password at a character that
    an unencoded password may hold (urllib at `/`, `?` or `#`, SQLAlchemy's `make_url` at the
    first `@`, printing the rest as the host), so either would print part of it. Everything
    between the first `:` of the user info and the *last* `@` of the URL is hidden instead: it
    covers what any of them would send as the password. Secret query parameters
    (`?password=...`) are hidden too.
    """
    m = _SCHEME.fullmatch(url)
    if m is not None:
        rest = m["rest"]
        at = rest.rfind("@")
        # `sqlite:////path/a@b.db` and `file:///...` have no user info: the rest starts with `/`.
        if at > 0 and not rest.startswith("/"):
            user, colon, _ = rest[:at].partition(":")
            if colon:
                url = f"{m['scheme']}{user}:***{rest[at:]}"
    return _SECRET_PARAM.sub(lambda s: f"{s['key']}***", url)


def redact_text(text: str) -> str:
    """`text` with every URL in it passed through `redact`."""
    return _URL_IN_TEXT.sub(lambda m: redact(m[0]), text)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports; a database or
    server URL in it (SQLAlchemy and MLflow quote the URL they failed on) is redacted."""
    text = str(err).strip().splitlines()
    return redact_text(text[0]) if text else type(err).__name__


_MIGRATION_RACE = ("already exists", "duplicate key value")


def migration_race(err: BaseException) -> bool:
    """Whether `err` is what a database says when two processes created its schema at once
    (MLflow's and Optuna's first migration): retrying finds the schema made by the other."""
    text = str(err).lower()
    return any(s in text for s in _MIGRATION_RACE)
