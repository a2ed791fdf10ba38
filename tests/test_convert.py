"""NIfTI conversion: dcm2niix with the SimpleITK fallback, the check against the DICOM geometry
and pixels, the allowlisted sidecar, BIDS names, reruns and the command line.

Small series are made here (a non-square matrix, an off-centre blob, gradients and noise, so a
flip or a row / column swap changes the voxels); the shared synthetic cohort is used read-only
for what only it has (vendor-like headers with every planted identifier). Geometry is verified
independently of ``pipelines.convert.check``: each DICOM pixel's position computed from its own
header must be a voxel centre of the NIfTI holding the same value.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from cohortflow.flows.cli import main
from cohortflow.models.database import open_index
from cohortflow.models.geometry import LPS_FROM_RAS, planes_of
from cohortflow.models.settings import BidsSettings, load_settings
from cohortflow.models.stages import stage_records
from cohortflow.models.synth import CohortTruth, Fault
from cohortflow.pipelines.convert import bids, sidecar
from cohortflow.pipelines.convert.check import SliceGrid, check_image, grid_findings, slice_grid
from cohortflow.pipelines.convert.dcm2niix import classify_output, find_dcm2niix
from cohortflow.pipelines.convert.errors import ConvertError
from cohortflow.pipelines.convert.folder import convert_folder
from cohortflow.pipelines.convert.results import ConvertedSeries, ConvertReport
from cohortflow.pipelines.dicom.cleaner import dataset_cleaner
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicom.protocols import ProtocolSet, load_protocols
from cohortflow.pipelines.synth.cohort import CohortResult
from cohortflow.qc.findings import Verdict

# --- small synthetic series -------------------------------------------------------------------

IDENTITY = {
    "PatientName": "TESTPERSON^ALICE",
    "PatientID": "PSEUDO-0042",
    "PatientBirthDate": "19500101",
    "InstitutionName": "Example Teaching Hospital",
    "InstitutionAddress": "1 Test Road, Testville",
    "StationName": "STATION77",
    "DeviceSerialNumber": "98765",
    "AccessionNumber": "ACC123456",
    "StudyID": "4711",
    "ReferringPhysicianName": "DOCTOR^DORIS",
    "OperatorsName": "OPERATOR^OLIVER",
}
ORIENTATIONS = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class Spec:
    """One series to write: a 3D T1 (sagittal) by default; see :data:`FLAIR`, :data:`T2`."""

    description: str = "t1_mprage_sag_p2_iso"
    orientation: str = "sagittal"
    series_number: int = 2
    slices: int = 24
    rows: int = 48
    columns: int = 40
    pixel_spacing: tuple[float, float] = (1.0, 0.9)  # between rows, between columns
    slice_spacing: float = 1.2
    acquisition: str = "3D"
    tr: float = 2300.0
    te: float = 2.98
    ti: float | None = 900.0
    flip: float = 9.0
    scanning_sequence: str = "GR\\IR"
    sequence_variant: str = "SK\\SP\\MP"
    missing: tuple[int, ...] = ()  # slices not written
    shear_mm: float = 0.0  # in-plane shift of each slice against the previous (along rows)
    gantry_tilt: float | None = None
    enhanced: bool = False  # one Enhanced MR object
    seed: int = 0


FLAIR = Spec(
    description="t2_tirm_tra_dark-fluid",
    orientation="axial",
    series_number=3,
    slices=20,
    rows=44,
    columns=52,
    pixel_spacing=(0.9, 0.9),
    slice_spacing=5.5,
    acquisition="2D",
    tr=9000.0,
    te=81.0,
    ti=2500.0,
    flip=150.0,
    scanning_sequence="SE\\IR",
    sequence_variant="SK\\SP\\MP",
    seed=1,
)
T2 = replace(
    FLAIR,
    description="t2_tse_tra",
    series_number=4,
    tr=5000.0,
    te=98.0,
    ti=None,
    scanning_sequence="SE",
    sequence_variant="SK",
    seed=2,
)


def _volume(spec: Spec) -> np.ndarray:
    """(slices, rows, columns) uint16: an off-centre blob on gradients, with noise."""
    rng = np.random.default_rng(spec.seed)
    k, r, c = np.mgrid[0 : spec.slices, 0 : spec.rows, 0 : spec.columns].astype(float)
    blob = np.exp(
        -(
            ((k - 0.35 * spec.slices) / (0.25 * spec.slices)) ** 2
            + ((r - 0.3 * spec.rows) / (0.2 * spec.rows)) ** 2
            + ((c - 0.65 * spec.columns) / (0.2 * spec.columns)) ** 2
        )
    )
    img = 200 + 1500 * blob + 6 * r + 3 * c + 4 * k + rng.integers(0, 40, k.shape)
    return img.astype(np.uint16)


def _common(ds: Dataset, spec: Spec, study: Study) -> None:
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    ds.ImageComments = "Alice Testperson DOB 19500101"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.date
    ds.StudyTime = "101500"
    ds.PatientSex = "F"
    ds.PatientAge = "071Y"
    ds.StudyInstanceUID = study.uid
    ds.StudyDescription = study.description
    ds.SeriesInstanceUID = spec_uid(study, spec)
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.description
    ds.ProtocolName = spec.description
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Prisma_fit"
    ds.SoftwareVersions = "syngo MR E11"
    ds.MagneticFieldStrength = "3"
    ds.FrameOfReferenceUID = study.frame
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.ReceiveCoilName = "HeadNeck_20"
    ds.MRAcquisitionType = spec.acquisition
    ds.ScanningSequence = spec.scanning_sequence
    ds.SequenceVariant = spec.sequence_variant
    ds.ScanOptions = "IR" if spec.ti else ""
    ds.SequenceName = "synthetic"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0


@dataclass(frozen=True)
class Study:
    uid: str
    frame: str
    date: str = "20200315"
    description: str = "MRI BRAIN MS PROTOCOL"


def spec_uid(study: Study, spec: Spec) -> str:
    return f"{study.uid}.{spec.series_number}"


def new_study(date: str = "20200315", n: int = 1) -> Study:
    root = f"1.2.826.0.1.3680043.10.1455.9.{n}"
    return Study(uid=root, frame=f"{root}.0", date=date)


def write_series(folder: Path, spec: Spec, study: Study) -> list[Path]:
    """Write ``spec`` into ``folder`` (one file per slice, or one Enhanced MR object)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = _volume(spec)
    row, col = (np.array(v) for v in ORIENTATIONS[spec.orientation])
    normal = np.cross(row, col)
    origin = np.array([-30.0, -40.0, 25.0]) - normal * 0.5 * spec.slices * spec.slice_spacing

    def position(k: int) -> list[str]:
        p = origin + k * spec.slice_spacing * normal + k * spec.shear_mm * col
        return [f"{x:.6f}" for x in p]

    orientation = [f"{x:g}" for x in (*row, *col)]
    spacing = [f"{spec.pixel_spacing[0]:g}", f"{spec.pixel_spacing[1]:g}"]
    if spec.enhanced:
        return [_write_enhanced(folder, spec, study, volume, position, orientation, spacing)]
    paths = []
    for k in range(spec.slices):
        if k in spec.missing:
            continue
        ds = Dataset()
        sop = generate_uid(entropy_srcs=[spec_uid(study, spec), str(k)])
        ds.file_meta = _meta(MRImageStorage, sop)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        _common(ds, spec, study)
        ds.AcquisitionDate = study.date
        ds.AcquisitionTime = "102000"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = f"{spec.tr:g}", f"{spec.te:g}", spec.flip
        if spec.ti is not None:
            ds.InversionTime = f"{spec.ti:g}"
        ds.SliceThickness = f"{spec.slice_spacing:g}"
        ds.SpacingBetweenSlices = f"{spec.slice_spacing:g}"
        if spec.gantry_tilt is not None:
            ds.GantryDetectorTilt = spec.gantry_tilt
        ds.ImagePositionPatient = position(k)
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = spacing
        ds.PixelData = np.ascontiguousarray(volume[k], "<u2").tobytes()
        path = folder / f"IM{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _meta(sop_class: str, sop: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _write_enhanced(
    folder: Path,
    spec: Spec,
    study: Study,
    volume: np.ndarray,
    position: Callable[[int], list[str]],
    orientation: list[str],
    spacing: list[str],
) -> Path:
    ds = Dataset()
    sop = generate_uid(entropy_srcs=[spec_uid(study, spec), "enhanced"])
    ds.file_meta = _meta(EnhancedMRImageStorage, sop)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, sop
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    _common(ds, spec, study)
    ds.AcquisitionDateTime = f"{study.date}102000"
    ds.InstanceNumber = 1
    ds.NumberOfFrames = spec.slices
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = spacing
    measures.SliceThickness = f"{spec.slice_spacing:g}"
    measures.SpacingBetweenSlices = f"{spec.slice_spacing:g}"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = orientation
    shared.PlaneOrientationSequence = DicomSequence([orient])
    timing = Dataset()
    timing.RepetitionTime, timing.FlipAngle = spec.tr, spec.flip
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = spec.te
    shared.MREchoSequence = DicomSequence([echo])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(spec.slices):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = position(k)
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    organization = generate_uid(entropy_srcs=[sop, "dimensions"])
    org = Dataset()
    org.DimensionOrganizationUID = organization
    ds.DimensionOrganizationSequence = DicomSequence([org])
    pointers = []
    for pointer in (0x00209056, 0x00209057):  # StackID, InStackPositionNumber
        index = Dataset()
        index.DimensionOrganizationUID = organization
        index.DimensionIndexPointer = pointer
        index.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        pointers.append(index)
    ds.DimensionIndexSequence = DicomSequence(pointers)
    ds.PixelData = np.ascontiguousarray(volume, "<u2").tobytes()
    path = folder / "IM00001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(root: Path, study: Study, specs: Sequence[Spec]) -> dict[str, list[Path]]:
    return {
        spec.description: write_series(root / f"SE{spec.series_number:02d}", spec, study)
        for spec in specs
    }


