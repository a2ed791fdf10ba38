"""Defacing and volumetry on real heads we did not make (../shared/realdata through
$COHORTFLOW_REALDATA): each real 3D T1 with a face is defaced, with no brain voxel changed
inside brain masks others made (ROBEX, HD-BET) and no nose left on its skin surface; each real
head is measured within its QC verdict; every reporting command's ``--json`` parses. (The
missing slices of the Siemens exam are caught in tests/test_realdata_roles.py, on the QC run
that test makes of it.)"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from cohortflow.flows.cli import main

pytestmark = pytest.mark.slow

#: the real 3D T1s with a face, by folder of the unpacked real data
FACES = {
    "philips_adni_mprage/dicom": 1,
    "fnndsc_adi_brain/dicom": 1,
    "dcm_qa_xa30/In/5_anat-T1w_acq-tfl": 1,
    "dcm_qa_xa30/In/6_anat-T1w_acq-tfl": 1,
}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> Path:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    return tmp_path


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)  # stdout holds the JSON document and nothing else


@pytest.mark.parametrize("folder", sorted(FACES))
def test_each_real_head_with_a_face_is_defaced_without_a_nose_or_a_brain_voxel_changed(
    realdata: Path, home: Path, folder: str, capsys: pytest.CaptureFixture[str], figures
) -> None:  # type: ignore[no-untyped-def]
    out, previews = home / "out", home / "previews"
    code, report = run_json(
        ["deface", str(realdata / folder), str(out), "--previews", str(previews)], capsys
    )
    assert code == 0, report
    reference = [s for s in report["series"] if "nose_after_mm" in s["metrics"]]
    assert len(reference) == FACES[folder]
    for series in report["series"]:
        assert series["status"] == "defaced", series
        assert series["metrics"]["brain_changed"] == 0
    metrics = reference[0]["metrics"]
    # the face was there (a nose standing out 14 to 20 mm), and is gone
    assert metrics["nose_before_mm"] >= 10, metrics
    assert metrics["nose_after_mm"] <= 8, metrics
    # the review sheet: three planes and the skin surface, before | after, 1.25 px per mm;
    # named by no identifier of these headers (not de-identified: none of their text is used)
    sheets = reference[0]["previews"]
    with Image.open(sheets["sheet"]) as sheet, Image.open(sheets["after"]) as after:
        assert sheet.width >= 1400 and sheet.height >= 700, sheet.size
        assert after.width < 0.6 * sheet.width
    header = pydicom.dcmread(next(p for p in (realdata / folder).iterdir() if p.is_file()))
    uids = (reference[0]["series"], reference[0]["study"], header.StudyInstanceUID)
    for path in (Path(sheets["sheet"]), Path(sheets["after"])):
        assert path.name.startswith("not-deidentified_"), path
        named = str(path.relative_to(previews))
        assert not [u for u in uids if u in named]
        assert str(header.get("PatientID") or "-") not in named
    if folder == "philips_adni_mprage/dicom":
        # brain masks others made, on the Philips head: not one of their voxels changed
        figures(_philips_brain_masks_unchanged(realdata, out))
    figures(
        f"deface {folder}: nose {metrics['nose_before_mm']:.0f} -> "
        f"{metrics['nose_after_mm']:.0f} mm, r {metrics['correlation']:.2f}, "
        f"{metrics['polish_moves']} polish moves"
    )


def _largest(mask: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    labels, count = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return np.asarray(labels == 1 + int(np.argmax(sizes)))


def _philips_brain_masks_unchanged(realdata: Path, out: Path) -> str:
    """ROBEX's mask and HD-BET's brain (its two added spheres left out) are on the dcm2niix
    grid: voxel (i, j, k) is pixel (row 255 - k, column 255 - j) of file 1301_{i+1:04d}.dcm
    (../shared/realdata/README.md). Every such pixel keeps its value. Returns the figure."""
    base = realdata / "philips_adni_mprage"
    robex = np.asarray(nib.load(base / "labels" / "robex_mask.nii.gz").dataobj) > 0
    hdbet_crop = _largest(
        np.asarray(nib.load(base / "labels" / "hdbet_brain_plus_spheres.nii.gz").dataobj) > 0
    )
    hdbet = np.zeros_like(robex)
    ci, cj, ck = hdbet_crop.shape
    hdbet[14 : 14 + ci, 20 : 20 + cj, 87 : 87 + ck] = hdbet_crop
    changed = {"robex": 0, "hdbet": 0}
    face_removed = 0
    for i in range(robex.shape[0]):
        name = f"1301_{i + 1:04d}.dcm"
        before = pydicom.dcmread(base / "dicom" / name).pixel_array
        after = pydicom.dcmread(out / name).pixel_array
        differ = before != after
        face_removed += int(differ.sum())
        for label, mask in (("robex", robex), ("hdbet", hdbet)):
            j, k = np.nonzero(mask[i])
            changed[label] += int(differ[255 - k, 255 - j].sum())
    assert robex.sum() > 1_400_000 and hdbet.sum() > 1_400_000
    assert changed == {"robex": 0, "hdbet": 0}
    assert face_removed > 100_000
    return (
        f"deface philips: {face_removed} voxels removed, 0 of {int(robex.sum())} ROBEX and "
        f"0 of {int(hdbet.sum())} HD-BET brain voxels changed"
    )


#: folder -> (verdicts allowed, ICV range ml): adults' heads
HEADS = {
    "philips_adni_mprage/dicom": ({"pass", "warn"}, (1300, 1900)),
    "fnndsc_adi_brain/dicom": ({"pass", "warn"}, (1300, 1900)),
    "dcm_qa_xa30/In/6_anat-T1w_acq-tfl": ({"pass", "warn"}, (1250, 1900)),
    "decubitus_t1_4positions/HFS": ({"warn"}, (1250, 1900)),  # 2D: lower confidence
}


@pytest.mark.parametrize("folder", sorted(HEADS))
def test_each_real_head_is_measured_within_its_verdict(
    realdata: Path, home: Path, folder: str, capsys: pytest.CaptureFixture[str], figures
) -> None:  # type: ignore[no-untyped-def]
    verdicts, (low, high) = HEADS[folder]
    code, report = run_json(
        ["volumetry", str(realdata / folder), "--out", str(home / "vol"), "--no-record"], capsys
    )
    assert len(report["results"]) == 1, report
    result = report["results"][0]
    assert result["verdict"] in verdicts, result["findings"]
    volumes = result["volumes"]
    assert low <= volumes["icv_ml"] <= high
    # SAMSEG's BPF of these heads: 0.71 to 0.75 (benchmarks/real.py)
    assert 0.6 <= volumes["bpf"] <= 0.9
    assert code == (0 if result["verdict"] != "fail" else 1)
    figures(
        f"volumetry {folder}: ICV {volumes['icv_ml']:.0f} ml, brain {volumes['brain_ml']:.0f} "
        f"ml, BPF {volumes['bpf']:.3f}, {result['verdict']} {result['reason'] or ''}"
    )


def test_every_reporting_command_prints_json_alone_on_stdout(
    realdata: Path, home: Path, model_cache: Path
) -> None:
    """Each command runs as its own process, so that what ITK, ANTs or a converter write on the
    process's standard output (not only Python's) would show; stdout must parse as one JSON
    document. Volumetry reads a NIfTI whose time units are unknown: ITK's warning about that
    once came before the JSON. (It reads the real MS head at half its in-plane resolution, made
    here with its header kept: stdout is what is tested, and this takes a quarter of the time.)"""
    import os
    import subprocess
    import sys

    cli = str(Path(sys.executable).with_name("cohortflow"))
    env = {
        **os.environ,
        "COHORTFLOW_HOME": str(home / "home"),
        "COHORTFLOW_CACHE_DIR": str(model_cache),
    }
    xa30 = str(realdata / "dcm_qa_xa30" / "In")
    real = nib.load(realdata / "open_ms_longitudinal" / "raw" / "patient12" / "study1_T1W.nii.gz")
    assert real.header.get_xyzt_units()[1] == "unknown"
    half = nib.Nifti1Image(
        np.asarray(real.dataobj)[::2, ::2], real.affine @ np.diag([2, 2, 1, 1]), real.header
    )
    ms = str(home / "ms_half.nii.gz")
    nib.save(half, ms)
    assert nib.load(ms).header.get_xyzt_units()[1] == "unknown"
    commands = [
        ["ingest", xa30, "--batch", "xa30"],
        ["verify"],
        ["report", "batch", "xa30"],
        ["anonymize", xa30, str(home / "anon")],
        ["qc", str(home / "anon")],
        ["convert", str(home / "anon"), str(home / "nifti")],
        ["volumetry", ms, "--out", str(home / "vol"), "--no-record"],
        ["status"],
        ["cohort", "count", "--by", "modality"],
        ["export", "biomarkers", "--out", str(home / "biomarkers.csv")],
    ]
    for argv in commands:
        done = subprocess.run(
            [cli, *argv, "--json"],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode in (0, 1), (argv, done.returncode, done.stderr[-2000:])
        try:
            json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"{argv}: stdout is not one JSON document: {done.stdout[:500]!r}"
            ) from exc
