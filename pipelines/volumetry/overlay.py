"""Overlay pictures for the dashboard: the T1 with the intracranial edge and the tissue labels on
three planes through the mask's centre (pure: arrays in, an RGB array out; ``write_png`` saves).

The pictures show pseudonymized, defaced pixels only; they are drawn in voxel space with each
axis scaled to millimetres, oriented as radiologists read them (anterior up in axial planes,
superior up in sagittal and coronal planes) when the grid is near the canonical axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.pipelines.imaging.preview import write_png

#: Label colours (RGB) for CSF, GM, WM, and the intracranial edge.
COLOURS = {1: (40, 120, 255), 2: (255, 170, 0), 3: (250, 250, 250)}
EDGE = (0, 230, 0)
ALPHA = 0.35


def _plane(
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    axis: int,
    index: int,
    spacing: tuple[float, float, float],
    top: float,
) -> npt.NDArray[np.uint8]:
    img = np.take(image, index, axis=axis)
    lab = np.take(labels, index, axis=axis)
    msk = np.take(mask, index, axis=axis)
    gray = np.clip(img / max(top, 1e-6) * 255.0, 0, 255)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for value, colour in COLOURS.items():
        sel = lab == value
        rgb[sel] = (1 - ALPHA) * rgb[sel] + ALPHA * np.asarray(colour, dtype=np.float64)
    edge = msk & ~ndimage.binary_erosion(msk)
    rgb[edge] = EDGE
    rest = [s for a, s in enumerate(spacing) if a != axis]
    zoom = (rest[0] / min(rest), rest[1] / min(rest), 1.0)
    rgb = ndimage.zoom(rgb, zoom, order=0)
    # voxel axes are RAS-ordered by the caller: show with the second axis up
    return np.asarray(np.flipud(np.transpose(rgb, (1, 0, 2))), dtype=np.uint8)


def overlay(
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
) -> npt.NDArray[np.uint8]:
    """Sagittal, coronal and axial planes side by side (voxel axes in RAS order)."""
    centre = (
        np.argwhere(mask).mean(axis=0).round().astype(int)
        if mask.any()
        else np.array(mask.shape) // 2
    )
    inside = image[mask] if mask.any() else image.ravel()
    top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    panels = [
        _plane(image, labels, mask, axis, int(centre[axis]), spacing, top) for axis in range(3)
    ]
    height = max(p.shape[0] for p in panels)
    padded = [
        np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=0) for p in panels
    ]
    return np.concatenate(padded, axis=1)


def write_overlay(
    path: Path,
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
) -> Path:
    write_png(path, overlay(image, labels, mask, spacing))
    return path
