"""One cleaner for every de-identified text: DICOM descriptors in the anonymizer, descriptions in
the cohort layer, sidecars and the dashboard.

A description is free text an operator typed at the scanner, and it carries what they had at
hand: ``T2 Gregory House 99887766 15.04.1960`` (the referring physician, the record number, the
birth date written the local way). The cleaner removes

- the identifying values the data set (or the index) holds for this patient and study: the
  names (patient, referring and performing physicians, operators) and each of their parts, the
  IDs, the accession number, the institution, its address, the station and the device serial
  number (``IDENTIFYING``), in any case; a word of letters only where no letter adjoins it
  (``Sag`` the operator stays out of ``Sagittal``), a number where no digit adjoins it, an ID
  of letters and digits wherever it stands;
- every run of six digits or more (record numbers, a date written without separators);
- every date in a common written form, whether or not it is one of this patient's: numeric
  (``15.04.1960``, ``15/04/60``, ``1960-04-15``, ``4/15/1960``) and with a month name in
  English, German or French (``April 15 1960``, ``15 Apr 1960``, ``15. April 1960``,
  ``15-APR-60``, ``Apr 1960``).

A series description holds no date a study needs (the study date is an attribute of its own,
shifted by the anonymizer), so removing every date costs nothing and needs no knowledge of the
patient. ``CLEANER_VERSION`` changes with what the cleaner removes: tables of cleaned text are
rebuilt when it does (pipelines/cohort/refresh.py).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable
from typing import Any

#: Changes whenever the cleaner removes something it did not before.
CLEANER_VERSION = "2"

#: Identifying values a descriptor is cleaned of, read from the data set before it is changed.
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "StudyID",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
)

LONG_NUMBER = re.compile(r"\d{6,}")

#: Words of MR protocol names that are never removed as a name: a surname Sag, Cor or Flair is
#: indistinguishable from the plane or the sequence in a description, and taking them out would
#: make the series unrecognisable to the protocol rules downstream.
_TERMS = """
    sag sagittal cor coronal tra trans transverse axial obl oblique iso mpr mip
    flair space cube vista tse fse spin echo gre grass spgr bravo mprage memprage tfl tfe ffe
    vibe star blade propeller dwi dti swi swan bold perfusion asl pcasl diff trace adc
    fat sat water dixon post pre gado contrast head brain neck spine loc localizer scout survey
    hippo hippocampus temporal thin thick fast short long high low
