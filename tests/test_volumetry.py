"""Volumetry: the tissue mixture, the intracranial edge, the verdict and overlays on phantoms with
known answers; the whole method on synthetic heads whose anatomy differs from the atlas (slow);
the command on DICOM, recorded in the index (slow)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cohortflow.flows.cli import main
from cohortflow.models.database import open_index
from cohortflow.models.settings import load_settings
from cohortflow.models.stages import (
    BiomarkerRecord,
    biomarker_records,
    record_biomarkers,
    stage_records,
)
from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.synth.cohort import CohortResult
from cohortflow.pipelines.volumetry.refine import refine_icv
from cohortflow.pipelines.volumetry.segment import fit_mixture
from cohortflow.pipelines.volumetry.verdict import judge

CSF, GM, WM = 0.25, 0.62, 1.0


def _phantom_tissue(
    rng: np.random.Generator, n: int, fractions: tuple[float, float, float], pv: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel intensities of pure CSF / GM / WM in ``fractions`` plus a share ``pv`` of
    partial-volume voxels (CSF/GM and GM/WM, uniform mixing), with noise; the true tissue
    amounts and noisy, imperfect priors."""
    n_pv = int(n * pv)
    n_pure = n - n_pv
    counts = rng.multinomial(n_pure, fractions)
    levels = np.array([CSF, GM, WM])
    true = np.zeros((n, 3))
    labels = np.repeat([0, 1, 2], counts)
    true[np.arange(n_pure), labels] = 1.0
    y = levels[labels]
    f = rng.uniform(0, 1, n_pv)
    pair = rng.integers(0, 2, n_pv)  # 0: CSF/GM, 1: GM/WM
    a, b = pair, pair + 1
    true[n_pure + np.arange(n_pv), a] = 1 - f
    true[n_pure + np.arange(n_pv), b] += f
    y = np.concatenate([y, (1 - f) * levels[a] + f * levels[b]])
    y = y + rng.normal(0, 0.03, n)
    priors = np.clip(true + rng.normal(0, 0.25, true.shape), 0, None) + 0.05
    return y, true, priors


def test_mixture_recovers_tissue_amounts_with_partial_volume() -> None:
    rng = np.random.default_rng(3)
    y, true, priors = _phantom_tissue(rng, 300_000, (0.15, 0.5, 0.35), pv=0.2)
    seg = fit_mixture(y, priors)
    got = seg.posteriors.sum(axis=0)
    want = true.sum(axis=0)
    assert np.allclose(got.sum(), len(y), rtol=1e-4)  # fractions sum to one per voxel
    assert np.all(np.abs(got / want - 1) < 0.02), (got, want)
    brain = got[1] + got[2]
    assert abs(brain / (want[1] + want[2]) - 1) < 0.01
    means = seg.mixture.means
    assert means[0] < means[1] < means[2]
    assert seg.mixture.converged


def test_mixture_follows_the_image_when_the_priors_understate_csf() -> None:
    """Atrophy: the subject has far more CSF than the template says. The weights adapt."""
    rng = np.random.default_rng(4)
    y, true, _ = _phantom_tissue(rng, 200_000, (0.35, 0.40, 0.25), pv=0.1)
    template_like = np.tile([0.05, 0.55, 0.40], (len(y), 1))
    priors = 0.6 * template_like + 0.4 * true
    got = fit_mixture(y, priors).posteriors.sum(axis=0)
    assert abs(got[0] / true.sum(axis=0)[0] - 1) < 0.05


