"""The key rules and the stream block size that both stores share: ``LocalStore``
(loom/storage.py) and ``S3Store`` (loom/s3.py) import them from here, and this module imports
neither, so the two stores never import each other back.

A key is a relative, '/'-separated path of safe segments (no '..', no leading '/', no
percent-escapes): both stores check every key they are given, so that a bug can never write
outside a store's root. The keys themselves are built in loom/storage.py (``input_key`` ...).
"""

from __future__ import annotations

import re

from loom.errors import InvalidKey

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._=-]+$")
# Reads and copies move objects in blocks of this size: memory stays at one block per stream.
STREAM_CHUNK = 1024 * 1024


def validate_key(key: str) -> str:
    """Refuse anything but relative, '/'-separated keys of safe segments (no '..', no '/x', no
    percent-escapes). Raises ``InvalidKey`` (permanent). The API checks caller-given keys with
    this same function at submit, so a key a store would refuse never reaches a worker."""
    if not isinstance(key, str) or not key or len(key) > 1024 or key.startswith("/"):
        raise InvalidKey(f"invalid storage key {str(key)[:200]!r}")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT_RE.match(segment):
            raise InvalidKey(f"invalid storage key {key[:200]!r}")
    return key


def is_segment(name: str) -> bool:
    """Whether ``name`` may be one segment of a key (a folder a store may list)."""
    return bool(_SEGMENT_RE.match(name))


def dir_prefix(prefix: str) -> str:
    """'' (the root) or a valid key prefix ending in '/'."""
    if prefix:
        validate_key(prefix.rstrip("/"))
        return prefix.rstrip("/") + "/"
    return ""
