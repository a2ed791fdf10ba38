"""The series page's slice viewer: one slice of a series' pseudonymized NIfTI image as a PNG, in
a grey window the reviewer sets, with the tissue classes volumetry found drawn over it.

Reading (``read_volume``) checks the header before any voxel is read: a 3D image (or 4D with
one volume) of at most ``MAX_VOXELS`` voxels with finite positive voxel sizes. The image is put
in RAS+ voxel order (``nibabel.as_closest_canonical``, as volumetry measures it), so the views
are those of the volumetry overlay (``pipelines/volumetry/overlay.py``): radiological (the
subject's right on the picture's left), anterior up in axial planes, superior up in coronal
and sagittal planes, the face to the left in sagittal planes. A label map (volumetry's
``*_labels.nii.gz``: 0 outside, 1 CSF, 2 GM, 3 WM) is used only on the same grid.

Drawing (``render``) is pure: a volume, a plane, a slice and a window in, PNG bytes out. Every
slice is resampled to square pixels (nearest voxel: the pixels are the image's) at one scale for
the three planes, at most ``PX_PER_MM`` and at most ``MAX_SIDE_PX`` on the longest side, which
bounds the answer's size and the work of a request. ``VolumeCache`` keeps the few volumes last
viewed (least recently used first out, bounded in bytes), so scrolling reads the file once.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cohortflow.qc.masks import touches

#: the largest image read, in voxels (a 1 mm head is about 11 million; 512 x 512 x 128, 33)
MAX_VOXELS = 1 << 25
#: pixels per millimetre at most (a 1 mm voxel shows as a 2 x 2 px block, as in the overlay)
PX_PER_MM = 2.0
#: the longest side of a slice's picture, in pixels
MAX_SIDE_PX = 512
#: the volumes kept between requests, in bytes (two or three heads)
CACHE_BYTES = 256 << 20
#: the percentiles of the image's non-background voxels its default window spans
WINDOW = (1.0, 99.5)
#: the most voxels the default window is computed from (a regular subsample of larger images)
WINDOW_VOXELS = 1 << 21

#: colours of the tissue classes (Okabe and Ito's colour-blind-safe palette): the fill tint and
#: the outlines, as in the volumetry overlay (the intracranial edge yellow, the CSF / brain
#: border sky blue, the grey / white matter border vermilion)
TINT = {1: (0, 114, 178), 2: (204, 121, 167), 3: (0, 158, 115)}
EDGE = (240, 228, 66)
PIAL = (86, 180, 233)
GMWM = (213, 94, 0)
#: the tint's share of a pixel at full opacity (the outlines are drawn at the opacity itself)
TINT_SHARE = 0.3
LEGEND = (
    ("intracranial edge", EDGE),
    ("CSF / brain border", PIAL),
    ("grey / white matter border", GMWM),
    ("CSF", TINT[1]),
    ("grey matter", TINT[2]),
    ("white matter", TINT[3]),
)

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]


class ViewerError(ValueError):
    """The image cannot be shown (not a 3D image, too large, unreadable); says why."""


@dataclass(frozen=True)
class Plane:
    """How a plane is shown (RAS+ voxel axes): the axis it is normal to, the axes along the
    picture's columns and rows, whether each runs from the high index to the low, and the
    letters on the picture's left, right, top and bottom edges."""

    name: str
    normal: int
    cols: int
    rows: int
    flip_cols: bool
    flip_rows: bool
    letters: tuple[str, str, str, str]
    #: which way the slice index grows
    order: str


PLANES: dict[str, Plane] = {
    p.name: p
    for p in (
        Plane("axial", 2, 0, 1, True, True, ("R", "L", "A", "P"), "inferior to superior"),
        Plane("coronal", 1, 0, 2, True, True, ("R", "L", "S", "I"), "posterior to anterior"),
        Plane("sagittal", 0, 1, 2, True, True, ("A", "P", "S", "I"), "left to right"),
    )
}