def _skull_phantom(gap: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A sphere of CSF-like brightness (radius 40 mm) in a dark skull 4 mm thick in a bright
    scalp, 1 mm voxels; optionally a 6 mm hole through the skull."""
    n = 120
    zz, yy, xx = np.mgrid[:n, :n, :n].astype(float)
    r = np.sqrt((zz - 60) ** 2 + (yy - 60) ** 2 + (xx - 60) ** 2)
    image = np.where(r <= 40, 0.6, 0.0)
    image = np.where((r > 40) & (r <= 44), 0.05, image)
    image = np.where((r > 44) & (r <= 52), 0.9, image)
    if gap:
        hole = (np.abs(yy - 60) <= 3) & (np.abs(xx - 60) <= 3) & (zz < 60)
        image = np.where(hole & (r > 40) & (r <= 44), 0.6, image)
    image = image + np.random.default_rng(1).normal(0, 0.03, image.shape)
    return image, r, (1.0, 1.0, 1.0)


@pytest.mark.parametrize("offset_mm", [-3.0, 3.0])
def test_refinement_moves_the_edge_to_the_inner_table(offset_mm: float) -> None:
    image, r, spacing = _skull_phantom()
    registered = r <= 40 + offset_mm
    out = refine_icv(image, registered, spacing, csf_level=0.6)
    true = float((r <= 40).sum())
    assert abs(out.mask.sum() / true - 1) < 0.02, (out.mask.sum(), true)
    assert 0.0 < out.skull_level < 0.1
    assert 0.2 < out.threshold < 0.6


def test_a_hole_in_the_skull_lets_in_a_few_voxels_not_the_scalp() -> None:
    image, r, spacing = _skull_phantom(gap=True)
    out = refine_icv(image, r <= 41, spacing, csf_level=0.6)
    true = float((r <= 40).sum())
    scalp = float(((r > 44) & (r <= 52)).sum())
    leaked = float((out.mask & (r > 44)).sum())
    assert leaked < 0.01 * scalp
    assert abs(out.mask.sum() / true - 1) < 0.02


def test_without_skull_csf_contrast_the_registered_edge_is_kept() -> None:
    """Bone lit up by coil shading (a reconstruction without intensity normalisation): the
    edge would grow into it, so the registered mask is kept, and said to be."""
    image, r, spacing = _skull_phantom()
    image = np.where((r > 40) & (r <= 44), 0.5, image)  # skull at 0.83 of the CSF level
    registered = r <= 43
    out = refine_icv(image, registered, spacing, csf_level=0.6)
    assert not out.refined
    assert np.array_equal(out.mask, registered)
    assert out.added_fraction == out.removed_fraction == 0.0
    dark_skull, _, _ = _skull_phantom()
    assert refine_icv(dark_skull, registered, spacing, csf_level=0.6).refined


def _judge(**changes: object) -> list[str]:
    values: dict[str, object] = dict(
        icv_ml=1450.0,
        bpf=0.8,
        correlation=0.9,
        means=(300.0, 700.0, 1000.0),
        converged=True,
        edge_change=0.04,
        on_border=0.0,
        slice_mm=1.0,
    )
    values.update(changes)
    return [f.check for f in judge(**values)]  # type: ignore[arg-type]


def test_the_bias_n4_left_is_removed_by_the_tissue_model() -> None:
    """Once: a real head's shading that N4 had left widened the grey matter class over the
    sulcal CSF (brain +20 % against SAMSEG); unified segmentation estimates that bias too."""
    from cohortflow.pipelines.volumetry.method import residual_bias

    rng = np.random.default_rng(3)
    n, spacing = 64, (2.0, 2.0, 2.0)
    grid = np.indices((n, n, n)).astype(np.float64)
    radius = np.sqrt(((grid - n / 2) ** 2).sum(axis=0)) * spacing[0]
    labels = np.select([radius < 30, radius < 45, radius < 58], [2, 1, 0], -1)
    inside = labels >= 0
    means = np.array([100.0, 300.0, 400.0])
    truth = np.where(inside, means[np.clip(labels, 0, 2)], 0.0)
    truth = truth * (1 + 0.04 * rng.standard_normal(truth.shape))
    field = np.exp(0.25 * (grid[0] - n / 2) / n + 0.15 * (grid[2] - n / 2) / n)
    image = (truth * field).astype(np.float32)
    one_hot = np.stack([(labels == k) for k in range(3)], axis=-1).astype(np.float32)
    priors = np.stack(
        [ndimage.gaussian_filter(one_hot[..., k], 1.5) for k in range(3)], axis=-1
    ).astype(np.float32)
    corrected = residual_bias(image, priors, inside, spacing, 0.5, 30.0, 4)

    def spread(values: np.ndarray) -> float:  # of the log ratio to the truth, in the WM
        wm = inside & (labels == 2)
        return float(np.std(np.log(values[wm] / truth[wm])))

    assert spread(corrected) < 0.3 * spread(image)
    assert abs(float(np.median(corrected[inside] / image[inside])) - 1) < 0.05  # scale kept
    assert residual_bias(image, priors, inside, spacing, 0.5, 30.0, 0) is image  # off


def test_verdict_names_each_implausible_result() -> None:
    assert _judge() == []
    assert _judge(correlation=0.3) == ["volumetry.registration"]
    # a fit its neighbours beat stopped short, however well it correlates
    assert _judge(correlation=0.9, neighbour_gain=0.01) == ["volumetry.registration"]
    assert _judge(correlation=0.5, neighbour_gain=-0.1) == []
    assert _judge(gm_ml=480.0, wm_ml=1140.0) == ["volumetry.tissue_ratio"]
    assert _judge(gm_ml=700.0, wm_ml=460.0) == []
    assert _judge(icv_ml=700.0) == ["volumetry.icv_range"]
    assert _judge(icv_ml=2600.0) == ["volumetry.icv_range"]
    assert _judge(bpf=0.4) == ["volumetry.bpf_range"]
    assert _judge(means=(700.0, 300.0, 1000.0)) == ["volumetry.tissue_contrast"]
    assert _judge(edge_change=0.3) == ["volumetry.mask_edge"]
    assert _judge(on_border=0.05) == ["volumetry.coverage"]
    assert _judge(skull_to_csf=0.78) == ["volumetry.edge_not_refined"]
    assert _judge(skull_to_csf=0.37) == []
    assert _judge(slice_mm=5.5) == ["volumetry.thick_slices"]
    assert _judge(converged=False) == ["volumetry.not_converged"]


def test_biomarkers_are_replaced_on_rerun(tmp_path: Path) -> None:
    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    row = BiomarkerRecord(
        series_uid="2.25.1",
        study_uid="2.25.2",
        volumes=Volumes(1400.0, 600.0, 500.0, 300.0, 1100.0, 0.7857),
        method="m",
        method_version="1",
        qc_status="pass",
        confidence="normal",
        parameters={"a": 1},
    )
    with index.session() as session:
        record_biomarkers(session, [row])
    with index.session() as session:
        again = replace(row, volumes=replace(row.volumes, icv_ml=1410.0))
        record_biomarkers(session, [again])
    with index.session() as session:
        rows = biomarker_records(session)
    assert len(rows) == 1 and rows[0].volumes == again.volumes and rows[0].parameters == {"a": 1}
    index.dispose()


# --- the whole method on synthetic heads (antspyx) -------------------------------------------


@pytest.mark.slow
def test_the_atlas_derived_from_the_head_model_is_kept_and_a_damaged_copy_made_again(
    head_model: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registration template and priors every measuring process derived from the head model
    (5 to 7 s each) are kept in the cache: read back, they are the same arrays; a damaged copy
    is made again, not believed. Workers that start together derive them once: the others wait
    for the first and read what it kept (two threads here, each with its own lock handle, as
    two processes have)."""
    from concurrent.futures import ThreadPoolExecutor

    from cohortflow.pipelines.atlas.headmodel import HeadModel
    from cohortflow.pipelines.volumetry import atlas

    assert isinstance(head_model, HeadModel)
    _derived, derive = atlas._derived, atlas._make_derived
    derived: list[int] = []

    def counted(model: HeadModel) -> Any:
        derived.append(1)
        return derive(model)

    with monkeypatch.context() as patched:
        patched.setattr(atlas, "_make_derived", counted)
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda _: _derived(tmp_path, head_model), range(2)))
    assert len(derived) == 1
    made = together[0]
    for a, b in zip(made, together[1], strict=True):
        assert np.array_equal(a, b)
    (kept,) = tmp_path.glob("volumetry-atlas-*.npz")
    for a, b in zip(made, _derived(tmp_path, head_model), strict=True):
        assert np.array_equal(a, b) and a.dtype == b.dtype == np.float32
    kept.write_bytes(kept.read_bytes()[:1000])  # cut short, as by a full disk
    for a, b in zip(made, _derived(tmp_path, head_model), strict=True):
        assert np.array_equal(a, b)
    assert kept.stat().st_size > 100 * 2**20  # and written whole again
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_volumes_of_a_warped_atrophied_head(
    head_model: object, model_cache: Path, tmp_path: Path, figures: Callable[[str], None]
) -> None:
    """Accuracy on one strongly warped, atrophied head. That the numbers are the same on every
    run (fixed seeds, one ITK thread) is checked across processes by the protocol runs: the
    Dask run's volumes equal the single-process run's to 0.001 ml (tests/test_protocol_run.py);
    a second measure here cost 50 s for nothing more."""
    from cohortflow.pipelines.atlas.headmodel import HeadModel
    from cohortflow.pipelines.synth import subjects
    from cohortflow.pipelines.volumetry.atlas import load_atlas
    from cohortflow.pipelines.volumetry.method import measure
    from cohortflow.pipelines.volumetry.run import read_t1

    assert isinstance(head_model, HeadModel)
    rng = np.random.default_rng([11, 0])
    subj = subjects.make_subject(
        head_model, rng, target_icv_ml=1550.0, atrophy=0.12, warp_sd_mm=5.0, warp_nodes=8
    )
    img, truth_img = subjects.scan(head_model, subj, rng, "sagittal_1mm")
    nib.save(img, tmp_path / "t1.nii.gz")
    atlas = load_atlas(model_cache)
    first = measure(read_t1(tmp_path / "t1.nii.gz"), atlas)
    v, t = first.volumes, subj.volumes
    icv_err = v.icv_ml / t.icv_ml - 1
    brain_err = v.brain_ml / t.brain_ml - 1
    figures(
        f"volumetry, one warped atrophied head: ICV {v.icv_ml:.0f} ml (truth {t.icv_ml:.0f}, "
        f"{icv_err:+.1%}), brain {v.brain_ml:.0f} ml (truth {t.brain_ml:.0f}, {brain_err:+.1%}), "
        f"{sum(first.seconds.values()):.0f} s"
    )
    assert abs(icv_err) < 0.04
    assert abs(brain_err) < 0.04
    assert abs(v.bpf - t.bpf) < 0.03
    # the mask agrees with the true intracranial space voxel by voxel
    truth = np.asarray(nib.as_closest_canonical(truth_img).dataobj)
    truth = truth[tuple(slice(a, b) for a, b in first.crop)]
    icv = np.isin(truth, (1, 2, 3))
    dice = 2 * (icv & first.mask).sum() / (icv.sum() + first.mask.sum())
    assert dice > 0.95


