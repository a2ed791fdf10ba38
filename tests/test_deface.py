"""Defacing: the face removed, the brain never touched, every series accounted for."""

from __future__ import annotations

import json
import re
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
from cohortflow.pipelines.atlas.template import (
    BRAIN,
    FACE,
    LEFT_EYE_LPS,
    PROTECT,
    Template,
    load_template,
)
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


def test_a_mask_grown_in_its_box_is_the_mask_grown_over_the_whole_volume() -> None:
    """``_grow`` dilates only the mask's bounding box grown by the radius: the same voxels as a
    dilation of the whole volume, at the volume's edges too, on anisotropic voxels."""
    from scipy import ndimage

    from cohortflow.pipelines.atlas.template import _grow

    rng = np.random.default_rng(5)
    for corner in ((0, 0, 0), (30, 20, 10), (55, 45, 35)):
        mask = np.zeros((60, 50, 40), dtype=bool)
        x, y, z = corner
        mask[x : x + 5, y : y + 4, z : z + 6] = (
            rng.random((5, 4, 6))[: 60 - x, : 50 - y, : 40 - z] > 0.4
        )
        voxel = np.array([1.0, 0.8, 2.0])
        radius = np.maximum(1, np.round(4.0 / voxel)).astype(int)
        grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
        ball = sum((g / r) ** 2 for g, r in zip(grid, radius, strict=True)) <= 1.0
        assert np.array_equal(_grow(mask, 4.0, voxel), ndimage.binary_dilation(mask, ball))
    assert not _grow(np.zeros((5, 5, 5), dtype=bool), 4.0, np.ones(3)).any()


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


def _header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_sheet_names_are_pseudonym_description_and_number_never_an_identifier() -> None:
    """A de-identified header names its sheets by the pseudonym (PatientID), the cleaned
    SeriesDescription and the SeriesNumber, kept to [A-Za-z0-9._-] and bounded; a header that
    does not say its identity was removed gives none of its text; series that would share a
    name both gain a digest of their UID; no UID is in any name or folder."""
    from cohortflow.pipelines.deface.previews import sheet_names, study_folder

    study = "2.25.1234567890123456789"
    anonymized = {
        "2.25.11": _header(
            PatientIdentityRemoved="YES",
            PatientID="CFABCDEFGHIJKL23",
            SeriesDescription="T1 MPRAGE sag/1mm (ADNI) ü",
            SeriesNumber=3,
        ),
        "2.25.12": _header(
            PatientIdentityRemoved="YES",
            PatientID="CFABCDEFGHIJKL23",
            SeriesDescription="../../" + "FLAIR" * 11,
            SeriesNumber=4,
        ),
        "2.25.13": _header(  # the same description and number twice in one study
            PatientIdentityRemoved="YES",
            PatientID="CFABCDEFGHIJKL23",
            SeriesDescription="DWI",
            SeriesNumber=5,
        ),
        "2.25.14": _header(
            PatientIdentityRemoved="YES",
            PatientID="CFABCDEFGHIJKL23",
            SeriesDescription="DWI",
            SeriesNumber=5,
        ),
    }
    names = sheet_names(anonymized)
    assert names["2.25.11"] == "CFABCDEFGHIJKL23_T1-MPRAGE-sag-1mm-ADNI_3"
    assert names["2.25.12"] == "CFABCDEFGHIJKL23_FLAIR" + "FLAIR" * 7 + "_4"  # 40 characters
    assert names["2.25.13"] != names["2.25.14"]
    assert all(names[u].startswith("CFABCDEFGHIJKL23_DWI_5_") for u in ("2.25.13", "2.25.14"))
    identified = _header(
        PatientID="MRN0042",
        PatientName="Doe^Jane",
        SeriesDescription="T1 Doe Jane",
        SeriesNumber=7,
        PatientIdentityRemoved="NO",
    )
    (name,) = sheet_names({"2.25.21": identified}).values()
    assert name == "not-deidentified_7"
    every = [*names.values(), name, study_folder(study)]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and len(n) <= 80 for n in every), every
    assert not [n for n in every if "2.25." in n or "MRN0042" in n or "Doe" in n]
    assert study_folder(study) == study_folder(study) != study_folder(study + "1")


