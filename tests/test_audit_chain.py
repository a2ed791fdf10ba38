"""The audit log a regulator would accept (models/audit.py): chained entries whose edit, deletion
or reordering ``cohortflow audit verify`` finds, and ``cohortflow reidentify`` as the one audited
way back from a pseudonym, for stewards only.

Before: the audit table could be edited without trace, and re-identification had no path but a
library function the tests used.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import delete, select, text, update

from cohortflow.flows.cli import main
from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.schema import AuditEntry, Linkage
from cohortflow.models.settings import load_settings

PASSWORD = "correct horse battery"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[IndexDB]:
    """An archive whose anonymization wrote linkage (audited), with a steward and a reviewer."""
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    delivered = tmp_path / "in"
    delivered.mkdir()
    (delivered / "a.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    # the patient's identity, in the index
    assert main(["ingest", str(delivered), "--batch", "b1"]) == 0
    assert main(["anonymize", str(delivered), str(tmp_path / "out")]) == 0
    for name, role in (("stella", "steward"), ("rita", "reviewer")):
        monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
        assert main(["users", "add", name, "--role", role, "--password-stdin"]) == 0
    for _ in range(5):  # more entries to break
        assert main(["cohort", "count", "--by", "sex", "--json"]) == 0
    index = open_index(load_settings().index)
    yield index
    index.dispose()


def _verify(capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = main(["audit", "verify", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_an_untouched_chain_verifies(home: IndexDB, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _verify(capsys)
    assert code == 0 and report["intact"] and report["problems"] == []
    assert report["entries"] >= 6 and report["unkeyed"] == 0


@pytest.mark.parametrize("attack", ["edit", "edit_actor", "delete", "delete_last", "reorder"])
def test_an_edit_a_deletion_or_a_reordering_is_found(
    home: IndexDB, capsys: pytest.CaptureFixture[str], attack: str
) -> None:
    with home.session() as session:
        rows = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
        middle, last = rows[len(rows) // 2], rows[-1]
        if attack == "edit":
            session.execute(
                update(AuditEntry).where(AuditEntry.id == middle.id).values(detail="{}")
            )
        elif attack == "edit_actor":
            session.execute(
                update(AuditEntry).where(AuditEntry.id == middle.id).values(actor="someone")
            )
        elif attack == "delete":
            session.execute(delete(AuditEntry).where(AuditEntry.id == middle.id))
        elif attack == "delete_last":
            session.execute(delete(AuditEntry).where(AuditEntry.id == last.id))
        else:  # swap two entries' places: their contents trade ids
            a, b = rows[1], rows[2]
            values = ("at", "actor", "action", "detail", "seq", "prev_mac", "mac", "key_id")
            first = {v: getattr(a, v) for v in values}
            second = {v: getattr(b, v) for v in values}
            session.execute(update(AuditEntry).where(AuditEntry.id == a.id).values(seq=-1))
            session.execute(update(AuditEntry).where(AuditEntry.id == b.id).values(**first))
            session.execute(update(AuditEntry).where(AuditEntry.id == a.id).values(**second))
    code, report = _verify(capsys)
    assert code == 1 and not report["intact"], report
    expected = {
        "edit": "was changed after it was written",
        "edit_actor": "was changed after it was written",
        "delete": "missing (deleted)",
        "delete_last": "missing (deleted) at the end",
        "reorder": "out of order",
    }[attack]
    assert any(expected in p for p in report["problems"]), report["problems"]
    capsys.readouterr()
    assert main(["audit", "verify"]) == 1
    assert "broken:" in capsys.readouterr().err


def test_a_forged_entry_needs_the_project_key(
    home: IndexDB, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever can write the index but has not the key cannot chain an entry that verifies:
    recomputing a plain hash is not enough."""
    import hashlib

    from cohortflow.models.audit import _utc

    with home.session() as session:
        last = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
        assert last is not None and last.seq is not None
        seq, previous = last.seq + 1, last.mac or ""
        forged = AuditEntry(at=last.at, actor="mallory", action="reidentify", detail="{}",
                            seq=seq, prev_mac=previous, key_id=last.key_id)  # fmt: skip
        payload = "\0".join((str(seq), previous, _utc(last.at), "mallory", "reidentify", "{}"))
        forged.mac = hashlib.sha256(payload.encode()).hexdigest()
        session.add(forged)
        session.execute(text("UPDATE audit_head SET seq = :s, mac = :m"),
                        {"s": seq, "m": forged.mac})  # fmt: skip
    code, report = _verify(capsys)
    assert code == 1 and any("mallory" in p for p in report["problems"])


def test_reidentify_is_for_stewards_with_a_reason_and_is_audited(
    home: IndexDB, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with home.session() as session:
        link = session.scalars(select(Linkage)).one()
        pseudonym = link.pseudonym

    def reidentify(user: str, *extra: str) -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
        capsys.readouterr()
        return main(["reidentify", pseudonym, "--user", user, "--password-stdin", *extra])

    assert reidentify("rita", "--reason", "follow-up of an incidental finding") == 2
    assert "steward accounts only" in capsys.readouterr().err
    assert reidentify("stella") == 2  # no reason given: argparse refuses
    assert reidentify("stella", "--reason", "because") == 2  # not a reason
    assert reidentify("stella", "--reason", "follow-up of an incidental finding", "--json") == 0
    found = json.loads(capsys.readouterr().out)
    assert found["pseudonym"] == pseudonym and found["patient_id"] and found["patient_name"]
    with home.session() as session:
        entries = session.scalars(
            select(AuditEntry).where(AuditEntry.action.in_(["reidentify", "refused.steward"]))
        ).all()
    assert [(e.action, e.actor) for e in entries] == [
        ("refused.steward", "rita"),
        ("reidentify", "stella"),
    ]
    assert json.loads(entries[-1].detail)["reason"] == "follow-up of an incidental finding"
    code, report = _verify(capsys)
    assert code == 0 and report["intact"]


def test_reads_of_the_identified_side_are_audited(
    home: IndexDB, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "batch", "b1", "--json"]) == 0
    with home.session() as session:
        reads = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "read.batch_report")
        ).all()
    assert len(reads) == 1 and json.loads(reads[0].detail) == {"batch": "b1"}
    code, report = _verify(capsys)
    assert report["intact"]
    assert code == 0
