"""Cohort discovery as the settings configure it: refreshing the cohort table, and turning a
saved cohort or a manifest into a protocol's selection (for ``cohortflow run --cohort`` and
``cohortflow select --manifest``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cohortflow.models.cohort import ManifestRow, cohort_studies
from cohortflow.models.database import IndexDB
from cohortflow.models.disclosure import DISCLOSURE, Disclosure
from cohortflow.models.errors import ManifestError
from cohortflow.models.settings import Settings
from cohortflow.models.spreadsheet import neutralised, restore
from cohortflow.pipelines.cohort.refresh import RefreshSummary, refresh
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicom.protocols import ProtocolSet, load_protocols
from cohortflow.pipelines.retrieve.config import pacs_node, retrieve_policy
from cohortflow.pipelines.retrieve.throttle import Throttle
from cohortflow.pipelines.select.listed import ListedStudy, select_listed
from cohortflow.pipelines.select.query import SelectionResult

#: the columns of a cohort manifest; ``accession_number`` and ``instances`` are also what a
#: batch manifest reads (``cohortflow ingest --manifest``), so a delivery can be accounted for
MANIFEST_COLUMNS = ("accession_number", "instances", "study_instance_uid", "study_date", "series")
_UID_COLUMNS = {"studyinstanceuid", "study_instance_uid", "study_uid"}
_ACCESSION_COLUMNS = {"accessionnumber", "accession", "accession_number", "accessionno", "acc"}


@dataclass(frozen=True)
class CohortSetup:
    """What cohort discovery needs beside the index, read once per command or dashboard: the
    project key (pseudonyms, dates, UIDs as the anonymizer makes them) and the protocol rules."""

    key: ProjectKey
    protocols: ProtocolSet
    disclosure: Disclosure

    @classmethod
    def load(cls, settings: Settings) -> CohortSetup:
        key = ProjectKey.load(str(settings.pseudonym_key_source))
        return cls(key, load_protocols(settings.protocols_file), disclosure_of(key, settings))

    def refresh(self, index: IndexDB) -> RefreshSummary:
        """Bring the cohort table up to date with the index."""
        return refresh(index, self.key, self.protocols)

    def roles(self) -> dict[str, list[str]]:
        """Protocol name -> its include rules, for checking cohort filters."""
        return roles_of(self.protocols)


def disclosure_of(key: ProjectKey, settings: Settings) -> Disclosure:
    """The disclosure control of de-identified counts, keyed by a secret derived from the
    project key (models/disclosure.py)."""
    return Disclosure(
        key.derived(DISCLOSURE), settings.cohort.min_cell_patients, settings.cohort.round_to
    )


def refresh_configured(settings: Settings, index: IndexDB) -> RefreshSummary:
    """``CohortSetup.refresh`` for one call."""
    return CohortSetup.load(settings).refresh(index)


def roles_of(protocols: ProtocolSet) -> dict[str, list[str]]:
    """Protocol name -> its include rules (what a cohort's protocol filter may name)."""
    return {name: [rule for rule, _ in p.include] for name, p in protocols.protocols.items()}


def protocol_roles(settings: Settings) -> dict[str, list[str]]:
    """``roles_of`` the configured protocol file."""
    return roles_of(load_protocols(settings.protocols_file))


def _select(
    settings: Settings,
    index: IndexDB,
    protocol: str,
    listed: Sequence[ListedStudy],
    source: str,
    use_pacs: bool,
) -> tuple[SelectionResult, Path]:
    protocols = load_protocols(settings.protocols_file)
    result = select_listed(
        protocols.get(protocol),
        listed,
        index,
        source=source,
        node=pacs_node(settings) if use_pacs else None,
        local_aet=settings.local_aet,
        association=Throttle(retrieve_policy(settings)).association,
    )
    return result, Path(protocols.source)


def select_cohort(
    settings: Settings, index: IndexDB, protocol: str, cohort: str, *, use_pacs: bool = True
) -> tuple[SelectionResult, Path]:
    """The saved cohort's studies, decided by ``protocol``'s series rules (archived studies
    from the index, any other from the PACS unless ``use_pacs`` is False)."""
    with index.session() as session:
        studies = cohort_studies(session, cohort)
    listed = [ListedStudy(uid) for _, uid in studies]
    return _select(settings, index, protocol, listed, f"cohort {cohort}", use_pacs)


def select_manifest(
    settings: Settings, index: IndexDB, protocol: str, manifest: Path
) -> tuple[SelectionResult, Path]:
    """The studies of a manifest file (``cohortflow cohort manifest``, or any CSV with a
    StudyInstanceUID or AccessionNumber column), decided as ``select_cohort``."""
    listed = read_listed(manifest)
    return _select(settings, index, protocol, listed, f"manifest {manifest}", True)


def read_listed(path: Path) -> list[ListedStudy]:
    """The studies of a manifest CSV; ManifestError names the file and line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path} is not UTF-8 text: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower().replace(" ", "").replace("-", "_") for h in next(reader, [])]
    uid_at = next((i for i, h in enumerate(header) if h in _UID_COLUMNS), None)
    acc_at = next((i for i, h in enumerate(header) if h in _ACCESSION_COLUMNS), None)
    if uid_at is None and acc_at is None:
        raise ManifestError(
            f"manifest {path}: no study_instance_uid or accession_number column in its first line"
        )
    listed: list[ListedStudy] = []
    seen: set[tuple[str | None, str | None]] = set()
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        uid = row[uid_at].strip() if uid_at is not None and uid_at < len(row) else ""
        accession = restore(row[acc_at].strip()) if acc_at is not None and acc_at < len(row) else ""
        if not uid and not accession:
            raise ManifestError(f"manifest {path} line {line}: no study UID or accession number")
        item = ListedStudy(uid or None, accession or None)
        if (item.study_instance_uid, item.accession_number) not in seen:
            seen.add((item.study_instance_uid, item.accession_number))
            listed.append(item)
    if not listed:
        raise ManifestError(f"manifest {path} lists no study")
    return listed


def write_manifest(rows: Sequence[ManifestRow], out: io.TextIOBase | Path) -> None:
    """CSV with ``MANIFEST_COLUMNS``."""
    handle = out.open("w", newline="", encoding="utf-8") if isinstance(out, Path) else out
    try:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            writer.writerow(
                [neutralised(r.accession_number or ""), r.instances, r.study_instance_uid,
                 r.study_date or "", neutralised(r.series)]
            )  # fmt: skip
    finally:
        if isinstance(out, Path):
            handle.close()
