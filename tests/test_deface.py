"""Defacing: the face removed, the brain never touched, every series accounted for."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from scipy import ndimage

from cohortflow.flows.cli import main
from cohortflow.models.errors import GeometryError
from cohortflow.models.geometry import Plane, planes_of, reference_volume, stack_pixels
from cohortflow.models.settings import DefaceSettings
from cohortflow.pipelines.atlas.masks import check_placement, removal_mask
from cohortflow.pipelines.atlas.template import BRAIN, FACE, PROTECT, Template, load_template
from cohortflow.pipelines.deface import folder as deface_module
from cohortflow.pipelines.deface.folder import (
    CLEAN_VISUAL_FEATURES,
    DefaceReport,
    deface_folder,
    mark_defaced,
    reference_rule,
)
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.dicomfolder import read_instance
from cohortflow.pipelines.imaging.register import Fit
from cohortflow.pipelines.synth.cohort import CohortResult
from cohortflow.pipelines.synth.scoring import score_deface
from tests.ingest_helpers import dciodvfy_errors

SETTINGS = DefaceSettings()


def _plane(z: float, instance: int = 0) -> Plane:
    return Plane(
        instance=instance,
        frame=None,
        origin=np.array([0.0, 0.0, z]),
        row_dir=np.array([1.0, 0.0, 0.0]),
        col_dir=np.array([0.0, 1.0, 0.0]),
        spacing=(1.0, 1.0),
        rows=8,
        columns=8,
    )


def test_reference_volume_orders_planes_and_tolerates_a_few_gaps() -> None:
    planes = [_plane(float(z), i) for i, z in enumerate(reversed(range(40)))]
    planes.append(_plane(20.0, 99))  # a duplicated position keeps the first instance
    volume = reference_volume(planes)
    assert len(volume.planes) == 40 and volume.slice_spacing == 1.0
    assert [p.origin[2] for p in volume.present] == [float(z) for z in range(40)]
    assert volume.planes[20] is not None and volume.planes[20].instance == 19
    gappy = [p for p in planes[:40] if p.origin[2] not in (10.0, 11.0, 12.0)]
    volume = reference_volume(gappy)
    assert len(volume.planes) == 40 and volume.planes[11] is None
    with pytest.raises(GeometryError, match="too many gaps"):
        reference_volume([p for p in planes[:40] if not 5 <= p.origin[2] < 15])
    with pytest.raises(GeometryError, match="regular grid"):
        reference_volume([*planes[:40], _plane(40.5, 100)])
    with pytest.raises(GeometryError, match="too few"):
        reference_volume(planes[:5])


def test_planes_of_refuses_instances_that_do_not_say_where_they_lie() -> None:
    ds = Dataset()
    ds.Rows, ds.Columns = 4, 4
    with pytest.raises(GeometryError, match="ImagePositionPatient") as info:
        planes_of(ds, 0)
    assert info.value.code == "no_geometry"
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    ds.PixelSpacing = [1, 1]
    with pytest.raises(GeometryError, match="orthogonal"):
        planes_of(ds, 0)


def test_removal_spares_the_grown_brain_mask() -> None:
    labels = np.array([FACE, FACE | PROTECT, FACE | BRAIN | PROTECT, BRAIN | PROTECT, 0], np.uint8)
    assert removal_mask(labels).tolist() == [True, False, False, False, False]


def test_mark_defaced_is_idempotent_and_keeps_earlier_methods() -> None:
    ds = Dataset()
    ds.DeidentificationMethod = "cohortflow basic; PS3.15 2026c"
    mark_defaced(ds)
    mark_defaced(ds)
    assert ds.RecognizableVisualFeatures == "NO"
    assert list(ds.DeidentificationMethod) == [
        "cohortflow basic; PS3.15 2026c",
        deface_module.METHOD_TEXT,
    ]
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == [CLEAN_VISUAL_FEATURES[0]]
    assert all(len(v) <= 64 for v in ds.DeidentificationMethod)  # LO


@dataclass(frozen=True)
class Defaced:
    report: DefaceReport
    out: Path
    previews: Path


@pytest.fixture(scope="module")
def template(model_cache: Path) -> Template:
    return load_template(
        model_cache, SETTINGS.brain_margin_mm, SETTINGS.face_margin_mm, SETTINGS.brow_mm
    )


def test_the_removal_reaches_above_the_brow_in_front_only() -> None:
    """pydeface's face region stops at the brow line; the brow (BROW) reaches ``brow_mm``
    higher in front of the forehead (Colin27 heads kept their eyebrows: 74 to 81 % of their face
    removed), never within 10 mm of the intracranial space and never behind the forehead. On a
    1 mm head of 80 voxels a side: a brain ball, a face block in front of and below it."""
    from cohortflow.pipelines.atlas.template import (
        BRAIN,
        BROW,
        BROW_BRAIN_MARGIN_MM,
        BROW_DEPTH_MM,
        FACE,
        PROTECT,
        compose_labels,
    )

    x, y, z = np.indices((80, 80, 80)).astype(float) - 40  # RAS millimetres
    affine = np.eye(4)
    affine[:3, 3] = -40
    brain = x**2 + (y + 5) ** 2 + (z - 5) ** 2 <= 25**2  # front at y = 20
    face = (y >= 24) & (z <= -8)
    plain = compose_labels(face, brain, affine, 4.0, 6.0, 0.0)
    labels = compose_labels(face, brain, affine, 4.0, 6.0, SETTINGS.brow_mm)
    assert not (plain & BROW).any()
    assert ((labels & FACE) == (plain & FACE)).all()  # the face region is the same
    before, added = plain & FACE > 0, labels & BROW > 0
    assert added.any() and not (added & before).any()
    assert ((labels & PROTECT > 0) == (plain & PROTECT > 0)).all()
    assert ((labels & BRAIN > 0) == brain).all()
    distance = ndimage.distance_transform_edt(~brain)
    assert distance[added].min() > BROW_BRAIN_MARGIN_MM - 0.5
    assert y[added].min() >= 20 - BROW_DEPTH_MM
    top = z[before].max()
    assert top < z[added].max() <= top + SETTINGS.brow_mm
    # each added voxel lies at most brow_mm straight above the (grown) face region
    for i, j, k in np.argwhere(added)[::7]:
        below = before[i, j, max(0, k - round(SETTINGS.brow_mm)) : k]
        assert below.any()


def test_the_brow_is_removed_near_the_subjects_skin_only() -> None:
    """Where the template's fit is off, its brow region reaches deep into the forehead: on a
    real Siemens Trio head (fit r 0.66) it took 7 voxels of ROBEX's brain mask at the frontal
    pole, 24 mm behind the skin. The brow is removed only to ``brow_depth_mm`` behind the
    subject's own skin, found by rays from the front; the face region is not touched by this;
    outside the reference's field (unknown depth) the brow is kept. On an axial plane through a
    head whose skin lies at LPS y = -60 (its front): brow pixels from 10 mm in front of the skin
    to 30 mm behind it."""
    from cohortflow.models.geometry import Plane
    from cohortflow.pipelines.atlas.masks import brow_near_skin, plane_points
    from cohortflow.pipelines.atlas.template import BROW, FACE
    from cohortflow.pipelines.deface.surface import RENDER_MM, front_skin

    # the LPS grid of the reference: x 0..99, y 0..99, z 0..19 mm from low; the head fills
    # y >= 40 (LPS y -60 with low y = -100) for x < 80, and nothing for x >= 80
    low = np.array([-50.0, -100.0, -10.0])
    head = np.zeros((100, 100, 20), bool)
    head[:80, 40:, :] = True
    skin = front_skin(head, low)
    assert skin.first_y[0, 0] == -60.0 and np.isinf(skin.first_y[90, 0])
    plane = Plane(
        origin=np.array([-50.0, -70.0, 0.0]),
        col_dir=np.array([0.0, 1.0, 0.0]),  # pixel (r, c): LPS x = -50 + c, y = -70 + r
        row_dir=np.array([1.0, 0.0, 0.0]),
        spacing=(RENDER_MM, RENDER_MM),
        rows=40,
        columns=120,
        instance=0,
        frame=None,
    )
    points = plane_points(plane)
    assert points[:, 3, 5].tolist() == [-45.0, -67.0, 0.0]
    labels = np.full((plane.rows, plane.columns), BROW, np.uint8)
    labels[:, :3] |= FACE
    with np.errstate(invalid="ignore"):
        near = skin.depth(points) <= 10.0
    decided = brow_near_skin(labels, near)
    assert not (decided & BROW).any()
    removed = decided & FACE > 0
    depth = points[1] + 60.0  # behind the skin, for the columns x < 80 with a head
    with_head = (points[0] < 30.0) & (points[0] >= -47.0)  # right of the face columns
    assert removed[with_head & (depth <= 10.0)].all()
    assert not removed[with_head & (depth > 10.0)].any()
    assert removed[:, :3].all()  # the face region stays removed at any depth
    assert removed[(points[0] >= 30.0) & (points[0] < 50.0)].all()  # no head in front: air
    assert not removed[points[0] >= 50].any()  # outside the grid: unknown, kept


@pytest.fixture(scope="module")
def defaced(
    cohort: CohortResult, template: Template, tmp_path_factory: pytest.TempPathFactory
) -> Defaced:
    root = tmp_path_factory.mktemp("defaced")
    is_reference = reference_rule(load_protocols(), SETTINGS.reference_rule)
    report = deface_folder(
        cohort.out_dir / "dicom", root / "out", template, SETTINGS, is_reference, root / "previews"
    )
    return Defaced(report, root / "out", root / "previews")


@pytest.mark.slow
def test_face_removed_and_no_intracranial_voxel_touched_on_the_cohort(
    cohort: CohortResult, defaced: Defaced, figures: Callable[[str], None]
) -> None:
    scores = score_deface(cohort.out_dir, cohort.truth, defaced.out)
    t1_truth = [
        se
        for patient in cohort.truth.patients
        for study in patient.studies
        for se in study.series
        if se.kind == "t1_3d" and se.deface_truth_file
    ]
    t1 = [s for s in scores if s.kind == "t1_3d"]
    seconds = [o.metrics["seconds"] for o in defaced.report.with_status("defaced")]
    figures(
        f"deface: {len(scores)} series scored against truth ({len(t1)} 3D T1): face removed "
        f"min {min(s.face_removed_fraction for s in scores):.1%}, intracranial voxels "
        f"checked {sum(s.intracranial_voxels for s in scores):,}, changed "
        f"{sum(s.intracranial_changed for s in scores)}; median "
        f"{statistics.median(seconds):.1f} s per series, max {max(seconds):.1f} s"
    )
    assert len(t1) == len(t1_truth) >= 10, "every study's 3D T1 is defaced"
    assert all(s.intracranial_changed == 0 for s in scores), [
        s for s in scores if s.intracranial_changed
    ]
    assert all(s.face_removed_fraction >= 0.95 for s in scores), [
        (s.folder, s.face_removed_fraction) for s in scores if s.face_removed_fraction < 0.95
    ]
    assert sum(s.face_voxels for s in t1) > 1_000_000  # the test does measure faces


@pytest.mark.slow
def test_every_series_is_defaced_or_explained(cohort: CohortResult, defaced: Defaced) -> None:
    outcomes = {o.folder: o for o in defaced.report.series}
    for patient in cohort.truth.patients:
        for study in patient.studies:
            for se in study.series:
                rel = str(Path(se.folder).relative_to("dicom"))
                outcome = outcomes[rel]
                if outcome.status == "defaced":
                    written = list((defaced.out / rel).iterdir())
                    assert len(written) == outcome.instances > 0
                else:
                    assert outcome.reason_code and outcome.reason
                    assert not (defaced.out / rel).exists(), "a series not defaced is not written"
    assert not defaced.report.with_status("failed")
    # screenshots of the protocol (secondary capture, no frame of reference) cannot be masked
    excluded = defaced.report.with_status("excluded")
    assert excluded and all(o.reason_code == "other_frame_of_reference" for o in excluded)
    assert all("Protocol" in o.folder for o in excluded)
    # the files cut short and the non-DICOM files are named with the reason
    reasons = {s.reason_code for s in defaced.report.skipped}
    assert {"corrupt", "not_dicom"} <= reasons


@pytest.mark.slow
@pytest.mark.integration
def test_defaced_files_say_so_keep_their_uids_and_stay_valid(
    cohort: CohortResult, defaced: Defaced
) -> None:
    checked = 0
    for outcome in defaced.report.with_status("defaced"):
        out_file = sorted((defaced.out / outcome.folder).iterdir())[0]
        source = cohort.out_dir / "dicom" / outcome.folder / out_file.name
        after, before = pydicom.dcmread(out_file), read_instance(source)
        assert after.RecognizableVisualFeatures == "NO"
        codes = {i.CodeValue for i in after.DeidentificationMethodCodeSequence}
        assert CLEAN_VISUAL_FEATURES[0] in codes
        assert after.SOPInstanceUID == before.SOPInstanceUID
        assert after.SeriesInstanceUID == before.SeriesInstanceUID
        assert after.pixel_array.shape == before.pixel_array.shape
        assert dciodvfy_errors(out_file) <= dciodvfy_errors(source), outcome.folder
        checked += 1
    assert checked >= 40


@pytest.mark.slow
def test_before_and_after_previews_are_written(defaced: Defaced) -> None:
    t1 = [o for o in defaced.report.with_status("defaced") if o.metrics["face_voxels"] > 100_000]
    assert t1
    for outcome in t1:
        before_png, after_png, planes_png = (Path(p) for p in outcome.previews[:3])
        surfaces = [Path(p) for p in outcome.previews[3:]]
        # the T1 the template was fitted to also has its skin surface rendered, before and after
        assert [p.name.rsplit("_", 2)[-2:] for p in surfaces] in (
            [],
            [["surface", "before.png"], ["surface", "after.png"]],
        )
        assert all(np.asarray(Image.open(p)).shape[0] > 150 for p in surfaces)
        assert before_png.parent.is_relative_to(defaced.previews)
        before = np.asarray(Image.open(before_png)).astype(int)
        after = np.asarray(Image.open(after_png)).astype(int)
        assert before.shape == after.shape and before.shape[2] == 3
        red = (before[..., 0] > before[..., 1] + 60) & (before[..., 0] > before[..., 2] + 60)
        assert red.sum() > 500, "the removed region is shown in red"
        # and is dark afterwards (its edge blends with its neighbours over two to three pixels
        # when reformatted: the region carved around the brain's margin has narrow parts)
        inner = ndimage.binary_erosion(red, iterations=3)
        assert inner.sum() > 200 and after[inner].max() < 40
        # the dashboard's picture: the defaced image on three planes, the removed region
        # tinted over emptied voxels only (no face shows through), the brain outlined
        planes = np.asarray(Image.open(planes_png)).astype(int)
        assert planes.shape[1] > 2.5 * planes.shape[0] and planes.shape[2] == 3
        r, g, b = planes[..., 0], planes[..., 1], planes[..., 2]
        tinted = (r - g > 80) & (g == b)  # the tint adds red to the gray value only
        assert tinted.sum() > 1000
        inner = ndimage.binary_erosion(tinted, iterations=2)
        assert np.percentile(g[inner], 99) < 20, "no face intensity under the tint"
        green = (planes[..., 1] == 255) & (planes[..., 0] == 0) & (planes[..., 2] == 0)
        assert green.sum() > 300, "the intracranial outline"


@pytest.mark.slow
def test_a_fit_that_stopped_short_is_polished_and_a_lost_one_refused(
    cohort: CohortResult,
    template: Template,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fit nodded by 8 degrees (it left 16 % of the face, measured) is finished by the
    placement check's own measure and defaces cleanly; a template that landed 40 mm above the
    head is refused and nothing is written."""
    study = cohort.out_dir / "dicom" / "ST0006"
    real_fit = deface_module.fit_affine
    turn = np.eye(4)
    a = np.deg2rad(8.0)
    turn[1, 1] = turn[2, 2] = np.cos(a)
    turn[1, 2], turn[2, 1] = -np.sin(a), np.sin(a)
    lost = np.eye(4)
    lost[2, 3] = -40.0
    is_reference = reference_rule(load_protocols(), SETTINGS.reference_rule)

    def moved(by: np.ndarray) -> Callable[..., Fit]:
        def fit(*args: object, **kwargs: object) -> Fit:
            done = real_fit(*args, **kwargs)  # type: ignore[arg-type]
            return Fit(done.subject_to_template @ by, done.seconds)

        return fit

    monkeypatch.setattr(deface_module, "fit_affine", moved(turn))
    report = deface_folder(study, tmp_path / "nodded", template, SETTINGS, is_reference)
    assert report.series and all(o.status == "defaced" for o in report.series), report.series
    for outcome in report.series:
        assert outcome.metrics["polish_moves"] >= 2
        assert outcome.metrics["brain_changed"] == 0

    monkeypatch.setattr(deface_module, "fit_affine", moved(lost))
    report = deface_folder(study, tmp_path / "out", template, SETTINGS, is_reference)
    assert report.series and all(o.status == "failed" for o in report.series)
    assert {o.reason_code for o in report.series} == {"registration_failed"}
    # polishing moves it part of the way back; then the fit is refused as lost or short
    reason = report.series[0].reason or ""
    assert "matches the image poorly" in reason or "stopped short" in reason, reason
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_placement_check_passes_the_fit_and_flags_its_neighbours(
    cohort: CohortResult, template: Template, tmp_path: Path
) -> None:
    """... and the fit is kept by content: the same image again is read from the store (the
    same matrix, no registration); another image is not."""
    from cohortflow.models.fits import FitStore

    series = cohort.out_dir / "dicom" / "ST0006"
    t1 = next(p for p in sorted(series.iterdir()) if "3D" in p.name)
    datasets = [read_instance(p) for p in sorted(t1.iterdir())]
    volume = reference_volume([p for i, ds in enumerate(datasets) for p in planes_of(ds, i)])
    stack = stack_pixels(volume, [ds.pixel_array for ds in datasets])
    store = FitStore(tmp_path / "fits")

    def fitted(pixels: np.ndarray) -> Fit:
        return deface_module.fit_affine(
            np.transpose(pixels, (2, 1, 0)),
            volume.first.origin,
            volume.spacing,
            volume.direction,
            str(template.head_path),
            store=store,
        )

    fit = fitted(stack)
    again = fitted(stack.copy())
    assert not fit.cached and again.cached and again.seconds < fit.seconds / 10
    assert (again.subject_to_template == fit.subject_to_template).all()
    (kept,) = (tmp_path / "fits").rglob("*.json")
    assert "subject_to_template" in json.loads(kept.read_text())
    geometry = (volume.first.origin, volume.spacing, volume.direction)
    other = stack.copy()
    other[0, 0, 0] += 1  # one voxel apart: another key, nothing stored under it
    keys = {store.key(p, geometry, {"template": template.digest}) for p in (stack, other)}
    assert len(keys) == 2 and all(store.get(k) is None for k in keys)
    kept.write_text("{damaged")
    assert store.get(kept.stem) is None  # ignored, and fitted again
    to_lps = volume.index_to_lps()
    good = check_placement(stack, to_lps, fit.subject_to_template, template)
    assert good.correlation > SETTINGS.min_correlation and good.neighbour_gain < 0
    for axis in range(3):
        shifted = np.eye(4)
        shifted[axis, 3] = 6.0
        bad = check_placement(stack, to_lps, fit.subject_to_template @ shifted, template)
        assert bad.neighbour_gain > 0, (axis, bad)


