"""A series' files read for conversion: the headers of its readable files (damaged and repeated
files left out with a finding), in the order their images are preferred; the DICOM pixels of a
few slices, to compare the converted voxels with; the files linked into a folder of their own for
the converters.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from cohortflow.models.geometry import Plane
from cohortflow.pipelines.convert.check import SliceGrid, sample_slots
from cohortflow.pipelines.convert.errors import ConvertError
from cohortflow.pipelines.dicomfolder import FolderFile, read_instance
from cohortflow.pipelines.safeio import RefusedError, read_regular
from cohortflow.qc.findings import Finding, finding


@dataclass(frozen=True)
class SeriesFiles:
    """The readable files of a series, in the order their images are preferred."""

    files: list[Path]
    headers: list[Dataset]
    digests: list[str]
    findings: list[Finding]


def read_series(entries: Sequence[FolderFile]) -> SeriesFiles:
    from cohortflow.pipelines.dicom.reader import classify

    readable: list[tuple[tuple[float, float, str], Path, Dataset]] = []
    digests: list[str] = []
    damaged: list[str] = []
    seen: set[str] = set()
    copies = 0
    for entry in entries:
        shown = str(entry.relative)
        if entry.damage is not None:
            damaged.append(f"{shown}: {entry.damage}")
            continue
        try:
            data, _ = read_regular(entry.path)
        except RefusedError as refused:
            damaged.append(f"{shown}: {refused.reason}")
            continue
        digests.append(hashlib.sha256(data).hexdigest())
        result = classify(data)
        if not result.readable or result.dataset is None:
            damaged.append(f"{shown}: {result.reason or result.status.value}")
            continue
        ds = result.dataset
        sop = str(ds.get("SOPInstanceUID") or shown)
        if sop in seen:  # the same instance delivered twice is one image
            copies += 1
            continue
        seen.add(sop)
        order = (
            as_float(ds.get("EchoNumbers"), 1.0),
            as_float(ds.get("InstanceNumber"), 0.0),
            shown,
        )
        readable.append((order, entry.path, ds))
    readable.sort(key=lambda item: item[0])
    findings = []
    if damaged:
        findings.append(
            finding(
                "convert.damaged_files",
                f"{len(damaged)} file(s) of the series cannot be read and are left out: "
                + "; ".join(damaged[:3])
                + (" ..." if len(damaged) > 3 else ""),
                len(damaged),
            )
        )
    if copies:
        findings.append(
            finding(
                "convert.duplicate_files",
                f"{copies} file(s) repeat an instance already read (same SOPInstanceUID): left out",
                copies,
            )
        )
    return SeriesFiles(
        [p for _, p, _ in readable], [ds for _, _, ds in readable], digests, findings
    )


def as_float(value: Any, default: float) -> float:
    """A DICOM number as a float (the first of several values), else ``default``."""
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return default


def sample_pixels(grid: SliceGrid, files: Sequence[Path]) -> dict[int, npt.NDArray[np.float64]]:
    """The DICOM pixels (rescaled) of a few slices, to compare the voxels with."""
    cache: dict[int, Dataset] = {}
    out = {}
    for slot in sample_slots(grid):
        plane = grid.plane_of(slot)
        assert plane is not None
        if plane.instance not in cache:
            cache[plane.instance] = read_instance(files[plane.instance])
        ds = cache[plane.instance]
        try:
            pixels = np.asarray(ds.pixel_array)
        except Exception as exc:
            raise ConvertError(
                "convert.unreadable_pixels",
                f"{files[plane.instance].name}: pixel data cannot be decoded: "
                f"{type(exc).__name__}: {exc}",
            ) from None
        if plane.frame is not None:
            pixels = pixels[plane.frame]
        slope, intercept = _rescale(ds, plane)
        out[slot] = pixels.astype(np.float64) * slope + intercept
    return out


def _rescale(ds: Dataset, plane: Plane) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a plane (per frame in Enhanced objects)."""
    sources: list[Dataset] = [ds]
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", plane.frame or 0),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups) or []
        if len(items) > index:
            transform = items[index].get("PixelValueTransformationSequence") or []
            sources.extend(transform[:1])
    for item in sources:
        if "RescaleSlope" in item or "RescaleIntercept" in item:
            return (
                as_float(item.get("RescaleSlope"), 1.0),
                as_float(item.get("RescaleIntercept"), 0.0),
            )
    return 1.0, 0.0


def link_files(files: Sequence[Path], folder: Path) -> list[Path]:
    """Put the series' files (only them) into ``folder``: symbolic links, else copies."""
    linked = []
    for n, path in enumerate(files):
        target = folder / f"{n:05d}.dcm"
        try:
            target.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, target)
        linked.append(target)
    return linked
