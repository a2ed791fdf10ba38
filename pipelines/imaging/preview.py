"""What the pictures reviewers read share: planes of the template brought into a subject, and
the drawing (Pillow's built-in font, orientation letters, a legend with a scale bar, outlines,
PNG files written atomically).

The planes are the template's, so every subject is shown the same way: top of the head up, the
subject's right on the picture's left (radiological), the face to the left in sagittal planes.
The deface review sheet (``pipelines.deface.sheet``) and the volumetry overlay
(``pipelines.volumetry.overlay``) draw with these.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.pipelines.atlas.template import Template
from cohortflow.qc.masks import touches

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

    Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

RGB = tuple[int, int, int]
#: text on the pictures' black background
TEXT: RGB = (235, 235, 235)

#: the letters on the left, right, top and bottom edges of a template plane, by LPS axis
PLANE_LETTERS = {
    0: ("A", "P", "S", "I"),  # sagittal: the face to the left
    1: ("R", "L", "S", "I"),  # coronal
    2: ("R", "L", "A", "P"),  # axial, seen from below
}


@dataclass(frozen=True)
class TemplatePlane:
    """A plane of the template normal to an LPS axis, sampled on a regular grid: its points
    (template LPS millimetres, (4, rows * columns)), its shape and the template's label bits on
    it (nearest voxel)."""

    axis: int
    points: npt.NDArray[np.float64]
    shape: tuple[int, int]
    labels: npt.NDArray[np.uint8]


def template_plane(
    template: Template, axis: int, through: Sequence[float], step_mm: float = 1.0
) -> TemplatePlane:
    """The template's plane normal to LPS ``axis`` (0 sagittal, 1 coronal, 2 axial) through the
    LPS point ``through``, over the template's whole box, every ``step_mm``. Rows and columns
    as radiologists look at them: sagittal rows top -> bottom, columns anterior -> posterior;
    coronal rows top -> bottom, columns right -> left; axial rows anterior -> posterior, columns
    right -> left."""
    dims = np.array(template.labels.shape)
    corners = np.array(
        [[a, b, c, 1.0] for a in (0, dims[0]) for b in (0, dims[1]) for c in (0, dims[2])]
    )
    lps = (template.index_to_lps @ corners.T)[:3]
    xs = np.arange(lps[0].min(), lps[0].max(), step_mm)  # L P S: x grows left
    ys = np.arange(lps[1].min(), lps[1].max(), step_mm)  # y grows posterior
    zs = np.arange(lps[2].max(), lps[2].min(), -step_mm)  # top first
    if axis == 0:
        rows, cols = np.meshgrid(zs, ys, indexing="ij")
        coords = (np.full(rows.shape, float(through[0])), cols, rows)
    elif axis == 1:
        rows, cols = np.meshgrid(zs, xs, indexing="ij")
        coords = (cols, np.full(rows.shape, float(through[1])), rows)
    else:
        rows, cols = np.meshgrid(ys, xs, indexing="ij")
        coords = (cols, rows, np.full(rows.shape, float(through[2])))
    points = np.stack([*coords, np.ones(rows.shape)]).reshape(4, -1)
    shape = (int(rows.shape[0]), int(rows.shape[1]))
    labels = ndimage.map_coordinates(
        template.labels, (template.lps_to_index @ points)[:3], order=0, mode="constant", cval=0
    ).reshape(shape)
    return TemplatePlane(axis, points, shape, np.asarray(labels, dtype=np.uint8))


def sample(
    volume: npt.NDArray[np.generic],
    index_to_lps: npt.NDArray[np.float64],
    subject_to_template: npt.NDArray[np.float64],
    plane: TemplatePlane,
    order: int = 1,
) -> npt.NDArray[np.float32]:
    """The subject's ``volume`` (any voxel order, with its 4 x 4 ``index_to_lps``) on the
    template's ``plane`` (``order`` 1: linear, 0: nearest voxel; 0 outside the volume)."""
    index = np.linalg.inv(index_to_lps) @ np.linalg.inv(subject_to_template) @ plane.points
    values = ndimage.map_coordinates(
        np.asarray(volume, dtype=np.float32), index[:3], order=order, mode="constant", cval=0
    )
    return np.asarray(values.reshape(plane.shape), dtype=np.float32)


def edge(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The one-pixel outline of ``mask``, drawn on its own pixels (those touching the outside)."""
    return np.asarray(mask & touches(~mask), dtype=bool)


@functools.cache
def font(size: int) -> Font:
    """Pillow's built-in font (nothing is read from the system or downloaded)."""
    from PIL import ImageFont

    return ImageFont.load_default(size)


def orientation_letters(
    draw: ImageDraw.ImageDraw,
    letters_font: Font,
    box: tuple[float, float, float, float],
    letters: tuple[str, str, str, str],
) -> None:
    """The orientation ``letters`` at the middle of the left, right, top and bottom edges of
    ``box`` (left, top, width, height), white on a black stroke; an empty letter is left out."""
    left, right, top, bottom = letters
    x, y, width, height = box
    cx, cy = x + width / 2, y + height / 2
    inset = 3

    def put(text: str, px: float, py: float, ax: float, ay: float) -> None:
        if not text:
            return
        # (ax, ay): the point of the text's box put at (px, py), as fractions of its size
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=letters_font, stroke_width=2)
        at = (px - x0 - ax * (x1 - x0), py - y0 - ay * (y1 - y0))
        draw.text(
            at, text, fill=(255, 255, 255), font=letters_font, stroke_width=2, stroke_fill=(0, 0, 0)
        )

    put(left, x + inset, cy, 0.0, 0.5)
    put(right, x + width - inset, cy, 1.0, 0.5)
    put(top, cx, y + inset, 0.5, 0.0)
    put(bottom, cx, y + height - inset, 0.5, 1.0)


def legend_width(
    text_font: Font, items: Sequence[tuple[RGB, str]], note: str, px_per_mm: float
) -> int:
    """The width in pixels ``legend`` takes, about."""
    texts = [t for _, t in items] + [note, "10 mm"]
    return int(sum(text_font.getlength(t) for t in texts) + len(texts) * 40 + 10 * px_per_mm)


def legend(
    draw: ImageDraw.ImageDraw,
    text_font: Font,
    at: tuple[float, float],
    items: Sequence[tuple[RGB, str]],
    note: str,
    px_per_mm: float,
    font_px: int,
) -> None:
    """One line from ``at``: each item's colour (a short thick line) and its text, the ``note``
    (the viewing convention) and a 10 mm scale bar at ``px_per_mm``."""
    x, y = at
    mid = y + font_px // 2 + 1
    for colour, text in items:
        draw.line([(x, mid), (x + 18, mid)], fill=colour, width=3)
        x += 24
        draw.text((x, y), text, fill=TEXT, font=text_font)
        x += text_font.getlength(text) + 16
    draw.text((x, y), note, fill=TEXT, font=text_font)
    x += text_font.getlength(note) + 16
    bar = 10 * px_per_mm
    draw.line([(x, mid), (x + bar, mid)], fill=TEXT, width=3)
    draw.text((x + bar + 6, y), "10 mm", fill=TEXT, font=text_font)


def write_png(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    """``rgb`` (rows x columns x 3) as a PNG at ``path``, atomically (no text chunks)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    Image.fromarray(rgb, mode="RGB").save(temp, format="PNG")
    temp.replace(path)
