"""One cleaner for every de-identified text (pipelines/dicom/cleaner.py): what it removes, what it
keeps, and that the anonymizer, the cohort layer and the sidecars all use it.

The attack it answers: a series described ``T2 Gregory House 99887766 15.04.1960`` (the
referring physician, the record number's digits, the birth date written the local way) was
listed verbatim by ``cohort list``, and the anonymizer kept ``T2    15.04.1960``.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import update

from cohortflow.flows.cli import main
from cohortflow.models.database import open_index
from cohortflow.models.schema import CohortState
from cohortflow.models.settings import load_settings
from cohortflow.pipelines.anonymize.deidentify import Deidentified, Deidentifier
from cohortflow.pipelines.anonymize.profile import load_profile
from cohortflow.pipelines.cohort.configured import refresh_configured
from cohortflow.pipelines.dicom.cleaner import (
    CLEANER_VERSION,
    WRITTEN_DATE,
    cleaner_for,
    written_forms,
)
from cohortflow.pipelines.dicom.keys import ProjectKey

LEAKY = "T2 Gregory House 99887766 15.04.1960"


@pytest.mark.parametrize(
    "written",
    [
        "15.04.1960",
        "15/04/60",
        "15-04-1960",
        "4/15/1960",
        "1960-04-15",
        "1960/4/15",
        "April 15 1960",
        "April 15, 1960",
        "Apr 15th 1960",
        "15 April 1960",
        "15. April 1960",
        "15-APR-60",
        "15 avr. 1960",
        "15. März 1960",
        "Apr 1960",
    ],
)
def test_a_date_written_any_common_way_is_removed(written: str) -> None:
    clean = cleaner_for([])
    assert clean(f"T1 {written} sag") == "T1 sag"
    assert clean(f"{written}") == ""


@pytest.mark.parametrize(
    "kept",
    [
        "AX 3D BRAVO",
        "t1_mprage_sag_p2_iso",
        "ep2d_diff_3scan_trace_p2",
        "T1 3D 1.0x1.0x1.0",
        "rs-fMRI 2.5mm 1.5T",
        "DTI 30 dir b1000",
        "cor t2 2mm 10-20",
        "Ax T2 March",  # a month without a day or a year is no date
        "summar 1999",
        "MEMPRAGE RMS 4e",
    ],
)
def test_descriptions_without_identifiers_are_kept_as_they_are(kept: str) -> None:
    assert cleaner_for(["House^Gregory", "Sag^Tom", "4711"])(kept) == kept


def test_names_ids_and_numbers_are_removed_where_they_stand() -> None:
    clean = cleaner_for(["House^Gregory", "99887766", "19600415", "Sag^Cuddy", "4711", "AB123"])
    assert clean(LEAKY) == "T2"
    assert clean("T1_MPRAGE_house") == "T1_MPRAGE"  # any case
    assert clean("Sagittal T1 Cuddy") == "Sagittal T1"
    assert clean("t1_Cuddy_sag") == "t1_sag"  # a surname Sag would stay: it is the plane too
    assert clean("tfl47115") == "tfl47115"  # StudyID 4711 is not in 47115
    assert clean("study 4711") == "study"
    assert clean("xAB123y") == "xy"  # an ID of letters and digits wherever it stands
    assert clean("MRN 1234567") == "MRN"  # any run of six digits or more


def test_written_forms_of_a_birth_date_are_all_found_by_the_date_pattern() -> None:
    forms = written_forms(dt.date(1960, 4, 15))
    assert {"15.04.1960", "15/04/60", "April 15 1960", "1960-04-15", "19600415"} <= set(forms)
    for form in forms:
        if not form.isdigit():
            assert WRITTEN_DATE.fullmatch(form), form


def _leaky_dataset(n: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName = f"Patient{n}^Anna"
    ds.PatientID = f"9988776{n}"
    ds.PatientBirthDate = "19600415"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.OperatorsName = ["Cuddy^Lisa", "Wilson^James"]
    ds.SeriesDescription = f"T2 Gregory House 9988776{n} 15.04.1960"
    ds.ProtocolName = "t2 Wilson April 15 1960"
    ds.StudyDescription = "MR brain Cuddy"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"study{n}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"series{n}"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"sop{n}"])
    return ds


def test_the_anonymizer_cleans_the_leaky_description() -> None:
    key = ProjectKey(b"k" * 32, "test")
    out = Deidentifier(load_profile(), key).deidentify(copy.deepcopy(_leaky_dataset(1)))
    assert isinstance(out, Deidentified)
    assert out.dataset.SeriesDescription == "T2"
    assert out.dataset.ProtocolName == "t2"
    assert out.dataset.StudyDescription == "MR brain"


def test_the_cohort_layer_lists_cleaned_descriptions_and_rebuilds_for_a_new_cleaner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    delivered = tmp_path / "delivered"
    delivered.mkdir()
    patients = 6  # above the smallest cell a list may show
    for n in range(patients):
        _leaky_dataset(n).save_as(delivered / f"{n}.dcm")
    assert main(["ingest", str(delivered)]) == 0
    capsys.readouterr()
    assert main(["cohort", "list", "--limit", "0", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = listing["rows"]
    assert len(rows) == patients
    text = json.dumps(listing)
    for leaked in ("Gregory", "House", "Wilson", "Cuddy", "9988776", "15.04.1960", "1960"):
        # whole tokens: a 39-digit pseudonymized UID may hold any four digits
        assert not re.search(rf"(?<![0-9A-Za-z]){re.escape(leaked)}", text), leaked
    assert {r["series_description"] for r in rows} == {"T2"}
    # rows cleaned by an older cleaner are rebuilt on the next refresh
    settings = load_settings()
    index = open_index(settings.index)
    try:
        with index.session() as session:
            session.execute(update(CohortState).values(cleaner_version="1"))
        summary = refresh_configured(settings, index)
        assert summary.rebuilt and summary.series == patients
        assert not refresh_configured(settings, index).rebuilt
        with index.session() as session:
            state = session.get(CohortState, 1)
            assert state is not None and state.cleaner_version == CLEANER_VERSION
    finally:
        index.dispose()
