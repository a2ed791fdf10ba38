"""The synthetic cohort checked against its own ground truth."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage, ImplicitVRLittleEndian, JPEGLosslessSV1

from cohortflow.models.synth import CohortTruth, Fault, SeriesTruth, StudyTruth, SynthConfig
from cohortflow.pipelines.synth.cohort import CohortResult, generate
from cohortflow.pipelines.synth.scanners import SCANNERS, UNKNOWN_SCANNERS

pytestmark = pytest.mark.slow


def _series(truth: CohortTruth) -> list[tuple[StudyTruth, SeriesTruth]]:
    return [(st, se) for p in truth.patients for st in p.studies for se in st.series]


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path, force=True)


def test_t1_series_read_back_with_right_geometry(cohort: CohortResult) -> None:
    clean = [(st, se) for st, se in _series(cohort.truth) if se.kind == "t1_3d" and not se.faults]
    assert clean
    for _, se in clean[:3]:
        folder = cohort.out_dir / se.folder
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == se.instances == se.slices
        first = _read(files[0])
        assert (first.Rows, first.Columns) == (se.rows, se.columns)
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(folder))
        assert len(names) == se.slices
        reader.SetFileNames(names)
        img = reader.Execute()
        assert img.GetSize() == (se.columns, se.rows, se.slices)
        assert np.allclose(
            img.GetSpacing(), (se.voxel_mm[1], se.voxel_mm[0], se.voxel_mm[2]), atol=1e-4
        )
        iop = np.array(first.ImageOrientationPatient, float)
        direction = np.array(img.GetDirection()).reshape(3, 3)
        assert np.allclose(direction[:, 0], iop[:3], atol=1e-5)
        assert np.allclose(direction[:, 1], iop[3:], atol=1e-5)
        positions = sorted(
            np.array(_read(f).ImagePositionPatient, float) @ direction[:, 2] for f in files
        )
        assert np.allclose(np.diff(positions), se.voxel_mm[2], atol=1e-3)
        # The head is inside and bright: WM-like intensity in the middle, air at the corner.
        arr = sitk.GetArrayFromImage(img)
        mid = arr[arr.shape[0] // 2]
        assert (
            mid[
                mid.shape[0] // 2 - 20 : mid.shape[0] // 2 + 20,
                mid.shape[1] // 2 - 20 : mid.shape[1] // 2 + 20,
            ].mean()
            > 800
        )
        assert arr[:, :10, :10].mean() < 150


def test_truth_volumes_match_label_maps(cohort: CohortResult) -> None:
    brains = [st for p in cohort.truth.patients for st in p.studies if st.volumes]
    assert brains
    for st in brains:
        assert st.labels_file and st.volumes
        img = nib.load(cohort.out_dir / st.labels_file)
        data = np.asarray(img.dataobj)
        voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
        counts = np.bincount(data.ravel(), minlength=5) * voxel_ml
        v = st.volumes
        assert counts[1] == pytest.approx(v.csf_ml, abs=0.01)
        assert counts[2] == pytest.approx(v.gm_ml, abs=0.01)
        assert counts[3] == pytest.approx(v.wm_ml, abs=0.01)
        assert v.icv_ml == pytest.approx(v.csf_ml + v.gm_ml + v.wm_ml, abs=0.01)
        assert v.brain_ml == pytest.approx(v.gm_ml + v.wm_ml, abs=0.01)
        assert 1000 < v.icv_ml < 2100 and 0.6 < v.bpf < 0.97


def test_dementia_group_has_atrophy(dementia6: CohortResult) -> None:
    """The protocol runs' cohort (made once for the run): the dementia group's brains are
    smaller for their heads than every control's."""
    truth = dementia6.truth
    bpf = defaultdict(list)
    for p in truth.patients:
        for st in p.studies:
            assert st.volumes and st.atrophy_fraction is not None
            bpf[p.group].append(st.volumes.bpf)
    assert bpf["dementia"] and bpf["control"]
    assert max(bpf["dementia"]) < min(bpf["control"])


