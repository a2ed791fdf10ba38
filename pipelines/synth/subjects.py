"""Single T1 volumes with known tissue volumes, for validating volumetry without DICOM.

The cohort generator (``cohort.py``) writes whole clinical studies as DICOM; volumetry's accuracy
targets need many subjects, re-scans of one subject and atrophy groups, where writing DICOM only
costs time. These functions render one subject's T1 on a scanner grid straight from the head
model, through the same anatomy code (size, smooth warp, atrophy, placement, bias, Rician noise),
and return the image with the true volumes.

Validation subjects should differ from the template a method registers: ``warp_sd_mm`` makes the
warp strong (the cohort uses 2 mm; 5 to 6 mm moves structures by a centimetre) and
``warp_nodes`` makes it local (more control points, shorter wavelength), ``texture_sd`` gives
the tissue a texture (``anatomy.texture_gain``; the generator's, ``pipelines.synth.generators``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import nibabel as nib
import numpy as np
import numpy.typing as npt

from cohortflow.models.geometry import LPS_FROM_RAS
from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.atlas.headmodel import HeadModel
from cohortflow.pipelines.synth import anatomy
from cohortflow.pipelines.synth.scanners import CONTRASTS

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class T1Grid:
    """A T1 acquisition grid: ImageOrientationPatient row / column directions, shape (slices,
    rows, columns), spacing (slice, row, column) mm, slice thickness, samples through a slice."""

    row: Vec3
    col: Vec3
    shape: tuple[int, int, int]
    spacing: Vec3
    thickness: float
    samples: int = 1


#: The T1s seen in clinics: 3D sagittal 1 mm, 3D axial 1 x 1 x 1.2 mm, 2D axial 5 mm slices.
T1_GRIDS: dict[str, T1Grid] = {
    "sagittal_1mm": T1Grid((0, 1, 0), (0, 0, -1), (176, 256, 256), (1.0, 1.0, 1.0), 1.0),
    "axial_1.2mm": T1Grid((1, 0, 0), (0, 1, 0), (150, 256, 256), (1.2, 1.0, 1.0), 1.2),
    "axial_2d_5mm": T1Grid((1, 0, 0), (0, 1, 0), (30, 256, 256), (5.5, 0.9, 0.9), 5.0, 5),
}


@dataclass(frozen=True)
class Subject:
    """One subject's anatomy: its shape, its (warped, atrophied) labels on the model grid."""

    shape: anatomy.SubjectShape
    labels: npt.NDArray[np.uint8]  # warped model-grid labels
    head: npt.NDArray[np.float32]  # warped model-grid template intensities
    face: npt.NDArray[np.uint8]  # warped model-grid face (what defacing removes)
    volumes: Volumes
    texture: npt.NDArray[np.float32] | None = None  # model-grid tissue texture gain, or flat
    crop_to_model: bool = False  # scans end where the model's image ends (Colin27: no jaw)


def make_subject(
    model: HeadModel,
    rng: np.random.Generator,
    *,
    target_icv_ml: float,
    atrophy: float,
    warp_sd_mm: float = 5.0,
    warp_nodes: int = 8,
    texture_sd: float = 0.0,
    crop_to_model: bool = False,
) -> Subject:
    """Draw a subject and compute its true volumes on a 1 mm grid in its own head frame; with
    ``texture_sd`` > 0 its tissue has a texture of that relative SD, the same in every scan."""
    shape = anatomy.sample_shape(
        model, rng, target_icv_ml, warp_sd_mm=warp_sd_mm, warp_nodes=warp_nodes
    )
    coords = anatomy.warp_coordinates(model, shape)
    labels = anatomy.warp_volume(
        anatomy.atrophied_labels(model, shape, atrophy), coords, order=0
    ).astype(np.uint8)
    head = anatomy.warp_volume(model.head, coords, order=1).astype(np.float32)
    face = anatomy.warp_volume(model.face, coords, order=0).astype(np.uint8)
    tgrid = anatomy.truth_grid(shape)
    truth = anatomy.sample_grid(labels, model, shape, anatomy.IDENTITY_PLACEMENT, tgrid, order=0)
    texture = None
    if texture_sd > 0:  # drawn only when asked: flat subjects keep their random stream
        spacing = anatomy.model_spacing(model)
        texture = anatomy.texture_gain(labels.shape, spacing, rng, texture_sd)
    volumes = anatomy.truth_volumes(truth.astype(np.uint8), 0.001)
    return Subject(shape, labels, head, face, volumes, texture, crop_to_model)


