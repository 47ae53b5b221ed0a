"""The one exception type a user can cause (the CLI prints its message on one line and exits 2),
and the helpers that keep such a line short and free of credentials."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class UserError(Exception):
    """A mistake the user can fix (bad option, unknown dataset, missing file); never a bug."""


def redact(url: str) -> str:
    """The URL with any password replaced by ***, safe to print or log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