def test_the_skin_is_seen_from_the_front_the_front_left_and_the_left() -> None:
    """An egg of a head on an LPS grid (x to the left, y to the back, z up) with a nose in
    front: from the front the nose shows in the middle; from the left on the picture's left (the
    face to the left, as in the sagittal planes); three-quarter, left of the middle; superior up.
    One grid, one frame: two heads on it are seen in the same pixels."""
    from cohortflow.pipelines.deface.surface import VIEWS, depths

    x, y, z = np.indices((80, 100, 90)).astype(float)
    egg = ((x - 40) / 30) ** 2 + ((y - 55) / 38) ** 2 + ((z - 45) / 40) ** 2 <= 1
    nose = (abs(x - 40) <= 3) & (y >= 8) & (y < 20) & (abs(z - 40) <= 6)
    with_nose, without = depths(egg | nose), depths(egg)
    assert set(with_nose) == set(VIEWS)
    for view in VIEWS:
        seen, bare = with_nose[view], without[view]
        assert seen.hit.shape == bare.hit.shape
        shown = seen.hit & (~bare.hit | (seen.depth < bare.depth - 1))  # where the nose shows
        rows, cols = np.nonzero(shown)
        assert rows.size > 20, view
        assert abs(rows.mean() - (89 - 40)) <= 2, view  # superior up: z = 40 is row 49
        head = np.flatnonzero(seen.hit.any(axis=0))
        middle = (head[0] + head[-1]) / 2
        if view == "front":
            assert abs(cols.mean() - middle) <= 2
        elif view == "left":
            assert cols.min() == head[0]  # the tip of the nose: the leftmost column
        else:
            assert cols.mean() < middle - 10, (cols.mean(), middle)


def test_the_review_sheet_shows_three_planes_and_the_surface_before_and_after(
    template: Template,
) -> None:
    """The template's own head defaced with its own mask: on each plane through the eyes the
    after panel differs from the before panel over the face and is the same pixel for pixel
    inside the intracranial mask; the skin surface from three sides; at least 1 px per mm (a
    panel of the 1 mm head some 300 px high); the after panels alone are the same pictures."""
    from cohortflow.pipelines.deface import sheet, surface
    from cohortflow.pipelines.imaging.preview import template_plane

    before = np.asarray(template.head, dtype=np.float32)
    removed = removal_mask(template.labels)
    after = np.where(removed, 0, before).astype(np.float32)
    same = np.eye(4)
    slices = sheet.slice_views(before, after, removed, template.index_to_lps, same, template)
    heads = [
        surface.head_mask(surface.to_lps_grid(v, template.index_to_lps)[0]) for v in (before, after)
    ]
    surfaces = sheet.surface_views(*heads)
    full = sheet.compose([slices, surfaces], "CFABCDEFGHIJKL23_T1_3")
    alone = sheet.compose([slices, surfaces], "CFABCDEFGHIJKL23_T1_3", with_before=False)
    assert sheet.PX_PER_MM >= 1.0
    assert [(p.view, p.side) for p in full.panels] == [
        (v.title, side) for v in [*slices, *surfaces] for side in ("before", "after")
    ]
    assert [p.view for p in full.panels[:6:2]] == [t for _, t in sheet.SLICES]
    assert all(p.height >= 256 for p in full.panels)
    assert full.rgb.shape[1] >= 1400 and full.rgb.shape[0] >= 700

    def pixels(which: sheet.Sheet, panel: sheet.Panel) -> np.ndarray:
        box = which.rgb[panel.top : panel.top + panel.height, panel.left : panel.left + panel.width]
        return box.astype(int)

    step = 1.0 / sheet.PX_PER_MM
    for number, (axis, title) in enumerate(sheet.SLICES):
        first, second = full.panels[2 * number], full.panels[2 * number + 1]
        assert first.view == second.view == title
        was, now = pixels(full, first), pixels(full, second)
        labels = template_plane(template, axis, LEFT_EYE_LPS, step).labels
        assert labels.shape == was.shape[:2]
        brain = ndimage.binary_erosion(labels & BRAIN > 0, iterations=2)
        brain[:30] = False  # the panel's own lettering
        assert brain.sum() > 2000, title
        assert (was[brain] == now[brain]).all(), title
        face = ndimage.binary_erosion(removal_mask(labels), iterations=2)
        face[:30] = False
        differ = (was[face] != now[face]).any(axis=1)
        assert face.sum() > 2000 and differ.mean() > 0.5, (title, differ.mean())
        red = (was[..., 0] > was[..., 1] + 60) & (was[..., 0] > was[..., 2] + 60)
        assert red[face].mean() > 0.5, "the region removed is tinted red"
        green = (was[..., 1] == 255) & (was[..., 0] == 0) & (was[..., 2] == 0)
        assert green.sum() > 100, "the intracranial mask is outlined"
    for number in range(3, 6):  # the surface: the face before, gone after
        was, now = pixels(full, full.panels[2 * number]), pixels(full, full.panels[2 * number + 1])
        assert was.shape == now.shape and (was != now).any(axis=2).mean() > 0.05
    # the after panels alone: the same pictures, nothing of the before ones
    assert [p.side for p in alone.panels] == ["after"] * 6
    afters = [p for p in full.panels if p.side == "after"]
    for mine, theirs in zip(alone.panels, afters, strict=True):
        assert (pixels(alone, mine) == pixels(full, theirs)).all()
    assert alone.rgb.shape[1] < full.rgb.shape[1] * 0.6


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