# --- independent verification -----------------------------------------------------------------


def _pixels_with_positions(files: Sequence[Path]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(LPS position, value) of a few pixels of every image, from each file's own header."""
    for path in files:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        for plane in planes_of(ds, 0):
            pixels = arr if plane.frame is None else arr[plane.frame]
            for r, c in (
                (0, 0),
                (plane.rows - 1, 0),
                (0, plane.columns - 1),
                (plane.rows // 2, plane.columns // 3),
                (plane.rows // 3, plane.columns - 2),
            ):
                lps = plane.origin + r * plane.spacing[0] * plane.col_dir
                lps = lps + c * plane.spacing[1] * plane.row_dir
                yield lps, np.asarray(pixels[r, c], float)


def assert_holds_dicom(nifti: Path, files: Sequence[Path], tolerance_mm: float = 0.1) -> None:
    """Every sampled DICOM pixel lies on a voxel centre of ``nifti`` holding its value."""
    image = nib.load(nifti)
    data = np.asanyarray(image.dataobj)
    to_voxel = np.linalg.inv(LPS_FROM_RAS @ image.affine)
    zooms = np.array(image.header.get_zooms()[:3])
    checked = 0
    for lps, value in _pixels_with_positions(files):
        ijk = (to_voxel @ np.array([*lps, 1.0]))[:3]
        nearest = np.rint(ijk)
        assert np.all(np.abs(ijk - nearest) * zooms <= tolerance_mm), (ijk, lps)
        assert np.all(nearest >= 0) and np.all(nearest < data.shape[:3]), (nearest, data.shape)
        assert float(data[tuple(nearest.astype(int))]) == pytest.approx(float(value)), ijk
        checked += 1
    assert checked


def only(report: ConvertReport, description: str) -> ConvertedSeries:
    found = [s for s in report.series if s.description == description]
    assert len(found) == 1, [s.description for s in report.series]
    return found[0]


def checks(result: ConvertedSeries) -> dict[str, object]:
    return {f.check: f.value for f in result.findings}


@pytest.fixture(scope="module")
def protocols() -> ProtocolSet:
    return load_protocols()


def fake_dcm2niix(folder: Path, body: str) -> Path:
    """An executable answering ``--version`` like dcm2niix, doing ``body`` (bash) otherwise."""
    path = folder / "fake-dcm2niix"
    path.write_text(
        '#!/bin/bash\nif [ "$1" = "--version" ]; then echo "v9.9.9"; exit 3; fi\n' + body + "\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --- the pure check ---------------------------------------------------------------------------


def _grid_and_image(
    spec: Spec, tmp_path: Path
) -> tuple[SliceGrid, np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    files = write_series(tmp_path / "series", spec, new_study())
    datasets = [pydicom.dcmread(f) for f in files]
    planes = [p for i, ds in enumerate(datasets) for p in planes_of(ds, i)]
    grid = slice_grid(planes)
    # the image as a converter should write it, built here from the grid: (c, r, k) voxels
    volume = np.zeros(grid.shape, np.float64)
    for plane, slot in zip(grid.planes, grid.slots, strict=True):
        volume[:, :, slot] = datasets[plane.instance].pixel_array.T
    affine = LPS_FROM_RAS @ grid.index_to_lps()
    samples = {}
    for slot in (3, 10, 17):
        plane = grid.plane_of(slot)
        assert plane is not None
        samples[slot] = datasets[plane.instance].pixel_array.astype(float)
    return grid, affine, volume, samples


def test_check_passes_a_faithful_image_in_any_axis_order_and_catches_flips(tmp_path: Path) -> None:
    grid, affine, volume, samples = _grid_and_image(Spec(), tmp_path)
    assert check_image(grid, affine, volume, samples).passed
    # the same image stored with reversed and permuted axes (as dcm2niix reorients) still passes
    flip_x = np.diag([-1.0, 1, 1, 1])
    flip_x[0, 3] = grid.columns - 1
    reordered = np.transpose(volume[::-1], (2, 0, 1))
    swap = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    assert check_image(grid, affine @ flip_x @ swap, reordered, samples).passed
    # a flip of the voxels that leaves the affine alone is caught by the data
    flipped = check_image(grid, affine, volume[:, ::-1, :], samples)
    assert not flipped.passed and flipped.findings[0].check == "convert.data_mismatch"
    slice_flip = check_image(grid, affine, volume[:, :, ::-1], samples)
    assert [f.check for f in slice_flip.findings] == ["convert.data_mismatch"]
    # a flipped affine (voxels untouched) is caught by the geometry
    bad = check_image(grid, affine @ np.diag([1.0, -1, 1, 1]), volume, samples)
    assert not bad.passed and bad.findings[0].check == "convert.geometry"
    assert bad.findings[0].value > 10
    # a slice short, a shifted origin, a wrong slice spacing, a transposed image
    assert check_image(grid, affine, volume[:, :, :-1], samples).findings[0].check == (
        "convert.slice_count"
    )
    moved = affine.copy()
    moved[:3, 3] += [0.0, 0.3, 0.0]
    shifted = check_image(grid, moved, volume, samples)
    assert shifted.findings[0].check == "convert.geometry" and shifted.findings[0].value == (
        pytest.approx(0.3, abs=0.01)
    )
    stretched = affine.copy()
    stretched[:3, 2] *= 1.01
    assert check_image(grid, stretched, volume, samples).findings[0].check == "convert.geometry"
    # rows and columns swapped in both the voxels and the affine: the same image
    assert check_image(grid, affine[:, [1, 0, 2, 3]], volume.transpose(1, 0, 2), samples).passed
    # ... in the voxels only: not the DICOM matrix
    swapped = check_image(grid, affine, volume.transpose(1, 0, 2), samples)
    assert swapped.findings[0].check == "convert.matrix"
    # axes turned by 2 degrees about the slice normal
    turn = np.radians(2.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    turned = check_image(grid, rotation @ affine, volume, samples)
    assert turned.findings[0].check == "convert.orientation"
    # rescaled voxels (a converter storing floats with a slope) are the same image
    assert check_image(grid, affine, volume * 0.5 + 10, samples).passed
    assert not check_image(grid, affine, -volume, samples).passed  # inverted contrast


def test_slice_grid_orders_planes_and_reports_gaps_duplicates_and_tilt(tmp_path: Path) -> None:
    spec = Spec(missing=(7, 8), shear_mm=0.4, gantry_tilt=18.4)
    files = write_series(tmp_path / "s", spec, new_study())
    datasets = [pydicom.dcmread(f) for f in reversed(files)]  # any file order
    datasets.append(datasets[5])  # one image again (a second instance at a position)
    grid = slice_grid([p for i, ds in enumerate(datasets) for p in planes_of(ds, i)])
    assert grid.count == spec.slices and grid.missing == (7, 8)
    assert len(grid.duplicates) == 1
    assert grid.sheared and grid.tilt_degrees == pytest.approx(np.degrees(np.arctan(0.4 / 1.2)))
    found = {f.check: f.value for f in grid_findings(grid, 18.4)}
    assert found["convert.missing_slices"] == 2 and found["convert.duplicate_slices"] == 1
    assert found["convert.gantry_tilt"] == pytest.approx(18.43, abs=0.01)
    # a header tilt without sheared positions is reported, not resampled
    files = write_series(tmp_path / "straight", Spec(slices=5), new_study())
    straight = slice_grid(
        [p for i, f in enumerate(files) for p in planes_of(pydicom.dcmread(f), i)]
    )
    (tilt,) = grid_findings(straight, 12.0)
    assert tilt.value == 12.0 and "no resampling" in tilt.message
    # several orientations are no volume
    axial = write_series(tmp_path / "a", replace(FLAIR, slices=3), new_study())
    mixed = [*datasets[:3], *(pydicom.dcmread(f) for f in axial)]
    with pytest.raises(ConvertError) as raised:
        slice_grid([p for i, ds in enumerate(mixed) for p in planes_of(ds, i)])
    assert raised.value.code == "convert.not_a_volume"


def test_sidecar_allowlist_drops_identifying_keys_and_identifying_text() -> None:
    raw = {
        "Manufacturer": "Siemens",
        "InstitutionName": "Example Teaching Hospital",
        "InstitutionAddress": "1 Test Road",
        "StationName": "STATION77",
        "DeviceSerialNumber": "98765",
        "ImageComments": "Alice Testperson DOB 19500101",
        "AcquisitionTime": "10:20:00.000000",
        "AcquisitionDateTime": "2020-03-15T10:20:00",
        "StudyDescription": "MRI BRAIN",
        "SeriesDescription": "t1 TESTPERSON",
        "ProtocolName": "t1_mprage",
        "EchoTime": 0.00298,
        "BidsGuess": ["anat", "_T1w"],
    }
    kept = sidecar.from_dcm2niix(raw)
    assert set(kept) == {"Manufacturer", "SeriesDescription", "ProtocolName", "EchoTime"}
    header = Dataset()
    header.PatientName = "TESTPERSON^ALICE"
    header.StudyID = "4711"
    clean, cleaned, dropped = sidecar.clean_identifiers(
        {**kept, "SequenceName": "tfl47115", "ScanOptions": "x 4711"},
        dataset_cleaner(header),
    )
    # the descriptor is cleaned, another text holding an identifier left out; a number counts
    # where it stands as a whole number: 47115 is not the StudyID 4711
    assert (cleaned, dropped) == (["SeriesDescription"], ["ScanOptions"])
    assert clean["SeriesDescription"] == "t1"
    assert clean["ProtocolName"] == "t1_mprage" and clean["SequenceName"] == "tfl47115"


def test_output_kinds_of_dcm2niix_are_told_apart() -> None:
    kinds = {p: classify_output(p) for p in ("", "_Tilt_1", "_Eq_1", "_Tilt_Eq_1", "_ROI1")}
    assert kinds == {
        "": "image",
        "_Tilt_1": "tilt_corrected",
        "_Eq_1": "equalized",
        "_Tilt_Eq_1": "tilt_corrected_equalized",
        "_ROI1": "roi",
    }
    assert classify_output("_e2") == "echo" and classify_output("_i00004") == "instance"
    assert classify_output("_ph") == "phase" and classify_output("_something") == "other"


def test_dcm2niix_is_found_beside_the_interpreter_with_its_version(tmp_path: Path) -> None:
    tool = find_dcm2niix()
    assert tool.executable.parent == Path(sys.executable).parent
    assert re.fullmatch(r"v1\.\d+\.\d+", tool.version)
    with pytest.raises(ConvertError) as raised:
        find_dcm2niix(tmp_path / "nowhere" / "dcm2niix")
    assert raised.value.code == "convert.dcm2niix_unavailable"
    assert "nowhere" in raised.value.message


# --- conversion of small series ---------------------------------------------------------------


def test_sagittal_3d_t1_and_axial_series_convert_with_dcm2niix_onto_the_dicom_geometry(
    tmp_path: Path, protocols: ProtocolSet, figures: Callable[[str], None]
) -> None:
    files = write_study(tmp_path / "in", new_study(), [Spec(), FLAIR, T2])
    start = time.perf_counter()
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols)
    figures(f"convert: 3 small series in {time.perf_counter() - start:.2f} s")
    assert report.dcm2niix is not None and not report.failed
    anat = tmp_path / "out" / "sub-PSEUDO0042" / "ses-1" / "anat"
    names = {"t1_mprage_sag_p2_iso": "T1w", "t2_tirm_tra_dark-fluid": "FLAIR", "t2_tse_tra": "T2w"}
    for description, suffix in names.items():
        result = only(report, description)
        assert result.verdict is Verdict.PASS, result.findings
        assert result.converter == "dcm2niix" and result.fallback_reason is None
        assert result.nifti == anat / f"sub-PSEUDO0042_ses-1_{suffix}.nii.gz"
        assert result.sidecar == anat / f"sub-PSEUDO0042_ses-1_{suffix}.json"
        assert_holds_dicom(result.nifti, files[description])
        meta = json.loads(result.sidecar.read_text())
        assert meta["ConversionSoftware"] == "dcm2niix"
        assert meta["CohortflowConverter"] == f"dcm2niix {report.dcm2niix}"
        assert meta["SeriesDescription"] == description
    t1 = only(report, "t1_mprage_sag_p2_iso")
    assert t1.slices == 24 and sorted(t1.shape or ()) == [24, 40, 48]
    assert sorted(t1.voxel_mm or ()) == pytest.approx([0.9, 1.0, 1.2])
    assert t1.role == "t1_3d" and t1.protocol == "ms"


def test_sidecar_and_nifti_header_hold_no_identifier_and_no_date(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    write_study(tmp_path / "in", new_study(), [Spec()])
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols)
    (result,) = report.series
    assert result.sidecar is not None and result.nifti is not None
    meta = json.loads(result.sidecar.read_text())
    assert set(meta) - set(sidecar.ALLOWED) == {
        "CohortflowConverter",
        "CohortflowMethodVersion",
        "CohortflowSeriesKey",
        "CohortflowDeidentified",
        "CohortflowDefaced",
    }
    assert meta["CohortflowDeidentified"] is False and meta["CohortflowDefaced"] is False
    assert meta["ReceiveCoilName"] == "HeadNeck_20"
    assert not [k for k in meta if "Date" in k]
    assert {k for k in meta if "Time" in k} <= {"EchoTime", "RepetitionTime", "InversionTime"}
    with gzip.open(result.nifti) as fh:
        header = fh.read(348)
    for text in (result.sidecar.read_bytes(), header):
        lower = text.lower()
        for value in (*IDENTITY.values(), "20200315", "testperson", "alice", "10:20", "102000"):
            assert value.lower().encode() not in lower, value
    assert nib.load(result.nifti).header["descrip"].tobytes().startswith(b"cohortflow convert-2")


def test_a_failing_dcm2niix_falls_back_to_simpleitk(tmp_path: Path, protocols: ProtocolSet) -> None:
    files = write_study(tmp_path / "in", new_study(), [Spec(), FLAIR])
    failing = fake_dcm2niix(tmp_path, 'echo "Error: out of luck" >&2; exit 1')
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols, dcm2niix=failing)
    assert report.dcm2niix == "v9.9.9"
    for description in ("t1_mprage_sag_p2_iso", "t2_tirm_tra_dark-fluid"):
        result = only(report, description)
        assert result.converter == "SimpleITK" and result.verdict is Verdict.WARN
        assert result.fallback_reason == "convert.dcm2niix_failed"
        assert result.fallback_message and "out of luck" in result.fallback_message
        assert checks(result)["convert.fallback"] == "convert.dcm2niix_failed"
        assert result.nifti is not None and result.sidecar is not None
        assert_holds_dicom(result.nifti, files[description])
        meta = json.loads(result.sidecar.read_text())
        assert meta["ConversionSoftware"] == "SimpleITK"
        assert meta["CohortflowConverter"].startswith("SimpleITK 2.")
        assert meta["CohortflowFallbackReason"] == "convert.dcm2niix_failed"
        assert meta["RepetitionTime"] == pytest.approx(2.3 if description.startswith("t1") else 9.0)
        assert "InstitutionName" not in meta and "StationName" not in meta


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("exit 0", "convert.no_output"),
        ("sleep 30", "convert.dcm2niix_timeout"),
    ],
)
def test_fallback_reasons_no_output_and_timeout(
    tmp_path: Path, protocols: ProtocolSet, body: str, reason: str
) -> None:
    write_study(tmp_path / "in", new_study(), [Spec()])
    tool = fake_dcm2niix(tmp_path, body)
    start = time.perf_counter()
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols, dcm2niix=tool, timeout=1)
    assert time.perf_counter() - start < 20
    (result,) = report.series
    assert result.converter == "SimpleITK" and result.fallback_reason == reason


def test_a_flipped_dcm2niix_image_is_caught_and_replaced_by_the_fallback(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    files = write_study(tmp_path / "in", new_study(), [Spec()])
    real = find_dcm2niix().executable
    flip = (
        "import glob, nibabel as n, numpy as np\n"
        "for f in glob.glob(sys.argv[1] + '/*.nii'):\n"
        "    i = n.load(f, mmap=False)\n"
        "    d = np.asanyarray(i.dataobj)[::-1].copy()\n"
        "    n.save(n.Nifti1Image(d, i.affine, i.header), f)\n"
    )
    script = tmp_path / "flip.py"
    script.write_text("import sys\n" + flip)
    # the real dcm2niix, then its images mirrored along their first axis, affine untouched
    tool = fake_dcm2niix(
        tmp_path,
        f'"{real}" "$@" || exit $?\n'
        'out=""; prev=""; for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
        f'"{sys.executable}" "{script}" "$out"',
    )
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols, dcm2niix=tool)
    (result,) = report.series
    assert result.fallback_reason == "convert.data_mismatch", result.findings
    assert result.fallback_message and "flipped" in result.fallback_message
    assert result.converter == "SimpleITK" and result.nifti is not None
    assert_holds_dicom(result.nifti, files["t1_mprage_sag_p2_iso"])


def test_enhanced_multiframe_series_is_converted_and_reported(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    files = write_study(tmp_path / "in", new_study(), [Spec(enhanced=True)])
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols)
    (result,) = report.series
    assert result.verdict is Verdict.PASS and result.converter == "dcm2niix"
    assert checks(result)["convert.multiframe"] == 24
    assert result.nifti is not None
    assert_holds_dicom(result.nifti, files["t1_mprage_sag_p2_iso"])
    # SimpleITK places the frames as well
    failing = fake_dcm2niix(tmp_path, "exit 1")
    again = convert_folder(tmp_path / "in", tmp_path / "out2", protocols, dcm2niix=failing)
    (fallback,) = again.series
    assert fallback.converter == "SimpleITK" and fallback.nifti is not None
    assert_holds_dicom(fallback.nifti, files["t1_mprage_sag_p2_iso"])


def test_a_missing_slice_is_filled_on_the_dicom_grid_and_reported(
    tmp_path: Path, protocols: ProtocolSet, capfd: pytest.CaptureFixture[str]
) -> None:
    files = write_study(tmp_path / "in", new_study(), [Spec(missing=(11,))])
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols)
    (result,) = report.series
    assert result.verdict is Verdict.WARN and checks(result)["convert.missing_slices"] == 1
    # reported once, as a finding: not also by ITK's reader on the process's stderr (it cluttered
    # the demo's progress lines)
    assert result.converter.startswith("SimpleITK"), result.converter
    assert "missing slices" not in capfd.readouterr().err
    assert result.slices == 24 and result.images == 23 and result.nifti is not None
    assert_holds_dicom(result.nifti, files["t1_mprage_sag_p2_iso"])
    # the gap holds the mean of its neighbours
    image = nib.load(result.nifti)
    data = np.asanyarray(image.dataobj).astype(float)
    to_voxel = np.linalg.inv(LPS_FROM_RAS @ image.affine)
    first = pydicom.dcmread(files["t1_mprage_sag_p2_iso"][0])
    normal = np.cross(
        np.array(first.ImageOrientationPatient[:3], float),
        np.array(first.ImageOrientationPatient[3:], float),
    )
    centre = np.array(first.ImagePositionPatient, float) + 11 * 1.2 * normal
    slot = np.rint(to_voxel @ np.array([*centre, 1.0]))[:3].astype(int)
    axis = int(np.argmax(np.abs(to_voxel[:3, :3] @ normal)))
    before, gap, after = (np.take(data, slot[axis] + d, axis=axis) for d in (-1, 0, 1))
    assert np.allclose(gap, (before + after) / 2, atol=0.51)


