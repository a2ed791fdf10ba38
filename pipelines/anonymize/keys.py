"""The project key and everything derived from it: pseudonyms, date offsets, UIDs.

All derivations are keyed HMAC-SHA256, so they are stable across runs and machines with the same
key, and nobody without the key can recompute or reverse them. The key never enters the
repository, the logs or Prefect parameters: it is read from ``file:PATH`` (created on first use,
mode 0600) or ``env:VARIABLE``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.anonymize.errors import ProjectKeyError

#: Dates move back by this many days plus a per-patient part below ``DATE_JITTER_DAYS``: far
#: enough (about 150 years) that a shifted date can never be mistaken for, or collide with, a
#: real date of the archive, and clearly not a real acquisition date to a reader.
DATE_OFFSET_BASE_DAYS = 150 * 365
DATE_JITTER_DAYS = 3650
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class ProjectKey:
    secret: bytes = field(repr=False)
    source: str  # where it came from (never the key itself)

    @classmethod
    def load(cls, source: str, create: bool = True) -> ProjectKey:
        """``file:PATH`` (created with a new random key if missing and ``create``) or
        ``env:VARIABLE``."""
        kind, _, where = source.partition(":")
        if kind == "env":
            value = os.environ.get(where, "")
            if len(value.encode()) < MIN_KEY_BYTES:
                raise ProjectKeyError(
                    f"the project key variable {where} is unset or shorter than "
                    f"{MIN_KEY_BYTES} bytes"
                )
            return cls(value.encode(), source)
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
            raise ProjectKeyError(
                f"the project key in {path} is shorter than {MIN_KEY_BYTES} bytes"
            )
        return cls(secret, source)

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, patient_key: str) -> str:
        """``CF`` + 14 characters of base32: stable, BIDS-safe (letters and digits only)."""
        text = base64.b32encode(self._mac("patient", patient_key)).decode()
        return "CF" + text[:14]

    def date_offset_days(self, patient_key: str) -> int:
        """Days to add to every date of the patient (negative): intervals stay exact."""
        jitter = int.from_bytes(self._mac("dates", patient_key)[:4], "big") % DATE_JITTER_DAYS
        return -(DATE_OFFSET_BASE_DAYS + jitter)

    def fingerprint(self) -> str:
        """A keyed hash of a constant: tells whether two keys are the same, reveals nothing."""
        return self._mac("fingerprint", "cohortflow").hex()

    def uid(self, uid: str) -> str:
        """The project's UID for ``uid`` (``2.25.`` + a 128-bit keyed hash, PS3.5 B.2)."""
        return "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))
