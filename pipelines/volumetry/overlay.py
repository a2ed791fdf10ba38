"""The volumetry overlay a reviewer reads: outline mosaics of the T1 (pure: arrays in, an RGB
array out; ``write_overlay`` saves it as PNG).

Three rows, axial, coronal and sagittal, of ``SLICES`` slices each, evenly through the
intracranial mask. Every panel is resampled to square pixels of ``PX_PER_MM`` per millimetre
(nearest voxel: a 1 mm voxel is a visible 2 x 2 px block, and the pixels are the image's, not
interpolated), in a grey window from the intracranial intensities. The tissue classes are drawn
as thin outlines, never fills, so the image stays readable beneath them: the intracranial edge,
the border between CSF and brain (pial surface, ventricles) and the border between grey and
white matter, in colours of Okabe and Ito's colour-blind-safe palette. Each panel carries its
orientation letters; a header gives the series' pseudonymous name, the volumes, the legend, the
viewing convention and a 10 mm scale bar.

The view is radiological (the subject's right on the picture's left), as in the deface review
sheet (``pipelines.deface.sheet``; both draw with ``pipelines.imaging.preview``): anterior up
in axial planes, superior up in coronal and sagittal planes, the face to the left in sagittal
planes. The voxel axes must be in RAS+ order (``run.read_t1`` reorients every image so): axis 0
grows towards the subject's right, axis 1 anterior, axis 2 superior.

The pictures show pseudonymized pixels only; the title is whatever the caller passes, which must
be a pseudonymous name (``run`` passes the BIDS name of the converted series).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cohortflow.pipelines.imaging.preview import (
    TEXT,
    edge,
    font,
    legend,
    legend_width,
    orientation_letters,
    write_png,
)
from cohortflow.qc.masks import touches

if TYPE_CHECKING:
    from cohortflow.models.volumes import Volumes

#: slices per plane
SLICES = 5
#: pixels per millimetre: a 1 mm voxel shows as a 2 x 2 px block
PX_PER_MM = 2.0
#: the longest side of a panel, in pixels: a larger field of view is drawn at fewer px per mm
#: (bounds the picture's size and memory: at most about 3 x 5 x 600 x 600 px)
MAX_PANEL_PX = 600
#: the space around the intracranial mask each panel shows (skull, scalp)
MARGIN_MM = 6.0
#: the percentiles of the intracranial intensities the grey window spans, and the headroom
#: above the upper one (a fraction of the span): white matter shows light grey, not white, so
#: its texture and the outlines over it stay visible
WINDOW = (0.5, 99.5)
HEADROOM = 0.2
#: the most voxels the window is computed from (a regular subsample of larger images)
WINDOW_VOXELS = 1 << 21

#: outline colours, from Okabe and Ito's colour-blind-safe palette (distinct in luminance too)
EDGE = (240, 228, 66)  # yellow: the intracranial edge
PIAL = (86, 180, 233)  # sky blue: CSF / brain border (pial surface, ventricles)
GMWM = (213, 94, 0)  # vermilion: grey / white matter border
LEGEND = (
    (EDGE, "intracranial edge"),
    (PIAL, "CSF / brain border (pial surface, ventricles)"),
    (GMWM, "grey / white matter border"),
)
CONVENTION = "radiological view: the subject's right on the picture's left"

DIM = (160, 160, 160)
FONT_PX = 14
LETTER_PX = 14
GAP = 6
PAD = 8


@dataclass(frozen=True)
class Plane:
    """How a plane is shown: the voxel axis it is normal to, the voxel axes along the picture's
    columns and rows, whether each runs from the high voxel index to the low, and the letters on
    the panel's left, right, top and bottom edges."""

    name: str
    normal: int
    cols: int
    rows: int
    flip_cols: bool
    flip_rows: bool
    letters: tuple[str, str, str, str]
    order: str  # the slices' order, left to right


#: radiological, for RAS+ voxel axes (0: towards the right, 1: anterior, 2: superior)
PLANES = (
    Plane("axial", 2, 0, 1, True, True, ("R", "L", "A", "P"), "inferior -> superior"),
    Plane("coronal", 1, 0, 2, True, True, ("R", "L", "S", "I"), "posterior -> anterior"),
    Plane("sagittal", 0, 1, 2, True, True, ("A", "P", "S", "I"), "left -> right"),
)


