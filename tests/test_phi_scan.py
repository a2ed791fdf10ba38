"""The release check, ``cohortflow phi-scan`` (pipelines/release/scan.py): a deliberately leaky
folder has each planted identifier found in its file and place; the anonymizer's output has
none."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file

from cohortflow.flows.cli import main

IDENTITY = {
    "PatientName": "Testperson^Alice",
    "PatientID": "MRN4711234",
    "PatientBirthDate": "19600415",
    "AccessionNumber": "ACC998877",
    "ReferringPhysicianName": "House^Gregory",
    "OperatorsName": "Cuddy^Lisa",
    "InstitutionAddress": "12 Quarry Lane Springfield",
}


@pytest.fixture
def released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An archived patient (the index holds who they are) and the anonymizer's output."""
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    raw = tmp_path / "raw"
    raw.mkdir()
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    ds.save_as(raw / "a.dcm")
    assert main(["ingest", str(raw)]) == 0
    assert main(["anonymize", str(raw), str(tmp_path / "out")]) == 0
    return tmp_path / "out"


def _scan(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = main(["phi-scan", str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_anonymizers_output_has_no_identifier(
    released: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _scan(released, capsys)
    assert report["patients"] == 1 and report["identifiers"] >= 20 and report["files"] == 1
    assert (code, report["hits"]) == (0, [])


def test_each_planted_identifier_is_found_in_its_file_and_place(
    released: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaky = tmp_path / "leaky"
    shutil.copytree(released, leaky)
    anonymized = next(leaky.rglob("*.dcm"))
    folder = anonymized.parent
    # a private tag holding the name in another order
    ds = pydicom.dcmread(anonymized)
    ds.private_block(0x0011, "ACME NOTES", create=True).add_new(0x01, "LO", "alice TESTPERSON")
    ds.save_as(folder / "private.dcm")
    # a sidecar naming the referring physician; a CSV with the accession number
    (folder / "t1.json").write_text(json.dumps({"SeriesDescription": "t1 for Dr House"}))
    with (folder / "table.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["series", "accession"], ["1", "ACC998877"]])
    # a NIfTI whose description carries the birth date written the local way
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    image.header["descrip"] = b"born 15.04.1960"
    nib.save(image, folder / "t1.nii.gz")
    # a PNG with the record number in a text chunk
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "patient MRN4711234")
    Image.new("L", (8, 8)).save(folder / "overlay.png", pnginfo=info)
    # a Parquet column with the operator's name; a gzip'd log with the address
    pq.write_table(pa.table({"note": ["ok", "scanned by Lisa Cuddy"]}), folder / "b.parquet")
    with gzip.open(folder / "run.log.gz", "wt") as handle:
        handle.write("sent to 12 quarry lane springfield\n")
    # a file name with the patient ID
    (folder / "MRN4711234_report.txt").write_text("nothing inside\n")
    code, report = _scan(leaky, capsys)
    assert code == 1
    found = {(Path(h["path"]).name, h["kind"]) for h in report["hits"]}
    assert {
        ("private.dcm", "patient_name"),
        ("t1.json", "physician"),
        ("table.csv", "accession_number"),
        ("t1.nii.gz", "birth_date"),
        ("overlay.png", "patient_id"),
        ("b.parquet", "operator"),
        ("run.log.gz", "address"),
        ("MRN4711234_report.txt", "patient_id"),
    } <= found, found
    places = {Path(h["path"]).name: h["place"] for h in report["hits"]}
    assert "ACME" in places["private.dcm"] or "private" in places["private.dcm"]
    assert places["t1.nii.gz"] == "NIfTI descrip" and places["overlay.png"] == "PNG tEXt"
    assert places["b.parquet"] == "Parquet column note"
    assert places["MRN4711234_report.txt"] == "file name"
    assert not {Path(h["path"]).name for h in report["hits"]} & {anonymized.name}
    text = json.dumps(report)  # the report names places, never the identifiers
    assert "MRN4711234" not in text.replace("MRN4711234_report.txt", "")
    assert "Testperson" not in text and "1960" not in text
