"""The linkage (identified side only) and the audit log: every write and read is recorded."""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.audit import append, audit_secret
from cohortflow.models.repository import insert_ignore, now
from cohortflow.models.schema import Linkage


@dataclass(frozen=True)
class LinkageRecord:
    patient_key: str
    pseudonym: str
    date_offset_days: int


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def audit(session: Session, action: str, detail: str, actor: str | None = None) -> None:
    """Append to the audit log, chained (models/audit.py); ``actor`` defaults to the user
    running the process."""
    append(session, audit_secret(), now(), actor or os_user(), action, detail)


def record_linkage(session: Session, records: Sequence[LinkageRecord], key_source: str) -> int:
    """Store new (patient, pseudonym, offset) rows; returns how many were new. Audited."""
    if not records:
        return 0
    known = set(
        session.scalars(
            select(Linkage.patient_key).where(
                Linkage.patient_key.in_([r.patient_key for r in records])
            )
        )
    )
    fresh = [r for r in records if r.patient_key not in known]
    stamp = now()
    insert_ignore(
        session,
        Linkage.__table__,
        [
            {
                "patient_key": r.patient_key,
                "pseudonym": r.pseudonym,
                "date_offset_days": r.date_offset_days,
                "key_source": key_source,
                "created_at": stamp,
            }
            for r in fresh
        ],
        ["patient_key"],
    )
    if fresh:
        audit(session, "linkage_write", f"{len(fresh)} patients linked to pseudonyms")
    return len(fresh)


def lookup(session: Session, pseudonym: str, purpose: str) -> LinkageRecord | None:
    """Re-identify one pseudonym (identified side only); the access is audited with its purpose."""
    row = session.scalar(select(Linkage).where(Linkage.pseudonym == pseudonym))
    audit(session, "linkage_read", f"pseudonym {pseudonym}: {purpose}")
    return LinkageRecord(row.patient_key, row.pseudonym, row.date_offset_days) if row else None