@pytest.mark.slow
def test_cli_measures_the_defaced_t1_of_a_dicom_study_and_records_it(
    cohort: CohortResult,
    model_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    study = next(
        st
        for p in cohort.truth.patients
        for st in p.studies
        if st.volumes is not None
        and not st.faults
        and any(se.kind == "t1_3d" and not se.faults for se in st.series)
    )
    assert study.volumes is not None
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    # fits of this test's own: the test cache kept between runs holds this head's warp from the
    # last run, and the first measurement below must register it
    monkeypatch.setenv("COHORTFLOW_FITS_DIR", str(tmp_path / "fits"))
    # as in the pipeline: volumetry sees the defaced series
    source = tmp_path / "defaced"
    assert main(["deface", str(cohort.out_dir / study.folder), str(source)]) == 0
    capsys.readouterr()
    code = main(["volumetry", str(source), "--out", str(tmp_path / "out"), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0, payload
    (result,) = payload["results"]
    assert result["converter"].startswith(("dcm2niix", "SimpleITK"))
    assert result["verdict"] in ("pass", "warn")
    assert Path(result["overlay"]).is_file()
    v, t = result["volumes"], study.volumes
    assert abs(v["icv_ml"] / t.icv_ml - 1) < 0.05
    assert abs(v["brain_ml"] / t.brain_ml - 1) < 0.05
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    with index.session() as session:
        rows = biomarker_records(session)
        stages = stage_records(session, "volumetry")
    index.dispose()
    # defaced but never anonymized (no PatientIdentityRemoved): recorded under the UID the
    # anonymizer gives the series, so no real UID reaches the de-identified side
    pseudo = ProjectKey.load(str(load_settings().pseudonym_key_source)).uid(result["series"])
    assert [r.series_uid for r in rows] == [pseudo]
    assert rows[0].volumes.brain_ml == pytest.approx(v["brain_ml"], abs=1e-3)
    assert rows[0].method_version and rows[0].parameters["affine_mm"] > 0
    assert [s.series_uid for s in stages] == [pseudo]
    # measured again (a rerun, a new method version): the deformable registration is read from
    # the fit store (<cache>/fits), and the volumes are the same to the bit
    assert result["metrics"]["deformable_from"] == "registered"
    again = main(["volumetry", str(source), "--out", str(tmp_path / "again"), "--no-record",
                  "--json"])  # fmt: skip
    (second,) = json.loads(capsys.readouterr().out)["results"]
    assert again == 0 and second["metrics"]["deformable_from"] == "stored"
    assert second["volumes"] == v
    assert second["metrics"]["seconds"]["deformable"] < result["metrics"]["seconds"]["deformable"]


def test_cli_names_an_unreadable_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    bad = tmp_path / "broken_T1w.nii.gz"
    bad.write_bytes(b"not an image")
    code = main(["volumetry", str(bad), "--json", "--no-record"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 1
    (result,) = payload["results"]
    assert result["reason"] == "volumetry.unreadable"
    assert str(bad) in result["findings"][0]["message"]
    assert main(["volumetry", str(tmp_path / "missing.nii.gz")]) == 2


COLIN = Path("/usr/share/mricron/templates")


@pytest.mark.slow
def test_a_real_head_agrees_with_masks_made_apart_from_our_atlas(
    model_cache: Path, figures: Callable[[str], None]
) -> None:
    """Colin27 (Debian's mricron-data): one person's T1 head, not our template. Its brain mask
    by FSL BET and its skull-stripped tissue image were made by others, with other tools."""
    from cohortflow.pipelines.volumetry.atlas import load_atlas
    from cohortflow.pipelines.volumetry.method import measure
    from cohortflow.pipelines.volumetry.run import read_t1

    m = measure(read_t1(COLIN / "ch2.nii.gz"), load_atlas(model_cache))
    bet: nib.Nifti1Image = nib.as_closest_canonical(nib.load(COLIN / "ch2bet.nii.gz"))
    bet_mask = np.asarray(bet.dataobj) > 0
    ours = np.zeros(bet_mask.shape, dtype=bool)
    ours[tuple(slice(a, b) for a, b in m.crop)] = m.mask
    dice = 2 * (ours & bet_mask).sum() / (ours.sum() + bet_mask.sum())
    bet_outside = (bet_mask & ~ours).sum() / bet_mask.sum()
    better: nib.Nifti1Image = nib.load(COLIN / "ch2better.nii.gz")
    tissue_ml = (np.asarray(better.dataobj) > 0).sum() * np.prod(better.header.get_zooms()) / 1e3
    v = m.volumes
    figures(
        f"volumetry, Colin27: ICV {v.icv_ml:.0f} ml, brain {v.brain_ml:.0f} ml against "
        f"{tissue_ml:.0f} ml skull-stripped tissue; Dice with the BET mask {dice:.3f}"
    )
    # BET's brain mask leaves out the CSF over the brain: it lies inside the intracranial mask
    assert bet_outside < 0.02
    assert dice > 0.9
    assert abs(v.brain_ml / tissue_ml - 1) < 0.03
    assert 0.75 < v.bpf < 0.9


def test_an_affine_handed_on_maps_points_as_its_matrix(tmp_path: Path) -> None:
    """A head fit's 4 x 4 (subject LPS -> template LPS) written as an ANTs transform moves
    points exactly as the matrix does (what volumetry starts from instead of registering)."""
    import ants

    from cohortflow.pipelines.volumetry.register import write_affine

    turn = np.deg2rad(7.0)
    matrix = np.array(
        [
            [1.05 * np.cos(turn), -np.sin(turn), 0.02, 4.0],
            [np.sin(turn), 0.97 * np.cos(turn), 0.0, -11.5],
            [0.01, 0.03, 1.1, 23.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    transform = ants.read_transform(write_affine(matrix, str(tmp_path / "fit.mat")))
    for point in ([0.0, 0.0, 0.0], [80.0, -40.0, 120.0], [-65.0, 95.0, -30.0]):
        moved = transform.apply_to_point(tuple(point))
        assert np.allclose(moved, (matrix @ [*point, 1.0])[:3], atol=1e-6)