@dataclass(frozen=True)
class Volume:
    """An image in RAS+ voxel order with its voxel sizes (mm), the tissue labels on its grid
    (None: none recorded, or not on this grid), its default window (centre, width) and the
    range of its values."""

    image: FloatArray
    spacing: tuple[float, float, float]
    labels: LabelArray | None
    window: tuple[float, float]
    value_range: tuple[float, float]
    #: why the labels recorded for it are not shown (None: shown, or none recorded)
    labels_problem: str | None = None

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes) + (0 if self.labels is None else int(self.labels.nbytes))

    @property
    def px_per_mm(self) -> float:
        """One scale for the three planes: the longest extent fits ``MAX_SIDE_PX``."""
        longest = max(int(n) * s for n, s in zip(self.image.shape, self.spacing, strict=True))
        return min(PX_PER_MM, MAX_SIDE_PX / max(longest, 1e-6))

    def size(self, plane: Plane) -> tuple[int, int]:
        """The picture of a slice of ``plane``: (width, height) in pixels."""
        return (self._pixels(plane.cols), self._pixels(plane.rows))

    def _pixels(self, axis: int) -> int:
        return max(1, round(int(self.image.shape[axis]) * self.spacing[axis] * self.px_per_mm))

    def describe(self) -> dict[str, Any]:
        """What the viewer's script needs: slices, picture sizes and letters per plane, the
        default window, the range of values and whether there is an overlay."""
        planes = {}
        for plane in PLANES.values():
            width, height = self.size(plane)
            planes[plane.name] = {
                "slices": int(self.image.shape[plane.normal]),
                "width": width,
                "height": height,
                "letters": list(plane.letters),
                "order": plane.order,
            }
        return {
            "shape": [int(n) for n in self.image.shape],
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "planes": planes,
            "window": {"center": self.window[0], "width": self.window[1]},
            "range": {"min": self.value_range[0], "max": self.value_range[1]},
            "overlay": self.labels is not None,
            "overlay_problem": self.labels_problem,
            "legend": [
                {"label": label, "color": "#{:02x}{:02x}{:02x}".format(*rgb)}
                for label, rgb in LEGEND
            ]
            if self.labels is not None
            else [],
        }


def read_volume(image_path: Path, labels_path: Path | None = None) -> Volume:
    """The image at ``image_path`` (and the labels at ``labels_path``, when on its grid), in
    RAS+ voxel order. Raises ViewerError when the image cannot be shown."""
    import nibabel as nib

    try:
        canonical = nib.as_closest_canonical(_checked(image_path, "the image"))
        data = np.asarray(canonical.get_fdata(dtype=np.float32), dtype=np.float32)
    except ViewerError:
        raise
    except Exception as exc:  # a file cut short or damaged: zlib, EOF, value errors
        raise ViewerError("the image's voxels cannot be read") from exc
    if data.ndim == 4:
        data = data[..., 0]
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    if len(zooms) != 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
        raise ViewerError(f"the image's voxel sizes {zooms} are not all positive")
    spacing = (zooms[0], zooms[1], zooms[2])
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    labels, problem = None, None
    if labels_path is not None:
        labels, problem = _labels(labels_path, data.shape, canonical.affine)
    low, high = float(data.min(initial=0.0)), float(data.max(initial=0.0))
    return Volume(data, spacing, labels, default_window(data), (low, high), problem)


def _checked(path: Path, what: str) -> Any:
    """The NIfTI image at ``path``, its header checked before any voxel is read; ``what`` names
    it in an error (never the file's name or place)."""
    import nibabel as nib

    try:
        img: Any = nib.load(path)
    except Exception as exc:  # nibabel raises several types for damaged files
        raise ViewerError(f"{what} is not a readable NIfTI image") from exc
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise ViewerError(f"{what} is not one 3D volume (shape {shape})")
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise ViewerError(f"{what} has {voxels} voxels, over the viewer's {MAX_VOXELS}")
    if not np.issubdtype(img.get_data_dtype(), np.number):
        raise ViewerError(f"{what} holds voxels of type {img.get_data_dtype()}, not numbers")
    return img


def _labels(
    path: Path, shape: tuple[int, ...], affine: npt.NDArray[np.float64]
) -> tuple[LabelArray | None, str | None]:
    """The label map at ``path`` when it lies on the image's grid; else None and why."""
    import nibabel as nib

    try:
        canonical = nib.as_closest_canonical(_checked(path, "the label map"))
        found = np.asarray(canonical.dataobj)
    except ViewerError as exc:
        return None, str(exc)
    except Exception:  # a file cut short or damaged: zlib, EOF, value errors
        return None, "the label map cannot be read"
    if found.ndim == 4:
        found = found[..., 0]
    if found.shape != shape or not np.allclose(canonical.affine, affine, atol=0.01):
        return None, "the label map is not on the image's grid"
    return np.clip(np.nan_to_num(found), 0, 3).astype(np.uint8), None