def test_each_fault_class_is_present_at_its_rate(cohort: CohortResult) -> None:
    truth = cohort.truth
    out = cohort.out_dir
    for fault, count in truth.fault_counts.items():
        expected = (
            0
            if count.rate == 0
            else min(count.eligible, max(1, round(count.rate * count.eligible)))
        )
        assert count.planted == expected, fault
        assert count.planted >= 1, f"{fault} absent from the test cohort"
    by_fault: dict[Fault, list[tuple[StudyTruth, SeriesTruth]]] = defaultdict(list)
    for st, se in _series(truth):
        for f in se.faults:
            by_fault[f].append((st, se))
    for fault in Fault:
        if fault not in (Fault.NON_DICOM, Fault.DUPLICATE_ACCESSION, Fault.UNKNOWN_SCANNER):
            assert len(by_fault[fault]) == truth.fault_counts[fault].planted, fault

    # Each planted fault is really in the files.
    for _, se in by_fault[Fault.NO_PREAMBLE]:
        for f in (out / se.folder).glob("*.dcm"):
            head = f.read_bytes()[:132]
            assert head[128:132] != b"DICM"
            assert _read(f).SeriesInstanceUID == se.series_instance_uid
    for _, se in by_fault[Fault.TRUNCATED_FILE]:
        broken = 0
        for f in (out / se.folder).glob("*.dcm"):
            try:
                _read(f).pixel_array  # noqa: B018
            except Exception:
                broken += 1
        assert broken == 1
    for _, se in by_fault[Fault.DUPLICATE_INSTANCE]:
        digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in (out / se.folder).iterdir()]
        assert len(digests) == se.files == se.instances + 1
        assert len(set(digests)) == se.instances
    for fault, syntax in (
        (Fault.JPEG_LOSSLESS, JPEGLosslessSV1),
        (Fault.IMPLICIT_VR, ImplicitVRLittleEndian),
    ):
        for _, se in by_fault[fault]:
            f = sorted((out / se.folder).glob("*.dcm"))[0]
            ds = _read(f)
            assert ds.file_meta.TransferSyntaxUID == syntax
            assert ds.pixel_array.shape == (se.rows, se.columns)
    for _, se in by_fault[Fault.ENHANCED_MULTIFRAME]:
        (f,) = (out / se.folder).glob("*.dcm")
        ds = _read(f)
        assert ds.SOPClassUID == EnhancedMRImageStorage
        assert int(ds.NumberOfFrames) == se.slices == len(ds.PerFrameFunctionalGroupsSequence)
    for _, se in by_fault[Fault.MISSING_SLICES]:
        assert se.instances == se.slices - 3
        pos = sorted(float(_read(f).SliceLocation) for f in (out / se.folder).glob("*.dcm"))
        assert max(np.diff(pos)) == pytest.approx(4 * se.voxel_mm[2], abs=1e-3)
    for _, se in by_fault[Fault.DUPLICATE_SLICES]:
        pos = [tuple(_read(f).ImagePositionPatient) for f in (out / se.folder).glob("*.dcm")]
        assert len(pos) == se.slices + 1 and len(set(pos)) == se.slices
    for _, se in by_fault[Fault.WRONG_PARAMETERS]:
        ds = _read(sorted((out / se.folder).glob("*.dcm"))[0])
        assert float(ds.RepetitionTime) == 550 and "InversionTime" not in ds
    studies = [st for p in truth.patients for st in p.studies]
    for st in studies:
        if Fault.UNKNOWN_SCANNER in st.faults:
            assert (st.manufacturer, st.model) in {
                (s.manufacturer, s.model) for s in UNKNOWN_SCANNERS
            }
        else:
            assert (st.manufacturer, st.model) in {(s.manufacturer, s.model) for s in SCANNERS}
        for name in st.non_dicom_files:
            assert (out / name).is_file()
            with pytest.raises(pydicom.errors.InvalidDicomError):
                pydicom.dcmread(out / name)
    accessions = [st.accession_number for st in studies]
    assert (
        len(accessions) - len(set(accessions))
        == truth.fault_counts[Fault.DUPLICATE_ACCESSION].planted
    )


def _background_sd(arr: np.ndarray) -> float:
    """Spread of the air band above the head (first rows, middle columns), where noise and
    motion ghosts (replicas along the phase-encoding rows) show."""
    c = arr.shape[2] // 2
    return float(arr[:, :8, c - 40 : c + 40].std())


