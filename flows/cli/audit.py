"""``cohortflow audit verify``, ``reidentify``, ``phi-scan`` and ``archive rekey``: the audit chain
checked, the one way back from a pseudonym to a patient (a steward's, with a reason, audited),
the release check of a folder, and the archive key rotated."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from cohortflow.flows.cli.common import open_index, steward_login
from cohortflow.flows.output import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    SafeTable,
    add_json,
    cell,
    progress_bar,
    stdout_console,
    write_json,
)
from cohortflow.models.settings import Settings
from cohortflow.pipelines.safeio import printable


def add_commands(sub: Any) -> None:
    """Register audit verify, reidentify, phi-scan and archive rekey, each with its handler."""
    audit = sub.add_parser(
        "audit",
        help="check the audit log",
        description="The audit log is a chain: each entry carries a MAC (keyed by the project "
        "key) over its content and the previous entry's. `verify` walks it and reports every "
        "edited, deleted or reordered entry; exit status 1 when one is found.",
    )
    audit_sub = audit.add_subparsers(dest="what", metavar="WHAT", required=True)
    verify = audit_sub.add_parser("verify", help="check the chain")
    add_json(verify, "the result")
    verify.set_defaults(handler=_verify)
    back = sub.add_parser(
        "reidentify",
        help="the patient behind a pseudonym (stewards, audited)",
        description="The one way from a pseudonym back to the patient: a steward account, a "
        "reason, and an audit entry with both. Prints the patient ID, issuer, name, birth date "
        "and the date offset.",
    )
    back.add_argument("pseudonym")
    back.add_argument("--reason", required=True, help="why (kept in the audit log)")
    back.add_argument("--user", help="a steward account")
    back.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    add_json(back, "the patient")
    back.set_defaults(handler=_reidentify)
    scan = sub.add_parser(
        "phi-scan",
        help="search a folder for the identifiers of the patients it is about",
        description="The release check. The pseudonyms found in the folder name its patients; "
        "every file (DICOM headers with sequences and private tags, NIfTI header fields, PNG "
        "text chunks, Parquet, CSV, JSON and any other text, file names) is searched for what "
        "the index holds for them: IDs, names in any order and case, birth dates in every "
        "written form, accession numbers, addresses, physicians and operators. Each hit is "
        "reported with its file, place and kind (never the value); exit status 1 on any hit.",
    )
    scan.add_argument("path", type=Path)
    add_json(scan, "the hits")
    scan.set_defaults(handler=_phi_scan)
    archive = sub.add_parser(
        "archive",
        help="manage the identified archive's encryption",
        description="The archive's blobs are sealed with AES-256-GCM, each with a data key of its "
        "own wrapped by the archive key (archive_key_source). `rekey` adds a new archive key, "
        "re-wraps every blob's data key under it (blobs stored before encryption are sealed), "
        "and removes the old keys once no blob needs them. The archive stays in use meanwhile; "
        "a killed rekey leaves every blob readable, and is rerun. Exit status 1 when a blob "
        "could not be opened (`cohortflow verify` lists it); the old keys are then kept.",
    )
    archive_sub = archive.add_subparsers(dest="what", metavar="WHAT", required=True)
    rekey = archive_sub.add_parser("rekey", help="rotate the archive key")
    add_json(rekey, "the counts")
    rekey.set_defaults(handler=_rekey)


def _rekey(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.linkage import audit
    from cohortflow.pipelines.archive.store import ArchiveStore

    store = ArchiveStore.of(settings)
    with progress_bar(err, "re-wrapping blob keys") as bar:
        task = bar.add_task("rekey", total=None)
        report = store.rekey(progress=lambda n: bar.advance(task, n))
    detail = {
        "key_id": report.key_id,
        "rewrapped": report.rewrapped,
        "sealed": report.sealed,
        "unchanged": report.unchanged,
        "failed": len(report.failed),
        "retired_keys": report.retired,
    }
    with open_index(settings) as index, index.session() as session:
        audit(session, "archive.rekey", json.dumps(detail))
    if args.json:
        write_json({**detail, "problems": [{"blob": b, "reason": r} for b, r in report.failed]})
    else:
        for blob, reason in report.failed:
            err.print(Text.assemble(("not re-wrapped: ", "red"), cell(f"{blob}: {reason}")))
        err.print(
            f"archive key {report.key_id}: {report.rewrapped} blobs re-wrapped, {report.sealed} "
            f"sealed, {report.unchanged} already under it; "
            + (
                f"{report.retired} old keys retired"
                if report.ok
                else f"{len(report.failed)} blobs could not be opened: the old keys are kept"
            )
        )
    return EXIT_OK if report.ok else EXIT_FAILURES


def _phi_scan(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.linkage import audit
    from cohortflow.pipelines.release.scan import Matcher, pseudonyms_in, scan_folder, targets

    root = args.path
    if not root.is_dir():
        err.print(f"[red]usage error:[/red] {printable(root)} is not a folder")
        return EXIT_USAGE
    found = pseudonyms_in(root)
    with open_index(settings) as index, index.session() as session:
        wanted = targets(session, found)
        detail = {"path": str(root), "pseudonyms": len(found), "identifiers": len(wanted)}
        audit(session, "release.scan", json.dumps(detail))
    report = scan_folder(root, Matcher(wanted))
    report.patients = len(found)
    if args.json:
        write_json(
            {
                "path": str(root),
                "files": report.files,
                "patients": report.patients,
                "identifiers": len(wanted),
                "hits": [vars(h) for h in report.hits],
                "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
            }
        )
    else:
        if report.hits:
            table = SafeTable(title=f"{len(report.hits)} identifiers found in {printable(root)}")
            for name in ("file", "place", "kind", "pseudonym"):
                table.add_column(name)
            for h in report.hits:
                table.add_row(h.path, h.place, h.kind, h.pseudonym)
            stdout_console().print(table)
        err.print(
            f"{report.files} files of {report.patients} patients searched for "
            f"{len(wanted)} identifiers: {len(report.hits)} found"
            + (f", {len(report.skipped)} entries not read" if report.skipped else "")
        )
    return EXIT_FAILURES if report.hits else EXIT_OK


def _verify(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.audit import audit_secret, verify

    with open_index(settings) as index, index.session() as session:
        report = verify(session, audit_secret(str(settings.pseudonym_key_source)))
    if args.json:
        write_json(
            {
                "intact": report.intact,
                "entries": report.entries,
                "before_chain": report.before_chain,
                "unkeyed": report.unkeyed,
                "problems": report.problems,
            }
        )
    else:
        for problem in report.problems:
            err.print(Text.assemble(("broken: ", "red"), cell(problem)))
        state = "intact" if report.intact else f"{len(report.problems)} breaks"
        err.print(
            f"audit chain {state}: {report.entries} entries checked"
            + (f", {report.before_chain} older than the chain" if report.before_chain else "")
            + (f", {report.unkeyed} written before the project key" if report.unkeyed else "")
        )
    return EXIT_OK if report.intact else EXIT_FAILURES


def _reidentify(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from sqlalchemy import select

    from cohortflow.models.linkage import audit
    from cohortflow.models.schema import Linkage, Patient

    reason = args.reason.strip()
    if len(reason) < 10:
        err.print("[red]usage error:[/red] --reason: say why in a sentence (10 characters or more)")
        return EXIT_USAGE
    with open_index(settings) as index:
        steward = steward_login(args, index, err, "re-identification")
        if steward is None:
            return EXIT_USAGE
        with index.session() as session:
            link = session.scalar(select(Linkage).where(Linkage.pseudonym == args.pseudonym))
            patient = (
                session.scalar(select(Patient).where(Patient.patient_key == link.patient_key))
                if link is not None
                else None
            )
            found = link is not None
            detail = {"pseudonym": args.pseudonym, "reason": reason, "found": found}
            audit(session, "reidentify", json.dumps(detail), actor=steward)
            if link is None:
                err.print(f"[red]error:[/red] no patient has the pseudonym {args.pseudonym}")
                return EXIT_USAGE
            # the key is ``id^issuer`` (models.ingest.patient_key): what anonymized data that
            # was never ingested leaves to go by
            key_id, _, key_issuer = link.patient_key.partition("^")
            result = {
                "pseudonym": link.pseudonym,
                "patient_key": link.patient_key,
                "patient_id": patient.patient_id if patient else key_id or None,
                "issuer_of_patient_id": (
                    patient.issuer_of_patient_id if patient else key_issuer or None
                ),
                "patient_name": patient.patient_name if patient else None,
                "patient_birth_date": patient.patient_birth_date if patient else None,
                "date_offset_days": link.date_offset_days,
            }
    if args.json:
        write_json(result)
    else:
        table = SafeTable(title=f"{args.pseudonym} (re-identified by {steward}, audited)")
        table.add_column("field")
        table.add_column("value")
        for name, value in result.items():
            table.add_row(name, "" if value is None else str(value))
        stdout_console().print(table)
    return EXIT_OK
