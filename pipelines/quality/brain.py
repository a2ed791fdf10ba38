"""Where the brain is: the defacing template's intracranial mask placed on a T1 by registration.

Thresholds alone cannot strip the skull reliably (the brain joins the scalp and the neck on a
few heads in ten); a template placed by an affine at 6 mm takes about 3 s and gives an
intracranial mask within a few percent, and, from the same transform, how much of the brain
lies outside the field of view.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.models.geometry import Volume
from cohortflow.pipelines.atlas.masks import brain_on_tissue
from cohortflow.pipelines.atlas.template import BRAIN, Template
from cohortflow.pipelines.imaging.register import HeadFit, fit_affine
from cohortflow.qc.image import Brain, outside_fraction
from cohortflow.qc.masks import block_mean, upsample

log = logging.getLogger(__name__)

#: Registration resolution (mm): intracranial masks within a few percent, about 3 s.
RESOLUTION_MM = 6.0
#: Grid on which the mask is sampled before nearest-neighbour upsampling (mm).
MASK_MM = 2.0
#: A placement with less of the mask on head tissue has landed off the brain.
MIN_ON_TISSUE = 0.85


def place_brain(
    stack: npt.NDArray[np.float32],
    volume: Volume,
    template: Template,
    handed: HeadFit | None = None,
) -> Brain:
    """The template's intracranial mask on ``stack`` (the volume's pixels, (k, r, c)), placed
    with ``handed`` (the study's head as defacing fitted it, at 3 mm and polished: better than
    this 6 mm affine) when it was fitted to this template, else by registering here."""
    spacing = (volume.slice_spacing, volume.first.spacing[0], volume.first.spacing[1])
    if handed is not None and handed.template_digest == template.digest:
        subject_to_template = handed.matrix
    else:
        try:
            subject_to_template = _register(stack, volume, template)
        except Exception as exc:  # ANTs raises plain RuntimeErrors on images it cannot use
            log.warning("brain placement: registration failed: %s", exc)
            return Brain(None, None, f"registration failed: {type(exc).__name__}: {exc}")
    index_to_lps = volume.index_to_lps()
    factors = tuple(max(1, round(MASK_MM / s)) for s in spacing)
    f3 = (factors[0], factors[1], factors[2])
    low_shape = tuple(-(-n // f) for n, f in zip(stack.shape, f3, strict=True))
    # low-resolution voxel (i, j, k) is the centre of a block of full-resolution voxels
    low_to_index = np.diag([*map(float, f3), 1.0])
    low_to_index[:3, 3] = [(f - 1) / 2 for f in f3]
    to_template = template.lps_to_index @ subject_to_template @ index_to_lps @ low_to_index
    brain = (template.labels & BRAIN > 0).astype(np.uint8)
    low = ndimage.affine_transform(
        brain,
        to_template[:3, :3],
        offset=to_template[:3, 3],
        output_shape=low_shape,
        order=0,
        mode="constant",
        cval=0,
    )
    mask = upsample(low > 0, f3, stack.shape)
    points = np.argwhere(brain[::2, ::2, ::2]).T.astype(np.float64) * 2.0
    template_lps = template.index_to_lps[:3, :3] @ points + template.index_to_lps[:3, 3:4]
    to_subject = np.linalg.inv(subject_to_template)
    subject_lps = to_subject[:3, :3] @ template_lps + to_subject[:3, 3:4]
    lps_to_index = np.asarray(np.linalg.inv(index_to_lps), dtype=np.float64)
    outside = outside_fraction(subject_lps, lps_to_index, stack.shape)
    if not mask.any():
        return Brain(None, outside, "the placed template's brain falls outside the image")
    on_tissue = brain_on_tissue(stack, mask)
    if on_tissue < MIN_ON_TISSUE:
        return Brain(
            None,
            outside,
            f"only {on_tissue:.0%} of the placed brain lies on the head (minimum "
            f"{MIN_ON_TISSUE:.0%}): the registration failed",
        )
    return Brain(mask, outside)


def _register(
    stack: npt.NDArray[np.float32], volume: Volume, template: Template
) -> npt.NDArray[np.float64]:
    """The template's affine onto ``stack`` at RESOLUTION_MM (subject LPS -> template LPS)."""
    # ANTs resamples to 6 mm by linear interpolation (a second for a 1 mm head): average to
    # about 2 mm first; the first block's centre is the new origin
    spacing = (volume.slice_spacing, volume.first.spacing[0], volume.first.spacing[1])
    shrink = tuple(max(1, int(RESOLUTION_MM / 3 / s)) for s in spacing)
    f3 = (shrink[0], shrink[1], shrink[2])
    small = block_mean(stack, f3)
    centre = np.array([(f - 1) / 2 for f in f3] + [1.0])
    origin = (volume.index_to_lps() @ centre)[:3]
    small_spacing = tuple(float(s * f) for s, f in zip(volume.spacing, f3[::-1], strict=True))
    fit = fit_affine(
        np.transpose(small, (2, 1, 0)),  # ITK index order: column, row, slice
        origin,
        (small_spacing[0], small_spacing[1], small_spacing[2]),
        volume.direction,
        str(template.head_path),
        RESOLUTION_MM,
        store=template.fits,
    )
    return fit.subject_to_template