@dataclass(frozen=True)
class Panel:
    """Where one slice is in the picture: ``plane``, its voxel ``index`` on the plane's normal
    axis (on the grid passed in), and its box in pixels."""

    plane: str
    index: int
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Mosaic:
    """The picture (rows x columns x RGB), where each slice is in it, and its scale."""

    rgb: npt.NDArray[np.uint8]
    panels: tuple[Panel, ...]
    px_per_mm: float


def mosaic(
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
    volumes: Volumes | None = None,
    title: str = "",
    slices: int = SLICES,
) -> Mosaic:
    """The outline mosaic of ``image`` (RAS+ voxel axes, ``spacing`` in mm) with its ``labels``
    (0 outside, 1 CSF, 2 GM, 3 WM) and intracranial ``mask``; ``volumes`` and ``title`` (a
    pseudonymous name) go in the header."""
    from PIL import Image, ImageDraw

    box = _box(mask, spacing)
    extent_mm = [(stop - start) * s for (start, stop), s in zip(box, spacing, strict=True)]
    ppmm = min(PX_PER_MM, MAX_PANEL_PX / max(*extent_mm, 1e-6))
    low, high = _window(image, mask)
    text_font, letter_font = font(FONT_PX), font(LETTER_PX)

    header = _header_lines(volumes, title)
    line_px = FONT_PX + 6
    rows_top = PAD + line_px * (len(header) + 1) + GAP  # + the legend line
    drawn: list[tuple[Plane, int, npt.NDArray[np.uint8]]] = []
    for plane in PLANES:
        for index in _slice_indices(mask, box, plane.normal, slices):
            pixels = _panel(image, labels, mask, box, spacing, plane, index, ppmm, low, high)
            drawn.append((plane, index, pixels))

    panels: list[Panel] = []
    top = rows_top
    for plane in PLANES:
        row = [(i, p) for q, i, p in drawn if q is plane]
        top += line_px  # the row's label
        left = PAD
        for index, pixels in row:
            h, w = pixels.shape[:2]
            panels.append(Panel(plane.name, index, top, left, h, w))
            left += w + GAP
        top += max((p.shape[0] for _, p in row), default=0) + GAP
    height = top + PAD - GAP
    width = max(p.left + p.width for p in panels) + PAD
    legend_px = legend_width(text_font, LEGEND, CONVENTION, ppmm)
    width = max(
        width, legend_px + 2 * PAD, *(int(text_font.getlength(t)) + 2 * PAD for t in header)
    )

    canvas = np.zeros((height, width, 3), np.uint8)
    for panel, (_, _, pixels) in zip(panels, drawn, strict=True):
        canvas[panel.top : panel.top + panel.height, panel.left : panel.left + panel.width] = pixels
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    y = PAD
    for text in header:
        draw.text((PAD, y), text, fill=TEXT, font=text_font)
        y += line_px
    legend(draw, text_font, (PAD, y), LEGEND, CONVENTION, ppmm, FONT_PX)
    for plane in PLANES:
        first = next(p for p in panels if p.plane == plane.name)
        label = f"{plane.name}, {plane.order}"
        draw.text((first.left, first.top - line_px + 2), label, fill=DIM, font=text_font)
        for panel in (p for p in panels if p.plane == plane.name):
            where = (panel.left, panel.top, panel.width, panel.height)
            orientation_letters(draw, letter_font, where, plane.letters)
    rgb = np.asarray(picture, dtype=np.uint8)
    return Mosaic(rgb, tuple(panels), ppmm)


def overlay(
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
    volumes: Volumes | None = None,
    title: str = "",
) -> npt.NDArray[np.uint8]:
    """The outline mosaic as an RGB array (see ``mosaic``)."""
    return mosaic(image, labels, mask, spacing, volumes, title).rgb


def write_overlay(
    path: Path,
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
    volumes: Volumes | None = None,
    title: str = "",
) -> Path:
    write_png(path, overlay(image, labels, mask, spacing, volumes, title))
    return path


#: the label map's values (``write_labels``), as the dashboard's slice viewer reads them
LABELS = {1: "CSF", 2: "grey matter", 3: "white matter"}


