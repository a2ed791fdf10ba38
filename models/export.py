"""The biomarker table: one row per measured T1, pseudonymized, with clinical labels (a
repository function: the dashboard, in ``qc``, and the command line both read it here).

The rows come from the index's biomarkers (keyed by the pseudonymized series UID). Who the
series belongs to is found on the identified side, through the run's anonymize steps (identified
series -> pseudonymized series): the patient's pseudonym, age at the scan (whole years, 90 and
over given as 90, as HIPAA's Safe Harbor asks), sex, the scanner and its field strength, and
the years since the patient's first measured T1 (for longitudinal statistics). Clinical labels
supplied by accession number join there too. The table itself holds no identifier and no real
date: accession numbers, patient ids and dates stay in the index; only intervals leave it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.errors import ExportError
from cohortflow.models.linkage import audit
from cohortflow.models.outcomes import worst_verdict
from cohortflow.models.reviews import latest_reviews, still_failing
from cohortflow.models.schema import Linkage, Patient, Series, StageResult, Study, StudyStep
from cohortflow.models.spreadsheet import neutralised, restore
from cohortflow.models.stages import BiomarkerRecord, biomarker_records
from cohortflow.models.volumes import VOLUME_NAMES, Volumes

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")
#: the label file's column that names the study (first match, case and spaces ignored)
ACCESSION_COLUMNS = ("accession_number", "accessionnumber", "accession")
#: ages from 90 up are reported as 90 (HIPAA Safe Harbor)
AGE_CAP = 90


@dataclass(frozen=True)
class LabelConflict:
    """One accession number given on several lines of a labels file with different labels.
    The lines only: the accession number is an identifier and stays out of reports."""

    lines: tuple[int, ...]


@dataclass(frozen=True)
class Labels:
    """Clinical labels by accession number (identified: never written out as such)."""

    source: str
    columns: tuple[str, ...]
    by_accession: dict[str, dict[str, str]]
    #: accession numbers left unlabelled because their lines disagree (``skip_conflicting``)
    conflicts: tuple[LabelConflict, ...] = ()


@dataclass(frozen=True)
class BiomarkerRow:
    pseudonym: str | None
    study: str
    series: str
    protocol: str | None
    age: int | None
    #: years from the patient's first measured T1 in the table to this one (from the study
    #: dates, which stay in the index; an interval, not a date), None without a study date
    years_since_baseline: float | None
    sex: str | None
    scanner: str | None
    field_strength: float | None
    volumes: Volumes
    #: the automatic verdict over every stage (pass, warn, fail) and its deciding reason
    qc_verdict: str
    qc_reason: str | None
    #: the newest reviewer decision (accept, reject, override) or None
    review: str | None
    #: what a statistician keeps: not failed (or overridden), not rejected
    usable: bool
    method: str
    method_version: str
    labels: dict[str, str] = field(default_factory=dict)


#: the table's columns, in order (label columns follow), the volumes spread out where the row
#: holds them
COLUMNS = tuple(
    name
    for f in fields(BiomarkerRow)
    if f.name != "labels"
    for name in (VOLUME_NAMES if f.name == "volumes" else (f.name,))
)


@dataclass(frozen=True)
class BiomarkerTable:
    rows: list[BiomarkerRow]
    label_columns: tuple[str, ...] = ()
    #: label lines whose accession number matched no measured study (count only)
    labels_unmatched: int = 0
    labels_matched: int = 0

    @property
    def columns(self) -> tuple[str, ...]:
        return (*COLUMNS, *self.label_columns)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            values = asdict(row)
            labels, volumes = values.pop("labels"), values.pop("volumes")
            spread = {c: volumes[c] if c in volumes else values[c] for c in COLUMNS}
            out.append(spread | {c: labels.get(c) for c in self.label_columns})
        return out


def check_release_size(table: BiomarkerTable, min_cell: int) -> None:
    """Refuse a row-level export of fewer than ``min_cell`` patients (disclosure control: a
    table of one or two patients with their ages and scanner singles them out as a list would;
    an empty table reveals nothing)."""
    patients = {row.pseudonym or row.series for row in table.rows}
    if 0 < len(patients) < min_cell:
        raise ExportError(
            f"the table holds {len(patients)} patient(s), fewer than the smallest cell "
            f"({min_cell}, setting cohort.min_cell_patients): no row-level export of so few"
        )


def release_size_refusal(
    session: Session, table: BiomarkerTable, min_cell: int, protocol: str | None, actor: str | None
) -> ExportError | None:
    """``check_release_size``'s refusal, audited in ``session`` (for the caller to raise once
    the session is committed), or None when the table may go out."""
    try:
        check_release_size(table, min_cell)
    except ExportError as exc:
        detail = {"protocol": protocol, "rows": len(table.rows), "why": str(exc)}
        audit(session, "refused.export", json.dumps(detail), actor=actor)
        return exc
    return None


def read_labels(path: Path, skip_conflicting: bool = False) -> Labels:
    """Read a CSV of clinical labels with an accession number column (any other columns are
    labels). ExportError names the file and line of anything wrong.

    An accession number given again with other labels is a conflict: which line is right is
    not known. By default that stops the reading, naming every conflicting line; with
    ``skip_conflicting`` the accession number is left unlabelled (none of its lines is used)
    and the conflict is listed in ``Labels.conflicts`` for the caller to report."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ExportError(f"cannot read the labels file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ExportError(f"the labels file {path} is not UTF-8 text") from exc
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    keyed = {h.lower().replace(" ", "").replace("_", ""): h for h in header}
    accession = next(
        (keyed[c.replace("_", "")] for c in ACCESSION_COLUMNS if c.replace("_", "") in keyed),
        None,
    )
    if accession is None:
        raise ExportError(
            f"the labels file {path} has no accession number column "
            f"(one of {', '.join(ACCESSION_COLUMNS)}); its columns are {', '.join(header)}"
        )
    columns = tuple(h for h in header if h != accession)
    if not columns:
        raise ExportError(f"the labels file {path} has no label column beside {accession}")
    clash = set(columns) & set(COLUMNS)
    if clash:
        raise ExportError(
            f"the labels file {path} has columns named like the table's own: "
            f"{', '.join(sorted(clash))}; rename them"
        )
    by_accession: dict[str, dict[str, str]] = {}
    lines_of: dict[str, list[int]] = {}
    clashes: dict[str, int] = {}  # accession number -> its first line that disagrees
    for line, raw in enumerate(reader, start=2):
        extra = raw.pop(None, None)  # csv's key for the fields beyond the header's
        if extra:
            raise ExportError(
                f"{path}, line {line}: {len(extra)} field(s) more than the header's "
                f"{len(header)} (a comma in a value needs quotes)"
            )
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        key = row.get(accession, "")
        if not key:
            raise ExportError(f"{path}, line {line}: no accession number")
        values = {c: row.get(c, "") for c in columns}
        lines_of.setdefault(key, []).append(line)
        if key in by_accession and by_accession[key] != values:
            clashes.setdefault(key, line)
        by_accession.setdefault(key, values)
    conflicts = tuple(LabelConflict(tuple(lines_of[key])) for key in clashes)
    if conflicts and not skip_conflicting:
        key, line = next(iter(clashes.items()))
        others = [", ".join(map(str, c.lines)) for c in conflicts[1:]]
        more = (
            f" ({len(others)} more accession number(s) so, lines "
            + "; ".join(others[:5])
            + ("; ..." if len(others) > 5 else "")
            + ")"
            if others
            else ""
        )
        raise ExportError(
            f"{path}, line {line}: the accession number of line {lines_of[key][0]} again, with "
            f"other labels{more}; correct the file, or skip conflicting labels "
            "(--skip-conflicting-labels) to leave those studies unlabelled"
        )
    for key in clashes:
        del by_accession[key]
    return Labels(str(path), columns, by_accession, conflicts)


