"""The volumetry overlay: outline mosaics at 2 px per mm, radiological orientation, outlines
not fills, the header with the volumes, the aspect of anisotropic voxels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.volumetry.overlay import (
    EDGE,
    GMWM,
    MAX_PANEL_PX,
    PIAL,
    Mosaic,
    Panel,
    mosaic,
    write_overlay,
)
from cohortflow.pipelines.volumetry.run import read_t1

VOLUMES = Volumes(1450.0, 650.0, 480.0, 320.0, 1130.0, 0.7793)


def _head(
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), size_mm: float = 120.0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """A sphere phantom on RAS+ voxel axes: WM within 25 mm, GM to 35 mm, CSF to 40 mm (the
    intracranial mask), a bright scalp from 44 to 50 mm."""
    r = _radius(spacing, size_mm)
    labels = np.select([r <= 25, r <= 35, r <= 40], [3, 2, 1], 0).astype(np.uint8)
    image = np.choose(labels, [0.05, 0.2, 0.5, 0.8]).astype(np.float32)
    image[(r > 44) & (r <= 50)] = 0.9
    image += np.random.default_rng(0).normal(0, 0.02, image.shape).astype(np.float32)
    return image, labels, r <= 40


def _radius(spacing: tuple[float, float, float], size_mm: float) -> npt.NDArray[np.float64]:
    axes = [(np.arange(round(size_mm / s)) + 0.5) * s - size_mm / 2 for s in spacing]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.asarray(np.sqrt(sum(g**2 for g in grid)), dtype=np.float64)


def _pixels(m: Mosaic, panel: Panel) -> npt.NDArray[np.uint8]:
    return m.rgb[panel.top : panel.top + panel.height, panel.left : panel.left + panel.width]


def _coloured(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    return np.asarray((rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2]), dtype=bool)


def _middle(m: Mosaic, plane: str) -> Panel:
    row = [p for p in m.panels if p.plane == plane]
    return row[len(row) // 2]


def test_a_1mm_head_is_drawn_at_2_px_per_mm_on_three_planes(tmp_path: Path) -> None:
    image, labels, mask = _head()
    m = mosaic(image, labels, mask, (1.0, 1.0, 1.0), VOLUMES, "sub-x_ses-1_T1w")
    assert m.rgb.dtype == np.uint8 and m.rgb.shape[2] == 3
    assert m.px_per_mm >= 2.0
    assert [p.plane for p in m.panels] == ["axial"] * 5 + ["coronal"] * 5 + ["sagittal"] * 5
    # the mask is 80 mm across: every panel shows it (and a margin) at 2 px per mm or more
    assert all(p.width >= 160 and p.height >= 160 for p in m.panels)
    for plane in ("axial", "coronal", "sagittal"):
        indices = [p.index for p in m.panels if p.plane == plane]
        assert indices == sorted(indices) and indices[0] < 60 - 20 and indices[-1] > 60 + 20
    path = write_overlay(tmp_path / "o.png", image, labels, mask, (1.0, 1.0, 1.0), VOLUMES, "x")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_marker_on_the_left_anterior_superior_lands_where_a_radiologist_expects_it(
    tmp_path: Path,
) -> None:
    """Through the reader: a NIfTI stored with permuted, flipped voxel axes (voxel axes S, L, P)
    with a bright cube on the subject's left, anterior, superior; in the picture (radiological)
    it is on the right of axial and coronal panels, on the left (the face's side) of sagittal
    panels, and in the upper half of every panel."""
    size = 120
    r = _radius((1.0, 1.0, 1.0), float(size))
    data = np.where(r <= 40, 0.5, 0.0) + np.random.default_rng(1).normal(0, 0.02, r.shape)
    centre = (size - 1) / 2
    # voxel (i, j, k) is at x = centre - j (L), y = centre - k (P), z = i - centre (S)
    affine = np.array(
        [[0, -1, 0, centre], [0, 0, -1, centre], [1, 0, 0, -centre], [0, 0, 0, 1]], float
    )
    x, y, z = -18.0, 18.0, 18.0  # RAS mm: left, anterior, superior
    i, j, k = round(z + centre), round(centre - x), round(centre - y)
    data[i - 6 : i + 7, j - 6 : j + 7, k - 6 : k + 7] = 5.0
    path = tmp_path / "marker_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)

    ras = read_t1(path).numpy()
    mask = r <= 40  # a sphere: the same on any voxel axes
    m = mosaic(ras, np.where(mask, 2, 0).astype(np.uint8), mask, (1.0, 1.0, 1.0))
    found = dict.fromkeys(("axial", "coronal", "sagittal"), 0)
    for panel in m.panels:
        rgb = _pixels(m, panel)
        h, w = rgb.shape[:2]
        inner = rgb[h // 5 : h - h // 5, w // 5 : w - w // 5]  # not the orientation letters
        rows, cols = np.nonzero((inner >= 150).all(axis=2) & ~_coloured(inner))
        if rows.size == 0:
            continue
        found[panel.plane] += 1
        x_pos = (cols.mean() + w // 5) / w
        y_pos = (rows.mean() + h // 5) / h
        assert y_pos < 0.45, panel  # anterior up (axial), superior up (coronal, sagittal)
        if panel.plane == "sagittal":
            assert x_pos < 0.45, panel  # the face's side on the left
        else:
            assert x_pos > 0.55, panel  # the subject's left on the picture's right
    assert all(found.values()), found


def test_tissue_is_outlined_not_filled() -> None:
    image, labels, mask = _head()
    m = mosaic(image, labels, mask, (1.0, 1.0, 1.0), VOLUMES)
    panel = _middle(m, "axial")
    rgb = _pixels(m, panel)
    for colour in (EDGE, PIAL, GMWM):
        assert int((rgb == colour).all(axis=2).sum()) > 100, colour
    # inside the white matter (radius 25 mm, 50 px): no colour at all; the grey is the image
    h, w = rgb.shape[:2]
    rows, cols = np.mgrid[:h, :w]
    deep = (rows - h / 2) ** 2 + (cols - w / 2) ** 2 < 40**2
    assert not _coloured(rgb)[deep].any()
    assert float(rgb[deep][:, 0].mean()) > 180  # bright, not hidden
    # over the whole intracranial disc (radius 80 px), the outlines are a few per cent
    disc = (rows - h / 2) ** 2 + (cols - w / 2) ** 2 < 80**2
    assert float(_coloured(rgb)[disc].mean()) < 0.08


def test_the_header_carries_the_title_the_volumes_and_the_legend() -> None:
    image, labels, mask = _head()
    spacing = (1.0, 1.0, 1.0)
    a = mosaic(image, labels, mask, spacing, VOLUMES, "sub-x_ses-1_T1w")
    other = Volumes(1451.0, 700.0, 430.0, 321.0, 1130.0, 0.7788)
    b = mosaic(image, labels, mask, spacing, other, "sub-x_ses-1_T1w")
    c = mosaic(image, labels, mask, spacing, VOLUMES, "sub-y_ses-1_T1w")
    top = min(p.top for p in a.panels) - 20  # above the first row's label
    header = a.rgb[:top]
    assert int((header > 100).any(axis=2).sum()) > 1000  # text
    for colour in (EDGE, PIAL, GMWM):  # the legend's swatches
        assert (header == colour).all(axis=2).any(), colour
    assert a.rgb.shape == b.rgb.shape == c.rgb.shape
    line = 14 + 6
    title, volumes = slice(0, 8 + line), slice(8 + line, 8 + 2 * line)
    assert (a.rgb[volumes] != b.rgb[volumes]).any() and (a.rgb[title] == b.rgb[title]).all()
    assert (a.rgb[title] != c.rgb[title]).any() and (a.rgb[volumes] == c.rgb[volumes]).all()
    assert (a.rgb[top:] == b.rgb[top:]).all()  # the panels are the same
    unmeasured = mosaic(image, labels, mask, spacing, None, "sub-x_ses-1_T1w")
    assert (unmeasured.rgb[volumes] != a.rgb[volumes]).any()


def test_a_2x2x3_mm_head_keeps_its_shape() -> None:
    """Regression: a 2 x 2 x 3 mm head was drawn one voxel per pixel, squashed (263 x 93 px)."""
    spacing = (2.0, 2.0, 3.0)
    image, labels, mask = _head(spacing)
    m = mosaic(image, labels, mask, spacing, VOLUMES)
    assert m.px_per_mm == 2.0
    for plane in ("axial", "coronal", "sagittal"):
        rgb = _pixels(m, _middle(m, plane))
        rows, cols = np.nonzero((rgb == EDGE).all(axis=2))
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1  # the 80 mm sphere's outline
        assert abs(height / width - 1) < 0.08, (plane, height, width)
        assert 150 <= width <= 170, (plane, width)


def test_a_large_field_of_view_is_bounded() -> None:
    spacing = (1.0, 1.0, 1.0)
    image = np.zeros((400, 40, 40), np.float32)
    mask = np.zeros(image.shape, bool)
    mask[5:395, 5:35, 5:35] = True
    m = mosaic(image, mask.astype(np.uint8), mask, spacing)
    assert max(max(p.width, p.height) for p in m.panels) <= MAX_PANEL_PX
    assert m.px_per_mm < 2.0
    empty = mosaic(image, np.zeros(image.shape, np.uint8), np.zeros(image.shape, bool), spacing)
    assert empty.rgb.shape[2] == 3  # an empty mask still gives a picture (the whole grid)
