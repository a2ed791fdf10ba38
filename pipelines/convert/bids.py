"""BIDS-style names, folders and files for converted series.

``OUT/sub-<subject>/ses-<session>/anat/sub-<subject>_ses-<session>[_acq-<label>][_ce-<label>]
[_run-<n>]_<suffix>.nii.gz`` and a ``.json`` sidecar beside it; ``OUT/dataset_description.json``
is written once.

Subject: the PatientID (pseudonymized: the step runs on anonymized data) with everything but
letters and digits removed.

Session: a number per study of the subject, kept in ``sub-<subject>/sub-<subject>_sessions.tsv``
(BIDS' sessions file) beside a key of the study (a hash of its StudyInstanceUID, not the UID).
A study seen before keeps its number on every rerun, whichever other studies are converted with
it; new studies get the next free numbers in the order of (StudyDate, StudyInstanceUID), so a
subject's sessions usually count its visits in time order. Numbering only the studies present in
one run would be stable for reruns of the same folder, but converting one follow-up study on its
own would name it ``ses-1`` and overwrite the baseline's files; the shifted StudyDate as label
would put a date into every path (the sidecar has none on purpose).

Dataset files (:func:`write_dataset_files`, on every run): ``dataset_description.json`` (the
settings' ``bids`` name, authors, licence; cohortflow in ``GeneratedBy``), ``README.md`` and
``sessions.json`` (what the columns mean; BIDS inheritance applies it to every subject's
sessions file). As subjects and studies are named: ``participants.tsv`` (pseudonymous label and
sex of the subjects whose series were de-identified) and ``participants.json``, and each
subject's sessions file with the age
at the scan in whole years (90: 90 or older), from PatientSex and PatientAge, which the
de-identification profile keeps. A rerun merges: a subject or session keeps its row and place, a
column or key someone added is kept, and a file is rewritten only when its bytes change. Nothing
identifying is written: no name, birth date, study date or UID.

Suffix: from the series' role in the protocol (its include rule): ``t1_3d`` T1w, ``t1_2d``
(a folder without protocol: every role is an include rule) T1w with ``acq-2d``, ``flair`` FLAIR,
``t2`` T2w, ``hippocampus_t2`` T2w with ``acq-hippocampus`` (another acquisition than the axial
T2, not a second run of it). Other roles and unselected series are converted only when every
image series is asked for: ``t1_post`` becomes ``ce-gadolinium_T1w``; the others get a suffix
guessed from their timing (:func:`guess_suffix`) and ``acq-guessed``, so that they never take
the name of a protocol series. Several series with one name in one session are numbered
``run-1``, ``run-2`` ... in SeriesNumber order.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydicom.dataset import Dataset

from cohortflow.models.export import AGE_CAP
from cohortflow.models.settings import BidsSettings

BIDS_VERSION = "1.10.0"
#: BIDS' empty cell.
NA = "n/a"


@dataclass(frozen=True)
class BidsName:
    """The name parts of an image apart from subject, session and run."""

    suffix: str
    entities: tuple[tuple[str, str], ...] = ()  # (key, label) in BIDS order: acq, ce

    def __str__(self) -> str:
        return "_".join([*(f"{k}-{v}" for k, v in self.entities), self.suffix])


#: The protocol roles converted by default, and their names.
ROLE_NAMES: Mapping[str, BidsName] = {
    "t1_3d": BidsName("T1w"),
    # a thick-slice 2D T1, measured by volumetry with lower confidence
    "t1_2d": BidsName("T1w", (("acq", "2d"),)),
    "flair": BidsName("FLAIR"),
    "t2": BidsName("T2w"),
    "hippocampus_t2": BidsName("T2w", (("acq", "hippocampus"),)),
}
#: Roles converted only when every image series is asked for.
EXTRA_ROLE_NAMES: Mapping[str, BidsName] = {
    "t1_post": BidsName("T1w", (("ce", "gadolinium"),)),
}
GUESSED = ("acq", "guessed")


def bids_label(text: str) -> str:
    """``text`` with everything but ASCII letters and digits removed (a BIDS label)."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return float(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def guess_suffix(ds: Dataset) -> str:
    """A BIDS anatomical suffix from the timing of a series no protocol rule names: FLAIR
    (inversion time >= 1500 ms), T2w (echo time >= 60 ms), PDw (long TR, short TE), else T1w;
    ``MR`` without timing."""
    tr, te, ti = (_number(ds, k) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    if ti is not None and ti >= 1500:
        return "FLAIR"
    if te is None:
        return "MR"
    if te >= 60:
        return "T2w"
    if tr is not None and tr >= 1500 and te < 40 and ti is None:
        return "PDw"
    return "T1w"


def name_for(role: str | None, header: Dataset, every_series: bool) -> BidsName | None:
    """The name of a series with this protocol ``role`` (None: not selected); None when the
    series is not to be converted."""
    if role is not None and role in ROLE_NAMES:
        return ROLE_NAMES[role]
    if not every_series:
        return None
    if role is not None and role in EXTRA_ROLE_NAMES:
        return EXTRA_ROLE_NAMES[role]
    return BidsName(guess_suffix(header), (GUESSED,))


def hashed_key(kind: str, uid: str) -> str:
    """A stable key for a study or series that does not show its UID."""
    return hashlib.sha256(f"cohortflow-{kind}:{uid}".encode()).hexdigest()[:16]


def stem(subject: str, session: str, name: BidsName, run: int | None) -> str:
    parts = [f"sub-{subject}", f"ses-{session}", *(f"{k}-{v}" for k, v in name.entities)]
    if run is not None:
        parts.append(f"run-{run}")
    parts.append(name.suffix)
    return "_".join(parts)


def anat_folder(out: Path, subject: str, session: str) -> Path:
    return out / f"sub-{subject}" / f"ses-{session}" / "anat"


def assign_runs(items: Sequence[tuple[str, BidsName, tuple[float, str]]]) -> dict[str, int | None]:
    """Run numbers of (key, name, order) items of one session: None for a name used once,
    1, 2 ... in ``order`` for a name used several times."""
    groups: dict[BidsName, list[tuple[tuple[float, str], str]]] = defaultdict(list)
    for key, name, order in items:
        groups[name].append((order, key))
    runs: dict[str, int | None] = {}
    for members in groups.values():
        members.sort()
        for n, (_, key) in enumerate(members, start=1):
            runs[key] = n if len(members) > 1 else None
    return runs


def age_years(value: object) -> int | None:
    """Whole years from a DICOM PatientAge (``065Y``, ``018M``, ``010W``, ``003D``), 90 and over
    as 90; None when missing or malformed."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(value or "").upper())
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2)
    years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
    return min(years, AGE_CAP)


def bids_sex(value: object) -> str | None:
    """DICOM PatientSex (M, F, O) as BIDS' level of the same letter; None otherwise."""
    text = str(value or "").strip().upper()
    return text if text in ("M", "F", "O") else None


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a TSV file (none when there is no file)."""
    if not path.is_file():
        return [], []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = [{k: v for k, v in row.items() if isinstance(k, str)} for row in reader]
        return list(reader.fieldnames or []), rows


def tsv_bytes(columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(c) or NA for c in columns])
    return text.getvalue().encode()


def _columns(ours: Sequence[str], found: Sequence[str]) -> list[str]:
    """Our columns first, then any other column the file had (someone's own), in its order."""
    return [*ours, *(c for c in found if c not in ours)]


@dataclass
class Sessions:
    """The session numbers of one subject's studies (``sub-<label>_sessions.tsv``) and the age
    at each; other columns someone added are kept."""

    path: Path
    labels: dict[str, str] = field(default_factory=dict)  # study key -> session label
    ages: dict[str, int] = field(default_factory=dict)  # study key -> age in whole years
    others: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> its row as read
    found: list[str] = field(default_factory=list)  # the file's columns
    changed: bool = False

    COLUMNS: ClassVar[tuple[str, ...]] = ("session_id", "cohortflow_study_key", "age")

    @classmethod
    def load(cls, out: Path, subject: str) -> Sessions:
        path = out / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
        sessions = cls(path)
        sessions.found, rows = read_tsv(path)
        for row in rows:
            key, label = row.get("cohortflow_study_key"), row.get("session_id") or ""
            if key and label.startswith("ses-"):
                sessions.labels[key] = label[4:]
                age = row.get("age") or ""
                if age.isdigit():
                    sessions.ages[key] = int(age)
                sessions.others[label[4:]] = row
        # a file of an older version (no age column) is brought up to date
        sessions.changed = bool(rows) and not set(cls.COLUMNS) <= set(sessions.found)
        return sessions

    def assign(self, studies: Iterable[tuple[str, str]]) -> None:
        """Number the new ones of (StudyInstanceUID, StudyDate): after the known ones, in date
        order."""
        taken = {int(v) for v in self.labels.values() if v.isdigit()}
        new = sorted(
            (date, uid) for uid, date in studies if hashed_key("study", uid) not in self.labels
        )
        following = max(taken, default=0)
        for _, uid in new:
            key = hashed_key("study", uid)
            if key in self.labels:
                continue
            following += 1
            self.labels[key] = str(following)
            self.changed = True

    def note_age(self, study_uid: str, age: int | None) -> None:
        """The age at the study (None: unknown; an age known before is kept)."""
        key = hashed_key("study", study_uid)
        if age is not None and self.ages.get(key) != age:
            self.ages[key] = age
            self.changed = True

    def label(self, study_uid: str) -> str:
        return self.labels[hashed_key("study", study_uid)]

    def save(self) -> None:
        if not self.changed:
            return
        rows = []
        for key, label in sorted(self.labels.items(), key=lambda kv: (len(kv[1]), kv[1])):
            age = self.ages.get(key)
            ours = {
                "session_id": f"ses-{label}",
                "cohortflow_study_key": key,
                "age": NA if age is None else str(age),
            }
            rows.append({**self.others.get(label, {}), **ours})
        write_atomic(self.path, tsv_bytes(_columns(self.COLUMNS, self.found), rows))
        self.changed = False


def update_participants(out: Path, sexes: Mapping[str, str | None]) -> Path:
    """Add or update the rows of ``sexes``' subjects (label -> BIDS sex; None: unknown, a sex
    known before is kept) in ``OUT/participants.tsv``, with ``participants.json`` beside it.
    Only de-identified subjects may be given: the label is written. A subject folder the file
    does not list whose sidecars say they come from de-identified DICOM (an earlier version's
    output) is added too, as BIDS asks for every subject. Rows keep their place, new ones follow
    in label order; columns someone added are kept. Call it under a lock when several processes
    write into one folder."""
    path = out / "participants.tsv"
    found, rows = read_tsv(path)
    by_id = {row.get("participant_id"): row for row in rows}
    unlisted = [p for p in out.glob("sub-*") if p.is_dir() and p.name not in by_id]
    earlier = {p.name[4:] for p in unlisted if _deidentified_subject(p)}
    for subject in sorted(set(sexes) | earlier):
        row = by_id.get(f"sub-{subject}")
        if row is None:
            row = {"participant_id": f"sub-{subject}"}
            rows.append(row)
            by_id[row["participant_id"]] = row
        sex = sexes.get(subject)
        if sex is not None:
            row["sex"] = sex
    data = tsv_bytes(_columns(("participant_id", "sex"), found), rows)
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)
    merge_json(out / "participants.json", PARTICIPANT_COLUMNS)
    return path


def _deidentified_subject(folder: Path) -> bool:
    """Whether a sidecar in a subject's folder says its source was de-identified."""
    for sidecar in folder.glob("ses-*/anat/*.json"):
        data = _json_object(sidecar)
        if "CohortflowDeidentified" in data:
            return data["CohortflowDeidentified"] is True
    return False


#: What the columns cohortflow writes mean (participants.json and sessions.json).
PARTICIPANT_COLUMNS: Mapping[str, Any] = {
    "participant_id": {
        "Description": "Pseudonymous subject label: the PatientID of the de-identified DICOM "
        "with everything but letters and digits removed."
    },
    "sex": {
        "Description": "Sex as recorded in the DICOM PatientSex (0010,0040).",
        "Levels": {"M": "male", "F": "female", "O": "other"},
    },
}
SESSION_COLUMNS: Mapping[str, Any] = {
    "session_id": {"Description": "The session: one imaging study of the subject."},
    "cohortflow_study_key": {
        "Description": "A key of the study (a hash of its StudyInstanceUID, not the UID): "
        "cohortflow finds a study's session number by it when it converts the study again."
    },
    "age": {
        "Description": "Age at the scan in whole years, from the DICOM PatientAge (0010,1010); "
        f"{AGE_CAP} means {AGE_CAP} or older.",
        "Units": "year",
    },
}


def write_dataset_files(out: Path, version: str, about: BidsSettings | None = None) -> None:
    """The dataset's own files: ``dataset_description.json``, ``README.md`` and
    ``sessions.json`` (``participants.tsv`` and ``.json`` and the sessions files are written as
    subjects and studies are named: :func:`update_participants`, :class:`Sessions`)."""
    about = about or BidsSettings()
    write_dataset_description(out, version, about)
    write_readme(out, version, about)
    merge_json(out / "sessions.json", SESSION_COLUMNS)


def write_dataset_description(out: Path, version: str, about: BidsSettings | None = None) -> Path:
    """``OUT/dataset_description.json``: the settings' name, authors, licence and how to cite
    (those set), BIDS version and type, cohortflow in ``GeneratedBy``. Merged into a file that
    is there: the keys set here are updated and any other key (a user's ``Funding``, say) is
    kept; a ``DatasetType``, and a ``Name`` while the settings keep the default, someone wrote
    are kept too."""
    about = about or BidsSettings()
    path = out / "dataset_description.json"
    existing = _json_object(path)
    ours: dict[str, Any] = {"Name": about.name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw"}
    if about.license:
        ours["License"] = about.license
    if about.authors:
        ours["Authors"] = list(about.authors)
    if about.how_to_acknowledge:
        ours["HowToAcknowledge"] = about.how_to_acknowledge
    others = [
        g
        for g in existing.get("GeneratedBy") or []
        if not (isinstance(g, dict) and g.get("Name") == "cohortflow")
    ]
    ours["GeneratedBy"] = [
        {
            "Name": "cohortflow",
            "Version": version,
            "Description": "DICOM to NIfTI conversion of de-identified MR brain series",
        },
        *others,
    ]
    theirs = {"DatasetType"} | ({"Name"} if about.name == BidsSettings().name else set())
    merged = {**ours, **{k: v for k, v in existing.items() if k not in ours or k in theirs}}
    _write_json_if_changed(path, merged)
    return path


#: The first line of the README cohortflow writes: a README without it is someone's, kept.
README_MARK = "<!-- written by cohortflow: remove this line to keep your own text on reruns -->"


def readme_text(version: str, about: BidsSettings) -> str:
    """The README of a converted folder (Markdown)."""
    licence = (
        f"The data are shared under {about.license} (`License` in dataset_description.json)."
        if about.license
        else "No licence is set yet: set `bids.license` in cohortflow's settings before sharing."
    )
    cite = about.how_to_acknowledge or (
        "Cite the authors listed in dataset_description.json (`Authors`, from cohortflow's "
        f"settings `bids.authors`) and cohortflow {version}."
    )
    return f"""{README_MARK}
# {about.name}

MR brain images converted from DICOM to NIfTI by cohortflow {version}, laid out as a BIDS
{BIDS_VERSION} raw dataset: `sub-<label>/ses-<n>/anat/sub-<label>_ses-<n>_<suffix>.nii.gz`
with a JSON sidecar beside each image.

## De-identification

cohortflow converts the series it has de-identified (the DICOM PS3.15 Basic Application Level
Confidentiality Profile, keeping sex and age, dates shifted) and defaced. Each sidecar says so of
its own source: `CohortflowDeidentified` (its DICOM said PatientIdentityRemoved YES) and
`CohortflowDefaced` (RecognizableVisualFeatures NO).

- Subject labels are pseudonyms (the de-identified PatientID). Sessions are numbers, one per
  study, kept in each subject's `sessions.tsv` beside a hash of the study's UID, never the UID.
- `participants.tsv` lists the subjects of de-identified DICOM with their sex (a subject of
  identified input is left out: its label is its real PatientID), `sessions.tsv` holds the age
  at each scan in whole years ({AGE_CAP} means {AGE_CAP} or older). No name, birth date, study
  date or time is written.
- Sidecars hold an allowlist of acquisition keys: no institution, station, device serial number
  or date.

## Licence

{licence}

## How to cite

{cite}
"""


def write_readme(out: Path, version: str, about: BidsSettings | None = None) -> Path:
    """``OUT/README.md``, unless someone's own README is there (one without
    :data:`README_MARK` in its first line, or a README of another extension)."""
    about = about or BidsSettings()
    path = out / "README.md"
    others = sorted(p for p in out.glob("README*") if p.name != "README.md")
    if others:
        return others[0]
    if path.is_file():
        first = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        if first.strip() != README_MARK:
            return path
    data = readme_text(version, about).encode()
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)
    return path


def merge_json(path: Path, ours: Mapping[str, Any]) -> Path:
    """``path`` (a JSON object) with ``ours`` keys set and any other key kept."""
    _write_json_if_changed(path, {**_json_object(path), **ours})
    return path


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}  # not JSON: replaced (no BIDS tool can read it either)
    return data if isinstance(data, dict) else {}


