"""Series roles on real scans of five vendors (../shared/realdata through $COHORTFLOW_REALDATA):
every series gets the right role from its acquisition physics, names second, and the folder
commands say per series what it is and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cohortflow.flows.cli import main
from cohortflow.pipelines.dicom.header import attributes
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.dicomfolder import SkippedFile, first_header, index_folder

#: (dataset, SeriesNumber, SeriesDescription) -> role, for every series of the corpora
EXPECTED = {
    ("dcm_qa_agfa", "11", "ep2d_fid_weisskoff_25slc"): "bold",
    ("dcm_qa_canon_61", "3000", "DTI_PA-ortho"): "dwi",
    ("dcm_qa_canon_61", "8000", "DTI_PA-ALL_20d"): "dwi",
    ("dcm_qa_enh", "801", "B0 NS"): "fieldmap",
    ("dcm_qa_enh", "6", "REST1 w SMS PF7-8"): "bold",
    ("dcm_qa_nih", "4", "Axial EPI-FMRI (Interleaved I to S)"): "bold",
    ("dcm_qa_nih", "5", "Axial EPI-FMRI (Sequential I to S)"): "bold",
    ("dcm_qa_nih", "6", "Axial EPI-FMRI (Interleaved S to I)"): "bold",
    ("dcm_qa_nih", "7", "Axial EPI-FMRI (Sequential S to I)"): "bold",
    ("dcm_qa_nih", "3", "EPI PE=AP"): "bold",
    ("dcm_qa_nih", "4", "EPI PE=PA"): "bold",
    ("dcm_qa_nih", "5", "EPI PE=RL"): "bold",
    ("dcm_qa_nih", "6", "EPI PE=LR"): "bold",
    ("dcm_qa_philips_enh", "1901", "3DpCASL"): "asl",
    ("dcm_qa_philips_enh", "1903", "WIP SOURCE - 3DpCASL"): "asl",
    ("dcm_qa_philips_enh", "2001", "fcMRI Field Mapping"): "fieldmap",
    ("dcm_qa_toshiba", "7006", "DTI ortho"): "dwi",
    ("dcm_qa_toshiba", "10006", "DTI ALL 20d"): "dwi",
    ("dcm_qa_ts", "1", "ax_asc_35sl"): "bold",
    ("dcm_qa_xa30", "5", "anat-T1w_acq-tfl"): "t1_3d",
    ("dcm_qa_xa30", "6", "anat-T1w_acq-tfl"): "t1_3d",
    ("dcm_qa_xa30", "7", "func-bold_task-fa_run-1"): "bold",
    ("dcm_qa_xa30", "8", "gre_field_mapping"): "fieldmap",
    ("dcm_qa_xa30", "9", "gre_field_mapping"): "fieldmap",
    ("decubitus_t1_4positions", "2", "t1_fl2d_sag"): "t1_2d",
    ("decubitus_t1_4positions", "3", "t1_fl2d_sag"): "t1_2d",
    ("fnndsc_adi_brain", "5", "mocoMEMPRAGE_220FOV RMS"): "t1_3d",
    ("fnndsc_adi_brain", "6", "AX FSE T2"): "t2",
    ("fnndsc_adi_brain", "17", "Perfusion_Weighted"): "derived",
    ("fnndsc_adi_brain", "18", "relCBF"): "derived",
    ("philips_adni_mprage", "1301", "ADNI_Sag3D MPRAGE"): "t1_3d",
}
#: the vendors the corpora hold 3D T1s of, by Manufacturer
T1_VENDORS = {"Philips", "SIEMENS", "Siemens Healthineers"}


def classified(realdata: Path) -> dict[tuple[str, str, str], set[str]]:
    """(dataset, SeriesNumber, SeriesDescription) -> the roles its copies got (classic and
    enhanced copies of a series both count), through the folder walker the commands use."""
    roles = load_protocols().roles
    assert roles is not None
    fields = sorted(roles.fields() | {"SeriesNumber", "SeriesDescription"})
    found: dict[tuple[str, str, str], set[str]] = {}
    for dataset in sorted(p for p in realdata.iterdir() if p.is_dir()):
        skipped: list[SkippedFile] = []
        for series in index_folder(dataset, skipped).values():
            for entries in series.values():
                attrs = attributes(first_header(entries), fields)
                key = (dataset.name, str(attrs["SeriesNumber"]), str(attrs["SeriesDescription"]))
                found.setdefault(key, set()).add(roles.classify(attrs).role)
    return found


def test_every_real_series_gets_its_role(realdata: Path, figures) -> None:  # type: ignore[no-untyped-def]
    found = classified(realdata)
    assert set(found) == set(EXPECTED), "the corpora's series changed"
    wrong = {k: (v, EXPECTED[k]) for k, v in found.items() if v != {EXPECTED[k]}}
    assert not wrong, wrong
    t1s = sum(1 for role in EXPECTED.values() if role == "t1_3d")
    figures(f"real series roles: {len(found)} series of 10 corpora, all right; {t1s} 3D T1s")


@pytest.mark.slow
def test_every_real_series_keeps_its_role_once_anonymized(
    realdata: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The roles are decided again on the anonymized copy (the defacing, QC and volumetry of a
    run read it): anonymization must not change a physics or contrast attribute the rules read.
    The Z/D action wrote "ANONYMIZED" into the Philips ADNI T1's empty ContrastBolusAgent, and
    the T1 became post-contrast: its study had no reference T1 to deface."""
    from collections import Counter

    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_PSEUDONYM_KEY_SOURCE", "env:CF_TEST_PROJECT_KEY")
    monkeypatch.setenv("CF_TEST_PROJECT_KEY", "0123456789abcdef" * 4)
    roles = load_protocols().roles
    assert roles is not None
    fields = sorted(roles.fields())
    for dataset in sorted({d for d, _, _ in EXPECTED}):
        out = tmp_path / "anonymized" / dataset
        assert main(["anonymize", str(realdata / dataset), str(out), "--json"]) in (0, 1)
        found: Counter[str] = Counter()
        for series in index_folder(out, []).values():
            for entries in series.values():
                found[roles.classify(attributes(first_header(entries), fields)).role] += 1
        wanted = Counter(role for (d, _, _), role in EXPECTED.items() if d == dataset)
        # (a classic and an enhanced copy of one series count once in EXPECTED)
        assert set(found) == set(wanted), (dataset, found, wanted)