@pytest.mark.slow
def test_cli_excludes_what_it_cannot_place_and_reruns_without_duplicates(
    cohort: CohortResult,
    model_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    source = tmp_path / "in"
    study = cohort.out_dir / "dicom" / "ST0006"
    series = sorted(p for p in study.iterdir() if p.is_dir())
    t1 = next(p for p in series if "3D" in p.name)
    other = next(p for p in series if p != t1 and "LOC" not in p.name)
    shutil.copytree(t1, source / "study" / t1.name)
    shutil.copytree(other, source / "study" / other.name)
    foreign = source / "study" / "foreign"
    foreign.mkdir()
    for path in sorted(other.iterdir()):  # the same images, another frame of reference
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"
        ds.FrameOfReferenceUID = ds.FrameOfReferenceUID + ".9"
        ds.save_as(foreign / path.name)
    lonely = source / "no-t1" / other.name  # a study without a 3D T1
    shutil.copytree(other, lonely)
    for path in lonely.iterdir():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.StudyInstanceUID + ".9"
        ds.save_as(path)

    out = tmp_path / "out"
    assert main(["deface", str(source), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_folder = {s["folder"]: s for s in report["series"]}
    assert by_folder[f"study/{t1.name}"]["status"] == "defaced"
    assert by_folder[f"study/{other.name}"]["status"] == "defaced"
    assert by_folder["study/foreign"]["reason_code"] == "other_frame_of_reference"
    assert by_folder[f"no-t1/{other.name}"]["reason_code"] == "no_reference_t1"
    assert (report["defaced"], report["excluded"], report["failed"]) == (2, 2, 0)
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["deface", str(source), str(out), "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out)
    second = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert second == first, "a rerun writes the same files, no more"
    # the head is registered once: the rerun read its fit from the store (<cache>/fits)
    t1_again = next(s for s in rerun["series"] if s["folder"] == f"study/{t1.name}")
    assert t1_again["metrics"]["registration_stored"] == 1.0
    assert list((model_cache / "fits").rglob("*.json"))
    assert main(["deface", str(source), str(source / "inside")]) == 2
