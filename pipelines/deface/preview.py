"""Before / after mid-sagittal pictures of a defaced series, for the QC dashboard.

The plane is the template's mid-sagittal plane brought into the subject, so every subject is
shown the same way: face to the left, top of the head up, 1 mm pixels. The "before" picture
tints in red what was removed and outlines the protected intracranial mask in green. It shows
the face profile, so it belongs to the restricted side with the identified archive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from pipelines.deface.masks import removal_mask
from pipelines.deface.template import BRAIN, Template


def _plane_points(template: Template) -> tuple[npt.NDArray[np.float64], tuple[int, int]]:
    """Template LPS points (4, n) of its mid-sagittal plane: rows top -> bottom, columns
    anterior -> posterior."""
    brain = np.argwhere(template.labels & BRAIN)
    centre = template.index_to_lps @ np.append(brain.mean(axis=0), 1.0)
    dims = np.array(template.labels.shape)
    corners = np.array(
        [[a, b, c, 1.0] for a in (0, dims[0]) for b in (0, dims[1]) for c in (0, dims[2])]
    )
    lps = (template.index_to_lps @ corners.T)[:3]
    ys = np.arange(lps[1].min(), lps[1].max(), 1.0)  # L P S: y grows posterior
    zs = np.arange(lps[2].max(), lps[2].min(), -1.0)  # top first
    zz, yy = np.meshgrid(zs, ys, indexing="ij")
    pts = np.stack([np.full(zz.shape, centre[0]), yy, zz, np.ones(zz.shape)]).reshape(4, -1)
    return pts, zz.shape


def midsagittal(
    volume: npt.NDArray[np.generic],
    index_to_lps: npt.NDArray[np.float64],
    subject_to_template: npt.NDArray[np.float64],
    template: Template,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """The subject's ``volume`` ((k, r, c) with its 4x4 ``index_to_lps``) and the template's
    label bits, both on the template's mid-sagittal plane."""
    pts, shape = _plane_points(template)
    subject_idx = np.linalg.inv(index_to_lps) @ np.linalg.inv(subject_to_template) @ pts
    image = ndimage.map_coordinates(
        np.asarray(volume, dtype=np.float32), subject_idx[:3], order=1, mode="constant", cval=0
    ).reshape(shape)
    labels = ndimage.map_coordinates(
        template.labels, (template.lps_to_index @ pts)[:3], order=0, mode="constant", cval=0
    ).reshape(shape)
    return np.asarray(image, dtype=np.float32), np.asarray(labels, dtype=np.uint8)


def render(
    before: npt.NDArray[np.float32],
    after: npt.NDArray[np.float32],
    labels: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """RGB pictures: before (removed region tinted red, intracranial outline green), after."""
    top = float(np.percentile(before[before > 0], 99.5)) if (before > 0).any() else 1.0
    scale = lambda img: np.clip(img / max(top, 1e-6) * 255.0, 0, 255)
    gray_before = scale(before)
    rgb_before = np.repeat(gray_before[..., None], 3, axis=2)
    removed = removal_mask(labels) & (before > 0)
    rgb_before[removed] = 0.5 * rgb_before[removed] + 0.5 * np.array([255.0, 0.0, 0.0])
    brain = labels & BRAIN > 0
    edge = brain & ~ndimage.binary_erosion(brain)
    rgb_before[edge] = (0.0, 255.0, 0.0)
    rgb_after = np.repeat(scale(after)[..., None], 3, axis=2)
    return rgb_before.astype(np.uint8), rgb_after.astype(np.uint8)


def write_png(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    Image.fromarray(rgb, mode="RGB").save(temp, format="PNG")
    temp.replace(path)
