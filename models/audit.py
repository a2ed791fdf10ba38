"""The audit log as a chain a regulator can check: every entry carries a MAC over its content
and the previous entry's MAC, so that an edit, a deletion or a reordering is found by
``cohortflow audit verify``.

Each entry gets the next sequence number and ``mac = HMAC(secret, seq, previous mac, time,
actor, action, detail)``. The newest sequence number and MAC are also kept in ``audit_head``,
whose row is updated first in the writing transaction: that update serialises writers (SQLite's
write lock, a row lock on PostgreSQL), so two processes never chain onto the same entry, and a
deletion of the newest entries is found too (the head then points past the end).

The secret is derived from the project key (``audit_secret``): whoever can write to the index
but does not hold the key cannot make a forged entry that verifies. Entries written before this
chain existed (an index migrated from revision 0008) carry no sequence number; ``verify`` counts
them apart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from cohortflow.models.errors import ProjectKeyError
from cohortflow.models.keys import derived, key_material
from cohortflow.models.schema import AuditEntry, AuditHead

#: what the project key's secret for the audit chain is derived with
AUDIT_PURPOSE = "audit-log"
#: the key id of entries written by a process that had no project key (nothing to key with)
UNKEYED = "none"

_secrets: dict[tuple[str, float], bytes] = {}
#: the project key's source this process was started with (``use_key_source``)
_source: list[str] = []


def use_key_source(source: str) -> None:
    """Key the chain with the project key at ``source`` from now on in this process (the
    command line and every flow task call it with their settings, ``--config`` included)."""
    _source[:] = [source]


def audit_secret(source: str | None = None) -> bytes:
    """The chain's secret, derived from the project key at ``source`` (else the one given to
    ``use_key_source``, else the one the environment's settings name); empty when no key exists
    yet (the entry is then chained, but unkeyed)."""
    if source is None and _source:
        source = _source[0]
    if source is None:
        from cohortflow.models.settings import load_settings

        source = str(load_settings().pseudonym_key_source)
    kind, _, where = source.partition(":")
    try:
        stamp = Path(where).stat().st_mtime if kind == "file" else 0.0
    except FileNotFoundError:
        return b""
    cached = _secrets.get((source, stamp))
    if cached is None:
        try:
            cached = derived(key_material(source, create=False), AUDIT_PURPOSE)
        except ProjectKeyError:
            return b""
        _secrets[(source, stamp)] = cached
    return cached


def key_id(secret: bytes) -> str:
    """Which secret chained an entry (a hash of it, never the secret)."""
    return hashlib.sha256(secret).hexdigest()[:16] if secret else UNKEYED


def _utc(at: dt.datetime) -> str:
    """A timestamp as the same text whatever the database gives back (SQLite: naive; PostgreSQL:
    aware in its own zone)."""
    if at.tzinfo is not None:
        at = at.astimezone(dt.UTC).replace(tzinfo=None)
    return at.isoformat(timespec="microseconds")


def entry_mac(
    secret: bytes, seq: int, previous: str, at: dt.datetime, actor: str, action: str, detail: str
) -> str:
    text = "\0".join((str(seq), previous, _utc(at), actor, action, detail))
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def append(
    session: Session, secret: bytes, at: dt.datetime, actor: str, action: str, detail: str
) -> AuditEntry:
    """Add one chained entry in ``session``'s transaction."""
    session.flush()
    taken = cast(
        "CursorResult[Any]",
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + 1)),
    ).rowcount
    if not taken:  # an index made without the migration's row (never in practice)
        last = session.scalar(select(func.max(AuditEntry.seq))) or 0
        session.add(AuditHead(id=1, seq=last + 1, mac=""))
        session.flush()
    seq, previous = session.execute(
        select(AuditHead.seq, AuditHead.mac).where(AuditHead.id == 1)
    ).one()
    mac = entry_mac(secret, seq, previous, at, actor, action, detail)
    entry = AuditEntry(
        at=at,
        actor=actor,
        action=action,
        detail=detail,
        seq=seq,
        prev_mac=previous,
        mac=mac,
        key_id=key_id(secret),
    )
    session.add(entry)
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(mac=mac))
    return entry


@dataclass
class ChainReport:
    """What ``verify`` found: the entries checked and every break, in order."""

    entries: int = 0
    before_chain: int = 0  # entries older than the chain (no sequence number)
    unkeyed: int = 0  # chained by a process without the project key: cannot be verified
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(session: Session, secret: bytes, batch: int = 5000) -> ChainReport:
    """Walk the chain in storage order: each entry must carry the next sequence number, the
    previous entry's MAC and its own MAC over its content; the head must point at the last."""
    report = ChainReport()
    report.before_chain = int(
        session.scalar(select(func.count(AuditEntry.id)).where(AuditEntry.seq.is_(None))) or 0
    )
    expected_seq: int | None = None
    previous = ""
    last_id = 0
    keyed = False
    problem: Callable[[str], None] = report.problems.append
    while True:
        rows = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.seq.is_not(None), AuditEntry.id > last_id)
            .order_by(AuditEntry.id)
            .limit(batch)
        ).all()
        if not rows:
            break
        for e in rows:
            last_id = e.id
            report.entries += 1
            assert e.seq is not None
            if expected_seq is None:
                expected_seq = e.seq
                previous = e.prev_mac or ""
                if e.seq != 1:
                    problem(f"the chain starts at entry {e.seq}, not 1: entries before it are gone")
            if e.seq != expected_seq:
                if e.seq > expected_seq:
                    problem(
                        f"entries {expected_seq} to {e.seq - 1} are missing (deleted) before "
                        f"entry {e.seq} (row {e.id})"
                    )
                else:
                    problem(f"entry {e.seq} (row {e.id}) is out of order: {expected_seq} expected")
            if (e.prev_mac or "") != previous:
                problem(f"entry {e.seq} (row {e.id}) does not follow the entry before it")
            used = secret
            if e.key_id == UNKEYED:
                # written before the project key existed; once it does, none may follow
                report.unkeyed += 1
                used = b""
                if keyed:
                    problem(
                        f"entry {e.seq} (row {e.id}) claims to be written without the project "
                        "key after keyed entries: it cannot be told from a forgery"
                    )
            else:
                keyed = True
                if e.key_id != key_id(secret):
                    problem(f"entry {e.seq} (row {e.id}) was chained under another project key")
            mac = entry_mac(used, e.seq, e.prev_mac or "", e.at, e.actor, e.action, e.detail)
            if not hmac.compare_digest(mac, e.mac or ""):
                problem(
                    f"entry {e.seq} (row {e.id}, {e.action} by {e.actor}) was changed after it "
                    "was written (its MAC does not match its content)"
                )
            previous = e.mac or ""
            expected_seq = e.seq + 1
        session.expunge_all()
    head = session.execute(select(AuditHead.seq, AuditHead.mac).where(AuditHead.id == 1)).first()
    if head is not None and head.seq:
        last = (expected_seq or 1) - 1
        if head.seq > last:
            problem(f"entries {last + 1} to {head.seq} are missing (deleted) at the end")
        elif head.mac != previous:
            problem("the newest entry is not the one the chain's head records")
    return report
