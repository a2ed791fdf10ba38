"""Header QC: each check on small hand-made series, with the value, threshold and reason."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from cohortflow.models.scanners import load_known_scanners
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.qc.findings import Severity, Verdict, verdict
from cohortflow.qc.header import SeriesFile, check_series, check_study, header_number
from cohortflow.qc.policy import QcPolicy, parse_policy

POLICY = load_protocols().get("dementia").qc
SCANNERS = load_known_scanners()


def _slice(z: float, n: int, **overrides: object) -> Dataset:
    """One axial slice of a conformant 3D T1 (Siemens MPRAGE) at height ``z``."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = f"1.2.3.{n}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.Modality = "MR"
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = (
        "SIEMENS",
        "Prisma_fit",
        "syngo MR E11",
    )
    ds.MagneticFieldStrength = "3"
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime, ds.EchoTime, ds.InversionTime, ds.FlipAngle = "2300", "2.98", "900", "9"
    ds.SliceThickness, ds.SpacingBetweenSlices = "1", "1"
    ds.Rows, ds.Columns = 8, 8
    ds.PixelSpacing = ["1", "1"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _series(positions: Iterable[float], **overrides: object) -> list[SeriesFile]:
    return [
        SeriesFile(f"IM{n:04d}", _slice(z, n, **overrides))
        for n, z in enumerate(positions, start=1)
    ]


def _checks(files: list[SeriesFile], policy: QcPolicy = POLICY, role: str = "t1_3d") -> list[str]:
    return [f.check for f in check_series(files, policy, role, SCANNERS).findings]


def test_a_conformant_series_has_no_finding_and_reports_its_geometry() -> None:
    result = check_series(_series(range(120)), POLICY, "t1_3d", SCANNERS)
    assert result.findings == ()
    assert verdict(result.findings) is Verdict.PASS
    assert result.metrics["slices"] == 120 and result.metrics["slice_spacing"] == 1.0
    assert result.metrics["missing_slices"] == 0 and result.metrics["duplicate_slices"] == 0
    assert result.metrics["RepetitionTime"] == 2300.0


def test_missing_slices_are_counted_and_located() -> None:
    files = _series(z for z in range(120) if z not in (50, 51, 52))
    result = check_series(files, POLICY, "t1_3d", SCANNERS)
    (finding,) = result.findings
    assert finding.check == "header.missing_slices" and finding.severity is Severity.FAIL
    assert finding.value == 3 and "between 49.00 and 53.00 mm" in finding.message


def test_a_second_image_at_one_position_is_a_duplicate_but_a_file_delivered_twice_is_not() -> None:
    files = _series(range(120))
    twice = SeriesFile("IM0060_copy", files[59].dataset)
    assert _checks([*files, twice]) == []
    extra = SeriesFile("IM9999", _slice(59.0, 9999))
    result = check_series([*files, extra], POLICY, "t1_3d", SCANNERS)
    (finding,) = result.findings
    assert finding.check == "header.duplicate_slices" and finding.value == 1
    assert "IM9999" in finding.message
    # two echoes at every position are not duplicates
    echoes = _series(range(20), EchoNumbers="1") + [
        SeriesFile(f"E2{n}", _slice(float(n), 1000 + n, EchoNumbers="2")) for n in range(20)
    ]
    assert "header.duplicate_slices" not in _checks(echoes, role="flair")


def test_irregular_positions_tilted_stacks_gaps_and_mixed_orientations() -> None:
    irregular = _series([*range(60), 60.5, *range(61, 120)])
    assert "header.irregular_spacing" in _checks(irregular)
    tilted = [
        SeriesFile(f"IM{n}", _slice(float(n), n, ImagePositionPatient=[0, 0.2 * n, n]))
        for n in range(60)
    ]
    findings = check_series(tilted, POLICY, "t1_3d", SCANNERS).findings
    tilt = next(f for f in findings if f.check == "header.gantry_tilt")
    assert tilt.severity is Severity.WARN and tilt.value == pytest.approx(11.31, abs=0.01)
    gappy = _series([7.0 * n for n in range(24)], SliceThickness="4", SpacingBetweenSlices="7")
    gap = next(
        f for f in check_series(gappy, POLICY, "flair").findings if f.check == "header.slice_gap"
    )
    assert gap.value == 0.75 and gap.severity is Severity.WARN
    mixed = _series(range(10)) + [
        SeriesFile(f"S{n}", _slice(0, 100 + n, ImageOrientationPatient=[0, 1, 0, 0, 0, -1]))
        for n in range(5)
    ]
    assert _checks(mixed) == ["header.mixed_orientation"]


def test_protocol_parameters_outside_their_ranges_name_value_and_range() -> None:
    # a spin echo where the protocol wants an MPRAGE (the synthetic cohort's wrong_parameters)
    files = _series(range(120), RepetitionTime="550", EchoTime="12", FlipAngle="90")
    findings = {f.check: f for f in check_series(files, POLICY, "t1_3d", SCANNERS).findings}
    assert set(findings) == {
        "header.conformance.RepetitionTime",
        "header.conformance.EchoTime",
        "header.conformance.FlipAngle",
    }
    tr = findings["header.conformance.RepetitionTime"]
    assert tr.value == 550.0 and tr.threshold == "5-15 or 1500-3000"
    assert "outside the protocol's 5-15 or 1500-3000" in tr.message
    # GE's per-echo TR is conformant too
    assert _checks(_series(range(120), RepetitionTime="8.2")) == []
    # thick slices, few of them
    thick = _checks(
        _series([2.0 * n for n in range(60)], SliceThickness="2", SpacingBetweenSlices="2")
    )
    assert set(thick) == {
        "header.conformance.SliceThickness",
        "header.conformance.VoxelSize",
        "header.conformance.Slices",
    }


def test_missing_attributes_wrong_modality_and_sop_class() -> None:
    files = _series(range(120), EchoTime=None, Manufacturer=None)
    findings = {f.check: f for f in check_series(files, POLICY, "t1_3d", SCANNERS).findings}
    assert findings["header.required_tags"].value == "Manufacturer, EchoTime"
    assert "header.conformance.EchoTime" in findings  # required by the t1_3d expectation
    assert "header.unknown_scanner" in findings
    ct = _checks(_series(range(120), Modality="CT", SOPClassUID=SecondaryCaptureImageStorage))
    assert {"header.modality", "header.sop_class"} <= set(ct)


def test_an_unknown_scanner_is_a_warning_that_says_why() -> None:
    files = _series(range(120), ManufacturerModelName="MAGNETOM Vida")
    (finding,) = check_series(files, POLICY, "t1_3d", SCANNERS).findings
    assert finding.check == "header.unknown_scanner" and finding.severity is Severity.WARN
    assert "model 'MAGNETOM Vida' of SIEMENS is not a known scanner" in finding.message
    assert verdict([finding]) is Verdict.WARN


def test_unreadable_files_are_reported_with_the_file_and_the_reason() -> None:
    files = [*_series(range(120)), SeriesFile("IM0121", None, "file cut short at 7000 bytes")]
    (finding,) = check_series(files, POLICY, "t1_3d", SCANNERS).findings
    assert finding.check == "header.unreadable_file" and finding.value == 1
    assert "IM0121: file cut short at 7000 bytes" in finding.message


def test_enhanced_mr_attributes_are_read_from_the_functional_groups() -> None:
    ds = _slice(0, 1)
    for keyword in (
        "RepetitionTime",
        "EchoTime",
        "InversionTime",
        "FlipAngle",
        "SliceThickness",
        "SpacingBetweenSlices",
        "PixelSpacing",
        "ImageOrientationPatient",
        "ImagePositionPatient",
    ):
        delattr(ds, keyword)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.NumberOfFrames = 120
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = (
        ["1", "1"],
        "1",
        "1",
    )
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    timing = Dataset()
    timing.RepetitionTime, timing.FlipAngle = 2300.0, 9.0
    echo = Dataset()
    echo.EffectiveEchoTime = 2.98
    modifier = Dataset()
    modifier.InversionTimes = [900.0]
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MREchoSequence = Sequence([echo])
    shared.MRModifierSequence = Sequence([modifier])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(120):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, k]
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    assert header_number(ds, "EchoTime") == 2.98 and header_number(ds, "InversionTime") == 900
    result = check_series([SeriesFile("IM0001", ds)], POLICY, "t1_3d", SCANNERS)
    assert result.findings == () and result.metrics["slices"] == 120


def test_severity_is_policy_per_protocol_and_family() -> None:
    relaxed = parse_policy(
        {},
        {"severity": {"header.missing_slices": "ignore", "header.conformance": "warn"}},
        "protocols.test.qc",
    )
    relaxed = relaxed.model_copy(update={"roles": POLICY.roles})
    files = _series(z for z in range(120) if z != 60)
    (missing,) = check_series(files, relaxed, "t1_3d").findings
    assert missing.severity is Severity.IGNORE and verdict([missing]) is Verdict.PASS
    (tr,) = check_series(_series(range(120), RepetitionTime="550"), relaxed, "t1_3d").findings
    assert tr.severity is Severity.WARN


def test_a_study_without_its_required_series_fails_with_the_missing_role() -> None:
    assert check_study(["t1_3d", "flair"], ("t1_3d",), POLICY) == []
    (finding,) = check_study(["flair", None], ("t1_3d",), POLICY)
    assert finding.check == "header.missing_required_series" and finding.value == "t1_3d"
    assert finding.severity is Severity.FAIL
