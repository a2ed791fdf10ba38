"""De-identify a folder of DICOM files into another, laid out by pseudonym and new UIDs.

``<out>/<pseudonym>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, all UIDs the
project's. Files that are not DICOM or are damaged (the ingest reader decides), and instances
that may carry burned-in text, are not written and are reported with a reason; one bad file never
stops the others. The linkage records it returns belong on the identified side only.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset

from cohortflow.models.database import IndexDB
from cohortflow.models.linkage import LinkageRecord, record_linkage
from cohortflow.models.settings import Settings
from cohortflow.pipelines.anonymize.deidentify import Deidentifier, Excluded
from cohortflow.pipelines.anonymize.profile import load_profile
from cohortflow.pipelines.anonymize.writer import can_splice, encode_file, snapshot
from cohortflow.pipelines.archive.sealed import SealError
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.safeio import (
    RefusedError,
    current_umask,
    holds,
    printable,
    printable_path,
    promote,
    publish,
    read_regular,
    take_umask,
)
from cohortflow.pipelines.walk import walk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileOutcome:
    source: str
    #: written, excluded (may carry burned-in text), skipped (not DICOM / damaged), failed
    status: str
    #: where it was written (or, failed with output_exists, the output another file holds)
    output: str | None = None
    reason_code: str | None = None
    reason: str | None = None


@dataclass
class FolderReport:
    #: every file in the output (published by this run, or found there from an earlier run
    #: with the same bytes): counted as they are, never computed from the input count
    published: list[FileOutcome] = field(default_factory=list)
    excluded: list[FileOutcome] = field(default_factory=list)
    skipped: list[FileOutcome] = field(default_factory=list)
    failed: list[FileOutcome] = field(default_factory=list)
    linkage: dict[str, LinkageRecord] = field(default_factory=dict)

    @property
    def written(self) -> int:
        return len(self.published)

    def add(self, outcome: FileOutcome) -> None:
        kind = "published" if outcome.status == "written" else outcome.status
        getattr(self, kind).append(outcome)


#: DICOM UID grammar (PS3.5 9.1): they become folder and file names
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _placement(ds: pydicom.Dataset) -> tuple[str, str, str] | str:
    """Study, series and instance UID of a de-identified data set, or why it cannot be filed."""
    uids = []
    if not ds.get("SOPClassUID"):
        return "no SOPClassUID: the file's kind is unknown"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword) or "")
        if not value:
            return f"no {keyword}: the file cannot be placed in a study and series"
        if len(value) > 64 or not _UID.match(value):
            return f"{keyword} {printable(value)!r} is not a valid UID"
        uids.append(value)
    return uids[0], uids[1], uids[2]


def _undecodable(ds: pydicom.Dataset) -> str | None:
    """The first element whose value cannot be decoded (a damaged value, an unknown VR), or
    None. Run only when de-identification raised: it decodes every element."""
    from pydicom.datadict import dictionary_VR

    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
            items = elem.value if elem.VR == "SQ" else ()
        except Exception as exc:
            return f"element {tag} cannot be decoded: {type(exc).__name__}: {exc}"
        try:
            standard = dictionary_VR(tag) if not tag.is_private else None
        except KeyError:
            standard = None
        if standard and elem.VR not in standard.split(" or "):
            # a damaged VR: the value cannot be replaced (a pseudonym is no decimal string)
            return f"element {tag} has VR {elem.VR}, the standard's is {standard}"
        for item in items:
            found = _undecodable(item)
            if found is not None:
                return found
    return None


def _encode(ds: pydicom.Dataset, meta: FileMetaDataset, data: bytes, originals: Any) -> bytes:
    """The de-identified file's bytes: spliced into the original where only values changed."""
    if can_splice(ds, meta):
        return encode_file(ds, meta, data, originals)
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128  # a preamble may carry application data (a TIFF header)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def anonymize_file(
    path: Path,
    out_root: Path,
    deidentifier: Deidentifier,
    archive: ArchiveStore | None = None,
    staging: Path | None = None,
) -> tuple[FileOutcome, LinkageRecord | None]:
    """De-identify one file into ``out_root``; never raises for the file's content. A symbolic
    link is read only when it leads into ``archive`` (which a run stages from), and a sealed
    blob is opened with the archive's key (nothing decrypted is ever written but the
    de-identified file). With
    ``staging``, the file is written there (at its path relative to ``out_root``) for the
    caller to promote once the patient's linkage is committed (:func:`anonymize_folder`)."""
    from cohortflow.pipelines.dicom.reader import classify

    shown = printable_path(str(path))
    try:
        trusted = None if archive is None else archive.root
        data, _ = read_regular(path, trusted, follow=archive is not None)
    except RefusedError as refused:
        return FileOutcome(shown, "skipped", None, refused.code, refused.reason), None
    if archive is not None:
        try:
            data = archive.unseal(data, Path(os.path.realpath(path)).name)
        except SealError as error:  # `cohortflow verify` finds and lists it as well
            return FileOutcome(shown, "failed", None, f"blob_{error.code}", error.reason), None
    try:
        verdict = classify(data)
        if not verdict.readable:
            reason = verdict.reason or verdict.status.value
            return FileOutcome(shown, "skipped", None, verdict.status.value, reason), None
        ds = verdict.full_dataset(data)  # the header is not parsed twice
        syntax = (ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None) or (
            verdict.header.transfer_syntax_uid if verdict.header else None
        )
        try:  # a value pydicom cannot decode or re-encode is the data's fault: named below
            originals = snapshot(ds)
            result = deidentifier.deidentify(ds)
            if isinstance(result, Excluded):
                return FileOutcome(shown, "excluded", None, result.reason_code, result.reason), None
            placed = _placement(ds)
            if isinstance(placed, str):
                return FileOutcome(shown, "skipped", None, "no_uids", placed), None
            study, series, instance = placed
            out = out_root / result.pseudonym / study / series / f"{instance}.dcm"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = pydicom.uid.UID(syntax or pydicom.uid.ExplicitVRLittleEndian)
            encoded = _encode(ds, meta, data, originals)
        except Exception:
            damaged = _undecodable(ds)
            if damaged is None:
                raise  # not the data's fault: an internal error, below
            return FileOutcome(shown, "skipped", None, "damaged_value", damaged), None
        # exclusive: a second file with this instance's UID and other content is reported,
        # never written over the first (the same content again is a rerun, or a copy)
        try:
            if staging is None:
                publish(out, encoded, out_root, exclusive=True)
            elif not holds(out, encoded):  # the same bytes there already: a rerun
                staged = staging / out.relative_to(out_root)
                publish(staged, encoded, staging, exclusive=True)
        except RefusedError as refused:
            if refused.code == "output_exists":  # a file of this SOPInstanceUID came first
                why = f"another input has SOPInstanceUID {instance} with other content: "
                return FileOutcome(
                    shown, "failed", str(out), "conflicting_instance", why + refused.reason
                ), None
            return FileOutcome(shown, "failed", None, refused.code, refused.reason), None
    except RefusedError as refused:
        return FileOutcome(shown, "failed", None, refused.code, refused.reason), None
    except Exception as exc:  # one bad file must not stop the others
        log.warning("anonymize failed on %s: %s", shown, exc)
        return FileOutcome(
            shown, "failed", None, "internal_error", f"{type(exc).__name__}: {exc}"
        ), None
    link = LinkageRecord(result.patient_key, result.pseudonym, result.date_offset_days)
    return FileOutcome(shown, "written", str(out)), link