def test_gantry_tilt_is_corrected_by_dcm2niix_and_reported(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    # axial slices whose positions drift along the rows: a tilted stack (as CT gantry tilt)
    tilted = replace(FLAIR, shear_mm=5.5 * np.tan(np.radians(12.0)), gantry_tilt=12.0)
    write_study(tmp_path / "in", new_study(), [tilted, replace(T2, gantry_tilt=3.0)])
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols)
    result = only(report, "t2_tirm_tra_dark-fluid")
    assert result.verdict is Verdict.WARN, result.findings
    assert checks(result)["convert.gantry_tilt"] == pytest.approx(12.0, abs=0.01)
    assert result.converter == "dcm2niix" and result.metrics["resampled"] is True
    # dcm2niix wrote the stack as stored and the tilt-corrected one: the latter is kept
    assert result.extra_outputs and "(plain)" in result.extra_outputs[0]
    assert "convert.extra_outputs" in checks(result)
    # a tilt in the header only: reported, nothing resampled
    header_only = only(report, "t2_tse_tra")
    assert checks(header_only)["convert.gantry_tilt"] == 3.0
    assert header_only.metrics["resampled"] is False and not header_only.extra_outputs


def test_one_failing_series_never_stops_the_others(tmp_path: Path, protocols: ProtocolSet) -> None:
    files = write_study(tmp_path / "in", new_study(), [Spec(), FLAIR])
    for path in files["t2_tirm_tra_dark-fluid"][:3]:  # three slices lose their position
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols)
    flair = only(report, "t2_tirm_tra_dark-fluid")
    assert flair.verdict is Verdict.FAIL and flair.reason is not None
    assert flair.reason.check == "convert.no_geometry" and not flair.converted
    assert "ImagePositionPatient" in flair.reason.message
    assert only(report, "t1_mprage_sag_p2_iso").verdict is Verdict.PASS


