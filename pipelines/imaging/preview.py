"""Pictures of a defaced series, for the QC dashboard.

The planes are the template's, brought into the subject, so every subject is shown the same
way: 1 mm pixels, top of the head up, face to the left in the sagittal plane.

- before / after, mid-sagittal: the "before" picture tints in red what was removed and
  outlines the protected intracranial mask in green. It shows the face profile, so it belongs
  to the restricted side with the identified archive.
- ``planes``: the defaced image only, on the sagittal, coronal and axial planes through the
  brain's centre, the removed region tinted red (over the emptied voxels: the template's face
  region, not the subject's face) and the intracranial mask outlined in green. It shows
  nothing the defaced series does not, so the dashboard may show it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.pipelines.atlas.masks import removal_mask
from cohortflow.pipelines.atlas.template import BRAIN, Template


def _plane_points(
    template: Template, axis: int = 0
) -> tuple[npt.NDArray[np.float64], tuple[int, int]]:
    """Template LPS points (4, n) of its plane through the brain's centre normal to LPS
    ``axis``: 0 sagittal (rows top -> bottom, columns anterior -> posterior), 1 coronal (rows
    top -> bottom, columns right -> left), 2 axial (rows anterior -> posterior, columns
    right -> left), as radiologists look at them."""
    brain = np.argwhere(template.labels & BRAIN)
    centre = template.index_to_lps @ np.append(brain.mean(axis=0), 1.0)
    dims = np.array(template.labels.shape)
    corners = np.array(
        [[a, b, c, 1.0] for a in (0, dims[0]) for b in (0, dims[1]) for c in (0, dims[2])]
    )
    lps = (template.index_to_lps @ corners.T)[:3]
    xs = np.arange(lps[0].min(), lps[0].max(), 1.0)  # L P S: x grows left
    ys = np.arange(lps[1].min(), lps[1].max(), 1.0)  # y grows posterior
    zs = np.arange(lps[2].max(), lps[2].min(), -1.0)  # top first
    if axis == 0:
        rows, cols = np.meshgrid(zs, ys, indexing="ij")
        coords = (np.full(rows.shape, centre[0]), cols, rows)
    elif axis == 1:
        rows, cols = np.meshgrid(zs, xs, indexing="ij")
        coords = (cols, np.full(rows.shape, centre[1]), rows)
    else:
        rows, cols = np.meshgrid(ys, xs, indexing="ij")
        coords = (cols, rows, np.full(rows.shape, centre[2]))
    pts = np.stack([*coords, np.ones(rows.shape)]).reshape(4, -1)
    return pts, rows.shape


def midsagittal(
    volume: npt.NDArray[np.generic],
    index_to_lps: npt.NDArray[np.float64],
    subject_to_template: npt.NDArray[np.float64],
    template: Template,
    axis: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """The subject's ``volume`` ((k, r, c) with its 4x4 ``index_to_lps``) and the template's
    label bits, both on the template's mid-sagittal plane (or the plane normal to ``axis``)."""
    pts, shape = _plane_points(template, axis)
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


def planes(
    volume: npt.NDArray[np.generic],
    index_to_lps: npt.NDArray[np.float64],
    subject_to_template: npt.NDArray[np.float64],
    template: Template,
) -> npt.NDArray[np.uint8]:
    """The defaced ``volume`` on the sagittal, coronal and axial planes side by side (one RGB
    picture): removed region tinted red, intracranial outline green."""
    shown = [
        midsagittal(volume, index_to_lps, subject_to_template, template, axis) for axis in (0, 1, 2)
    ]
    inside = np.concatenate([img[img > 0] for img, _ in shown])
    top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    height = max(img.shape[0] for img, _ in shown)
    pictures = []
    for img, labels in shown:
        gray = np.clip(img / max(top, 1e-6) * 255.0, 0, 255)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        removed = removal_mask(labels)
        rgb[removed] = 0.6 * rgb[removed] + 0.4 * np.array([255.0, 0.0, 0.0])
        brain = labels & BRAIN > 0
        rgb[brain & ~ndimage.binary_erosion(brain)] = (0.0, 255.0, 0.0)
        pad = np.zeros((height, rgb.shape[1] + 4, 3))
        pad[: rgb.shape[0], : rgb.shape[1]] = rgb
        pictures.append(pad)
    return np.concatenate(pictures, axis=1).astype(np.uint8)


def write_png(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    Image.fromarray(rgb, mode="RGB").save(temp, format="PNG")
    temp.replace(path)


def stack_pngs(paths: list[Path], out: Path) -> None:
    """The pictures one above the other, left-aligned on black, into one PNG (the dashboard
    shows one picture per stage: the planes, then the skin surface after defacing)."""
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    width = max(i.shape[1] for i in images)
    rows = [np.pad(i, ((0, 4), (0, width - i.shape[1]), (0, 0))) for i in images]
    write_png(out, np.vstack(rows).astype(np.uint8))
