"""Paths as the index stores them."""

from __future__ import annotations

import os


def printable_path(path: str | os.PathLike[str] | bytes) -> str:
    """The path as text that any database and terminal accepts (undecodable bytes escaped)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")