def _first_readable(folder: Path) -> Dataset:
    for path in sorted(folder.iterdir()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        if "SeriesInstanceUID" in header:
            return header
    raise AssertionError(f"no readable header in {folder}")


@pytest.mark.slow
def test_review_sheets_are_written_under_names_that_identify_no_one(
    cohort: CohortResult, defaced: Defaced
) -> None:
    """Every defaced stack has its review sheet (before | after) and the after panels alone, in
    its study's folder; the names carry no UID and nothing of a header that was not
    de-identified (the synthetic cohort's are not: ``not-deidentified_<SeriesNumber>``), and are
    unique within the study; 1.25 px per mm, two rows (the planes, the skin surface) for the T1
    the template was fitted to; the after panels alone show nothing under the red tint."""
    from cohortflow.pipelines.deface.previews import study_folder

    done = defaced.report.with_status("defaced")
    t1 = [o for o in done if o.metrics["face_voxels"] > 100_000]
    assert t1 and all(o.previews is not None for o in t1)
    written = [o for o in done if o.previews is not None]
    by_study: dict[str, list[str]] = {}
    for outcome in written:
        assert outcome.previews is not None
        sheet, alone = Path(outcome.previews.sheet), Path(outcome.previews.after)
        assert sheet.is_file() and alone.is_file()
        assert sheet.parent == alone.parent == defaced.previews / study_folder(outcome.study)
        assert sheet.name.endswith("_deface.png")
        assert alone.name == sheet.name.replace("_deface.png", "_deface-after.png")
        by_study.setdefault(outcome.study, []).append(sheet.name)
        # the series' source header (its folder holds the planted damaged files too)
        header = _first_readable(cohort.out_dir / "dicom" / outcome.folder)
        assert header.get("PatientIdentityRemoved") != "YES"
        assert sheet.name.startswith("not-deidentified_")
        named = str(sheet.relative_to(defaced.previews)).lower()
        identifiers = [
            header.StudyInstanceUID,
            header.SeriesInstanceUID,
            header.SOPInstanceUID,
            header.get("PatientID"),
            header.get("AccessionNumber"),
            *str(header.get("PatientName") or "").split("^"),
        ]
        assert not [i for i in identifiers if i and len(str(i)) >= 4 and str(i).lower() in named]
        picture = np.asarray(Image.open(sheet)).astype(int)
        after = np.asarray(Image.open(alone)).astype(int)
        assert picture.shape[2] == after.shape[2] == 3
        two_rows = "nose_after_mm" in outcome.metrics
        assert picture.shape[1] >= 1400, picture.shape
        assert picture.shape[0] >= (600 if two_rows else 380), (two_rows, picture.shape)
        assert after.shape[1] < 0.6 * picture.shape[1]
        r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
        assert ((g == 255) & (r == 0) & (b == 0)).sum() > 300, "the intracranial outline"
        if outcome not in t1:
            continue  # a series that barely reaches the face (a slab) may show none of it
        assert ((r > g + 60) & (r > b + 60)).sum() > 5000, "the region removed, in red"
        r, g, b = after[..., 0], after[..., 1], after[..., 2]
        tinted = ndimage.binary_erosion((r - g > 80) & (g == b), iterations=2)
        assert tinted.sum() > 1000
        assert np.percentile(g[tinted], 99) < 20, "no face under the tint"
    assert sum(1 for o in written if "nose_after_mm" in o.metrics) == len(by_study)
    for names in by_study.values():
        assert len(set(names)) == len(names)


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