def _chunk(
    paths: list[Path],
    out_root: Path,
    deidentifier: Deidentifier,
    archive: ArchiveStore | None = None,
    staging: Path | None = None,
) -> list[tuple[FileOutcome, LinkageRecord | None]]:
    return [anonymize_file(path, out_root, deidentifier, archive, staging) for path in paths]


#: where :func:`anonymize_folder` writes files until their patients' linkage is committed
STAGING = ".staging"


def anonymize_folder(
    source: Path,
    out_root: Path,
    deidentifier: Deidentifier,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    chunk_size: int = 64,
    archive: ArchiveStore | None = None,
    commit: Callable[[list[LinkageRecord]], None] | None = None,
    expect: Callable[[int], None] | None = None,
) -> FolderReport:
    """De-identify every file under ``source`` (in ``workers`` processes when more than one).
    Symbolic links are not followed, except into ``archive``: a protocol run stages a study
    from the archive as links (pipelines/run/steps.py).

    With ``commit`` (which stores linkage records on the identified side), no output file is
    published before its patient's linkage is committed: each chunk of files is written into
    a folder of its own under ``out_root/.staging``, its new linkage committed, and then its
    files renamed into place, chunk after chunk in input order (so of two inputs with one
    SOPInstanceUID and other bytes the first is kept, whichever worker finished first). A run
    killed at any point leaves no published file without its linkage; the rerun clears the
    staging folder, finds what was published already (the same bytes: not written again) and
    completes the rest."""
    report = FolderReport()
    staging = None if commit is None else out_root / STAGING
    if staging is not None:
        _clear(staging)
    committed: set[str] = set()

    def staged(number: int) -> Path | None:
        return None if staging is None else staging / str(number)

    def collect(number: int, results: list[tuple[FileOutcome, LinkageRecord | None]]) -> None:
        fresh = [
            link for _, link in results if link is not None and link.patient_key not in committed
        ]
        if commit is not None and fresh:
            commit(list({link.patient_key: link for link in fresh}.values()))
            committed.update(link.patient_key for link in fresh)
        for made, link in results:
            folder = staged(number)
            ended = made if folder is None else _promote(made, out_root, folder)
            report.add(ended)
            if link is not None and ended.status == "written":
                report.linkage.setdefault(link.patient_key, link)
        if progress is not None:
            progress(len(results))

    # ingest's walk: name order, symlinked folders not followed, an unlistable folder reported
    paths = [Path(c.path) for c in walk([source], stat=False)]
    if expect is not None:
        expect(len(paths))  # ``progress`` hears of the files done, chunk by chunk
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    if workers <= 1:
        for number, chunk in enumerate(chunks):
            collect(number, _chunk(chunk, out_root, deidentifier, archive, staged(number)))
    else:
        # forkserver: no inherited threads or connections; workers load pydicom once
        context = get_context("forkserver")
        context.set_forkserver_preload(["cohortflow.pipelines.anonymize.files"])
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=take_umask, initargs=(current_umask(),)
        ) as pool:
            batches = pool.map(
                _chunk,
                chunks,
                repeat(out_root),
                repeat(deidentifier),
                repeat(archive),
                [staged(n) for n in range(len(chunks))],
            )
            for number, results in enumerate(batches):  # in input order
                collect(number, results)
    if staging is not None:
        _clear(staging)
    return report