def test_enhanced_and_classic_copies_read_the_same_physics(realdata: Path) -> None:
    """The enhanced copy of a Canon DTI series answers TR, TE, flip angle and the sequence in the
    classic keywords, equal to its classic copy's."""
    roles = load_protocols().roles
    assert roles is not None
    base = realdata / "dcm_qa_canon_61" / "In"
    skipped: list[SkippedFile] = []
    keys = ["RepetitionTime", "EchoTime", "FlipAngle", "ScanningSequence", "MRAcquisitionType"]
    copies = []
    for folder in ("cl", "enh"):
        studies = index_folder(base / folder, skipped)
        series = next(s for st in studies.values() for s in st.values())
        copies.append(attributes(first_header(series), keys))
    classic, enhanced = copies
    assert (
        classic
        == enhanced
        == {
            "RepetitionTime": 10000.0,
            "EchoTime": 79.0,
            "FlipAngle": 90.0,
            "ScanningSequence": ["SE", "EP"],
            "MRAcquisitionType": "2D",
        }
    )


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        # a Siemens XA30 enhanced exam: its study description matches no protocol, and its 3D T1
        # is named after neither MPRAGE nor any other name rule; the physics tell
        ("dcm_qa_xa30/In", {"t1_3d": 2, "bold": 1, "fieldmap": 2}),
        ("fnndsc_adi_brain/dicom", {"t1_3d": 1, "t2": 1, "derived": 2}),
    ],
)
def test_qc_on_a_folder_without_protocol_says_each_series_role(
    realdata: Path,
    model_cache: Path,
    dataset: str,
    expected: dict[str, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))  # the head model, built once
    code = main(["qc", str(realdata / dataset), "--no-record", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    roles: dict[str, int] = {}
    for series in report["series"]:
        assert series["protocol"] == "auto"
        assert series["evidence"].startswith(f"role {series['role']} by match: "), series
        roles[series["role"]] = roles.get(series["role"], 0) + 1
    for series in report["not_checked"]:
        # "not selected by protocol auto (derived: ImageType contains DERIVED)"
        rule, why = series["reason"].split("(", 1)[1].split(": ", 1)
        roles[rule] = roles.get(rule, 0) + 1
        assert why
    assert roles == expected
    if dataset == "fnndsc_adi_brain/dicom":
        # series 5 lacks InstanceNumber 115 (a 2 mm gap in a 1 mm stack), series 6 lacks 35
        assert code == 1
        by_role = {s["role"]: s for s in report["series"]}
        for role in ("t1_3d", "t2"):
            checks = [f["check"] for st in by_role[role]["stages"] for f in st["findings"]]
            assert "header.missing_slices" in checks, (role, checks)
            assert by_role[role]["verdict"] == "fail"