def default_window(image: FloatArray) -> tuple[float, float]:
    """(centre, width) spanning the ``WINDOW`` percentiles of the voxels above the image's
    floor (the air of a zero-filled background left out), on a regular subsample."""
    step = max(1, math.ceil((image.size / WINDOW_VOXELS) ** (1 / 3)))
    values = image[::step, ::step, ::step].ravel()
    floor = float(values.min(initial=0.0))
    values = values[values > floor]
    if values.size == 0:
        return floor + 0.5, 1.0
    low, high = (float(v) for v in np.percentile(values, WINDOW))
    if high <= low:
        high = low + 1.0
    return (low + high) / 2, high - low


def render(
    volume: Volume,
    plane: Plane,
    index: int,
    center: float,
    width: float,
    overlay: bool = True,
    opacity: float = 0.7,
) -> bytes:
    """Slice ``index`` of ``plane`` as PNG: grey from ``center - width / 2`` (black) to
    ``center + width / 2`` (white), the tissue classes drawn over it at ``opacity`` when
    ``overlay`` and the volume has labels."""
    from PIL import Image

    rgb = slice_rgb(volume, plane, index, center, width, overlay, opacity)
    out = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def slice_rgb(
    volume: Volume,
    plane: Plane,
    index: int,
    center: float,
    width: float,
    overlay: bool = True,
    opacity: float = 0.7,
) -> npt.NDArray[np.uint8]:
    """The picture of ``render`` as an RGB array (rows x columns x 3)."""
    if not 0 <= index < volume.image.shape[plane.normal]:
        raise ViewerError(f"slice {index} is outside 0-{volume.image.shape[plane.normal] - 1}")
    pick = np.ix_(_pixels_of(volume, plane.rows, plane.flip_rows),
                  _pixels_of(volume, plane.cols, plane.flip_cols))  # fmt: skip
    img = _slice(volume.image, plane, index)[pick]
    low = center - width / 2
    grey = np.clip((img - low) * (255.0 / max(width, 1e-12)), 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if not overlay or volume.labels is None or opacity <= 0:
        return rgb
    lab = _slice(volume.labels, plane, index)[pick]
    out = rgb.astype(np.float32)
    for value, colour in TINT.items():
        _blend(out, lab == value, colour, TINT_SHARE * opacity)
    inside, brain = lab > 0, (lab == 2) | (lab == 3)
    # each outline on the pixels inside the structure it bounds: one pixel thin
    _blend(out, brain & touches(~brain), PIAL, opacity)
    _blend(out, (lab == 3) & touches(lab == 2), GMWM, opacity)
    _blend(out, inside & touches(~inside), EDGE, opacity)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _slice(volume: npt.NDArray[Any], plane: Plane, index: int) -> npt.NDArray[Any]:
    """The 2D slice indexed (rows axis, columns axis)."""
    taken: npt.NDArray[Any] = np.take(volume, index, axis=plane.normal)
    # the two axes left keep their order: transpose when the rows' axis comes second
    return taken if plane.rows < plane.cols else taken.T


def _pixels_of(volume: Volume, axis: int, flip: bool) -> npt.NDArray[np.intp]:
    """The voxel index under each pixel centre along ``axis``."""
    n, spacing, ppmm = int(volume.image.shape[axis]), volume.spacing[axis], volume.px_per_mm
    count = max(1, round(n * spacing * ppmm))
    centres_mm = (np.arange(count) + 0.5) / ppmm
    index: npt.NDArray[np.intp] = np.minimum((centres_mm / spacing).astype(np.intp), n - 1)
    return index[::-1] if flip else index


def _blend(
    rgb: npt.NDArray[np.float32],
    where: npt.NDArray[np.bool_],
    colour: tuple[int, int, int],
    alpha: float,
) -> None:
    rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colour, np.float32)


class VolumeCache:
    """The volumes last viewed, at most ``max_bytes`` of them (the least recently used goes
    first; one larger than the whole budget is not kept). One volume is read at a time: many
    requests for a series not yet read wait for one reading, not each for its own."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._volumes: OrderedDict[Hashable, Volume] = OrderedDict()
        self._lock = threading.Lock()
        self._reading = threading.Lock()

    def get(self, key: Hashable, read: Callable[[], Volume]) -> Volume:
        found = self._found(key)
        if found is not None:
            return found
        with self._reading:
            found = self._found(key)  # read by another request meanwhile
            if found is not None:
                return found
            volume = read()
        with self._lock:
            if volume.nbytes <= self.max_bytes:
                self._volumes[key] = volume
                while sum(v.nbytes for v in self._volumes.values()) > self.max_bytes:
                    self._volumes.popitem(last=False)
        return volume

    def _found(self, key: Hashable) -> Volume | None:
        with self._lock:
            found = self._volumes.get(key)
            if found is not None:
                self._volumes.move_to_end(key)
            return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._volumes)