"""
PROTOCOL_TERMS = frozenset(_TERMS.split())

_MONTHS = {
    # English, German, French: full names and the common abbreviations
    1: ("january", "jan", "januar", "jänner", "janvier", "janv"),
    2: ("february", "feb", "februar", "févr", "février", "fevrier", "fev"),
    3: ("march", "mar", "märz", "maerz", "mars", "mrz"),
    4: ("april", "apr", "avril", "avr"),
    5: ("may", "mai"),
    6: ("june", "jun", "juni", "juin"),
    7: ("july", "jul", "juli", "juillet", "juil"),
    8: ("august", "aug", "août", "aout"),
    9: ("september", "sep", "sept", "septembre"),
    10: ("october", "oct", "oktober", "okt", "octobre"),
    11: ("november", "nov", "novembre"),
    12: ("december", "dec", "dezember", "dez", "décembre", "decembre", "déc"),
}
_MONTH = (
    r"(?<![^\W\d_])(?:"  # not the end of a longer word
    + "|".join(sorted({m for ms in _MONTHS.values() for m in ms}, key=len)[::-1])
    + r")(?![^\W\d_])"
)
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th|er)?"
_YEAR = r"(?:1[89]\d\d|20\d\d|\d\d)"
_SEP = r"[ \t]*[./\-, ][ \t]*"
#: written dates, not inside a longer word or number (``T1 Apr 1960`` keeps its T1)
WRITTEN_DATE = re.compile(
    r"(?<![^\W_])(?<!\.)(?:"
    # day.month.year, month/day/year, with two- or four-digit years
    rf"(?:0?[1-9]|[12]\d|3[01])[./\-](?:0?[1-9]|1[0-2]|[12]\d|3[01])[./\-](?:1[89]\d\d|20\d\d|\d\d)"
    # year-month-day
    r"|(?:1[89]\d\d|20\d\d)[./\-](?:0?[1-9]|1[0-2])[./\-](?:0?[1-9]|[12]\d|3[01])"
    # 15 April 1960, 15. Apr. 60, 15-APR-1960
    rf"|{_DAY}\.?(?:{_SEP}|[ \t]*){_MONTH}\.?(?:{_SEP}|[ \t]*){_YEAR}"
    # April 15 1960, Apr 15, 1960, April 15th 1960
    rf"|{_MONTH}\.?{_SEP}{_DAY}\.?(?:{_SEP}|[ \t]*){_YEAR}"
    # April 1960
    rf"|{_MONTH}\.?{_SEP}(?:1[89]\d\d|20\d\d)"
    r")(?![\d])",
    re.IGNORECASE,
)


def identifying_words(split: Iterable[str], whole: Iterable[str] = ()) -> tuple[str, ...]:
    """The words a description must lose: each value of ``split`` and its parts (split at
    ``^``, spaces, ``,``, ``/``, ``=``, ``\\``), each of ``whole`` as it is; three characters or
    more, not a protocol term (``PROTOCOL_TERMS``), longest first."""
    found = set(whole)
    for value in split:
        found.add(value)
        found.update(re.split(r"[\^\s,/=\\]+", value))
    kept = (v for v in found if len(v.strip()) >= 3 and v.strip().lower() not in PROTOCOL_TERMS)
    return tuple(sorted(kept, key=lambda w: (-len(w), w)))


def written_forms(day: dt.date) -> tuple[str, ...]:
    """The ways a date is commonly written (for a release scan that looks for one patient's
    birth date): numeric with and without leading zeros, two- and four-digit years, in
    day-month-year, month-day-year and year-month-day order, and with English month names."""
    d, m, y = day.day, day.month, day.year
    years = (f"{y:04d}", f"{y % 100:02d}")
    days, months = {f"{d:02d}", str(d)}, {f"{m:02d}", str(m)}
    forms = {f"{y:04d}{m:02d}{d:02d}"}
    for sep in ".-/":
        for yy in years:
            for dd in days:
                for mm in months:
                    forms.add(f"{dd}{sep}{mm}{sep}{yy}")
                    forms.add(f"{mm}{sep}{dd}{sep}{yy}")
        for dd in days:
            for mm in months:
                forms.add(f"{y:04d}{sep}{mm}{sep}{dd}")
    name = dt.date(2000, m, 1).strftime("%B")
    for month in (name, name[:3]):
        forms.update(
            {
                f"{d} {month} {y:04d}",
                f"{d:02d} {month} {y:04d}",
                f"{month} {d} {y:04d}",
                f"{month} {d}, {y:04d}",
                f"{d:02d}-{month}-{y:04d}",
                f"{d}. {month} {y:04d}",
            }
        )
    return tuple(sorted(forms))


def _strip(text: str) -> str:
    """What a removal left: a run of one separator made one, separators at either end dropped."""
    return re.sub(r"([ _\-])\1+", r"\1", text).strip(" _-^/,.")


def _word(word: str) -> str:
    """The pattern of one identifying word: a name only where no letter adjoins it (an operator
    called Sag must not take the ``Sag`` out of ``Sagittal``), a number only where no digit
    adjoins it (StudyID 4711 is not in ``tfl47115``), an ID of letters and digits anywhere."""
    escaped = re.escape(word)
    if word.isdigit():
        return rf"(?<!\d){escaped}(?!\d)"
    if any(c.isdigit() for c in word):
        return escaped
    return rf"(?<![^\W\d_]){escaped}(?![^\W\d_])"


class Cleaner:
    """Removes ``words`` (any case), long digit runs and written dates from a text.

    Most descriptions hold none of them: a plain search for the words comes before a pattern
    is made, and the pattern of one set of words is made once."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = tuple(w for w in words if w.strip())
        self._lowered = tuple(w.lower() for w in self.words)
        self._patterns: dict[tuple[str, ...], re.Pattern[str]] = {}

    def _pattern(self, text: str) -> re.Pattern[str] | None:
        """The pattern of the words ``text`` may hold (a plain search first), or None."""
        folded = text.lower()
        hits = tuple(w for w, low in zip(self.words, self._lowered, strict=True) if low in folded)
        if not hits:
            return None
        pattern = self._patterns.get(hits)
        if pattern is None:
            pattern = re.compile("|".join(_word(w) for w in hits), re.IGNORECASE)
            self._patterns[hits] = pattern
        return pattern

    def __call__(self, text: str) -> str:
        pattern = self._pattern(text)
        if pattern is not None:
            text = pattern.sub("", text)
        cleaned = LONG_NUMBER.sub("", WRITTEN_DATE.sub("", text))
        return _strip(cleaned) if pattern is not None or cleaned != text else text

    def names(self, text: str) -> bool:
        """Whether ``text`` holds one of the identifying words (not counting dates and numbers:
        for values that are not free text, such as a converter's version)."""
        pattern = self._pattern(text)
        return pattern is not None and pattern.search(text) is not None

    def optional(self) -> Callable[[str | None], str | None]:
        """The cleaner for nullable columns: None and an emptied text are None."""

        def clean(text: str | None) -> str | None:
            if not text:
                return text
            return self(text) or None

        return clean


def cleaner_for(values: Iterable[str | None], whole: Iterable[str | None] = ()) -> Cleaner:
    """The cleaner of one patient's texts: ``values`` (names, IDs, the institution ...; split
    into their parts too) and ``whole`` (values removed only as they are)."""
    return Cleaner(identifying_words((v for v in values if v), (w for w in whole if w)))


def dataset_cleaner(ds: Any) -> Cleaner:
    """The cleaner of the texts of one DICOM data set: the values of its ``IDENTIFYING``
    attributes (multi-valued ones value by value) and the IDs of its OtherPatientIDsSequence."""
    values: list[str] = []
    for keyword in IDENTIFYING:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            values.extend(str(v) for v in value)
        else:
            values.append(str(value))
    others = [str(item.get("PatientID", "")) for item in ds.get("OtherPatientIDsSequence") or []]
    return Cleaner(identifying_words((v.strip() for v in values if v), others))
