"""Header de-identification: PS3.15 Basic Profile + options, keyed pseudonyms, proof of no PHI."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cohortflow.flows.cli import main
from cohortflow.models.database import open_index
from cohortflow.models.ingest import patient_key
from cohortflow.models.linkage import lookup
from cohortflow.models.synth import CohortTruth
from cohortflow.pipelines.anonymize.deidentify import Deidentifier, Excluded
from cohortflow.pipelines.anonymize.errors import ProfileError, ProjectKeyError
from cohortflow.pipelines.anonymize.profile import load_profile
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import dciodvfy_errors, pydicom_file

KEY = ProjectKey(b"k" * 32, "test")
OTHER_KEY = ProjectKey(b"o" * 32, "test-other")


def _deidentify(ds: Dataset, key: ProjectKey = KEY) -> Dataset:
    result = Deidentifier(load_profile(), key).deidentify(ds)
    assert not isinstance(result, Excluded), result
    return result.dataset


def test_keys_are_stable_keyed_and_valid() -> None:
    assert KEY.pseudonym("MRN1^") == KEY.pseudonym("MRN1^") != KEY.pseudonym("MRN2^")
    assert KEY.pseudonym("MRN1^") != OTHER_KEY.pseudonym("MRN1^")
    assert re.fullmatch(r"CF[A-Z2-7]{14}", KEY.pseudonym("MRN1^"))
    offset = KEY.date_offset_days("MRN1^")
    assert -(150 * 365 + 3650) < offset <= -(150 * 365)
    uid = KEY.uid("1.2.3.4")
    assert uid == KEY.uid("1.2.3.4") != OTHER_KEY.uid("1.2.3.4")
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid) and len(uid) <= 64


def test_project_key_file_is_created_private_and_refused_when_readable(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "project.key"
    key = ProjectKey.load(f"file:{path}")
    assert path.stat().st_mode & 0o777 == 0o600 and len(key.secret) == 32
    assert ProjectKey.load(f"file:{path}").secret == key.secret  # the same key next time
    assert key.secret.hex() not in repr(key) and key.secret.hex() not in str(key)
    path.chmod(0o644)
    with pytest.raises(ProjectKeyError, match="readable by others"):
        ProjectKey.load(f"file:{path}")
    with pytest.raises(ProjectKeyError, match="unset or shorter"):
        ProjectKey.load("env:COHORTFLOW_TEST_NO_SUCH_VARIABLE")


def test_basic_profile_and_options_on_a_real_file() -> None:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    original = copy.deepcopy(ds)
    ds.PatientAge, ds.PatientSex, ds.PatientWeight = "042Y", "F", "61"
    ds.StationName, ds.DeviceSerialNumber = "MRC35123", "35123"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.ContrastBolusAgent = ""
    ds.SeriesDescription = "t1 ROSSI 3D 20160709"
    ds.PatientName = "Rossi^Anna"
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "OLD-123"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([ref])
    block = ds.private_block(0x0009, "ACME SECRET", create=True)
    block.add_new(0x01, "LO", "Rossi^Anna")
    safe = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    safe.add_new(0x0E, "FL", 2.5)
    identity = patient_key(
        str(ds.PatientID) or None,
        ds.get("IssuerOfPatientID"),
        str(ds.PatientName),
        ds.get("PatientBirthDate"),
    )
    out = _deidentify(ds)

    pseudonym = KEY.pseudonym(identity)
    assert out.PatientID == out.PatientName == pseudonym
    assert out.PatientIdentityRemoved == "YES"
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert {"113100", "113107", "113108", "113105", "113111"} <= codes and "113109" not in codes
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    # dates moved by the patient's offset, times kept
    days = KEY.date_offset_days(identity)
    moved = dt.datetime.strptime(original.StudyDate, "%Y%m%d") + dt.timedelta(days=days)
    assert out.StudyDate == moved.strftime("%Y%m%d") and out.StudyTime == original.StudyTime
    # characteristics kept; device identity, institution, other IDs gone
    assert (out.PatientAge, out.PatientSex, out.PatientWeight) == ("042Y", "F", 61)
    # (X/Z/D: a dummy, as some IODs make them Type 1)
    assert out.StationName == out.DeviceSerialNumber == out.InstitutionName == "ANONYMIZED"
    # ... but an empty one stays empty: it hides nothing, and an empty ContrastBolusAgent (Z/D)
    # means "no contrast" (a dummy made the Philips ADNI T1 post-contrast to the series rules)
    assert "ContrastBolusAgent" in out and not out.ContrastBolusAgent
    assert "OtherPatientIDsSequence" not in out
    # descriptors kept, cleaned of the patient's name and of dates
    assert out.SeriesDescription == "t1 3D"
    # UIDs remapped consistently: the reference points at the new SOP instance
    assert out.SOPInstanceUID == KEY.uid(original.SOPInstanceUID) != original.SOPInstanceUID
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPClassUID == original.SOPClassUID  # registered UIDs identify nobody
    # private: only the safe allow-list survives
    assert (0x0009, 0x1001) not in out and (0x0009, 0x0010) not in out
    assert out[0x2005, 0x100E].value == 2.5


def test_burned_in_text_is_excluded_with_a_reason() -> None:
    cases = {
        "burned_in_annotation": {"BurnedInAnnotation": "YES"},
        "secondary_capture": {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},
        "screen_capture": {"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]},
        "secondary_with_overlay": {"ImageType": ["DERIVED", "SECONDARY"], "OverlayRows": 1},
    }
    for code, values in cases.items():
        ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
        for keyword, value in values.items():
            if keyword == "OverlayRows":
                ds.add_new(0x60003000, "OW", b"\x00" * 8)
            else:
                setattr(ds, keyword, value)
        result = Deidentifier(load_profile(), KEY).deidentify(ds)
        assert isinstance(result, Excluded) and result.reason_code == code and result.reason
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.add_new(0x60003000, "OW", b"\x00" * 8)  # an overlay plane of an original image
    assert (0x6000, 0x3000) not in _deidentify(ds)


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: 1\nname: x\nstandard_table: dicomfields_2026c\nopt: {}\n", "opt"),
        ("version: 1\nname: x\nstandard_table: dicomfields_1999\n", "no such table"),
        ("version: 1\nname: x\nstandard_table: dicomfields_2026c\ndescriptors: [Foo]\n", "Foo"),
        (
            "version: 1\nname: x\nstandard_table: dicomfields_2026c\n"
            "safe_private: [{creator: A, group: 0x0010, element: 1}]\n",
            "not a private",
        ),
        ("version: 2\nname: x\nstandard_table: dicomfields_2026c\n", "version 2"),
    ],
)
def test_bad_profiles_are_refused_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


# --- the whole synthetic cohort -------------------------------------------------------------


def _planted(truth: CohortTruth) -> set[str]:
    values = {i.value for i in truth.identifiers if i.location != "pixels (burned-in text)"}
    for patient in truth.patients:
        values |= {patient.patient_id, patient.patient_name, patient.birth_date}
        values |= {s.accession_number for s in patient.studies}
    return {v for v in values if len(v) >= 3}


_DIGIT_RUN = re.compile(rb"[0-9]+")


def _found(values: set[str], data: bytes) -> list[str]:
    """Values present in ``data``, case-insensitively. A number counts only where it stands as
    a number: a 4-digit StudyID appears by chance inside any 39-digit ``2.25.`` UID. So numbers
    are looked up among the file's maximal digit runs, collected in one pass (a regular
    expression per value and file took ten minutes on the test cohort)."""
    lower = data.lower()
    numbers: set[bytes] | None = None
    hits = []
    for value in values:
        needle = value.lower().encode()
        if value.isdigit():
            if numbers is None:
                numbers = set(_DIGIT_RUN.findall(lower))
            if needle in numbers:
                hits.append(value)
        elif needle in lower:
            hits.append(value)
    return hits


@pytest.mark.integration
@pytest.mark.slow
def test_no_planted_identifier_survives_in_any_output_file(
    cohort: CohortResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    figures: Callable[[str], None],
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    out = tmp_path / "out"
    assert main(["anonymize", str(cohort.out_dir / "dicom"), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the output names the exact profile file used (its hash), for provenance
    shipped = Path(load_profile().source).read_bytes()
    assert report["profile_sha256"] == hashlib.sha256(shipped).hexdigest()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    values = _planted(cohort.truth)
    leaks = {str(f): hits for f in files if (hits := _found(values, f.read_bytes()))}
    figures(
        f"PHI audit: searched {len(values)} planted values in {len(files)} output files: "
        f"{sum(len(h) for h in leaks.values())} found"
    )
    assert files and not leaks, list(leaks.items())[:5]
    # what was not written is explained: burned-in screenshots, the non-DICOM and cut files
    burned = sum(
        1
        for p in cohort.truth.patients
        for s in p.studies
        for se in s.series
        if se.kind == "burned_in_sc"
    )
    assert len(report["excluded"]) == burned and all(e["reason"] for e in report["excluded"])
    assert all(s["reason"] for s in report["skipped"]) and not report["failed"]
    assert report["patients"] == len(cohort.truth.patients) == report["new_linkage"]

    # longitudinal: intervals between a patient's studies exact, under the pseudonym
    dates: dict[str, set[str]] = defaultdict(set)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID", "StudyDate"])
        dates[str(ds.PatientID)].add(str(ds.StudyDate))
    key = ProjectKey.load(f"file:{tmp_path / 'home' / 'secrets' / 'project.key'}", create=False)
    issuer = "HOSPITAL_MRN"  # the synthetic hospital's IssuerOfPatientID
    for patient in cohort.truth.patients:
        ident = f"{patient.patient_id}^{issuer}"
        assert len(dates[key.pseudonym(ident)]) == len(patient.studies)
        real = sorted(dt.date.fromisoformat(_iso(s.study_date)) for s in patient.studies)
        shifted = sorted(dt.date.fromisoformat(_iso(d)) for d in dates[key.pseudonym(ident)])
        assert [b - a for a, b in pairwise(real)] == [b - a for a, b in pairwise(shifted)]

    # same key: the same pseudonyms and file names on a rerun; the linkage is audited
    again = tmp_path / "again"
    assert main(["anonymize", str(cohort.out_dir / "dicom"), str(again), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_linkage"] == 0
    assert sorted(p.relative_to(again) for p in again.rglob("*.dcm")) == sorted(
        p.relative_to(out) for p in out.rglob("*.dcm")
    )
    index = open_index(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    try:
        with index.session() as session:
            first = cohort.truth.patients[0]
            ident = f"{first.patient_id}^{issuer}"
            found = lookup(session, key.pseudonym(ident), "test: audit check")
            assert found is not None and found.patient_key == ident
            audited = list(
                session.execute(
                    __import__("sqlalchemy").text(
                        "select action, detail from audit_log order by id"
                    )
                )
            )
    finally:
        index.dispose()
    # each commit of new linkage rows (one per chunk of files: no file is published before
    # its patient's row) is audited in the same transaction; then the one read
    actions = [a for a, _ in audited]
    assert actions == ["linkage_write"] * (len(actions) - 1) + ["linkage_read"]
    linked = sum(int(d.split()[0]) for a, d in audited if a == "linkage_write")
    assert linked == len(cohort.truth.patients)
    # another key: other pseudonyms
    monkeypatch.setenv("COHORTFLOW_PSEUDONYM_KEY_SOURCE", "env:OTHER_PROJECT_KEY")
    monkeypatch.setenv("OTHER_PROJECT_KEY", "another-secret-key-of-this-project")
    other = tmp_path / "other"
    assert main(["anonymize", str(cohort.out_dir / "dicom"), str(other), "--json"]) == 0
    assert not {p.name for p in other.iterdir()} & {p.name for p in out.iterdir()}


def _iso(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}"


@pytest.mark.integration
@pytest.mark.slow
def test_dciodvfy_finds_no_new_error_in_anonymized_output(
    cohort: CohortResult, tmp_path: Path
) -> None:
    from cohortflow.pipelines.anonymize.files import anonymize_file

    deidentifier = Deidentifier(load_profile(), KEY)
    checked = 0
    for series in sorted(p for p in (cohort.out_dir / "dicom").glob("*/*") if p.is_dir()):
        first = sorted(p for p in series.iterdir() if p.suffix == ".dcm")[:1]
        for source in first:
            outcome, _ = anonymize_file(source, tmp_path / "out", deidentifier)
            if outcome.status != "written":
                continue
            assert outcome.output is not None
            before, after = dciodvfy_errors(source), dciodvfy_errors(Path(outcome.output))
            assert after <= before, (source, after - before)
            checked += 1
    assert checked >= 30


def test_deflated_files_keep_their_pixel_data() -> None:
    """Regression: the header read by classify was completed from an offset that, in a deflated
    file, points into the inflated stream: the pixel data was silently lost."""
    from cohortflow.pipelines.dicom.reader import classify

    source = pydicom_file("image_dfl.dcm")
    data = source.read_bytes()
    whole = classify(data).full_dataset(data)
    assert whole.PixelData == pydicom.dcmread(source).PixelData
    # and a file that is not deflated is completed from where the header stopped
    source = pydicom_file("MR_small.dcm")
    data = source.read_bytes()
    assert classify(data).full_dataset(data).PixelData == pydicom.dcmread(source).PixelData


def _both_writers(path: Path) -> tuple[bytes, bytes] | None:
    """The de-identified file as the splicing writer and as pydicom's writer encode it."""
    import io

    from pydicom.dataset import FileMetaDataset

    from cohortflow.pipelines.anonymize.writer import can_splice, encode_file, snapshot
    from cohortflow.pipelines.dicom.reader import classify

    data = path.read_bytes()
    outputs = []
    for splice in (True, False):
        verdict = classify(data)
        if not verdict.readable:
            return None
        ds = verdict.full_dataset(data)
        if "SOPClassUID" not in ds:
            return None
        originals = snapshot(ds)
        if isinstance(Deidentifier(load_profile(), KEY).deidentify(ds), Excluded):
            return None
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        assert verdict.header is not None
        syntax = ds.file_meta.get("TransferSyntaxUID") or verdict.header.transfer_syntax_uid
        meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
        if splice:
            if not can_splice(ds, meta):
                return None
            outputs.append(encode_file(ds, meta, data, originals))
        else:
            ds.file_meta = meta
            ds.preamble = b"\x00" * 128
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            outputs.append(buffer.getvalue())
    return outputs[0], outputs[1]


@pytest.mark.slow
def test_splicing_writer_writes_what_pydicom_writes(cohort: CohortResult) -> None:
    """The fast writer copies untouched elements' bytes: the result must be pydicom's, byte for
    byte, on every kind of file (implicit VR, no preamble, compressed, multi-frame, pydicom's
    own test files with their odd corners)."""
    from pydicom.data import get_testdata_file

    folder = Path(get_testdata_file("MR_small.dcm", download=False) or "").parent
    paths = [
        *sorted(p for p in (cohort.out_dir / "dicom").rglob("*") if p.is_file())[::5],
        *sorted(p for p in folder.iterdir() if p.is_file()),
    ]
    compared = 0
    for path in paths:
        pair = _both_writers(path)
        if pair is None:
            continue
        assert pair[0] == pair[1], path
        assert pair[0][:128] == b"\x00" * 128
        compared += 1
    assert compared >= 600
