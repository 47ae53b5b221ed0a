"""The one exception type a user can cause (the CLI prints its message on one line and exits 2),
and the helpers that keep such a line short and free of credentials."""

from __future__ import annotations

import re
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix (bad option, unknown dataset, missing file); never a bug."""


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """' (did you mean 'mid'?)' when a known name is close to `name` (difflib), else ''."""
    import difflib

    if not isinstance(name, str) or not name:
        return ""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not close and name.lower() != name:
        close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close and close[0] != name else ""


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


def first_line(err: BaseException, url: str | None = None) -> str:
    """The first line of an exception's message, for one-line error reports; a database or
    server URL in it (SQLAlchemy and MLflow quote the URL they failed on) is redacted, and so
    is any fragment of the password of `url`, the URL the failing call was given."""
    text = str(err).strip().splitlines()
    line = redact_text(text[0]) if text else type(err).__name__
    return scrub(line, url) if url else line


def password_fragments(url: str) -> list[str]:
    """What a driver may print of the password of `url` (as `redact` reads it): the password,
    and, when it holds an unencoded `@`, each part of it on either side of one, which a driver
    that splits the URL at another `@` shows as user or host; percent-decoded forms too.
    Longest first; parts shorter than 3 characters are left (they would hide ordinary words)."""
    from urllib.parse import unquote

    m = _SCHEME.fullmatch(url)
    if m is None:
        return []
    rest = m["rest"]
    at = rest.rfind("@")
    if at <= 0 or rest.startswith("/"):
        return []
    _, colon, password = rest[:at].partition(":")
    if not colon or not password:
        return []
    pieces = password.split("@")
    found = {password}
    for i in range(len(pieces)):
        found.add("@".join(pieces[i:]))
        found.add("@".join(pieces[: i + 1]))
        found.add(pieces[i])
    found |= {unquote(f) for f in found}
    return sorted((f for f in found if len(f) >= 3), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` with every fragment of the password of `url` replaced by ***."""
    for fragment in password_fragments(url):
        text = text.replace(fragment, "***")
    return text


_MIGRATION_RACE = ("already exists", "duplicate key value")


def migration_race(err: BaseException) -> bool:
    """Whether `err` is what a database says when two processes created its schema at once
    (MLflow's and Optuna's first migration): retrying finds the schema made by the other."""
    text = str(err).lower()
    return any(s in text for s in _MIGRATION_RACE)
