"""Intracranial, grey matter, white matter, CSF and brain volume of one T1 image.

1. The atlas head is registered to the T1 (affine, then SyN on the skull shell; ``register``).
2. N4 removes the intensity non-uniformity inside the registered mask grown by 5 mm.
3. A mixture of CSF, GM and WM Gaussians and the two partial-volume classes between them, with
   the atlas' tissue priors, is fitted on the mask's voxels away from its edge (``segment``),
   after the bias N4 left is estimated from that model and removed (``residual_bias``).
4. The intracranial edge is moved to the border between the skull and the ventricles' CSF
   level (``refine``); every voxel of the refined mask gets its tissue fractions under the
   mixture.
5. Volumes: ICV = voxels of the refined mask; CSF, GM, WM = sums of the fractions;
   brain = GM + WM; BPF = brain / ICV.

Compute only: an ANTs image comes in, a :class:`Measurement` (volumes, maps, diagnostics) goes
out; reading, writing, QC and recording happen a layer up.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.volumetry.atlas import Atlas
from cohortflow.pipelines.volumetry.refine import MAX_SKULL_TO_CSF, Refinement, refine_icv
from cohortflow.pipelines.volumetry.register import Placed, place_atlas
from cohortflow.pipelines.volumetry.segment import CLASSES, Mixture, fit_parameters, posteriors_for

METHOD = "cohortflow-volumetry"
#: Changes whenever a step or a default changes the numbers: results of another version are redone.
#: 5: N4 on a grid shrunk 6 times (was 4); the affine's starts compared at its coarse level.
#: 6: the atlas placed by the head fit defacing makes (handed on in a run), not an affine of its own
#: 7: each EM fit starts from the one before it (the residual bias rounds, then the final fit)
#: 8: the final fit starts from the priors again (from the last round's fit it ended elsewhere on
#: two real heads); the bias rounds keep starting from the round before
#: 9: the final fit's parameters from 100,000 voxels of the mask, as each bias round's (was 250,000)
#: 10: the residual bias smoothed at 15 mm (was 30 mm)
METHOD_VERSION = "10"
#: the voxels the mixture's parameters are fitted on (every k-th of the fitting mask); the
#: fractions are computed for every voxel
FIT_SAMPLES = 100_000


@dataclass(frozen=True)
class Parameters:
    """What the numbers depend on (recorded with every result)."""

    #: resolution of the placement's checks (correlation, neighbour gain) and crop
    affine_mm: float = 4.0
    deformable: bool = True
    deformable_mm: float = 5.0
    shell_mm: float = 12.0
    #: N4 fits its field on the image shrunk this many times per axis: 6 takes a third of 4's
    #: time (measured on 10 real heads: 1.6-6.2 s against 4.3-18.6 s) and moved brain volume
    #: towards SAMSEG's (mean |difference| 4.4 -> 3.2 %; the largest, a decubitus head, +10.0 ->
    #: -2.3 %; none moved more than 0.6 % away); ICV within 0.5 %. The field is smooth at the
    #: scale of centimetres: a 6 mm grid still samples it finely.
    n4_shrink: int = 6
    n4_levels: int = 4
    #: the bias N4 left, estimated from the tissue model and removed (``residual_bias``):
    #: smoothing (mm) and rounds; 0 rounds: off. At 30 mm (method 9) it could not follow a field
    #: that changes by a quarter between the brain's centre and its surface (``residual_bias``)
    bias_mm: float = 15.0
    bias_rounds: int = 4
    prior_weight: float = 0.5
    band_in_mm: float = 12.0
    band_out_mm: float = 4.0
    opening_mm: float = 1.0
    bays_mm: float = 4.0
    fit_depth_mm: float = 3.0
    max_skull_ratio: float = MAX_SKULL_TO_CSF
    refine: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    volumes: Volumes
    registered_icv_ml: float  # before refinement
    correlation: float
    neighbour_gain: float
    mixture: Mixture
    refinement: Refinement | None
    #: on the cropped grid: the T1 (bias-corrected), the intracranial mask, labels 0..3
    image: npt.NDArray[np.float32]
    mask: npt.NDArray[np.bool_]
    registered: npt.NDArray[np.bool_]  # the atlas mask as registration placed it
    labels: npt.NDArray[np.uint8]
    spacing: tuple[float, float, float]
    crop: tuple[tuple[int, int], ...]
    seconds: dict[str, float] = field(default_factory=dict)
    deformable_from: str | None = None  # Placed.deformable_from


def n4(image: Any, mask: Any, shrink: int, levels: int = 4) -> Any:
    """ANTs N4 bias-field correction inside ``mask``, ``levels`` fitting levels of 50
    iterations (each level doubles the B-spline mesh).

    Two levels left a real head reconstructed without the scanner's intensity normalisation
    (Siemens XA30, 32-channel coil) with a residual field that made its white matter GM/WM
    0.42 and its brain 42 % above SAMSEG's; four levels (ANTs' default) measured GM/WM 1.8 there
    and moved brain volume towards SAMSEG's on the other 3D heads too (Trio +8.7 -> +5.2 %,
    XA30 normalised -13.6 -> -10.5 %). A finer mesh (100 mm spline distance) was worse on both.
    """
    import ants

    return ants.n4_bias_field_correction(
        image,
        mask=mask,
        shrink_factor=shrink,
        convergence={"iters": [50] * levels, "tol": 1e-6},
    )


#: the grid the residual bias is smoothed on (mm)
BIAS_GRID_MM = 4.0


def residual_bias(
    image: npt.NDArray[np.float32],
    priors: npt.NDArray[np.float32],
    fit: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
    prior_weight: float,
    sigma_mm: float,
    rounds: int,
    tolerance: float = 0.005,
) -> npt.NDArray[np.float32]:
    """``image`` divided by the smooth multiplicative bias that N4 left, estimated as unified
    segmentation does (Van Leemput et al. 1999, Ashburner & Friston 2005): fit the tissue
    mixture, predict each voxel of ``fit`` from its tissue fractions and the class means, and
    smooth the log ratio of image to prediction (Gaussian of ``sigma_mm``, each voxel weighted
    by how sure the model is of it: its classes' inverse variances); repeat until the field
    changes by less than ``tolerance`` (log units) or after ``rounds``.

    N4 sharpens the intensity histogram and knows nothing of tissues. On a real Siemens XA30
    reconstruction without intensity normalisation it left a shading that widened the grey
    matter class over the CSF in the sulci (brain +20 % against SAMSEG, GM/WM 2.6); removing
    the residual bias brought it to +2 %. The field's weighted mean is zero: the scale of the
    image is kept.

    The smoothing was 30 mm until method 10. The Siemens XA30 head reconstructed with and
    without the scanner's intensity normalisation (one acquisition, 2 mm voxels) showed that
    this was too smooth. Without normalisation the shading rises 2.8-fold from the brain's
    centre to its surface. After N4 and a 30 mm residual the white matter still rose from 0.87
    to 1.18 of its median from centre to surface, and the brainstem stood at 0.72 of the white
    matter (in SAMSEG's corrected image: flat, and 1.01). With normalisation, the outer cortex
    came out at 0.63 of the white matter (SAMSEG: 0.71) and lost grey matter to CSF. Brain
    volumes were +15.2 and -10.3 % against SAMSEG's, 29 % apart (SAMSEG's two: 0.6 %). A
    Gaussian of 30 mm is 70 mm across at half height; it cannot follow a field that changes
    by a quarter over 5 cm. Measured on the pair as the gap between the two brain volumes:
    15 mm 12 % (+5.3 and -5.6 %, the default); 20 mm with tissue weights 16 %; 10 mm (8
    rounds) 22 %, grey matter absorbed the CSF; the precision weights replaced by grey plus
    white matter fractions, or 8 rounds instead of 4, changed it by 1 %. Changes to N4 did
    not help: two passes, a white-matter weight mask, 200 iterations, 5 levels, the mask not
    grown (24 to 37 %). On six other real heads, 15 mm moved brain volume by -0.8 to +0.8 %:
    towards SAMSEG's on four, unchanged on one, 0.8 % further from it on one.

    Each round's fit starts from the one before (the image changes little between rounds; from
    the priors' sure voxels each fit took 86 to 91 EM iterations on Colin27). The final fit,
    after the rounds, starts from the priors: started from the last round's fit, it ended
    elsewhere on two real heads where the EM is not well determined (the Siemens XA30 head
    without intensity normalisation, brain +23 % against SAMSEG instead of +14 %; the decubitus
    HFDL head, GM/WM 0.46 and failed instead of 1.16).
    """
    if rounds <= 0:
        return image
    corrected = np.asarray(image, dtype=np.float64)
    blocks = tuple(max(1, round(BIAS_GRID_MM / s)) for s in spacing)
    sigma = [sigma_mm / (s * b) for s, b in zip(spacing, blocks, strict=True)]
    # the field is estimated from every second voxel along each axis (it is smooth at
    # centimetres); each round's mixture from FIT_SAMPLES voxels of ``fit``, as the final fit
    sample = np.zeros(image.shape, dtype=bool)
    sample[::2, ::2, ::2] = True
    sample &= fit
    mixture: Mixture | None = None
    for _ in range(rounds):
        mixture = fit_parameters(
            corrected[fit], priors[fit], prior_weight, max_samples=FIT_SAMPLES, start=mixture
        )
        y = corrected[sample]
        fractions = posteriors_for(y, priors[sample], mixture, prior_weight).astype(np.float64)
        predicted = np.maximum(fractions @ np.asarray(mixture.means), 1e-6)
        # log-domain weights: a voxel's precision, (mean / sd)^2 of its classes
        weight = (fractions / np.square(np.asarray(mixture.sds))[None, :]).sum(axis=1)
        weight *= np.square(predicted)
        ratio = np.log(np.maximum(y, 1e-6) / predicted)
        numerator, denominator = np.zeros(image.shape), np.zeros(image.shape)
        numerator[sample], denominator[sample] = weight * ratio, weight
        step = _smooth_ratio(numerator, denominator, blocks, sigma)
        step -= np.average(step[sample], weights=weight)
        corrected /= np.exp(step)
        if float(np.abs(step[fit]).max()) < tolerance:
            break
    return corrected.astype(np.float32)


def _smooth_ratio(
    numerator: npt.NDArray[np.float64],
    denominator: npt.NDArray[np.float64],
    blocks: tuple[int, ...],
    sigma: list[float],
) -> npt.NDArray[np.float64]:
    """Gaussian-smoothed ``numerator / denominator`` (normalised convolution), computed on
    blocks of ``blocks`` voxels (a field smooth at centimetres needs no finer grid: on the
    full 1 mm grid the two filters took 10 s a round) and brought back by linear
    interpolation."""
    shape = numerator.shape
    padded = tuple(-(-n // b) * b for n, b in zip(shape, blocks, strict=True))
    small = []
    for volume in (numerator, denominator):
        full = np.zeros(padded)
        full[: shape[0], : shape[1], : shape[2]] = volume
        summed = full.reshape(
            padded[0] // blocks[0], blocks[0], padded[1] // blocks[1], blocks[1],
            padded[2] // blocks[2], blocks[2],
        ).sum(axis=(1, 3, 5))  # fmt: skip
        small.append(ndimage.gaussian_filter(summed, sigma))
    top, bottom = small
    ratio = top / np.maximum(bottom, 1e-12 * float(bottom.max()))
    big = ndimage.zoom(ratio, blocks, order=1, mode="nearest", grid_mode=True)
    return np.asarray(big[: shape[0], : shape[1], : shape[2]], dtype=np.float64)


def csf_level(
    image: npt.NDArray[np.float32],
    csf_prior: npt.NDArray[np.float32],
    deep: npt.NDArray[np.bool_],
    mixture: Mixture,
) -> float:
    """The intensity of pure CSF: the median of the ventricles (voxels of the deep mask that
    the atlas makes almost surely CSF and that are darker than grey matter: a few millimetres
    of misregistration put white matter beside the ventricles among them), else the mixture's
    CSF mean.

    The mixture's CSF class also takes CSF / grey matter partial volume: on a real head its
    mean came out a fifth above the ventricles' median, which put the skull / CSF threshold
    into the CSF over the brain and cut it off.
    """
    sure = deep & (csf_prior >= 0.9) & (image < mixture.means[1])
    if int(sure.sum()) >= 100:
        return float(np.median(image[sure]))
    return float(mixture.means[0])


def measure(
    subject: Any,
    atlas: Atlas,
    params: Parameters | None = None,
    affine: npt.NDArray[np.float64] | None = None,
) -> Measurement:
    """Volumes of the T1 ``subject`` (an ANTs image in its own orientation); ``affine``: the
    subject fitted to the atlas's head model before (subject LPS -> atlas LPS), else
    registered here."""
    import ants

    p = params or Parameters()
    placed: Placed = place_atlas(
        subject,
        atlas,
        affine_mm=p.affine_mm,
        deformable_mm=p.deformable_mm,
        deformable=p.deformable,
        shell_mm=p.shell_mm,
        affine=affine,
    )
    seconds = dict(placed.seconds)
    voxel_ml = float(np.prod(placed.spacing)) / 1000.0
    registered = placed.icv >= 0.5

    t0 = time.perf_counter()
    reference = ants.from_numpy(placed.image, spacing=placed.spacing)
    grown = ants.iMath(
        ants.from_numpy(registered.astype(np.float32), spacing=placed.spacing),
        "MD",
        max(1, round(5.0 / min(placed.spacing))),
    )
    corrected = n4(reference, grown, p.n4_shrink, p.n4_levels).numpy().astype(np.float32)
    seconds["n4"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    priors = np.moveaxis(placed.priors, 0, -1)  # (..., 3)
    depth = ndimage.distance_transform_edt(registered, sampling=placed.spacing)
    # the class parameters come from the voxels at least fit_depth_mm inside the mask: at its
    # edge the dark voxels are not all CSF (dura, vessels, bone in part); they widened the CSF
    # class over the CSF / GM border (on a real head: a fifth more grey matter than SAMSEG)
    fit = depth > p.fit_depth_mm
    corrected = residual_bias(
        corrected, priors, fit, placed.spacing, p.prior_weight, p.bias_mm, p.bias_rounds
    )
    seconds["bias"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mixture = fit_parameters(corrected[fit], priors[fit], p.prior_weight, max_samples=FIT_SAMPLES)
    refinement = None
    mask = registered
    if p.refine:
        refinement = refine_icv(
            corrected,
            registered,
            placed.spacing,
            csf_level=csf_level(corrected, placed.priors[0], depth > p.band_in_mm, mixture),
            band_in_mm=p.band_in_mm,
            band_out_mm=p.band_out_mm,
            opening_mm=p.opening_mm,
            bays_mm=p.bays_mm,
            max_skull_ratio=p.max_skull_ratio,
        )
        mask = refinement.mask
    post = np.zeros((*mask.shape, 3), np.float32)
    post[mask] = posteriors_for(corrected[mask], priors[mask], mixture, p.prior_weight)
    seconds["segment"] = time.perf_counter() - t0

    sums = post.reshape(-1, 3).sum(axis=0) * voxel_ml
    csf, gm, wm = (float(v) for v in sums)
    icv = float(mask.sum()) * voxel_ml
    labels = np.where(mask, post.argmax(axis=-1) + 1, 0).astype(np.uint8)
    return Measurement(
        volumes=Volumes(
            icv_ml=icv,
            gm_ml=gm,
            wm_ml=wm,
            csf_ml=csf,
            brain_ml=gm + wm,
            bpf=(gm + wm) / icv if icv > 0 else float("nan"),
        ),
        registered_icv_ml=float(registered.sum()) * voxel_ml,
        correlation=placed.correlation,
        neighbour_gain=placed.neighbour_gain,
        mixture=mixture,
        refinement=refinement,
        image=corrected,
        mask=mask,
        registered=registered,
        labels=labels,
        spacing=placed.spacing,
        crop=placed.crop,
        seconds=seconds,
        deformable_from=placed.deformable_from,
    )


__all__ = ["CLASSES", "METHOD", "METHOD_VERSION", "Measurement", "Parameters", "measure"]
