"""SimpleITK's series reader: the fallback converter when dcm2niix fails.

The files are given in slice order (ascending along the normal, one per position). The reader's
own image is written as it is when the series is a complete stack of single-frame files, so the
check that follows judges SimpleITK's geometry independently. Where the reader cannot know the
grid (slices missing: it assumes even spacing; frames of a multi-frame object stored out of
order), the slices it read are placed on the DICOM grid computed from the headers and gaps are
filled by linear interpolation between neighbours, as ``check.grid_findings`` reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from cohortflow.pipelines.convert.check import SliceGrid
from cohortflow.pipelines.convert.errors import ConvertError

log = logging.getLogger(__name__)

NAME = "SimpleITK"


def sitk_version() -> str:
    import SimpleITK as sitk

    return str(sitk.Version.VersionString())


def convert_with_sitk(files: Sequence[Path], grid: SliceGrid, out: Path) -> Path:
    """Read ``files`` (one per plane of ``grid``, in its order; the one file of a multi-frame
    object) and write ``out`` (NIfTI). Raises ConvertError ``convert.sitk_failed``."""
    import SimpleITK as sitk

    where = files[0].parent.name if files else "?"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    # ITK warns on stderr of "non uniform sampling or missing slices": known here (the grid)
    # and placed below; the warning only cluttered the demo's progress lines
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConvertError(
            "convert.sitk_failed", f"SimpleITK cannot read the series {where}: {first}"
        ) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        if size[3] != 1:
            raise ConvertError(
                "convert.sitk_failed",
                f"SimpleITK read {size[3]} volumes from the series {where}, not one",
            )
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    multiframe = len(files) == 1 and len(grid.planes) > 1
    frames = [int(p.frame or 0) for p in grid.planes]
    # frames stored in slice order, none left out as a duplicate: the reader's stack is the grid
    in_order = not multiframe or frames == list(range(len(frames)))
    if not grid.missing and in_order:
        _write(image, out)
        return out
    if grid.sheared:
        raise ConvertError(
            "convert.sitk_failed",
            f"the series {where} is tilted and has gaps: SimpleITK cannot place its slices",
        )
    stack = sitk.GetArrayFromImage(image)  # (slices, rows, columns) in reading order
    # frame f of a multi-frame object is slice f of the reader's image
    sources = frames if multiframe else list(range(len(grid.planes)))
    if stack.shape[0] <= max(sources) or stack.shape[1:] != (grid.rows, grid.columns):
        raise ConvertError(
            "convert.sitk_failed",
            f"SimpleITK read {stack.shape} from the series {where}, the headers describe "
            f"{len(grid.planes)} images of {grid.rows}x{grid.columns}",
        )
    full = np.zeros((grid.count, grid.rows, grid.columns), np.float64)
    for slot, source in zip(grid.slots, sources, strict=True):
        full[slot] = stack[source]
    present = list(grid.slots)
    for a, b in pairwise(present):
        for k in range(a + 1, b):
            w = (k - a) / (b - a)
            full[k] = (1 - w) * full[a] + w * full[b]
    if np.issubdtype(stack.dtype, np.integer):
        full = np.rint(full)
    placed = sitk.GetImageFromArray(full.astype(stack.dtype))
    placed.SetSpacing((grid.spacing[1], grid.spacing[0], grid.slice_spacing))
    placed.SetOrigin(tuple(float(x) for x in grid.origin))
    direction = np.stack([grid.row_dir, grid.col_dir, grid.normal], axis=1)
    placed.SetDirection(tuple(float(x) for x in direction.ravel()))
    _write(placed, out)
    return out


def _write(image: Any, out: Path) -> None:
    import SimpleITK as sitk

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(out))
    except RuntimeError as exc:
        raise ConvertError(
            "convert.sitk_failed", f"SimpleITK cannot write {out.name}: {exc}"
        ) from None