def test_motion_and_noise_degrade_the_image(cohort: CohortResult) -> None:
    def load(se: SeriesTruth) -> np.ndarray:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(cohort.out_dir / se.folder)))
        return sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)

    t1 = [se for _, se in _series(cohort.truth) if se.kind == "t1_3d"]
    clean = float(np.median([_background_sd(load(se)) for se in t1 if not se.faults]))
    for se in t1:
        if Fault.NOISE in se.faults or Fault.MOTION in se.faults:
            assert _background_sd(load(se)) > 1.5 * clean, se.faults


def _walk(ds: Dataset, prefix: str = "") -> list[tuple[str, str]]:
    """(location, text) of every string-valued element, with the truth file's location format."""
    found: list[tuple[str, str]] = []
    for elem in ds:
        if elem.tag.is_private:
            block = (elem.tag.element >> 8) & 0xFF
            creator = ds.get((elem.tag.group, block))
            name = creator.value if creator is not None else "?"
            loc = f"({elem.tag.group:04X},{elem.tag.element:04X}) private {name}"
        else:
            loc = f"{prefix}{elem.keyword}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                found += _walk(item, f"{prefix}{elem.keyword}[{i}].")
        elif elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "DA", "CS", "AE"):
            found.append((loc, str(elem.value)))
    return found


def test_every_planted_identifier_is_listed(cohort: CohortResult) -> None:
    truth = cohort.truth
    listed = {(i.series_folder, i.location) for i in truth.identifiers}
    listed_values = {(i.series_folder, i.value) for i in truth.identifiers}
    checked = 0
    for p in truth.patients:
        secrets = {p.patient_id, p.birth_date, p.patient_name.split("^")[0]}
        for st in p.studies:
            for se in st.series:
                for f in sorted((cohort.out_dir / se.folder).glob("*.dcm"))[:3]:
                    try:
                        ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
                    except Exception:
                        continue  # the truncated file
                    for loc, text in _walk(ds):
                        if any(s.upper() in text.upper() for s in secrets):
                            checked += 1
                            assert (se.folder, loc) in listed, (se.folder, loc, text)
                if se.kind == "burned_in_sc":
                    assert (se.folder, p.patient_id) in listed_values
                    assert (se.folder, "pixels (burned-in text)") in listed
    assert checked > 100
    kinds = {i.kind for i in truth.identifiers}
    assert {
        "patient_name",
        "patient_id",
        "birth_date",
        "address",
        "phone",
        "other_patient_id",
        "physician",
        "operator",
        "institution",
        "accession_number",
        "free_text",
    } <= kinds
    locations = {i.location for i in truth.identifiers}
    assert "OtherPatientIDsSequence[0].PatientID" in locations
    assert "RequestAttributesSequence[0].RequestedProcedureID" in locations
    assert any(loc.startswith("(") and "private" in loc for loc in locations)


def test_same_seed_gives_byte_identical_output(
    tmp_path: Path, model_cache: Path, cohort: CohortResult
) -> None:
    """Whatever the number of workers; and the DICOM files are the same without the defacing
    truth maps (what the demo leaves out), whose truth records then name none. Another seed
    (the session's cohort, seed 7) gives other files."""
    cfg = SynthConfig(studies=2, seed=42)
    a = generate(cfg, tmp_path / "a", model_cache, workers=1)
    b = generate(cfg, tmp_path / "b", model_cache, workers=2, deface_truth=False)

    def digest(root: Path) -> dict[str, str]:
        return {
            str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*"))
            if f.is_file()
        }

    da, db = digest(a.out_dir), digest(b.out_dir)
    assert len(da) > 50
    maps = {name for name in da if name.endswith("_deface.nii.gz")}
    assert maps and not maps & set(db)
    assert {k: v for k, v in da.items() if k not in maps and k != "ground_truth.json"} == {
        k: v for k, v in db.items() if k != "ground_truth.json"
    }
    truths = [
        se.deface_truth_file for p in b.truth.patients for st in p.studies for se in st.series
    ]
    assert not any(truths)
    assert a.truth.model_copy(update={"patients": []}) == b.truth.model_copy(
        update={"patients": []}
    )
    other = {k: v for k, v in digest(cohort.out_dir / "dicom").items() if k.endswith(".dcm")}
    assert other and not set(other.values()) & {v for k, v in da.items() if k.endswith(".dcm")}
