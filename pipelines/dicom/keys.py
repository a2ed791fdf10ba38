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
from dataclasses import dataclass, field

from cohortflow.models.keys import MIN_KEY_BYTES, derived, key_material

__all__ = ["MIN_KEY_BYTES", "ProjectKey"]

#: Dates move back by this many days plus a per-patient part below ``DATE_JITTER_DAYS``: far
#: enough (about 150 years) that a shifted date can never be mistaken for, or collide with, a
#: real date of the archive, and clearly not a real acquisition date to a reader.
DATE_OFFSET_BASE_DAYS = 150 * 365
DATE_JITTER_DAYS = 3650


@dataclass(frozen=True)
class ProjectKey:
    secret: bytes = field(repr=False)
    source: str  # where it came from (never the key itself)

    @classmethod
    def load(cls, source: str, create: bool = True) -> ProjectKey:
        """``file:PATH`` (created with a new random key if missing and ``create``) or
        ``env:VARIABLE`` (models/keys.py reads it)."""
        return cls(key_material(source, create), source)

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

    def derived(self, purpose: str) -> bytes:
        """A secret of its own for ``purpose`` (e.g. the disclosure control's noise), from which
        the project key cannot be worked back."""
        return derived(self.secret, purpose)

    def fingerprint(self) -> str:
        """A keyed hash of a constant: tells whether two keys are the same, reveals nothing."""
        return self._mac("fingerprint", "cohortflow").hex()

    def uid(self, uid: str) -> str:
        """The project's UID for ``uid`` (``2.25.`` + a 128-bit keyed hash, PS3.5 B.2)."""
        return "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))