def write_labels(
    path: Path, labels: npt.NDArray[np.uint8], affine: npt.NDArray[np.float64]
) -> Path:
    """The tissue classes as a NIfTI label map (uint8: 0 outside the intracranial mask, then
    ``LABELS``) on the measured image's grid in RAS+ voxel order, ``affine`` its voxel to
    millimetre map: the dashboard's slice viewer draws them over the image. Gzipped with no
    time stamp (the same labels, the same bytes), written whole or not at all."""
    import gzip
    import io

    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"cohortflow volumetry labels 1 CSF 2 GM 3 WM"
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=1, mtime=0) as gz:
        gz.write(image.to_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    temp.write_bytes(buffer.getvalue())
    temp.replace(path)
    return path


def _box(mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float]) -> list[tuple[int, int]]:
    """The mask's bounding box grown by ``MARGIN_MM``, per voxel axis (start, stop); the whole
    grid for an empty mask."""
    box = []
    for axis, s in enumerate(spacing):
        others = tuple(a for a in range(3) if a != axis)
        found = np.flatnonzero(mask.any(axis=others))
        n = mask.shape[axis]
        if found.size == 0:
            box.append((0, n))
            continue
        grow = math.ceil(MARGIN_MM / s)
        box.append((max(0, int(found[0]) - grow), min(n, int(found[-1]) + 1 + grow)))
    return box


def _window(image: npt.NDArray[np.floating], mask: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """The grey window: ``WINDOW`` percentiles of the intracranial intensities (of the whole
    image when the mask is empty), on a regular subsample of at most ``WINDOW_VOXELS``, the top
    raised by ``HEADROOM``."""
    step = max(1, math.ceil((image.size / WINDOW_VOXELS) ** (1 / 3)))
    sub = image[::step, ::step, ::step]
    inside = sub[mask[::step, ::step, ::step]]
    values = inside if inside.size else sub.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, WINDOW))
    return low, high + HEADROOM * (high - low) if high > low else low + 1.0


def _slice_indices(
    mask: npt.NDArray[np.bool_], box: list[tuple[int, int]], axis: int, n: int
) -> list[int]:
    """``n`` voxel indices evenly spaced through the mask's extent along ``axis`` (ends
    excluded: the mask's first and last slices are caps), increasing."""
    others = tuple(a for a in range(3) if a != axis)
    found = np.flatnonzero(mask.any(axis=others))
    first, last = (
        (int(found[0]), int(found[-1])) if found.size else (box[axis][0], box[axis][1] - 1)
    )
    positions = np.linspace(first, last, n + 2)[1:-1]
    return sorted({round(float(p)) for p in positions})


def _resample(
    start: int, stop: int, spacing: float, ppmm: float, flip: bool
) -> npt.NDArray[np.intp]:
    """The voxel index (from ``start``) under each pixel centre along one axis."""
    count = max(1, round((stop - start) * spacing * ppmm))
    centres_mm = (np.arange(count) + 0.5) / ppmm
    index = np.minimum((centres_mm / spacing).astype(np.intp), stop - start - 1)
    return index[::-1] if flip else index


def _panel(
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    box: list[tuple[int, int]],
    spacing: tuple[float, float, float],
    plane: Plane,
    index: int,
    ppmm: float,
    low: float,
    high: float,
) -> npt.NDArray[np.uint8]:
    """One slice, resampled to square pixels (rows x columns x RGB), with its outlines."""
    region = [slice(start, stop) for start, stop in box]
    region[plane.normal] = slice(index, index + 1)
    sub = tuple(region)
    # the 2D slice indexed (rows axis, columns axis)
    order = (plane.rows, plane.cols, plane.normal)
    img2, lab2, msk2 = (np.transpose(a[sub], order)[..., 0] for a in (image, labels, mask))
    r = _resample(*box[plane.rows], spacing[plane.rows], ppmm, plane.flip_rows)
    c = _resample(*box[plane.cols], spacing[plane.cols], ppmm, plane.flip_cols)
    pick = np.ix_(r, c)
    img, lab, msk = img2[pick], lab2[pick], msk2[pick]

    scaled = (np.asarray(img, dtype=np.float32) - low) * (255.0 / (high - low))
    grey = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    brain = (lab == 2) | (lab == 3)
    # each outline is drawn on the pixels inside the structure it bounds: thin (one pixel)
    rgb[edge(brain)] = PIAL
    rgb[(lab == 3) & touches(lab == 2)] = GMWM
    rgb[edge(msk)] = EDGE
    return rgb


def _header_lines(volumes: Volumes | None, title: str) -> list[str]:
    name = f"volumetry of {title}" if title else "volumetry"
    if volumes is None:
        return [name, "volumes not measured"]
    v = volumes
    return [
        name,
        f"ICV {v.icv_ml:.0f} ml   GM {v.gm_ml:.0f} ml   WM {v.wm_ml:.0f} ml   "
        f"CSF {v.csf_ml:.0f} ml   brain {v.brain_ml:.0f} ml   BPF {v.bpf:.3f}",
    ]
