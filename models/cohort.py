"""Cohort discovery: feasibility counts and cohort lists over the archive index, in two layers.

* The **de-identified layer** (the default, for every reader) shows pseudonyms, pseudonymized
  UIDs, shifted dates and ages (90 and over as 90) only. Its date filters and years are the
  shifted ones, and a grouped count with fewer than ``min_cell`` patients in a cell is
  suppressed (and, when a table would let a suppressed cell be worked out from the total, the
  next smallest cell too).
* The **identified layer** adds patient IDs, accession numbers, real dates and UIDs; the callers
  let only the steward role in, and every use is written to the audit log here.

Queries read ``cohort_series`` (one row per archived series, kept by
``pipelines.cohort.refresh``) and ``cohort_protocols``. Filters are parsed from text (command
line options, URL query) by one registry, ``FILTERS``; every value is a bound parameter, never
SQL. Free patterns are RE2 regular expressions (``google-re2``: linear time in the text, so no
pattern can hang a request or the command line; no look-around or back-references; at most
``MAX_PATTERN_LENGTH`` characters) matched in Python against the distinct values of their
(indexed) column, so SQLite and PostgreSQL agree on what they mean and neither runs a pattern.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    delete,
    distinct,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.orm import Session, aliased

from cohortflow.models.disclosure import Disclosure, cell_key
from cohortflow.models.errors import CohortQueryError, did_you_mean
from cohortflow.models.linkage import audit
from cohortflow.models.repository import chunks, now
from cohortflow.models.schema import (
    CohortMember,
    CohortProtocol,
    CohortSeries,
    Patient,
    SavedCohort,
    Series,
    Study,
)

DEIDENTIFIED, IDENTIFIED = "deidentified", "identified"
LAYERS = (DEIDENTIFIED, IDENTIFIED)
#: cells with fewer patients than this are suppressed in the de-identified layer (default)
MIN_CELL_PATIENTS = 5
QC_VERDICTS = ("pass", "warn", "fail", "none")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*(:[A-Za-z][A-Za-z0-9_-]*)?$")


@dataclass(frozen=True)
class FilterSpec:
    """One filter: its name (``--field-strength`` on the command line, ``field_strength`` in a
    URL), the syntax of its value and what it reads."""

    name: str
    kind: str  # values, pattern, range, dates, choice, protocol
    help: str
    choices: tuple[str, ...] = ()


FILTERS: tuple[FilterSpec, ...] = (
    FilterSpec("cohort", "cohort", "only the series of this saved cohort"),
    FilterSpec("modality", "values", "Modality, e.g. MR or MR,CT"),
    FilterSpec(
        "protocol",
        "protocol",
        "series a protocol of protocols.yaml selects, by its rules: NAME or NAME:ROLE "
        "(e.g. dementia:t1_3d), several separated by commas",
    ),
    FilterSpec("protocol_name", "pattern", "regular expression searched in ProtocolName"),
    FilterSpec("series_description", "pattern", "regular expression searched in SeriesDescription"),
    FilterSpec("study_description", "pattern", "regular expression searched in StudyDescription"),
    FilterSpec("body_part", "pattern", "regular expression searched in BodyPartExamined"),
    FilterSpec(
        "date",
        "dates",
        "study date range FIRST..LAST (YYYY, YYYY-MM or YYYY-MM-DD; either side may be left "
        "out); shifted dates in the de-identified layer",
    ),
    FilterSpec("manufacturer", "pattern", "regular expression searched in Manufacturer"),
    FilterSpec("model", "pattern", "regular expression searched in ManufacturerModelName"),
    FilterSpec(
        "field_strength",
        "range",
        "nominal field strength in T (the reported one to the nearest 0.5): 3, 1..2, 3..",
    ),
    FilterSpec("slice_thickness", "range", "SliceThickness in mm: ..1.2, 1..3"),
    FilterSpec("acquisition", "choice", "MRAcquisitionType", ("3D", "2D")),
    FilterSpec(
        "age", "range", "age in whole years at the scan (90 means 90 and over): 65.., 40..60"
    ),
    FilterSpec("sex", "values", "PatientSex: F, M, O (several separated by commas)"),
    FilterSpec(
        "qc", "values", "the QC verdict after reviews: pass, warn, fail, none (not judged yet)"
    ),
    FilterSpec(
        "biomarkers", "choice", "yes: measured and usable brain volumes; no: none", ("yes", "no")
    ),
)
FILTER_NAMES = tuple(f.name for f in FILTERS)
_SPECS = {f.name: f for f in FILTERS}

#: what counts can be grouped by
GROUPS = (
    "year",
    "scanner",
    "protocol",
    "role",
    "sex",
    "age_band",
    "modality",
    "field_strength",
    "manufacturer",
    "body_part",
    "acquisition",
    "qc",
    "biomarkers",
)


@dataclass(frozen=True)
class Bounds:
    """An inclusive numeric range; either end may be open."""

    low: float | None
    high: float | None


@dataclass(frozen=True)
class DateBounds:
    first: dt.date | None
    last: dt.date | None


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CohortQueryError(f"filter {name}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CohortQueryError(f"filter {name}: {text!r} is not a finite number")
    return value


def _parse_range(name: str, text: str) -> Bounds:
    low_text, dots, high_text = text.partition("..")
    if not dots:
        value = _number(name, text)
        return Bounds(value, value)
    if not low_text.strip() and not high_text.strip():
        raise CohortQueryError(f"filter {name}: {text!r} is empty: use MIN..MAX, MIN.. or ..MAX")
    low = _number(name, low_text.strip()) if low_text.strip() else None
    high = _number(name, high_text.strip()) if high_text.strip() else None
    if low is not None and high is not None and high < low:
        raise CohortQueryError(f"filter {name}: {text!r} ends before it starts")
    return Bounds(low, high)


def _parse_day(name: str, text: str, end: bool) -> dt.date:
    """YYYY, YYYY-MM or YYYY-MM-DD; the first or (``end``) the last day of the period."""
    parts = text.split("-")
    try:
        if len(parts) == 1 and len(parts[0]) == 4:
            year = int(parts[0])
            return dt.date(year, 12, 31) if end else dt.date(year, 1, 1)
        if len(parts) == 2 and len(parts[0]) == 4:
            year, month = int(parts[0]), int(parts[1])
            last = calendar.monthrange(year, month)[1]
            return dt.date(year, month, last if end else 1)
        if len(parts) == 3 and len(parts[0]) == 4:
            return dt.date.fromisoformat(text)
    except ValueError:
        pass
    raise CohortQueryError(
        f"filter {name}: {text!r} is not a date: use YYYY, YYYY-MM or YYYY-MM-DD"
    )


def _parse_dates(name: str, text: str) -> DateBounds:
    first_text, dots, last_text = text.partition("..")
    if not dots:
        return DateBounds(_parse_day(name, text, False), _parse_day(name, text, True))
    first_text, last_text = first_text.strip(), last_text.strip()
    if not first_text and not last_text:
        raise CohortQueryError(f"filter {name}: {text!r} is empty: use FIRST..LAST")
    first = _parse_day(name, first_text, False) if first_text else None
    last = _parse_day(name, last_text, True) if last_text else None
    if first and last and last < first:
        raise CohortQueryError(f"filter {name}: {text!r} ends before it starts")
    return DateBounds(first, last)


#: the longest pattern a filter takes (characters)
MAX_PATTERN_LENGTH = 200


class Pattern(Protocol):
    """A compiled pattern (RE2's): what a filter keeps and the queries search with."""

    @property
    def pattern(self) -> str: ...

    def search(self, text: str) -> object | None: ...


def _parse_pattern(name: str, text: str) -> Pattern:
    """``text`` compiled by RE2, case-insensitive: matching takes time linear in the value,
    whatever the pattern (Python's ``re`` backtracks: ``(a+)+$`` doubled its time with every
    character of the value)."""
    import re2

    if len(text) > MAX_PATTERN_LENGTH:
        raise CohortQueryError(
            f"filter {name}: the pattern has {len(text)} characters; at most "
            f"{MAX_PATTERN_LENGTH} are taken"
        )
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # the error is the user's answer, not a log line
    try:
        return cast(Pattern, re2.compile(text, options))
    except re2.error as exc:
        why = (
            exc.args[0].decode(errors="replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else str(exc)
        )
        raise CohortQueryError(
            f"filter {name}: {text!r} is not a regular expression this search takes ({why}; "
            "RE2 syntax: no look-around or back-references)"
        ) from None


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class CohortFilter:
    """Parsed filters; ``given`` keeps the text they came from (what a saved cohort stores)."""

    given: Mapping[str, str] = field(default_factory=dict)
    cohort: str | None = None
    modality: tuple[str, ...] = ()
    protocol: tuple[tuple[str, str | None], ...] = ()
    patterns: Mapping[str, Pattern] = field(default_factory=dict)
    date: DateBounds | None = None
    field_strength: Bounds | None = None
    slice_thickness: Bounds | None = None
    acquisition: str | None = None
    age: Bounds | None = None
    sex: tuple[str, ...] = ()
    qc: tuple[str, ...] = ()
    biomarkers: bool | None = None

    @classmethod
    def parse(
        cls,
        values: Mapping[str, str | None],
        protocols: Mapping[str, Sequence[str]] | None = None,
    ) -> CohortFilter:
        """Parse ``{filter: text}`` (empty values ignored). ``protocols`` (name -> roles) lets
        unknown protocol names fail here. Raises CohortQueryError naming the filter."""
        given = {k: str(v).strip() for k, v in values.items() if v is not None and str(v).strip()}
        parsed: dict[str, Any] = {}
        patterns: dict[str, Pattern] = {}
        for name, text in given.items():
            spec = _SPECS.get(name)
            if spec is None:
                raise CohortQueryError(
                    f"unknown filter {name!r}{did_you_mean(name, FILTER_NAMES)}; filters: "
                    + ", ".join(FILTER_NAMES)
                )
            if spec.kind == "pattern":
                patterns[name] = _parse_pattern(name, text)
            elif spec.kind == "range":
                parsed[name] = _parse_range(name, text)
            elif spec.kind == "dates":
                parsed[name] = _parse_dates(name, text)
            elif spec.kind == "choice":
                match = [c for c in spec.choices if c.lower() == text.lower()]
                if not match:
                    raise CohortQueryError(
                        f"filter {name}: {text!r} is not one of {', '.join(spec.choices)}"
                    )
                parsed[name] = (match[0] == "yes") if name == "biomarkers" else match[0]
            elif spec.kind == "protocol":
                parsed[name] = _parse_protocols(text, protocols)
            elif spec.kind == "cohort":
                if not _NAME.fullmatch(text):
                    raise CohortQueryError(f"filter cohort: {text!r} is not a cohort name")
                parsed[name] = text
            elif name == "sex":
                sexes = tuple(v.upper() for v in _split(text))
                bad = [v for v in sexes if v not in ("F", "M", "O")]
                if bad or not sexes:
                    raise CohortQueryError(f"filter sex: {text!r}: use F, M or O")
                parsed[name] = sexes
            elif name == "qc":
                verdicts = tuple(v.lower() for v in _split(text))
                bad = [v for v in verdicts if v not in QC_VERDICTS]
                if bad or not verdicts:
                    raise CohortQueryError(
                        f"filter qc: {text!r}: use {', '.join(QC_VERDICTS)} (comma-separated)"
                    )
                parsed[name] = verdicts
            else:  # modality
                found = tuple(v.upper() for v in _split(text))
                if not found or any(not re.fullmatch(r"[A-Z0-9_ ]{1,16}", v) for v in found):
                    raise CohortQueryError(f"filter {name}: {text!r} is not a list of codes")
                parsed[name] = found
        return cls(given=given, patterns=patterns, **parsed)


def _parse_protocols(
    text: str, protocols: Mapping[str, Sequence[str]] | None
) -> tuple[tuple[str, str | None], ...]:
    chosen: list[tuple[str, str | None]] = []
    for item in _split(text):
        if not _PROTOCOL.fullmatch(item):
            raise CohortQueryError(f"filter protocol: {item!r}: use NAME or NAME:ROLE")
        name, _, role = item.partition(":")
        if protocols is not None:
            if name not in protocols:
                raise CohortQueryError(
                    f"filter protocol: no protocol {name!r}{did_you_mean(name, list(protocols))}"
                    f"; protocols: {', '.join(sorted(protocols))}"
                )
            if role and role not in protocols[name]:
                raise CohortQueryError(
                    f"filter protocol: protocol {name} has no include rule {role!r}"
                    f"{did_you_mean(role, list(protocols[name]))}; rules: "
                    + ", ".join(protocols[name])
                )
        chosen.append((name, role or None))
    if not chosen:
        raise CohortQueryError(f"filter protocol: {text!r} names no protocol")
    return tuple(chosen)


def parse_groups(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``year,scanner`` -> ("year", "scanner"); unknown names raise CohortQueryError."""
    if text is None:
        return ()
    items = _split(text) if isinstance(text, str) else tuple(t for t in text if t)
    for item in items:
        if item not in GROUPS:
            raise CohortQueryError(
                f"cannot group by {item!r}{did_you_mean(item, GROUPS)}; groups: "
                + ", ".join(GROUPS)
            )
    if len(set(items)) != len(items):
        raise CohortQueryError(f"grouping {','.join(items)} names a group twice")
    return tuple(items)


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise CohortQueryError(f"unknown layer {layer!r}: {' or '.join(LAYERS)}")


# --- the query ----------------------------------------------------------------------------------

_PATTERN_COLUMNS = {
    "protocol_name": CohortSeries.protocol_name,
    "series_description": CohortSeries.series_description,
    "study_description": CohortSeries.study_description,
    "body_part": CohortSeries.body_part,
    "manufacturer": CohortSeries.manufacturer,
    "model": CohortSeries.model,
}


def _in_range(column: Any, bounds: Bounds) -> ColumnElement[bool]:
    parts = []
    if bounds.low is not None:
        parts.append(column >= bounds.low)
    if bounds.high is not None:
        parts.append(column <= bounds.high)
    return and_(*parts)


def _protocol_match(
    chosen: Sequence[tuple[str, str | None]], table: Any = CohortProtocol
) -> ColumnElement[bool]:
    return or_(
        *(
            and_(table.protocol == name, table.role == role) if role else table.protocol == name
            for name, role in chosen
        )
    )


def _conditions(session: Session, flt: CohortFilter, layer: str) -> list[ColumnElement[bool]]:
    cs = CohortSeries
    where: list[ColumnElement[bool]] = []
    if flt.cohort is not None:
        where.append(member_filter(session, flt.cohort))
    if flt.modality:
        where.append(cs.modality.in_(flt.modality))
    if flt.protocol:
        # an uncorrelated IN: the database walks the protocol's index to the few series it
        # names, instead of testing every series (aliased: apart from the table a grouping by
        # protocol joins)
        chosen = aliased(CohortProtocol)
        where.append(
            cs.series_pk.in_(select(chosen.series_pk).where(_protocol_match(flt.protocol, chosen)))
        )
    for name, pattern in flt.patterns.items():
        where.append(_pattern_condition(session, _PATTERN_COLUMNS[name], pattern))
    if flt.date is not None:
        day = cs.shifted_date if layer == DEIDENTIFIED else cs.study_date
        if flt.date.first is not None:
            where.append(day >= flt.date.first)
        if flt.date.last is not None:
            where.append(day <= flt.date.last)
    if flt.field_strength is not None:
        where.append(_in_range(cs.field_strength, flt.field_strength))
    if flt.slice_thickness is not None:
        where.append(_in_range(cs.slice_thickness, flt.slice_thickness))
    if flt.acquisition is not None:
        where.append(cs.acquisition == flt.acquisition)
    if flt.age is not None:
        where.append(_in_range(cs.age, flt.age))
    if flt.sex:
        where.append(cs.sex.in_(flt.sex))
    if flt.qc:
        judged = [v for v in flt.qc if v != "none"]
        options = [cs.qc_verdict.in_(judged)] if judged else []
        if "none" in flt.qc:
            options.append(cs.qc_verdict.is_(None))
        where.append(or_(*options))
    if flt.biomarkers is not None:
        where.append(cs.biomarkers.is_(flt.biomarkers))
    return where


#: the most values a pattern's condition lists (database parameter limits lie above)
MAX_LISTED_VALUES = 5000


def _pattern_condition(session: Session, column: Any, pattern: Pattern) -> ColumnElement[bool]:
    """The rows whose ``column`` the pattern finds something in: the matching distinct values
    as a list (or the others, when fewer), so every backend gives the pattern the same meaning
    and no database runs it (SQLite's REGEXP is Python's backtracking ``re``). Lists longer than
    MAX_LISTED_VALUES are written into the statement as literals (database parameter limits);
    the values are the column's own, never the user's text."""
    seen = session.scalars(select(column).where(column.is_not(None)).distinct()).all()
    hits = [v for v in seen if v is not None and pattern.search(v)]
    misses = (
        []
        if len(hits) <= MAX_LISTED_VALUES
        else [v for v in seen if v is not None and not pattern.search(v)]
    )
    if len(hits) <= MAX_LISTED_VALUES or len(hits) <= len(misses):
        return column.in_(_listed(hits))  # type: ignore[no-any-return]
    return and_(column.is_not(None), column.not_in(_listed(misses)))


def _listed(values: list[str]) -> Any:
    """``values`` for an IN list: bound parameters, or literals beyond MAX_LISTED_VALUES."""
    if len(values) <= MAX_LISTED_VALUES:
        return values
    return bindparam(None, values, expanding=True, literal_execute=True)


def _group_column(group: str, layer: str, age_band: int) -> Any:
    cs = CohortSeries
    return {
        "year": cs.shifted_year if layer == DEIDENTIFIED else cs.study_year,
        "scanner": cs.scanner,
        "protocol": CohortProtocol.protocol,
        "role": CohortProtocol.protocol + ":" + CohortProtocol.role,
        "sex": cs.sex,
        "age_band": cs.age // age_band * age_band,
        "modality": cs.modality,
        "field_strength": cs.field_strength,
        "manufacturer": cs.manufacturer,
        "body_part": cs.body_part,
        "acquisition": cs.acquisition,
        "qc": cs.qc_verdict,
        "biomarkers": cs.biomarkers,
    }[group]


def _label(group: str, value: object, age_band: int) -> str:
    if value is None:
        if group == "qc":
            return "none"  # not judged yet: the qc filter's word
        return "(none)" if group in ("protocol", "role") else "(unknown)"
    if group == "age_band":
        low = int(value)  # type: ignore[call-overload]
        return "90+" if low >= 90 else f"{low}-{min(low + age_band - 1, 89)}"
    if group == "field_strength":
        return f"{float(value):g} T"  # type: ignore[arg-type]
    if group == "biomarkers":
        return "yes" if value else "no"
    return str(value)


@dataclass(frozen=True)
class Cell:
    """One group's counts; every count is None when the cell is suppressed."""

    key: tuple[str, ...]
    patients: int | None
    studies: int | None
    series: int | None
    instances: int | None
    suppressed: str | None = None  # None, "small" (too few patients), "complementary"


@dataclass(frozen=True)
class CountResult:
    layer: str
    by: tuple[str, ...]
    filters: Mapping[str, str]
    min_cell: int
    total: Cell
    cells: tuple[Cell, ...]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "by": list(self.by),
            "filters": dict(self.filters),
            "min_cell_patients": self.min_cell if self.layer == DEIDENTIFIED else None,
            "total": _cell_dict(self.total, ()),
            "cells": [_cell_dict(c, self.by) for c in self.cells],
            "seconds": round(self.seconds, 4),
        }


def _cell_dict(cell: Cell, by: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(zip(by, cell.key, strict=True))
    out.update(
        patients=cell.patients,
        studies=cell.studies,
        series=cell.series,
        instances=cell.instances,
        suppressed=cell.suppressed,
    )
    return out


def _needs_protocol_join(by: Sequence[str]) -> bool:
    return "protocol" in by or "role" in by


def _counting(joined: bool) -> list[Any]:
    """Patients, studies, series and instances (a series counted once when a grouping by
    protocol joined it to several rows), and the sums of the patients', studies' and series'
    record keys (the cell keys of models/disclosure.py)."""
    cs = CohortSeries
    series = func.count(distinct(cs.id)) if joined else func.count(cs.id)
    return [
        func.count(distinct(cs.patient_pk)),
        func.count(distinct(cs.study_pk)),
        series,
        func.coalesce(func.sum(cs.instances), 0),
        func.coalesce(func.sum(distinct(cs.patient_rkey)), 0),
        func.coalesce(func.sum(distinct(cs.study_rkey)), 0),
        func.coalesce(func.sum(distinct(cs.series_rkey)), 0),
    ]


#: the counts of a cell and the record keys each one's noise is keyed by
_KINDS = (("patients", 0), ("studies", 1), ("series", 2), ("instances", 2))


def count(
    session: Session,
    flt: CohortFilter,
    by: Sequence[str] = (),
    *,
    layer: str = DEIDENTIFIED,
    disclosure: Disclosure | None = None,
    age_band: int = 10,
    actor: str | None = None,
) -> CountResult:
    """Patients, studies, series and instances matching ``flt``, in total and per group.

    In the de-identified layer (which needs ``disclosure``) a cell (and the total) with fewer
    than ``disclosure.min_cell`` patients is suppressed, and so is the next smallest cell when
    only one was (or the total would give it away); every count shown is perturbed and rounded
    (models/disclosure.py). Every count is audited with ``actor`` and what it showed.
    """
    _check_layer(layer)
    if age_band < 1:
        raise CohortQueryError(f"age band width {age_band}: use 1 year or more")
    if layer == DEIDENTIFIED and disclosure is None:
        raise CohortQueryError("de-identified counts need disclosure control (the project key)")
    started = time.perf_counter()
    where = _conditions(session, flt, layer)
    total_row = session.execute(select(*_counting(False)).where(*where)).one()
    total = _cell((), total_row)
    keys: dict[tuple[str, ...], tuple[int, int, int]] = {(): _keys(total_row)}
    cells: list[Cell] = []
    if by:
        joined = _needs_protocol_join(by)
        columns = [_group_column(g, layer, age_band) for g in by]
        query: Select[Any] = select(*columns, *_counting(joined)).where(*where)
        if joined:
            on = CohortProtocol.series_pk == CohortSeries.series_pk
            if flt.protocol:
                on = and_(on, _protocol_match(flt.protocol))
            query = query.outerjoin(CohortProtocol, on)
        for row in session.execute(query.group_by(*columns)):
            key = tuple(_label(g, v, age_band) for g, v in zip(by, row[: len(by)], strict=True))
            cells.append(_cell(key, row[len(by) :]))
            keys[key] = _keys(row[len(by) :])
        cells.sort(key=lambda c: tuple((k.startswith("("), k) for k in c.key))
    min_cell = 0
    if disclosure is not None and layer == DEIDENTIFIED:
        min_cell = disclosure.min_cell
        total, cells = _suppress(total, cells, min_cell)
        total = _perturbed(total, keys[()], disclosure)
        cells = [_perturbed(c, keys[c.key], disclosure) for c in cells]
        _audit_query(session, "count", flt, actor, {"by": list(by), **_answer(total, cells)})
    else:
        _audit_identified(
            session, "count", flt, actor, {"by": list(by), "patients": total.patients}
        )
    return CountResult(
        layer, tuple(by), dict(flt.given), min_cell, total, tuple(cells),
        time.perf_counter() - started,
    )  # fmt: skip


def _cell(key: tuple[str, ...], counts: Sequence[Any]) -> Cell:
    patients, studies, series, instances = (int(v) for v in counts[:4])
    return Cell(key, patients, studies, series, instances)


def _keys(counts: Sequence[Any]) -> tuple[int, int, int]:
    return (cell_key(counts[4]), cell_key(counts[5]), cell_key(counts[6]))


def _perturbed(cell: Cell, keys: tuple[int, int, int], disclosure: Disclosure) -> Cell:
    """A shown cell's counts perturbed and rounded (a suppressed one stays as it is)."""
    if cell.suppressed is not None or cell.patients is None:
        return cell
    p, st, se, i = (
        disclosure.shown(int(getattr(cell, kind)), keys[which], kind) for kind, which in _KINDS
    )
    return Cell(cell.key, p, st, se, i)


def _answer(total: Cell, cells: Sequence[Cell]) -> dict[str, Any]:
    """What a de-identified count showed, for its audit entry."""
    return {
        "patients": total.patients if total.suppressed is None else total.suppressed,
        "cells": {"/".join(c.key): c.patients if c.suppressed is None else c.suppressed
                  for c in cells},
    }  # fmt: skip


def _audit_query(
    session: Session, what: str, flt: CohortFilter, actor: str | None, detail: Mapping[str, Any]
) -> None:
    """Every de-identified query is audited: who asked what and what they were shown."""
    payload = {"what": what, "filters": dict(flt.given), **detail}
    audit(session, f"cohort.query.{what}", json.dumps(payload, default=str), actor=actor)


def _hidden(cell: Cell, why: str) -> Cell:
    return Cell(cell.key, None, None, None, None, why)


def _suppress(total: Cell, cells: list[Cell], min_cell: int) -> tuple[Cell, list[Cell]]:
    small = [c for c in cells if (c.patients or 0) < min_cell]
    shown = [c for c in cells if (c.patients or 0) >= min_cell]
    hidden = {c.key: _hidden(c, "small") for c in small}
    total_small = 0 < (total.patients or 0) < min_cell
    if len(hidden) == 1 and shown and not total_small:
        # the total minus the shown cells would give the one hidden cell away
        smallest = min(shown, key=lambda c: (c.patients or 0, c.key))
        hidden[smallest.key] = _hidden(smallest, "complementary")
    out = [hidden.get(c.key, c) for c in cells]
    return (_hidden(total, "small") if total_small else total), out


def _audit_identified(
    session: Session, what: str, flt: CohortFilter, actor: str | None, detail: Mapping[str, Any]
) -> None:
    if not actor:
        raise CohortQueryError("the identified layer needs the name of the steward using it")
    payload = {"what": what, "filters": dict(flt.given), **detail}
    audit(session, f"cohort.identified.{what}", json.dumps(payload, default=str), actor=actor)


# --- lists --------------------------------------------------------------------------------------

#: the columns of a cohort list, per layer
DEIDENTIFIED_COLUMNS = (
    "pseudonym",
    "study",
    "series",
    "date",
    "age",
    "sex",
    "modality",
    "protocols",
    "series_description",
    "protocol_name",
    "body_part",
    "scanner",
    "field_strength",
    "slice_thickness",
    "acquisition",
    "instances",
    "qc",
    "biomarkers",
)
IDENTIFIED_COLUMNS = (
    "patient_id",
    "accession_number",
    "study_instance_uid",
    "series_instance_uid",
    "study_date",
    *DEIDENTIFIED_COLUMNS,
)


@dataclass(frozen=True)
class CohortList:
    layer: str
    filters: Mapping[str, str]
    columns: tuple[str, ...]
    rows: tuple[Mapping[str, Any], ...]
    total: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "filters": dict(self.filters),
            "total": self.total,
            "offset": self.offset,
            "columns": list(self.columns),
            "rows": [dict(r) for r in self.rows],
        }


def _enough_patients(
    session: Session, where: Sequence[Any], disclosure: Disclosure | None, what: str
) -> None:
    """Refuse a de-identified ``what`` of fewer than the smallest cell's patients."""
    if disclosure is None:
        raise CohortQueryError(f"a de-identified {what} needs disclosure control (the project key)")
    patients = session.scalar(select(func.count(distinct(CohortSeries.patient_pk))).where(*where))
    if int(patients or 0) < disclosure.min_cell:
        raise CohortQueryError(
            f"fewer than {disclosure.min_cell} patients match these filters: the de-identified "
            f"layer makes no {what} of so few (cohort.min_cell_patients); widen the filters, "
            "or ask a data steward"
        )


def list_series(
    session: Session,
    flt: CohortFilter,
    *,
    layer: str = DEIDENTIFIED,
    disclosure: Disclosure | None = None,
    limit: int | None = 100,
    offset: int = 0,
    actor: str | None = None,
) -> CohortList:
    """The series matching ``flt`` in the layer's columns, by date then pseudonym. A
    de-identified list (which needs ``disclosure``) of fewer than its smallest cell's patients
    is refused. Every list is audited with ``actor``."""
    _check_layer(layer)
    cs = CohortSeries
    where = _conditions(session, flt, layer)
    if layer == DEIDENTIFIED:
        _enough_patients(session, where, disclosure, "list")
    total = int(session.scalar(select(func.count(cs.id)).where(*where)) or 0)
    day = cs.shifted_date if layer == DEIDENTIFIED else cs.study_date
    columns: list[Any] = [cs]
    if layer == IDENTIFIED:
        columns += [
            Patient.patient_id,
            Study.accession_number,
            Study.study_instance_uid,
            Series.series_instance_uid,
        ]
    query = select(*columns).where(*where).order_by(day, cs.pseudonym, cs.id).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    if layer == IDENTIFIED:
        query = (
            query.join(Series, Series.id == cs.series_pk)
            .outerjoin(Study, Study.id == cs.study_pk)
            .outerjoin(Patient, Patient.id == cs.patient_pk)
        )
    found = session.execute(query).all()
    roles: dict[int, list[str]] = {}
    pks = [row[0].series_pk for row in found]
    for chunk in chunks(pks):
        for pk, protocol, role in session.execute(
            select(CohortProtocol.series_pk, CohortProtocol.protocol, CohortProtocol.role)
            .where(CohortProtocol.series_pk.in_(chunk))
            .order_by(CohortProtocol.protocol)
        ):
            roles.setdefault(pk, []).append(f"{protocol}:{role}")
    rows = []
    for row in found:
        c: CohortSeries = row[0]
        out: dict[str, Any] = {}
        if layer == IDENTIFIED:
            out.update(
                patient_id=row[1],
                accession_number=row[2],
                study_instance_uid=row[3],
                series_instance_uid=row[4],
                study_date=c.study_date.isoformat() if c.study_date else None,
            )
        out.update(
            pseudonym=c.pseudonym,
            study=c.pseudo_study_uid,
            series=c.pseudo_series_uid,
            date=c.shifted_date.isoformat() if c.shifted_date else None,
            age=c.age,
            sex=c.sex,
            modality=c.modality,
            protocols=",".join(roles.get(c.series_pk, [])),
            series_description=c.series_description,
            protocol_name=c.protocol_name,
            body_part=c.body_part,
            scanner=c.scanner,
            field_strength=c.field_strength,
            slice_thickness=c.slice_thickness,
            acquisition=c.acquisition,
            instances=c.instances,
            qc=c.qc_verdict,
            biomarkers=c.biomarkers,
        )
        rows.append(out)
    if layer == IDENTIFIED:
        _audit_identified(session, "list", flt, actor, {"rows": len(rows), "total": total})
    else:
        _audit_query(session, "list", flt, actor, {"rows": len(rows), "total": total})
    names = IDENTIFIED_COLUMNS if layer == IDENTIFIED else DEIDENTIFIED_COLUMNS
    return CohortList(layer, dict(flt.given), names, tuple(rows), total, offset)


# --- saved cohorts --------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedInfo:
    name: str
    description: str
    layer: str
    filters: Mapping[str, str]
    created_by: str
    created_at: dt.datetime
    patients: int
    studies: int
    series: int

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"] = self.created_at.isoformat()
        out["filters"] = dict(self.filters)
        return out


def _info(row: SavedCohort) -> SavedInfo:
    stored = row.filters
    return SavedInfo(
        row.name,
        row.description,
        str(stored.get("layer", DEIDENTIFIED)),
        dict(stored.get("where", {})),  # type: ignore[call-overload]
        row.created_by,
        row.created_at,
        row.patients,
        row.studies,
        row.series,
    )


def save_cohort(
    session: Session,
    name: str,
    flt: CohortFilter,
    *,
    actor: str,
    layer: str = DEIDENTIFIED,
    disclosure: Disclosure | None = None,
    description: str = "",
    replace: bool = False,
) -> SavedInfo:
    """Save the series matching ``flt`` now as cohort ``name`` (audited). ``replace`` renews a
    cohort of that name; without it an existing name is an error. In the de-identified layer
    (which needs ``disclosure``) a cohort of fewer than the smallest cell's patients is refused
    and the counts kept with it are perturbed as counts are."""
    _check_layer(layer)
    if not _NAME.fullmatch(name):
        raise CohortQueryError(
            f"cohort name {name!r}: use letters, digits, '.', '_' and '-' (at most 80)"
        )
    old = session.scalar(select(SavedCohort).where(SavedCohort.name == name))
    if old is not None:
        if not replace:
            raise CohortQueryError(
                f"a cohort named {name} exists: choose another name or replace it"
            )
        session.delete(old)
        session.flush()
    where = _conditions(session, flt, layer)
    if layer == DEIDENTIFIED:
        _enough_patients(session, where, disclosure, "saved cohort")
    members = session.execute(
        select(
            CohortSeries.series_pk,
            CohortSeries.study_pk,
            CohortSeries.patient_pk,
            CohortSeries.patient_rkey,
            CohortSeries.study_rkey,
            CohortSeries.series_rkey,
        )
        .where(*where, CohortSeries.study_pk.is_not(None))
        .order_by(CohortSeries.series_pk)
    ).all()
    if not members:
        raise CohortQueryError(f"cohort {name}: no series matches the filters; nothing saved")
    counts = {
        "patients": len({m.patient_pk for m in members if m.patient_pk is not None}),
        "studies": len({m.study_pk for m in members}),
        "series": len(members),
    }
    if layer == DEIDENTIFIED and disclosure is not None:
        # what a count of the same series shows: the same record keys, the same noise
        keys = (
            cell_key(sum({m.patient_rkey or 0 for m in members})),
            cell_key(sum({m.study_rkey or 0 for m in members})),
            cell_key(sum({m.series_rkey or 0 for m in members})),
        )
        counts = {kind: disclosure.shown(counts[kind], keys[which], kind)
                  for kind, which in _KINDS if kind in counts}  # fmt: skip
    row = SavedCohort(
        name=name,
        description=description,
        filters={"layer": layer, "where": dict(flt.given)},
        created_by=actor,
        created_at=now(),
        **counts,
    )
    session.add(row)
    session.flush()
    session.execute(
        insert(CohortMember),
        [{"cohort_id": row.id, "series_pk": m.series_pk, "study_pk": m.study_pk} for m in members],
    )
    detail = {"name": name, "layer": layer, "filters": dict(flt.given), "studies": row.studies,
              "series": row.series, "replaced": old is not None}  # fmt: skip
    audit(session, "cohort.save", json.dumps(detail), actor=actor)
    return _info(row)


def saved_cohorts(session: Session) -> list[SavedInfo]:
    return [_info(r) for r in session.scalars(select(SavedCohort).order_by(SavedCohort.name))]


def saved_cohort(session: Session, name: str) -> SavedInfo:
    row = session.scalar(select(SavedCohort).where(SavedCohort.name == name))
    if row is None:
        known = [r for r in session.scalars(select(SavedCohort.name))]
        raise CohortQueryError(
            f"no saved cohort {name!r}{did_you_mean(name, known)}"
            + (f"; saved: {', '.join(sorted(known))}" if known else "; none is saved yet")
        )
    return _info(row)


def delete_cohort(session: Session, name: str, *, actor: str) -> None:
    saved_cohort(session, name)
    session.execute(delete(SavedCohort).where(SavedCohort.name == name))
    audit(session, "cohort.delete", json.dumps({"name": name}), actor=actor)


def member_filter(session: Session, name: str) -> ColumnElement[bool]:
    """A condition on ``cohort_series`` selecting the saved cohort's series."""
    saved_cohort(session, name)
    cohort_id = select(SavedCohort.id).where(SavedCohort.name == name).scalar_subquery()
    return CohortSeries.series_pk.in_(
        select(CohortMember.series_pk).where(CohortMember.cohort_id == cohort_id)
    )


def cohort_studies(session: Session, name: str) -> list[tuple[int, str]]:
    """The saved cohort's studies as (studies.id, StudyInstanceUID), in UID order (identified
    side: for the flow that processes them, never shown)."""
    saved_cohort(session, name)
    rows = session.execute(
        select(Study.id, Study.study_instance_uid)
        .where(
            Study.id.in_(
                select(CohortMember.study_pk)
                .join(SavedCohort, SavedCohort.id == CohortMember.cohort_id)
                .where(SavedCohort.name == name)
            )
        )
        .order_by(Study.study_instance_uid)
    ).all()
    return [(pk, uid) for pk, uid in rows]


@dataclass(frozen=True)
class ManifestRow:
    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    series: int
    instances: int


def manifest(session: Session, name: str, *, actor: str) -> list[ManifestRow]:
    """The saved cohort's studies as a retrieval manifest (identifiers: audited with
    ``actor``)."""
    saved_cohort(session, name)
    rows = session.execute(
        select(
            Study.study_instance_uid,
            Study.accession_number,
            Study.study_date,
            func.count(CohortMember.series_pk),
            func.coalesce(func.sum(CohortSeries.instances), 0),
        )
        .join(CohortMember, CohortMember.study_pk == Study.id)
        .join(SavedCohort, SavedCohort.id == CohortMember.cohort_id)
        .outerjoin(CohortSeries, CohortSeries.series_pk == CohortMember.series_pk)
        .where(SavedCohort.name == name)
        .group_by(Study.id, Study.study_instance_uid, Study.accession_number, Study.study_date)
        .order_by(Study.study_instance_uid)
    ).all()
    out = [
        ManifestRow(uid, accession, day.isoformat() if day else None, int(n), int(instances))
        for uid, accession, day, n, instances in rows
    ]
    detail = {"what": "manifest", "name": name, "studies": len(out)}
    audit(session, "cohort.identified.manifest", json.dumps(detail), actor=actor)
    return out