def with_atrophy(model: HeadModel, subject: Subject, atrophy: float) -> Subject:
    """The same subject (same size and warp) with another fraction of its brain lost."""
    coords = anatomy.warp_coordinates(model, subject.shape)
    labels = anatomy.warp_volume(
        anatomy.atrophied_labels(model, subject.shape, atrophy), coords, order=0
    ).astype(np.uint8)
    tgrid = anatomy.truth_grid(subject.shape)
    truth = anatomy.sample_grid(
        labels, model, subject.shape, anatomy.IDENTITY_PLACEMENT, tgrid, order=0
    )
    volumes = anatomy.truth_volumes(truth.astype(np.uint8), 0.001)
    return replace(subject, labels=labels, volumes=volumes)


def scan(
    model: HeadModel,
    subject: Subject,
    rng: np.random.Generator,
    grid_name: str = "sagittal_1mm",
    *,
    noise: float = 0.02,
    bias: float = 0.12,
    max_deg: float = 6.0,
    max_mm: float = 8.0,
    defaced: bool = False,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """One T1 acquisition of ``subject``: a random head placement, the named grid, a bias field
    and Rician noise; returned as NIfTI images (RAS affine, as a converter would write it): the
    T1 and the true labels on its grid (at slice centres). ``defaced``: the face set to
    background, as the defacing step leaves it."""
    spec = T1_GRIDS[grid_name]
    placement = anatomy.sample_placement(rng, max_deg=max_deg, max_mm=max_mm)
    grid = anatomy.centred_grid(
        spec.shape,
        spec.spacing,
        spec.row,
        spec.col,
        centre=placement.translation + rng.uniform(-3, 3, size=3),
    )
    if subject.crop_to_model:
        grid = anatomy.within_model(grid, model, subject.shape, placement)
    model_img = anatomy.tissue_image(subject.head, subject.labels, CONTRASTS["t1"])
    if subject.texture is not None:
        model_img = anatomy.textured(model_img, subject.labels, subject.texture)
    if defaced:
        model_img[subject.face > 0] = 0.0
    acc = np.zeros(grid.shape, np.float32)
    offsets = np.linspace(-1 / 3, 1 / 3, spec.samples) if spec.samples > 1 else [0.0]
    for off in offsets:
        g = replace(grid, origin=grid.origin + grid.normal * off * spec.thickness)
        acc += np.asarray(
            anatomy.sample_grid(model_img, model, subject.shape, placement, g, order=1),
            dtype=np.float32,
        )
    img = (acc / np.float32(len(offsets))).astype(np.float32)
    img *= anatomy.bias_field(img.shape, rng, bias)
    img = anatomy.rician(img, noise, rng)
    truth = anatomy.sample_grid(subject.labels, model, subject.shape, placement, grid, order=0)
    return (
        to_nifti(np.clip(img * 3000.0, 0, 4095).astype(np.int16), grid),
        to_nifti(np.asarray(truth, dtype=np.uint8), grid),
    )


def to_nifti(stack: npt.NDArray[np.generic], grid: anatomy.Grid) -> nib.Nifti1Image:
    """A (k, r, c) stack on ``grid`` as a NIfTI image in (c, r, k) voxel order, RAS affine."""
    data = np.transpose(stack, (2, 1, 0))
    m = grid.index_to_lps()
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = m[:3, 2], m[:3, 1], m[:3, 0], m[:3, 3]
    aff = LPS_FROM_RAS @ aff
    img = nib.Nifti1Image(data, aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img