def test_a_folder_run_announces_its_total_before_the_first_series(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    # the command line's progress shows "1/2", not "1/?": the total comes once the folder is
    # read, before any series is done, and matches the series reported
    write_study(tmp_path / "in", new_study(), [Spec(), FLAIR])
    heard: list[object] = []
    convert_folder(
        tmp_path / "in",
        tmp_path / "out",
        protocols,
        every_series=True,
        progress=lambda item: heard.append("done"),
        expect=heard.append,
    )
    assert heard == [2, "done", "done"]


def test_both_converters_failing_fails_the_series_with_both_reasons(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    # tilted and with a gap: dcm2niix (here failing) would be needed, SimpleITK cannot place it
    spec = replace(FLAIR, shear_mm=1.0, missing=(9,))
    write_study(tmp_path / "in", new_study(), [spec, Spec()])
    failing = fake_dcm2niix(tmp_path, "exit 2")
    report = convert_folder(tmp_path / "in", tmp_path / "out", protocols, dcm2niix=failing)
    result = only(report, "t2_tirm_tra_dark-fluid")
    assert result.verdict is Verdict.FAIL and not result.converted
    codes = [f.check for f in result.findings if f.severity.value == "fail"]
    assert codes == ["convert.dcm2niix_failed", "convert.sitk_failed"]
    assert result.reason is not None and "status 2" in result.reason.message
    assert only(report, "t1_mprage_sag_p2_iso").converter == "SimpleITK"


# --- BIDS layout, names, reruns ---------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    """The BIDS files under ``root`` (not the hidden lock folder, which BIDS tools skip)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    }


def test_bids_layout_sessions_runs_and_idempotent_reruns(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    later, earlier = new_study("20210601", 2), new_study("20190101", 1)
    write_study(tmp_path / "in" / "b", later, [Spec(), replace(Spec(), series_number=5, seed=4)])
    write_study(tmp_path / "in" / "a", earlier, [Spec(), FLAIR])
    out = tmp_path / "out"
    report = convert_folder(tmp_path / "in", out, protocols)
    assert not report.failed
    tree = _tree(out)
    subject = "sub-PSEUDO0042"
    assert set(tree) == {
        "dataset_description.json",
        "README.md",  # no participants.tsv: the input was not de-identified
        "sessions.json",
        f"{subject}/{subject}_sessions.tsv",
        *(
            f"{subject}/ses-{ses}/anat/{subject}_ses-{ses}_{name}.{ext}"
            for ses, name in (
                ("1", "T1w"),
                ("1", "FLAIR"),
                ("2", "run-1_T1w"),
                ("2", "run-2_T1w"),
            )
            for ext in ("nii.gz", "json")
        ),
    }
    description = json.loads(tree["dataset_description.json"])
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "cohortflow"
    sessions = tree[f"{subject}/{subject}_sessions.tsv"].decode()
    assert sessions.splitlines()[0] == "session_id\tcohortflow_study_key\tage"
    assert later.uid not in sessions and earlier.uid not in sessions
    # a rerun writes the same bytes and nothing else
    convert_folder(tmp_path / "in", out, protocols)
    assert _tree(out) == tree
    # a study converted on its own keeps its session; a new one gets the next number
    convert_folder(tmp_path / "in" / "b", out, protocols)
    assert _tree(out) == tree
    third = new_study("20180101", 3)  # earlier than both, but new: numbered after them
    write_study(tmp_path / "in3", third, [Spec()])
    (result,) = convert_folder(tmp_path / "in3", out, protocols).series
    assert result.session == "3" and result.name == f"{subject}_ses-3_T1w"
    # a series whose name changes (its run number: the other T1 of ses-2 is gone from the
    # input) leaves no copy under the old name; the other series' files are not touched
    shutil.rmtree(tmp_path / "in" / "b" / "SE05")
    convert_folder(tmp_path / "in" / "b", out, protocols)
    anat2 = sorted(p.name for p in (out / subject / "ses-2" / "anat").iterdir())
    assert anat2 == [
        f"{subject}_ses-2_T1w.json",
        f"{subject}_ses-2_T1w.nii.gz",
        f"{subject}_ses-2_run-2_T1w.json",
        f"{subject}_ses-2_run-2_T1w.nii.gz",
    ]
    assert (out / subject / "ses-2" / "anat" / f"{subject}_ses-2_T1w.nii.gz").read_bytes() == (
        tree[f"{subject}/ses-2/anat/{subject}_ses-2_run-1_T1w.nii.gz"]
    )


def test_every_series_option_names_the_others_by_a_guess(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    study = replace(new_study(), description="MRI BRAIN")  # the open protocol: T1 and FLAIR
    write_study(tmp_path / "in", study, [Spec(), FLAIR, T2])
    default = convert_folder(tmp_path / "in", tmp_path / "out", protocols)
    assert {s.description for s in default.series} == {"t1_mprage_sag_p2_iso", FLAIR.description}
    (left,) = default.not_converted
    assert left.reason_code == "not_selected" and left.description == "t2_tse_tra"
    every = convert_folder(tmp_path / "in", tmp_path / "out", protocols, every_series=True)
    t2 = only(every, "t2_tse_tra")
    assert t2.role == "" and t2.name == "sub-PSEUDO0042_ses-1_acq-guessed_T2w"
    assert t2.verdict is Verdict.PASS
    assert bids.guess_suffix(pydicom.dcmread(next((tmp_path / "in" / "SE03").iterdir()))) == (
        "FLAIR"
    )


def test_sessions_are_numbered_by_date_and_kept(tmp_path: Path) -> None:
    sessions = bids.Sessions.load(tmp_path, "X1")
    sessions.assign([("1.2.3", "20200101"), ("1.2.2", "20190101")])
    sessions.save()
    assert sessions.label("1.2.2") == "1" and sessions.label("1.2.3") == "2"
    again = bids.Sessions.load(tmp_path, "X1")
    again.assign([("1.2.1", "20000101"), ("1.2.3", "20200101")])
    assert again.label("1.2.3") == "2" and again.label("1.2.1") == "3"
    assert bids.bids_label("MRN-0042/ä_b") == "MRN0042b"


def test_ages_and_sexes_become_bids_values_without_detail() -> None:
    assert [
        bids.age_years(v) for v in ("065Y", "018M", "010W", "400D", "095Y", "", "65", None)
    ] == [
        65,
        1,
        0,
        1,
        90,
        None,
        None,
        None,
    ]
    assert [bids.bids_sex(v) for v in ("M", "f ", "O", "", "X", None)] == ["M", "F", "O"] + [
        None
    ] * 3


def test_an_older_sessions_file_gains_the_age_column_and_keeps_its_numbers(tmp_path: Path) -> None:
    path = tmp_path / "sub-X1" / "sub-X1_sessions.tsv"
    path.parent.mkdir()
    key = bids.hashed_key("study", "1.2.3")
    path.write_text(f"session_id\tcohortflow_study_key\tgroup\nses-4\t{key}\tpatients\n")
    sessions = bids.Sessions.load(tmp_path, "X1")
    sessions.assign([("1.2.3", "20200101"), ("1.2.9", "20210101")])
    sessions.note_age("1.2.9", 70)
    sessions.save()
    assert path.read_text().splitlines() == [
        "session_id\tcohortflow_study_key\tage\tgroup",
        f"ses-4\t{key}\tn/a\tpatients",
        f"ses-5\t{bids.hashed_key('study', '1.2.9')}\t70\tn/a",
    ]


def _retag(files: Iterable[Path], **values: str) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _bids_validator() -> Path | None:
    beside = Path(sys.executable).with_name("bids-validator-deno")
    found = shutil.which("bids-validator-deno")
    return beside if beside.exists() else (Path(found) if found else None)


def _validate(folder: Path, deno_dir: Path) -> dict[str, Any]:
    """The BIDS validator's report on ``folder`` (JSON). Deno keeps its compile cache in
    ``deno_dir``; nothing is fetched (the bundled schema; the tests run with no network)."""
    validator = _bids_validator()
    assert validator is not None
    done = subprocess.run(
        [str(validator), "--format", "json", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DENO_DIR": str(deno_dir), "NO_COLOR": "1"},
        check=False,
    )
    assert done.stdout.startswith("{"), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


#: The validator's warnings a converted folder keeps, by (code, subCode), and why the converter
#: cannot clear them.
KEPT_WARNINGS = {
    ("JSON_KEY_RECOMMENDED", "HEDVersion"): "no HED tags: anatomical images have no events",
    ("JSON_KEY_RECOMMENDED", "SourceDatasets"): "the source is a DICOM archive, not a dataset "
    "with a URL or DOI",
    **{
        ("SIDECAR_KEY_RECOMMENDED", key): "identifies the site: left out by the sidecar allowlist"
        for key in (
            "InstitutionName",
            "InstitutionAddress",
            "InstitutionalDepartmentName",
            "StationName",
            "DeviceSerialNumber",
        )
    },
    **{
        ("SIDECAR_KEY_RECOMMENDED", key): "dcm2niix reads it from a vendor's private header "
        "(Siemens CSA; allowlisted, kept when there): the synthetic series have none"
        for key in (
            "ReceiveCoilActiveElements",
            "MatrixCoilMode",
            "CoilCombinationMethod",
            "PulseSequenceDetails",
            "DwellTime",
            "SliceTiming",
        )
    },
    ("SIDECAR_KEY_RECOMMENDED", "SpoilingType"): "no DICOM attribute holds it; dcm2niix does "
    "not write it",
}
#: Cleared by the settings' ``bids`` section (authors, licence), unset by default.
SETTINGS_WARNINGS = {
    ("NO_AUTHORS", "Authors"),
    ("TOO_FEW_AUTHORS", None),
    ("JSON_KEY_RECOMMENDED", "License"),
}


def _issues(report: dict[str, Any], severity: str) -> set[tuple[str, str | None]]:
    return {
        (issue["code"], issue.get("subCode"))
        for issue in report["issues"]["issues"]
        if issue["severity"] == severity
    }


@pytest.mark.skipif(
    _bids_validator() is None,
    reason="bids-validator-deno is not installed (make setup installs it with the dev extras)",
)
def test_a_converted_folder_passes_the_bids_validator_and_reruns_merge(
    tmp_path: Path, protocols: ProtocolSet
) -> None:
    first, second = new_study("20190101", 1), new_study("20210601", 2)
    deidentified = {"PatientIdentityRemoved": "YES"}
    for files in write_study(tmp_path / "in" / "a", first, [Spec(), FLAIR]).values():
        _retag(files, **deidentified)
    later = write_study(tmp_path / "later", second, [Spec()])
    _retag(later["t1_mprage_sag_p2_iso"], PatientAge="073Y", **deidentified)
    other = write_study(tmp_path / "in" / "c", new_study("20200101", 3), [Spec()])
    # another subject, defaced too, 95 years old
    _retag(
        other["t1_mprage_sag_p2_iso"],
        PatientID="PSEUDO-0007",
        PatientSex="M",
        PatientAge="095Y",
        RecognizableVisualFeatures="NO",
        **deidentified,
    )
    out = tmp_path / "out"
    assert not convert_folder(tmp_path / "in", out, protocols).failed
    assert not convert_folder(tmp_path / "later", out, protocols).failed
    a, b = "sub-PSEUDO0042", "sub-PSEUDO0007"
    assert (out / "participants.tsv").read_text().splitlines() == [
        "participant_id\tsex",
        f"{b}\tM",
        f"{a}\tF",
    ]
    rows = (out / a / f"{a}_sessions.tsv").read_text().splitlines()
    assert [r.split("\t")[::2] for r in rows] == [
        ["session_id", "age"],
        ["ses-1", "71"],
        ["ses-2", "73"],
    ]
    assert (out / b / f"{b}_sessions.tsv").read_text().splitlines()[1].endswith("\t90")
    sidecar_b = json.loads((out / b / "ses-1" / "anat" / f"{b}_ses-1_T1w.json").read_text())
    assert sidecar_b["CohortflowDeidentified"] is True and sidecar_b["CohortflowDefaced"] is True
    sidecar_a = json.loads((out / a / "ses-1" / "anat" / f"{a}_ses-1_T1w.json").read_text())
    assert sidecar_a["CohortflowDeidentified"] is True and sidecar_a["CohortflowDefaced"] is False
    readme = (out / "README.md").read_text()
    assert readme.startswith(bids.README_MARK) and "cohortflow" in readme

    # the validator: no error; every warning either explained here or cleared by the settings
    report = _validate(out, tmp_path / "deno")
    assert not _issues(report, "error"), report["issues"]["issues"]
    warnings = _issues(report, "warning")
    assert warnings - set(KEPT_WARNINGS) == SETTINGS_WARNINGS
    assert sorted(report["summary"]["subjects"]) == ["PSEUDO0007", "PSEUDO0042"]
    about = BidsSettings(
        name="Memory clinic MRI",
        authors=("Ada Example", "Ben Example"),
        license="CC0-1.0",
        how_to_acknowledge="Cite doi:10.0000/example.",
    )
    bids.write_dataset_files(out, "9.9", about)
    report = _validate(out, tmp_path / "deno")
    assert not _issues(report, "error") and _issues(report, "warning") <= set(KEPT_WARNINGS)
    assert "CC0-1.0" in (out / "README.md").read_text()

    # reruns: the same bytes; someone's column, description key and README are kept
    convert_folder(tmp_path / "later", out, protocols, about=about)
    tree = _tree(out)
    convert_folder(tmp_path / "in", out, protocols, about=about)
    convert_folder(tmp_path / "later", out, protocols, about=about)
    assert _tree(out) == tree
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["Authors"] == ["Ada Example", "Ben Example"]
    assert description["GeneratedBy"][0]["Name"] == "cohortflow"
    description["Funding"] = ["A grant"]
    (out / "dataset_description.json").write_text(json.dumps(description))
    participants = (out / "participants.tsv").read_text().replace("sex\n", "sex\tgroup\n")
    (out / "participants.tsv").write_text(
        participants.replace("\tM\n", "\tM\tcontrol\n").replace("\tF\n", "\tF\tpatient\n")
    )
    (out / "README.md").write_text("# Our own words\n")
    convert_folder(tmp_path / "later", out, protocols, about=about)
    assert json.loads((out / "dataset_description.json").read_text())["Funding"] == ["A grant"]
    assert (out / "participants.tsv").read_text().splitlines() == [
        "participant_id\tsex\tgroup",
        f"{b}\tM\tcontrol",
        f"{a}\tF\tpatient",
    ]
    assert (out / "README.md").read_text() == "# Our own words\n"
    # a subject folder the file does not list (an older version wrote no participants.tsv) is
    # added when its sidecars say it was de-identified
    (out / "participants.tsv").unlink()
    convert_folder(tmp_path / "later", out, protocols, about=about)
    assert (out / "participants.tsv").read_text().splitlines() == [
        "participant_id\tsex",
        f"{b}\tn/a",
        f"{a}\tF",
    ]
    # nothing identifying in the dataset's own files
    for name in (
        "README.md",
        "participants.tsv",
        "dataset_description.json",
        f"{a}/{a}_sessions.tsv",
    ):
        text = (out / name).read_text().lower()
        for value in (*IDENTITY.values(), first.uid, second.uid, "20190101", "20210601"):
            assert value.lower() not in text, (name, value)


# --- the command line and the index -----------------------------------------------------------


def test_cli_json_exit_codes_and_stage_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    write_study(tmp_path / "in", new_study(), [Spec(), FLAIR])
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "in"), str(out), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["converted"] == 2 and document["failed"] == 0
    assert document["dcm2niix"].startswith("v1.")
    t1 = next(s for s in document["series"] if s["role"] == "t1_3d")
    assert t1["converter"] == "dcm2niix" and Path(t1["nifti"]).is_file()
    assert t1["name"] == "sub-PSEUDO0042_ses-1_T1w" and t1["verdict"] == "pass"
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    try:
        with index.session() as session:
            rows = stage_records(session, "convert")
        assert len(rows) == 2
        # the input was not de-identified: the rows are keyed by the anonymizer's UIDs
        key = ProjectKey.load(str(load_settings().pseudonym_key_source))
        assert t1["series"] not in {r.series_uid for r in rows}
        row = next(r for r in rows if r.series_uid == key.uid(t1["series"]))
        assert row.status == "pass" and row.protocol == "ms" and row.role == "t1_3d"
        assert row.method_version == f"convert-2 dcm2niix {document['dcm2niix']}"
        assert row.metrics["converter"] == "dcm2niix" and row.metrics["slices"] == 24
        # ... the files it wrote (named by the real PatientID) and a pseudonym left out: the
        # dashboard neither names nor shows what no one de-identified
        assert not {"nifti", "image", "pseudonym"} & set(row.metrics), row.metrics
        assert row.metrics["description"] and "PSEUDO" not in json.dumps(row.metrics)
        assert row.input_sha256 == t1["input_sha256"] and len(row.input_sha256) == 64
        # a failing series: exit status 1, recorded with its reason; a rerun replaces the rows
        path = next((tmp_path / "in" / "SE03").iterdir())
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
        assert main(["convert", str(tmp_path / "in"), str(out)]) == 1
        capsys.readouterr()
        with index.session() as session:
            rows = stage_records(session, "convert")
        assert len(rows) == 2
        flair = next(r for r in rows if r.role == "flair")
        assert flair.status == "fail" and flair.reason_code == "convert.no_geometry"
        # the image an earlier run wrote for it is gone with it: no output the index fails
        anat = out / "sub-PSEUDO0042" / "ses-1" / "anat"
        assert sorted(p.name for p in anat.iterdir()) == [
            "sub-PSEUDO0042_ses-1_T1w.json",
            "sub-PSEUDO0042_ses-1_T1w.nii.gz",
        ]
    finally:
        index.dispose()
    # --no-record leaves the index alone; usage errors exit 2
    other = tmp_path / "home2"
    monkeypatch.setenv("COHORTFLOW_HOME", str(other))
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "o2"), "--no-record"]) == 1
    assert not (other / "index.sqlite").exists()
    assert main(["convert", str(tmp_path / "nothing"), str(out)]) == 2
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "in" / "out")]) == 2
    assert main(["convert", str(tmp_path / "in"), str(out), "--protocol", "nope"]) == 2
    assert main(["convert", str(tmp_path / "in")]) == 2
    capsys.readouterr()


