"""Reading the project key's material from where the settings say it is (``file:PATH``, created
on first use with mode 0600, or ``env:VARIABLE``). Everything keyed by it (pseudonyms, dates,
UIDs: ``pipelines.dicom.keys.ProjectKey``; the audit chain: ``models.audit``) reads it here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cohortflow.models.errors import ProjectKeyError

MIN_KEY_BYTES = 16


def key_material(source: str, create: bool = True) -> bytes:
    """The key's bytes: ``env:VARIABLE`` as text, ``file:PATH`` hex-decoded (or as text); a
    missing file is made with a new random key when ``create``."""
    kind, _, where = source.partition(":")
    if kind == "env":
        value = os.environ.get(where, "")
        if len(value.encode()) < MIN_KEY_BYTES:
            raise ProjectKeyError(
                f"the project key variable {where} is unset or shorter than {MIN_KEY_BYTES} bytes"
            )
        return value.encode()
    if kind != "file":
        raise ProjectKeyError(f"pseudonym_key_source {source!r}: use file:PATH or env:VARIABLE")
    path = Path(where)
    if not path.exists():
        if not create:
            raise ProjectKeyError(f"no project key at {path}")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    if path.stat().st_mode & 0o077:
        raise ProjectKeyError(f"the project key {path} is readable by others: chmod 600 it")
    text = path.read_text(encoding="ascii").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = text.encode()
    if len(secret) < MIN_KEY_BYTES:
        raise ProjectKeyError(f"the project key in {path} is shorter than {MIN_KEY_BYTES} bytes")
    return secret


def derived(material: bytes, purpose: str) -> bytes:
    """A secret of its own for ``purpose`` (``ProjectKey.derived`` gives the same bytes)."""
    return hmac.new(material, f"derived\0{purpose}".encode(), hashlib.sha256).digest()