@dataclass(frozen=True)
class _Identity:
    pseudonym: str | None
    accession: str | None
    age: int | None
    sex: str | None
    scanner: str | None
    field_strength: float | None
    #: identified: only the interval to the patient's first study leaves this module
    study_date: dt.date | None


def age_at(birth_date: str | None, day: dt.date | None) -> int | None:
    """Whole years at ``day`` from a DICOM birth date (YYYYMMDD), 90 and over as
    :data:`AGE_CAP`; None when either date is unknown or unreadable."""
    if not birth_date or day is None:
        return None
    try:
        born = dt.datetime.strptime(birth_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    return min(years, AGE_CAP) if years >= 0 else None


def _identities(session: Session, pseudo_series: Iterable[str]) -> dict[str, _Identity]:
    """Pseudonymized series UID -> who and what it is (identified side)."""
    wanted = set(pseudo_series)
    identified: dict[str, str] = {}
    for outputs in session.scalars(select(StudyStep.outputs).where(StudyStep.step == "anonymize")):
        linked = (outputs or {}).get("_linked_series")
        if isinstance(linked, dict):
            for source, pseudo in linked.items():
                if pseudo in wanted:
                    identified[str(source)] = str(pseudo)
    if not identified:
        return {}
    query = (
        select(
            Series.series_instance_uid,
            Series.manufacturer,
            Series.manufacturer_model_name,
            Series.magnetic_field_strength,
            Study.accession_number,
            Study.study_date,
            Patient.patient_birth_date,
            Patient.patient_sex,
            Linkage.pseudonym,
        )
        .join(Study, Series.study_pk == Study.id, isouter=True)
        .join(Patient, Study.patient_pk == Patient.id, isouter=True)
        .join(Linkage, Linkage.patient_key == Patient.patient_key, isouter=True)
        .where(Series.series_instance_uid.in_(list(identified)))
    )
    found = {}
    for uid, maker, model, tesla, accession, date, birth, sex, pseudonym in session.execute(query):
        scanner = " ".join(x for x in (maker, model) if x) or None
        found[identified[uid]] = _Identity(
            pseudonym, accession, age_at(birth, date), sex or None, scanner, tesla, date
        )
    return found


@dataclass(frozen=True)
class _Outcome:
    status: str  # the worst over every stage and volumetry's own verdict
    reason: str | None  # the deciding reason (the first failure in flow order, else warning)
    failed: frozenset[str]  # the stages that failed the series


def _verdicts(session: Session, rows: Sequence[BiomarkerRecord]) -> dict[str, _Outcome]:
    by_series: dict[str, list[tuple[str, str, str | None]]] = {}
    for uid, stage, status, reason in session.execute(
        select(
            StageResult.series_uid, StageResult.stage, StageResult.status, StageResult.reason_code
        ).where(StageResult.series_uid.in_([r.series_uid for r in rows]))
    ):
        by_series.setdefault(uid, []).append((stage, status, reason))
    out = {}
    for r in rows:
        found = [*by_series.get(r.series_uid, []), ("volumetry", r.qc_status, r.qc_reason)]
        status, _, reason = worst_verdict(found)
        failed = frozenset(stage for stage, s, _ in found if s == "fail")
        out[r.series_uid] = _Outcome(status, reason, failed)
    return out


def biomarker_table(
    session: Session, protocol: str | None = None, labels: Labels | None = None
) -> BiomarkerTable:
    """One row per measured T1 (of ``protocol``), labels joined by accession number."""
    measured = biomarker_records(session, protocol)
    who = _identities(session, (r.series_uid for r in measured))
    verdicts = _verdicts(session, measured)
    decisions = latest_reviews(session, [r.series_uid for r in measured])
    matched: set[str] = set()
    baseline: dict[str, dt.date] = {}
    for known in who.values():
        if known.pseudonym and known.study_date:
            first = baseline.get(known.pseudonym, known.study_date)
            baseline[known.pseudonym] = min(first, known.study_date)
    rows = []
    for r in measured:
        identity = who.get(r.series_uid)
        verdict = verdicts[r.series_uid]
        decision = decisions.get(r.series_uid)
        values: dict[str, str] = {}
        if labels is not None and identity is not None and identity.accession:
            values = labels.by_accession.get(identity.accession, {})
            if values:
                matched.add(identity.accession)
        rows.append(
            BiomarkerRow(
                pseudonym=identity.pseudonym if identity else None,
                study=r.study_uid,
                series=r.series_uid,
                protocol=r.protocol,
                age=identity.age if identity else None,
                years_since_baseline=_years_since(identity, baseline),
                sex=identity.sex if identity else None,
                scanner=identity.scanner if identity else None,
                field_strength=identity.field_strength if identity else None,
                volumes=r.volumes,
                qc_verdict=verdict.status,
                qc_reason=verdict.reason,
                review=decision,
                usable=not still_failing(verdict.failed, decision),
                method=r.method,
                method_version=r.method_version,
                labels=dict(values),
            )
        )
    unmatched = len(labels.by_accession) - len(matched) if labels is not None else 0
    return BiomarkerTable(
        rows,
        labels.columns if labels is not None else (),
        labels_unmatched=unmatched,
        labels_matched=len(matched),
    )


def _years_since(identity: _Identity | None, baseline: Mapping[str, dt.date]) -> float | None:
    if identity is None or not identity.pseudonym or identity.study_date is None:
        return None
    days = (identity.study_date - baseline[identity.pseudonym]).days
    return round(days / 365.25, 4)


def write_table(table: BiomarkerTable, target: Path | io.TextIOBase, fmt: str) -> None:
    """Write the table as CSV (to a path or a text stream) or Parquet (to a path)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    records = table.records()
    if fmt == "csv":
        if isinstance(target, Path):
            with target.open("w", newline="", encoding="utf-8") as out:
                _write_csv(table, records, out)
        else:
            _write_csv(table, records, target)
        return
    if not isinstance(target, Path):
        raise ExportError("Parquet is written to a file: give --out PATH")
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {
        "age": pa.int32(),
        "years_since_baseline": pa.float64(),
        "field_strength": pa.float64(),
        "usable": pa.bool_(),
    }
    types.update({name: pa.float64() for name in VOLUME_NAMES})
    schema = pa.schema(
        [(name, types.get(name, pa.string())) for name in COLUMNS]
        + [(name, pa.string()) for name in table.label_columns]
    )
    pq.write_table(pa.Table.from_pylist(records, schema=schema), target)


def _write_csv(table: BiomarkerTable, records: list[dict[str, Any]], out: Any) -> None:
    writer = csv.DictWriter(out, fieldnames=list(table.columns), lineterminator="\n")
    writer.writeheader()
    for record in records:
        # repr of a float round-trips exactly: the file holds the index's values
        writer.writerow({k: ("" if v is None else neutralised(v)) for k, v in record.items()})


#: the table's other numeric columns, empty when unknown (a CSV holds text)
_NUMBERS: dict[str, type[int] | type[float]] = {
    "age": int,
    "years_since_baseline": float,
    "field_strength": float,
}


def read_table(path: Path) -> list[dict[str, Any]]:
    """Read back an exported table (CSV or Parquet) as records: statistics on a file."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_table(path).to_pylist())
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot read the table {path}: {exc}") from exc
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ExportError(f"cannot read the table {path}: {exc.strerror}") from exc
    for row in rows:
        for key, value in row.items():
            if isinstance(value, str):
                row[key] = restore(value)
        for name in VOLUME_NAMES:
            try:
                row[name] = float(row[name])
            except (KeyError, ValueError) as exc:
                raise ExportError(f"{path}: column {name} missing or not a number") from exc
        row["usable"] = str(row.get("usable", "")).lower() == "true"
        for name, kind in _NUMBERS.items():
            value = row.get(name)
            if value in (None, ""):
                row[name] = None
                continue
            try:
                row[name] = kind(value)
            except ValueError as exc:
                raise ExportError(f"{path}: column {name} holds {value!r}, not a number") from exc
    return rows


def audit_export(
    session: Session, table: BiomarkerTable, protocol: str | None, fmt: str, actor: str | None
) -> None:
    """Every export lands in the audit log: what, how many rows, which labels."""
    detail = {
        "protocol": protocol,
        "format": fmt,
        "rows": len(table.rows),
        "label_columns": list(table.label_columns),
    }
    audit(session, "export.biomarkers", json.dumps(detail), actor=actor)