# --- the synthetic cohort ---------------------------------------------------------------------


def _planted(truth: CohortTruth) -> set[str]:
    """Every identifying value the generator wrote (as the anonymization audit reads them)."""
    values = {i.value for i in truth.identifiers if i.location != "pixels (burned-in text)"}
    for patient in truth.patients:
        values |= {patient.patient_id, patient.patient_name, patient.birth_date}
        values |= {s.accession_number for s in patient.studies}
    return {v for v in values if len(v) >= 3}


def _found(values: set[str], data: bytes) -> list[str]:
    """Values in ``data`` (case-insensitive); a number only where it stands as a number."""
    lower = data.lower()
    numbers = set(re.findall(rb"[0-9]+", lower))
    return [
        v
        for v in values
        if (v.lower().encode() in numbers if v.isdigit() else v.lower().encode() in lower)
    ]


@pytest.fixture(scope="module")
def converted_cohort(
    cohort: CohortResult, tmp_path_factory: pytest.TempPathFactory
) -> ConvertReport:
    """Every MR image series of the cohort, converted once (read-only for the tests)."""
    out = tmp_path_factory.mktemp("converted")
    return convert_folder(cohort.out_dir / "dicom", out, load_protocols(), every_series=True)


def _series_files(cohort: CohortResult, folder: str) -> list[Path]:
    return sorted((cohort.out_dir / folder).iterdir())


