"""The review sheet of a defaced series: every view before | after defacing, side by side (pure:
arrays in, an RGB picture out; ``deface.previews`` names and writes it).

Two rows of views, each at ``PX_PER_MM`` (a 1 mm head at 1.25 px per mm: a panel is some 300
pixels a side):

- the image on three planes of the template brought into the subject with the fit defacing
  used: sagittal through the left eye (the face lies off the midline, where a mid-sagittal plane
  shows neither eye), coronal through both eyes, axial through the eyes and the bridge of the
  nose, each pixel the nearest voxel's. The region defacing emptied is tinted red (the mask
  applied: the template's face region with the brow decided on the subject's skin, never the
  subject's own outline), the intracranial mask it protected is outlined in green;
- the skin surface of the reference T1 (``deface.surface``) from the front, the front left
  (three-quarter) and the left, at the same scale; on the surface before, what defacing took
  away is tinted red.

Each panel carries its orientation letters (radiological: the subject's right on the picture's
left, the face to the left in sagittal planes and the side view); a header gives the series'
name, the legend and a 10 mm scale bar.

The before panels show the face: a sheet drawn with them belongs on the restricted side, with
the identified archive. Drawn with the after panels only (``with_before=False``) it shows
nothing the defaced series does not: the tint covers the template's region, not the subject's
outline, and the surface after is not tinted (where it moved back would trace the profile).
That one is what the dashboard shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cohortflow.pipelines.atlas.template import BRAIN, LEFT_EYE_LPS, Template
from cohortflow.pipelines.deface import surface
from cohortflow.pipelines.imaging import preview

#: the sheet's scale: pixels per millimetre (at least one, so that the face's detail shows)
PX_PER_MM = 1.25
#: the slices: the template's LPS axis each is normal to, and its title
SLICES = (
    (0, "sagittal, through the left eye"),
    (1, "coronal, through the eyes"),
    (2, "axial, through the eyes"),
)
#: the skin surface's views (``surface.VIEWS``), their titles and orientation letters
SURFACES = (
    ("front", "skin surface, front", ("R", "L", "S", "I")),
    ("front_left", "skin surface, three-quarter", ("", "", "S", "I")),
    ("left", "skin surface, left side", ("A", "P", "S", "I")),
)
#: a surface counts as taken away where it moved back more than this (mm)
MOVED_MM = 2.0
#: around the head in the surface views (mm)
SURFACE_MARGIN_MM = 6.0

REMOVED = (255, 0, 0)
PROTECTED = (0, 255, 0)
LEGEND = (
    (REMOVED, "removed by defacing"),
    (PROTECTED, "intracranial mask, never altered"),
)
CONVENTION = "radiological view: the subject's right on the picture's left"
WARNING = "The before panels show the face: keep this picture on the restricted side."
WARN = (240, 228, 66)
DIM = (160, 160, 160)
FONT_PX = 14
LETTER_PX = 14
GAP = 4  # between a view's before and after
VIEW_GAP = 16  # between views
PAD = 8


@dataclass(frozen=True)
class View:
    """One view of the series before and after defacing: two RGB pictures of one size."""

    title: str
    letters: tuple[str, str, str, str]
    before: npt.NDArray[np.uint8]
    after: npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Panel:
    """Where one picture is on the sheet: its view's title, ``side`` (before or after) and its
    box in pixels."""

    view: str
    side: str
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Sheet:
    """The picture (rows x columns x RGB) and where each panel is in it."""

    rgb: npt.NDArray[np.uint8]
    panels: tuple[Panel, ...]


def slice_views(
    before: npt.NDArray[np.generic],
    after: npt.NDArray[np.generic],
    removed: npt.NDArray[np.bool_],
    index_to_lps: npt.NDArray[np.float64],
    subject_to_template: npt.NDArray[np.float64],
    template: Template,
) -> list[View]:
    """The series on the template's three planes through the eyes, before and after: the
    volumes (and the mask of the voxels defacing emptied) on one grid with its 4 x 4
    ``index_to_lps``, placed with ``subject_to_template``. Each pixel is the nearest voxel's,
    never a blend: the red tint covers exactly the voxels emptied (a blend would carry kept
    voxels into it over a thick slice), and the picture shows the voxels as they are. One grey
    window for both (the intensities before), so that what defacing did not touch looks the
    same."""
    step = 1.0 / PX_PER_MM
    planes = [preview.template_plane(template, axis, LEFT_EYE_LPS, step) for axis, _ in SLICES]
    mask = np.asarray(removed, dtype=np.float32)
    shown = [
        (
            preview.sample(before, index_to_lps, subject_to_template, plane, order=0),
            preview.sample(after, index_to_lps, subject_to_template, plane, order=0),
            preview.sample(mask, index_to_lps, subject_to_template, plane, order=0) > 0.5,
        )
        for plane in planes
    ]
    inside = np.concatenate([b[b > 0] for b, _, _ in shown])
    top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    views = []
    for (axis, title), plane, (img_before, img_after, cut) in zip(
        SLICES, planes, shown, strict=True
    ):
        outline = preview.edge(plane.labels & BRAIN > 0)
        views.append(
            View(
                title,
                preview.PLANE_LETTERS[axis],
                _paint(img_before, top, cut, 0.5, outline),
                _paint(img_after, top, cut, 0.4, outline),
            )
        )
    return views


def surface_views(
    head_before: npt.NDArray[np.bool_], head_after: npt.NDArray[np.bool_]
) -> list[View]:
    """The skin surface before and after defacing (two head masks on one LPS grid, of
    ``surface.RENDER_MM``) from the front, the front left and the left, cropped to the head and
    scaled to ``PX_PER_MM``; on the surface before, what moved back is tinted red."""
    seen_before = surface.depths(head_before, tuple(v for v, _, _ in SURFACES))
    seen_after = surface.depths(head_after, tuple(v for v, _, _ in SURFACES))
    views = []
    for view, title, letters in SURFACES:
        b, a = seen_before[view], seen_after[view]
        moved = b.hit & (~a.hit | (a.depth > b.depth + MOVED_MM))
        grey_before, grey_after = surface.shade(b), surface.shade(a)
        rgb_before = _paint(grey_before, 255.0, moved, 0.4, np.zeros_like(moved))
        rgb_after = _paint(grey_after, 255.0, np.zeros_like(moved), 0.0, np.zeros_like(moved))
        crop = _crop(b.hit | a.hit)
        views.append(View(title, letters, _scaled(rgb_before[crop]), _scaled(rgb_after[crop])))
    return views


def compose(rows: Sequence[Sequence[View]], title: str, with_before: bool = True) -> Sheet:
    """The sheet: a header (``title``, the legend, and with the before panels a warning that
    they show the face), then each row of views, each view before | after (or after alone)."""
    from PIL import Image, ImageDraw

    text_font, letter_font = preview.font(FONT_PX), preview.font(LETTER_PX)
    line_px = FONT_PX + 6
    header = [f"{title}: before | after defacing" if with_before else f"{title}: after defacing"]
    if with_before:
        header.append(WARNING)
    top = PAD + line_px * (len(header) + 1) + GAP  # + the legend line
    panels: list[Panel] = []
    pictures: list[npt.NDArray[np.uint8]] = []
    for row in rows:
        top += line_px  # the views' titles
        left = PAD
        height = 0
        for view in row:
            sides = [("before", view.before)] if with_before else []
            sides.append(("after", view.after))
            for side, picture in sides:
                h, w = picture.shape[:2]
                panels.append(Panel(view.title, side, top, left, h, w))
                pictures.append(picture)
                left += w + GAP
                height = max(height, h)
            left += VIEW_GAP - GAP
        top += height + GAP
    height = top + PAD - GAP
    width = max(
        max((p.left + p.width for p in panels), default=0) + PAD,
        preview.legend_width(text_font, LEGEND, CONVENTION, PX_PER_MM) + 2 * PAD,
        *(int(text_font.getlength(t)) + 2 * PAD for t in header),
    )
    canvas = np.zeros((height, width, 3), np.uint8)
    for panel, picture in zip(panels, pictures, strict=True):
        canvas[panel.top : panel.top + panel.height, panel.left : panel.left + panel.width] = (
            picture
        )
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    y = PAD
    for number, text in enumerate(header):
        draw.text((PAD, y), text, fill=WARN if number else preview.TEXT, font=text_font)
        y += line_px
    preview.legend(draw, text_font, (PAD, y), LEGEND, CONVENTION, PX_PER_MM, FONT_PX)
    titled: set[str] = set()
    letters = {view.title: view.letters for row in rows for view in row}
    for panel in panels:
        if panel.view not in titled:
            titled.add(panel.view)
            at = (panel.left, panel.top - line_px + 2)
            draw.text(at, panel.view, fill=preview.TEXT, font=text_font)
        draw.text((panel.left + 4, panel.top + 3), panel.side, fill=DIM, font=text_font)
        box = (panel.left, panel.top, panel.width, panel.height)
        preview.orientation_letters(draw, letter_font, box, letters[panel.view])
    return Sheet(np.asarray(image, dtype=np.uint8), tuple(panels))


def _paint(
    image: npt.NDArray[np.floating] | npt.NDArray[np.uint8],
    top: float,
    tint: npt.NDArray[np.bool_],
    alpha: float,
    outline: npt.NDArray[np.bool_],
) -> npt.NDArray[np.uint8]:
    """A grey picture (0 to ``top``) with ``tint`` blended towards red by ``alpha`` and
    ``outline`` drawn green."""
    grey = np.clip(np.asarray(image, dtype=np.float32) / max(top, 1e-6) * 255.0, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[tint] = (1.0 - alpha) * rgb[tint] + alpha * np.array(REMOVED, dtype=np.float32)
    rgb[outline] = PROTECTED
    return np.asarray(np.rint(rgb), dtype=np.uint8)


def _crop(hit: npt.NDArray[np.bool_]) -> tuple[slice, slice]:
    """The box around the head in a surface view, with ``SURFACE_MARGIN_MM``."""
    if not hit.any():
        return slice(None), slice(None)
    margin = round(SURFACE_MARGIN_MM / surface.RENDER_MM)
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    return (
        slice(max(0, int(rows[0]) - margin), int(rows[-1]) + 1 + margin),
        slice(max(0, int(cols[0]) - margin), int(cols[-1]) + 1 + margin),
    )


def _scaled(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """A surface view (``surface.RENDER_MM`` per pixel) at the sheet's scale (bilinear)."""
    from PIL import Image

    factor = PX_PER_MM * surface.RENDER_MM
    size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
    resized = Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)
