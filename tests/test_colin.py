"""The second head generator: Colin27's head (``pipelines.atlas.colin``), tissue texture and the
generator choice (``pipelines.synth.generators``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from cohortflow.models.synth import Fault, SynthConfig
from cohortflow.pipelines.atlas.colin import COLIN_DIR, load_or_build_colin
from cohortflow.pipelines.atlas.errors import HeadModelError
from cohortflow.pipelines.atlas.headmodel import CSF, GM, OTHER_HEAD, WM, HeadModel, tissue_image
from cohortflow.pipelines.synth import anatomy, generators, subjects
from cohortflow.pipelines.synth.cohort import DEFACE_TRUTH_FACE, DEFACE_TRUTH_INTRACRANIAL, generate
from cohortflow.pipelines.synth.errors import SynthError
from cohortflow.pipelines.synth.scanners import CONTRASTS

needs_colin = pytest.mark.skipif(
    not all((COLIN_DIR / n).is_file() for n in ("ch2.nii.gz", "ch2bet.nii.gz")),
    reason=f"Colin27 not found in {COLIN_DIR}: apt-get install mricron-data",
)


@pytest.fixture(scope="module")
def colin(model_cache: Path) -> HeadModel:
    return load_or_build_colin(model_cache)


def _ras(model: HeadModel, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    return np.asarray((model.affine[:3, :3] @ idx.T).T + model.affine[:3, 3])


def test_textured_render_has_larger_within_class_sd() -> None:
    labels = np.full((40, 40, 40), OTHER_HEAD, np.uint8)
    labels[5:35, 5:35, 5:35] = CSF
    labels[10:30, 10:30, 10:30] = GM
    labels[15:25, 15:25, 15:25] = WM
    head = np.full(labels.shape, 0.5, np.float32)
    flat = tissue_image(head, labels, CONTRASTS["t1"])
    gain = anatomy.texture_gain(labels.shape, (1.0, 1.0, 1.0), np.random.default_rng(3), 0.06)
    textured = anatomy.textured(flat, labels, gain)
    for cls in (CSF, GM, WM):
        assert flat[labels == cls].std() < 1e-6
        sd = textured[labels == cls].std() / flat[labels == cls].mean()
        assert 0.02 < sd < 0.12, cls
    # the head outside the intracranial space keeps the template's intensities
    assert np.array_equal(textured[labels == OTHER_HEAD], flat[labels == OTHER_HEAD])
    again = anatomy.texture_gain(labels.shape, (1.0, 1.0, 1.0), np.random.default_rng(3), 0.06)
    assert np.array_equal(gain, again)  # reproducible from the seed


def test_unknown_generator_is_refused_with_the_choices() -> None:
    with pytest.raises(SynthError, match=r"did you mean 'colin'.*colin, mni"):
        generators.get("colins")
    assert generators.get("mni").texture_sd == 0 < generators.get("colin").texture_sd


def test_missing_colin_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(HeadModelError, match="apt-get install mricron-data"):
        load_or_build_colin(tmp_path / "cache", source_dir=tmp_path / "no-templates")


@needs_colin
@pytest.mark.slow
def test_colin_model_has_plausible_volumes(colin: HeadModel, model_cache: Path) -> None:
    """Colin27 is a large head in MNI space: ICV about 1.6 to 1.9 l."""
    icv_ml = len(colin.icv_voxels) * colin.voxel_ml
    v = colin.volumes_ml()
    assert 1600 < icv_ml < 1900
    assert 650 < v["gm"] < 1000 and 550 < v["wm"] < 900 and 100 < v["csf"] < 350
    assert 0.8 < (v["gm"] + v["wm"]) / icv_ml < 0.95
    assert colin.voxel_ml == pytest.approx(0.001)
    # tissue orders atrophy: smooth, inside the intracranial space only
    assert colin.tissue[colin.labels == OTHER_HEAD].max() == 0
    assert 0.3 < float(colin.tissue[colin.labels == GM].mean()) < 1.0
    meta = json.loads((model_cache / f"colinmodel-{colin.digest}" / "model.json").read_text())
    assert "Colin27" in meta["notice"] and meta["volumes_ml"]["gm"] == pytest.approx(v["gm"])


def test_with_neck_repeats_the_lowest_plane_below_and_keeps_the_points() -> None:
    from cohortflow.pipelines.atlas.colin import with_neck

    head = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    bet = head > 12
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-1.0, -2.0, -10.0)
    taller, mask, moved = with_neck(head, bet, affine, 3)
    assert taller.shape == (2, 3, 7) and mask.shape == (2, 3, 7)
    assert (taller[:, :, :3] == head[:, :, :1]).all() and (taller[:, :, 3:] == head).all()
    assert not mask[:, :, :3].any() and (mask[:, :, 3:] == bet).all()
    # each original voxel keeps its place in space; the new planes lie below
    assert np.allclose(moved @ [1, 2, 3 + 2, 1], affine @ [1, 2, 2, 1])
    assert (moved @ [0, 0, 0, 1])[2] == -16.0


@needs_colin
def test_colin_model_has_a_neck_below_its_brain(colin: HeadModel) -> None:
    """ch2 ends 4 mm below its brain; the model goes on NECK_MM further, with tissue (not air)
    in every plane of it, outside the intracranial space."""
    from cohortflow.pipelines.atlas.colin import NECK_MM

    inside = np.isin(colin.labels, (CSF, GM, WM))
    lowest = int(np.flatnonzero(inside.any(axis=(0, 1)))[0])
    assert lowest * abs(colin.affine[2, 2]) >= NECK_MM
    # the head mask's opening takes the outermost planes of the box (as at every edge of it)
    neck = (colin.labels[:, :, 3:lowest] == OTHER_HEAD).sum(axis=(0, 1)) * colin.voxel_ml * 1e3
    assert neck.min() > 2000  # mm^2 of tissue in every plane: 20 cm^2 at least


@needs_colin
@pytest.mark.slow
def test_colin_labels_differ_from_the_atlas_model(colin: HeadModel, head_model: HeadModel) -> None:
    assert colin.digest != head_model.digest
    to_atlas = np.linalg.inv(head_model.affine) @ colin.affine
    atlas_labels = ndimage.affine_transform(
        head_model.labels,
        to_atlas[:3, :3],
        offset=to_atlas[:3, 3],
        output_shape=colin.labels.shape,
        order=0,
    )
    inside = np.isin(colin.labels, (CSF, GM, WM))
    atlas_inside = np.isin(atlas_labels, (CSF, GM, WM))
    dice = 2 * (inside & atlas_inside).sum() / (inside.sum() + atlas_inside.sum())
    assert dice < 0.9
    assert (atlas_labels[inside] == colin.labels[inside]).mean() < 0.6


@needs_colin
@pytest.mark.slow
def test_colin_face_lies_in_front_of_the_brain(colin: HeadModel) -> None:
    face = colin.face > 0
    inside = np.isin(colin.labels, (CSF, GM, WM))
    assert face.sum() * colin.voxel_ml > 30
    assert not (face & inside).any()
    assert (colin.labels[face] == OTHER_HEAD).all()
    distance = ndimage.distance_transform_edt(~inside)
    assert distance[face].min() >= 10
    face_ras, icv_ras = _ras(colin, face), _ras(colin, inside)
    # in front of the brain's centre, around its frontal pole, below the brow
    assert face_ras[:, 1].min() > icv_ras[:, 1].mean() + 50
    assert face_ras[:, 1].mean() > np.percentile(icv_ras[:, 1], 99)
    assert face_ras[:, 2].max() < icv_ras[icv_ras[:, 1] > icv_ras[:, 1].max() - 5, 2].min()


@needs_colin
@pytest.mark.slow
def test_textured_colin_scan_varies_within_white_matter(colin: HeadModel) -> None:
    """The same subject and scan, flat and textured: the texture adds within-class variance."""
    sds = []
    for texture_sd in (0.0, 0.06):
        rng = np.random.default_rng(5)
        subject = subjects.make_subject(
            colin, rng, target_icv_ml=1500, atrophy=0.02, texture_sd=texture_sd
        )
        assert (subject.texture is None) == (texture_sd == 0)
        img, truth = subjects.scan(colin, subject, np.random.default_rng(6), noise=0.005, bias=0)
        t1 = np.asarray(img.dataobj, dtype=np.float32)
        wm = ndimage.binary_erosion(np.asarray(truth.dataobj) == WM, iterations=2)
        sds.append(float(t1[wm].std() / t1[wm].mean()))
    flat, textured = sds
    assert textured > flat + 0.02, sds


@needs_colin
@pytest.mark.slow
def test_colin_cohort_reads_as_dicom(tmp_path: Path, model_cache: Path, colin: HeadModel) -> None:
    config = SynthConfig(
        studies=2,
        seed=8,
        protocol_weights={"dementia": 1.0},
        fault_rates={f: 0.0 for f in Fault},
    )
    result = generate(config, tmp_path / "cohort", model_cache, workers=2, generator="colin")
    truth = result.truth
    assert truth.generator == "colin" and truth.head_model == colin.digest
    studies = [st for p in truth.patients for st in p.studies]
    assert len(studies) == 2
    t1s = [se for st in studies for se in st.series if se.kind == "t1_3d"]
    assert t1s
    for st in studies:
        assert st.volumes is not None and 1000 < st.volumes.icv_ml < 2100
    for se in t1s:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(result.out_dir / se.folder)))
        image = sitk.GetArrayFromImage(reader.Execute())
        assert image.shape == (se.slices, se.rows, se.columns)
        assert image.max() > 1000 and image[:, :10, :10].mean() < 150
        assert se.deface_truth_file is not None
        codes_img: Any = nib.load(result.out_dir / se.deface_truth_file)
        codes = np.asarray(codes_img.dataobj)
        assert (codes == DEFACE_TRUTH_FACE).sum() > 10_000
        assert (codes == DEFACE_TRUTH_INTRACRANIAL).sum() > 500_000