@pytest.mark.slow
def test_cohort_series_convert_onto_their_dicom_geometry(
    cohort: CohortResult,
    converted_cohort: ConvertReport,
    figures: Callable[[str], None],
) -> None:
    report = converted_cohort
    by_uid = {s.series: s for s in report.series}
    seconds = sum(s.seconds for s in report.series)
    figures(
        f"convert (test cohort): {len(report.series)} series in {seconds:.1f} s, "
        f"{sum(s.converter == 'dcm2niix' for s in report.series)} by dcm2niix, "
        f"{sum(s.converter == 'SimpleITK' for s in report.series)} by SimpleITK, "
        f"{len(report.failed)} failed, {len(report.not_converted)} not converted"
    )
    assert not report.failed, [(s.folder, s.reason) for s in report.failed]
    seen = {"sagittal_t1": 0, "axial": 0, "enhanced": 0, "missing": 0}
    for patient in cohort.truth.patients:
        for study in patient.studies:
            for truth in study.series:
                result = by_uid.get(truth.series_instance_uid)
                if truth.kind in ("localizer", "burned_in_sc"):
                    assert result is None
                    continue
                assert result is not None and result.nifti is not None, truth.folder
                faults = set(truth.faults)
                if Fault.ENHANCED_MULTIFRAME in faults:
                    assert "convert.multiframe" in checks(result)
                    seen["enhanced"] += 1
                if Fault.MISSING_SLICES in faults:
                    assert checks(result)["convert.missing_slices"] == truth.slices - (
                        truth.instances
                    )
                    assert result.slices == truth.slices
                    seen["missing"] += 1
                if faults & {Fault.TRUNCATED_FILE, Fault.DUPLICATE_SLICES, Fault.MISSING_SLICES}:
                    continue
                if truth.kind == "t1_3d" and truth.orientation == "sagittal":
                    key = "sagittal_t1"
                elif truth.orientation == "axial":
                    key = "axial"
                else:
                    continue
                if seen[key] >= 2 or Fault.ENHANCED_MULTIFRAME in faults:
                    continue
                assert result.converter == "dcm2niix" and result.verdict is Verdict.PASS
                files = _series_files(cohort, truth.folder)
                assert_holds_dicom(result.nifti, files[:: max(1, len(files) // 6)])
                seen[key] += 1
    assert seen["sagittal_t1"] and seen["axial"]
    planted = {
        f for p in cohort.truth.patients for st in p.studies for se in st.series for f in se.faults
    }
    assert (Fault.ENHANCED_MULTIFRAME in planted) == bool(seen["enhanced"])
    assert (Fault.MISSING_SLICES in planted) == bool(seen["missing"])


@pytest.mark.slow
def test_cohort_sidecars_and_headers_hold_no_planted_identifier(
    cohort: CohortResult, converted_cohort: ConvertReport, figures: Callable[[str], None]
) -> None:
    values = _planted(cohort.truth)
    files = sorted(p for p in converted_cohort.out.rglob("*") if p.is_file())
    sidecars = [p for p in files if p.name.endswith(".json")]
    leaks = {}
    for path in files:
        if path.name.endswith(".nii.gz"):
            with gzip.open(path) as fh:
                data = fh.read(352)
        else:
            data = path.read_bytes()
        hits = _found(values, data)
        if hits:
            leaks[str(path)] = hits
    figures(
        f"convert PHI audit: {len(values)} planted values in {len(sidecars)} sidecars and "
        f"{len(files) - len(sidecars)} other files: {sum(len(h) for h in leaks.values())} found"
    )
    assert sidecars and not leaks, list(leaks.items())[:5]
    forbidden = {"InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber"}
    for path in sidecars:
        meta = json.loads(path.read_text())
        if path.parent == converted_cohort.out:
            continue  # the dataset's own files (dataset_description.json, sessions.json)
        assert not forbidden & set(meta), path
        assert not [k for k in meta if "Date" in k or k in ("AcquisitionTime", "ImageComments")]
        assert meta["CohortflowConverter"].split()[0] in ("dcm2niix", "SimpleITK")


@pytest.mark.slow
def test_cohort_study_converts_by_protocol_with_the_cli_and_reruns_identically(
    cohort: CohortResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    study = next(
        st
        for p in cohort.truth.patients
        for st in p.studies
        if st.volumes is not None and not st.faults and not any(se.faults for se in st.series)
    )
    out = tmp_path / "out"
    args = ["convert", str(cohort.out_dir / study.folder), str(out), "--json", "--no-record"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    kinds = {se.series_instance_uid: se.kind for se in study.series}
    converted = {kinds[s["series"]] for s in first["series"]}
    assert "t1_3d" in converted and "flair_2d" in converted
    assert {n["reason_code"] for n in first["not_converted"]} <= {"not_selected"}
    tree = _tree(out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["converted"] == first["converted"]
    assert _tree(out) == tree
    assert os.path.isfile(out / "dataset_description.json")
