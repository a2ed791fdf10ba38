"""Image QC: metric formulas on known numbers, masks on simple volumes, and the whole image check
on head phantoms of known noise, contrast and non-uniformity (SNR and CNR within 10 %)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cohortflow.pipelines.atlas.headmodel import HeadModel
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.synth.phantom import qc_phantom, rician_moments
from cohortflow.qc import metrics as m
from cohortflow.qc.findings import Severity
from cohortflow.qc.image import Brain, check_image, outside_fraction
from cohortflow.qc.masks import tissue_thresholds
from cohortflow.qc.outliers import outlier_findings, robust_z

POLICY = load_protocols().get("dementia").qc


def test_noise_sigma_recovers_gaussian_noise_from_rayleigh_air() -> None:
    rng = np.random.default_rng(0)
    air = np.hypot(rng.normal(0, 7.0, 200_000), rng.normal(0, 7.0, 200_000))
    air[:20_000] = 0  # defaced or zero-filled background is left out
    air[20_000:30_000] += 200  # a few ghosted voxels barely move the median
    sigma = m.noise_sigma(air)
    assert sigma == pytest.approx(7.0, rel=0.05)
    assert m.snr_dietrich(700.0, sigma) == pytest.approx(100.0, rel=0.05)
    assert m.noise_sigma(np.zeros(5000)) is None and m.snr_dietrich(1.0, None) is None


def test_metric_formulas_on_known_numbers() -> None:
    assert m.cnr(2220, 1380, 3.0, 4.0, 0.0) == pytest.approx(840 / 5)
    assert m.cjv(2220, 1380, 100, 110) == pytest.approx(210 / 840)
    assert m.snr(2000.0, 100.0) == 20.0 and m.snr(1.0, 0.0) is None
    assert m.fber(np.full(100, 30.0), np.full(100, 3.0)) == pytest.approx(100.0)
    assert m.fber(np.ones(10), np.zeros(10)) is None
    assert m.wm2max(np.full(10, 70.0), np.linspace(0, 100, 10001)) == pytest.approx(0.7, abs=1e-3)
    median, spread = m.location_spread(np.r_[np.random.default_rng(1).normal(10, 2, 10000), [1e6]])
    assert median == pytest.approx(10, abs=0.1) and spread == pytest.approx(2, rel=0.05)
    # EFC: all energy in one voxel is perfectly focused (0); spread evenly, it is maximal (1)
    focused = np.zeros(1000)
    focused[0] = 1
    assert m.efc(focused) == pytest.approx(0.0, abs=1e-9)
    assert m.efc(np.ones(1000)) == pytest.approx(1.0)
    assert m.clipped_fraction(np.r_[np.arange(99), [4095] * 101]) == pytest.approx(0.505)


def test_qi1_ignores_noise_and_finds_coherent_ghosts() -> None:
    rng = np.random.default_rng(2)
    from scipy import ndimage

    air = np.hypot(rng.normal(0, 50, (40, 60, 60)), rng.normal(0, 50, (40, 60, 60)))
    noise_only = m.qi1(ndimage.uniform_filter(air, 3).ravel(), air.ravel())
    ghosted = air.copy()
    ghosted[:, 20:30, :] += 45  # a faint replica band, below one noise sigma per voxel
    ghosts = m.qi1(ndimage.uniform_filter(ghosted, 3).ravel(), ghosted.ravel())
    # the band covers a sixth of the air; its blurred edges stay under the threshold
    assert noise_only < 0.001 and ghosts > 0.09


def test_bias_field_fit_recovers_a_smooth_field() -> None:
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 60, size=(3, 20_000))
    true = np.exp(0.004 * points[0] - 0.003 * points[1] + 0.00005 * points[2] ** 2)
    field = m.inu_field(1000 * true * rng.normal(1, 0.01, 20_000), points)
    fitted = field(points)
    assert np.allclose(fitted / np.median(fitted), true / np.median(true), rtol=0.02)
    grid = field.on_grid((10, 12, 14))
    assert grid[3, 4, 5] == pytest.approx(field(np.array([[3.0], [4.0], [5.0]]))[0], rel=1e-5)
    spread, _ = m.inu_summary(true)
    assert spread == pytest.approx(
        np.subtract(*np.percentile(true / np.median(true), [95, 5])), rel=1e-6
    )


def test_tissue_thresholds_find_small_classes_that_otsu_splits_away() -> None:
    rng = np.random.default_rng(4)
    csf, gm, wm = (
        rng.normal(480, 60, 5_000),
        rng.normal(1050, 60, 400_000),
        rng.normal(2220, 60, 300_000),
    )
    low, high = tissue_thresholds(np.r_[csf, gm, wm])
    assert 500 < low < 1000 and 1100 < high < 2200
    low, high = tissue_thresholds(
        np.r_[rng.normal(1380, 60, 400_000), rng.normal(2220, 60, 300_000)]
    )
    assert 1380 < high < 2220 and low < 1380


def test_outside_fraction_counts_points_beyond_the_grid() -> None:
    index_to_lps = np.eye(4)
    points = np.array([[0.0, 5.0, 9.4, 9.6, -0.6], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert outside_fraction(points, np.linalg.inv(index_to_lps), (10, 10, 10)) == pytest.approx(0.4)


def test_robust_outliers_are_named_with_their_pool() -> None:
    rng = np.random.default_rng(5)
    pool = list(rng.normal(30.0, 2.0, 30))
    assert robust_z(30.0, pool) == pytest.approx(0.0, abs=0.5)
    assert robust_z(1.0, [2.0] * 20) is None  # no spread, no z
    (finding,) = outlier_findings(
        {"snrd_wm": 12.0}, {"snrd_wm": [*pool, 12.0]}, POLICY, "dementia on X Y"
    )
    assert finding.check == "image.outlier.snrd_wm" and finding.severity is Severity.WARN
    assert isinstance(finding.value, float) and finding.value < -3.5
    assert (
        "unusually low for dementia on X Y" in finding.message
        and "over 31 series" in finding.message
    )
    # too few series of this protocol and scanner yet: no judgement
    assert outlier_findings({"snrd_wm": 12.0}, {"snrd_wm": pool[:5]}, POLICY, "g") == []


def test_an_empty_or_saturated_image_fails_with_its_reason() -> None:
    empty = check_image(np.zeros((20, 30, 30), np.float32), (1.0, 1.0, 1.0), Brain(None), POLICY)
    assert [f.check for f in empty.findings] == ["image.empty"]
    rng = np.random.default_rng(6)
    head = np.abs(rng.normal(0, 20, (60, 80, 80))).astype(np.float32)
    head[10:50, 15:65, 15:65] = 2000
    saturated = np.minimum(head + rng.normal(0, 300, head.shape).astype(np.float32), 2200)
    result = check_image(saturated, (2.0, 2.0, 2.0), Brain(None, None, "not placed"), POLICY)
    checks = [f.check for f in result.findings]
    assert checks[:2] == ["image.brain_mask", "image.clipped"]  # SNR is fine here
    clipped = next(f for f in result.findings if f.check == "image.clipped")
    assert (
        isinstance(clipped.value, float) and clipped.value > 0.2 and clipped.threshold == "<= 0.02"
    )
    assert "not placed" in result.findings[0].message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("snr", "gm", "bias"),
    [
        (40, None, 0.0),
        (20, None, 0.0),
        (8, None, 0.0),
        (20, 0.55, 0.0),
        (20, 0.35, 0.0),
        (20, None, 0.15),
    ],
)
def test_snr_and_cnr_within_10_percent_on_head_phantoms(
    head_model: HeadModel, model_cache: Path, snr: float, gm: float | None, bias: float
) -> None:
    """Known noise and contrast, the whole image check as the QC stage runs it (template placed
    by registration, masks and classes found from the image)."""
    from cohortflow.pipelines.atlas.template import load_brain_template
    from cohortflow.pipelines.quality.brain import place_brain

    rng = np.random.default_rng(int(snr * 10 + (gm or 0) * 100 + bias * 1000))
    phantom = qc_phantom(head_model, rng, snr, gm, bias)
    brain = place_brain(phantom.stack, phantom.volume, load_brain_template(model_cache))
    result = check_image(phantom.stack, (1.0, 1.0, 1.0), brain, POLICY)
    metrics, truth = result.metrics, phantom.truth
    assert brain.outside == 0.0 and metrics["coverage_outside"] == 0.0
    if bias:
        # the field's range is measured; SNR and CNR then include the field (as in MRIQC)
        assert metrics["inu_range"] == pytest.approx(truth.inu_range, rel=0.15)
        return
    assert metrics["snrd_wm"] == pytest.approx(truth.snrd_wm, rel=0.10)
    assert metrics["cnr"] == pytest.approx(truth.cnr, rel=0.10)
    assert metrics["inu_range"] is not None and metrics["inu_range"] < 0.05
    checks = {f.check for f in result.findings}
    assert "image.snr" not in checks and "image.motion" not in checks


def test_rician_moments_match_the_definition() -> None:
    rng = np.random.default_rng(7)
    for nu in (0.0, 1.0, 3.0):
        samples = np.hypot(nu + rng.normal(0, 1, 400_000), rng.normal(0, 1, 400_000))
        mean, sd = rician_moments(nu, 1.0)
        assert mean == pytest.approx(samples.mean(), rel=0.01)
        assert sd == pytest.approx(samples.std(), rel=0.01)
    assert rician_moments(0.0, 1.0)[1] == pytest.approx(math.sqrt((4 - math.pi) / 2))


def test_a_zero_filled_background_is_reported_not_passed_silently() -> None:
    rng = np.random.default_rng(8)
    image = np.zeros((60, 80, 80), np.float32)
    image[10:50, 15:65, 15:65] = 2000 + rng.normal(0, 50, (40, 50, 50))
    result = check_image(image, (2.0, 2.0, 2.0), Brain(None, None, "not placed"), POLICY)
    finding = next(f for f in result.findings if f.check == "image.no_noise_estimate")
    assert finding.severity is Severity.WARN and finding.value == 0.0
    assert result.metrics["noise_sigma"] is None


def test_a_head_fit_handed_over_by_defacing_places_the_brain_without_registering(
    head_model: HeadModel, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Register once (issue 24): in a protocol run image QC places its brain mask with the fit
    defacing made (3 mm, on the same template) instead of its own 6 mm affine; the mask agrees
    with the one QC's own registration places, and a fit to another template is not used."""
    from dataclasses import replace

    from cohortflow.pipelines.atlas.template import load_brain_template
    from cohortflow.pipelines.imaging import register
    from cohortflow.pipelines.quality import brain as placement

    rng = np.random.default_rng(31)
    phantom = qc_phantom(head_model, rng, 20, None, 0.0)
    template = load_brain_template(model_cache)
    own = placement.place_brain(phantom.stack, phantom.volume, template)
    volume = phantom.volume
    fit = register.fit_affine(  # as defacing fits the study's T1
        np.transpose(phantom.stack, (2, 1, 0)),
        volume.first.origin,
        volume.spacing,
        volume.direction,
        str(template.head_path),
    )
    handed = register.HeadFit.of("2.25.1", "2.25.2", fit, template.digest)
    assert register.HeadFit.from_json(handed.to_json()) == handed

    def no_registration(*args: object, **kwargs: object) -> object:
        raise AssertionError("image QC registered a head whose fit was handed over")

    monkeypatch.setattr(placement, "fit_affine", no_registration)
    placed = placement.place_brain(phantom.stack, phantom.volume, template, handed)
    assert own.mask is not None and placed.mask is not None
    dice = 2 * (own.mask & placed.mask).sum() / (own.mask.sum() + placed.mask.sum())
    assert dice > 0.95, dice
    assert placed.outside == 0.0
    mine = check_image(phantom.stack, (1.0, 1.0, 1.0), own, POLICY).metrics
    theirs = check_image(phantom.stack, (1.0, 1.0, 1.0), placed, POLICY).metrics
    assert theirs["snrd_wm"] == pytest.approx(mine["snrd_wm"], rel=0.05)
    assert theirs["cnr"] == pytest.approx(mine["cnr"], rel=0.05)
    # a fit to another head model is not this template's: QC registers (here: refused)
    other = replace(handed, template_digest="other")
    refused = placement.place_brain(phantom.stack, phantom.volume, template, other)
    assert refused.mask is None and "registered a head" in (refused.problem or "")