def _write_json_if_changed(path: Path, data: Mapping[str, Any]) -> None:
    encoded = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
    if not path.is_file() or path.read_bytes() != encoded:
        write_atomic(path, encoded)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (no half files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_nifti_gz(path: Path, nifti: bytes) -> None:
    """Gzip ``nifti`` (an uncompressed .nii) into ``path``: no time stamp or name in the gzip
    header, so the same image gives the same bytes on every run. Level 1: a third of level
    6's time for 1 % more bytes (a 3.5 MB T2: 0.07 s and 2,637 KB against 0.21 s, 2,615 KB)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=1, mtime=0) as gz:
        gz.write(nifti)
    write_atomic(path, buffer.getvalue())


def write_sidecar(path: Path, sidecar: Mapping[str, Any]) -> None:
    write_atomic(path, (json.dumps(sidecar, indent=2) + "\n").encode())


def remove_stale(folder: Path, series_key: str, keep: str) -> list[Path]:
    """Remove the files an earlier run wrote for the same series under another name than
    ``keep`` (its run number or suffix changed; ``""``: every name, the series failed now);
    returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for sidecar in folder.glob("*.json"):
        name = sidecar.name[: -len(".json")]
        if name == keep:
            continue
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("CohortflowSeriesKey") == series_key:
            for path in (sidecar, folder / f"{name}.nii.gz"):
                if path.exists():
                    path.unlink()
                    removed.append(path)
    return removed
