"""Integrity of the files ddsweep writes and later reads back (feature-cache entries, FID
statistics, predictions; latents and any other safetensors file can use the same two calls).

`seal` adds a SHA-256 digest of a safetensors file's content (its tensors' names, dtypes,
shapes and bytes, and its metadata) to the file's own metadata; `read_sealed` hands back the
file's bytes only when that digest still matches. A torn copy, a file cut short or re-saved with
fewer rows, flipped bytes or shifted labels all fail it; so does garbage (no valid header). Such
an entry is named in one warning line on stderr and removed, and the caller recomputes it. A
FIFO, a device or a folder in an entry's place is never opened for reading (it could block
forever): it is refused the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

DIGEST_KEY = "ddsweep.sha256"
_HEADER_BYTES = 8  # safetensors: a little-endian u64 header length, the JSON header, the data


class Damaged(Exception):
    """A file that is not what ddsweep wrote (its message says how)."""


def read_regular(path: Path | str) -> bytes | None:
    """The bytes of `path`, None when it does not exist; Damaged when it is no regular file.
    Opened without blocking and checked on the open descriptor, so a FIFO never hangs us."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):  # absent, or no folder to hold it
        return None
    except IsADirectoryError as err:
        raise Damaged("a folder, not a file") from err
    except OSError as err:
        raise Damaged(f"unreadable ({err.strerror or err})") from err
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise Damaged("not a regular file")
        try:
            return f.read()
        except OSError as err:
            raise Damaged(f"unreadable ({err.strerror or err})") from err


def _split(blob: bytes) -> tuple[dict[str, Any], dict[str, str], memoryview]:
    """(tensor entries, metadata, data) of safetensors bytes; Damaged on anything malformed."""
    if len(blob) < _HEADER_BYTES:
        raise Damaged("shorter than a safetensors header")
    n = int.from_bytes(blob[:_HEADER_BYTES], "little")
    if n > len(blob) - _HEADER_BYTES:
        raise Damaged("its header runs past the end of the file")
    try:
        header = json.loads(blob[_HEADER_BYTES : _HEADER_BYTES + n])
    except (UnicodeDecodeError, ValueError) as err:
        raise Damaged("its header is not JSON") from err
    if not isinstance(header, dict):
        raise Damaged("its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise Damaged("its metadata is not a JSON object")
    data = memoryview(blob)[_HEADER_BYTES + n :]
    end = 0
    for name, entry in header.items():
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise Damaged(f"tensor {name!r} has no data offsets") from err
        if not 0 <= start <= stop <= len(data):
            raise Damaged(f"tensor {name!r} runs past the end of the file")
        end = max(end, stop)
    if end != len(data):
        raise Damaged("its data and its header disagree in size")
    return header, meta, data


def _digest(header: dict[str, Any], meta: dict[str, str], data: memoryview) -> str:
    """SHA-256 of the metadata (less the digest), every tensor's name, dtype and shape, and the
    data bytes."""
    h = hashlib.sha256()
    described = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    tensors = {
        k: [v.get("dtype"), v.get("shape"), v.get("data_offsets")] for k, v in header.items()
    }
    h.update(json.dumps([described, tensors], sort_keys=True).encode())
    h.update(data)
    return h.hexdigest()


def seal(blob: bytes) -> bytes:
    """safetensors bytes (from `safetensors.torch.save` or `safetensors.numpy.save`) with the
    digest of their content added to their metadata; the data is unchanged."""
    header, meta, data = _split(blob)
    meta = {**meta, DIGEST_KEY: _digest(header, meta, data)}
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return len(text).to_bytes(_HEADER_BYTES, "little") + text + bytes(data)


def check(blob: bytes, *, sealed: bool = True) -> dict[str, str]:
    """The metadata of sealed safetensors bytes; Damaged unless they are well formed and their
    digest matches. With sealed=False, bytes without a digest (written before digests) pass
    on their format alone."""
    header, meta, data = _split(blob)
    recorded = meta.get(DIGEST_KEY)
    if recorded is None:
        if not sealed:
            return meta
        raise Damaged("it carries no content digest (not written by this ddsweep)")
    if recorded != _digest(header, meta, data):
        raise Damaged("its content does not match its digest")
    return meta


def read_sealed(path: Path | str, what: str) -> bytes | None:
    """The bytes of the sealed file `path`, verified; None when it is absent, or damaged: then
    one warning line names it (`what` says what it held) and it is removed, so that the caller
    recomputes and writes it again."""
    try:
        blob = read_regular(path)
        if blob is None:
            return None
        check(blob)
    except Damaged as err:
        discard(path, what, str(err))
        return None
    return blob


def discard(path: Path | str, what: str, why: str) -> None:
    """Warn (one line) that `path` is damaged and remove it; a folder in its place is left."""
    warn(f"{what} {path} is damaged ({why}): removed, it will be recomputed")
    with contextlib.suppress(OSError):
        os.unlink(path)


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"ddsweep: warning: {message}", file=sys.stderr, flush=True)


def save_torch(tensors: dict[str, Any], path: Path | str, metadata: dict[str, str]) -> None:
    """Write torch `tensors` to `path` as sealed safetensors (the caller makes it atomic)."""
    from safetensors.torch import save

    write(path, seal(save(tensors, metadata=metadata)))


def load_torch(blob: bytes) -> dict[str, Any]:
    """The torch tensors of verified safetensors bytes (see `read_sealed`)."""
    from safetensors.torch import load

    return load(blob)


def write(path: Path | str, blob: bytes) -> None:
    """Write `blob` to `path` and flush it to the disk (before any rename names it)."""
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