def _clear(staging: Path) -> None:
    """Remove a staging folder (a killed run's leftovers); a link there is removed, never
    followed."""
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)


def _promote(outcome: FileOutcome, out_root: Path, staging: Path) -> FileOutcome:
    """Rename a staged file into place (its linkage committed); the outcome as it ends."""
    if outcome.status != "written" or outcome.output is None:
        return outcome
    out = Path(outcome.output)
    staged = staging / out.relative_to(out_root)
    if not staged.is_file():
        return outcome  # published by an earlier run: the same bytes were found there
    try:
        promote(staged, out, out_root)
    except RefusedError as refused:
        if refused.code == "output_exists":  # an earlier chunk published this instance
            why = f"another input has SOPInstanceUID {out.stem} with other content: "
            return replace(
                outcome,
                status="failed",
                reason_code="conflicting_instance",
                reason=why + refused.reason,
            )
        return replace(
            outcome,
            status="failed",
            output=None,
            reason_code=refused.code,
            reason=refused.reason,
        )
    return outcome


@dataclass(frozen=True)
class ConfiguredRun:
    report: FolderReport
    deidentifier: Deidentifier
    new_linkage: int  # patients linked for the first time


def anonymize_configured(
    settings: Settings,
    source: Path,
    out_root: Path,
    index: IndexDB,
    profile: Path | None = None,
    progress: Callable[[int], None] | None = None,
    expect: Callable[[int], None] | None = None,
) -> ConfiguredRun:
    """De-identify with the project's key and profile, one process per core, and record the
    linkage (identified side, audited) in the index."""
    assert settings.pseudonym_key_source is not None
    key = ProjectKey.load(settings.pseudonym_key_source)
    deidentifier = Deidentifier(load_profile(profile), key)
    new = 0

    def commit(records: list[LinkageRecord]) -> None:
        nonlocal new
        with index.session() as session:
            new += record_linkage(session, records, key.source)

    report = anonymize_folder(
        source,
        out_root,
        deidentifier,
        progress=progress,
        workers=settings.worker_count,
        commit=commit,
        expect=expect,
    )
    return ConfiguredRun(report, deidentifier, new)
