"""The converters run on one series and their image chosen: dcm2niix first (of the images it
writes, the one the series' geometry calls for is tried first), SimpleITK's series reader when
dcm2niix gives no image that passes the check against the DICOM (``check``); the free-text fields
of the kept NIfTI's header scrubbed before it is written.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from cohortflow.pipelines.convert import sidecar
from cohortflow.pipelines.convert.check import ImageCheck, SliceGrid, check_image
from cohortflow.pipelines.convert.dcm2niix import Dcm2niix, Output, run_dcm2niix
from cohortflow.pipelines.convert.errors import ConvertError
from cohortflow.pipelines.convert.sitk import NAME as SITK
from cohortflow.pipelines.convert.sitk import convert_with_sitk, sitk_version
from cohortflow.qc.findings import Finding, Severity, finding

DCM2NIIX = "dcm2niix"
#: Images of one series dcm2niix wrote that are checked at most (the preferred ones first).
MAX_CANDIDATES = 4


@dataclass(frozen=True)
class CheckedImage:
    """A converted image that passed the check, still in the temporary folder."""

    converter: str
    version: str
    path: Path
    sidecar: dict[str, Any]
    check: ImageCheck
    shape: tuple[int, ...]
    voxel_mm: tuple[float, ...]
    extra: tuple[str, ...] = ()


def try_dcm2niix(
    tool: Dcm2niix,
    dicom: Path,
    work: Path,
    grid: SliceGrid,
    samples: Mapping[int, npt.NDArray[np.float64]],
    timeout: float,
) -> CheckedImage | list[Finding]:
    """dcm2niix's image that passes the check, or why there is none."""
    try:
        run = run_dcm2niix(tool, dicom, work, timeout)
    except ConvertError as exc:
        return [finding(exc.code, exc.message)]
    if run.returncode != 0:
        return [
            finding(
                "convert.dcm2niix_failed",
                f"dcm2niix exited with status {run.returncode}: "
                f"{run.last_message() or 'no message'}",
                run.returncode,
            )
        ]
    if not run.outputs:
        return [
            finding(
                "convert.no_output",
                f"dcm2niix wrote no image: {run.last_message() or 'no message'}",
            )
        ]
    failures: list[Finding] = []
    for output in _candidates(run.outputs, grid)[:MAX_CANDIDATES]:
        result, shape, zooms = _load(output.path, grid, samples)
        if not result.passed:
            failures.extend(
                replace(f, message=f"dcm2niix image {output.label}: {f.message}")
                for f in result.findings
                if f.severity is Severity.FAIL
            )
            continue
        raw: dict[str, Any] = {}
        json_path = run.sidecar_for(output)
        if json_path is not None:
            try:
                loaded = json.loads(json_path.read_text(encoding="utf-8", errors="replace"))
                raw = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                raw = {}
        return CheckedImage(
            converter=DCM2NIIX,
            version=tool.version,
            path=output.path,
            sidecar=sidecar.from_dcm2niix(raw),
            check=result,
            shape=shape,
            voxel_mm=zooms,
            extra=tuple(o.label for o in run.outputs if o is not output),
        )
    return failures


def _candidates(outputs: Sequence[Output], grid: SliceGrid) -> list[Output]:
    """dcm2niix's images in the order they are tried: the tilt-corrected one for a sheared
    series, the equalized one for a series with gaps, else the plain image; the rest after."""
    if grid.sheared and grid.missing:
        prefer = ["tilt_corrected_equalized", "tilt_corrected", "equalized", "image"]
    elif grid.sheared:
        prefer = ["tilt_corrected", "image"]
    elif grid.missing:
        prefer = ["equalized", "image"]
    else:
        prefer = ["image"]
    rank = {kind: n for n, kind in enumerate(prefer)}
    return sorted(outputs, key=lambda o: (rank.get(o.kind, len(prefer)), o.postfix))


def try_sitk(
    files: Sequence[Path],
    grid: SliceGrid,
    samples: Mapping[int, npt.NDArray[np.float64]],
    target: Path,
    header: Dataset,
) -> CheckedImage | list[Finding]:
    """SimpleITK's image if it passes the check, or why not."""
    try:
        convert_with_sitk(files, grid, target)
    except ConvertError as exc:
        return [finding(exc.code, exc.message)]
    result, shape, zooms = _load(target, grid, samples)
    if not result.passed:
        return [
            replace(f, message=f"SimpleITK image: {f.message}")
            for f in result.findings
            if f.severity is Severity.FAIL
        ]
    return CheckedImage(
        converter=SITK,
        version=sitk_version(),
        path=target,
        sidecar=sidecar.from_headers(header),
        check=result,
        shape=shape,
        voxel_mm=zooms,
    )


def _load(
    path: Path, grid: SliceGrid, samples: Mapping[int, npt.NDArray[np.float64]]
) -> tuple[ImageCheck, tuple[int, ...], tuple[float, ...]]:
    """Check the NIfTI at ``path``; its shape and voxel size."""
    import nibabel as nib

    image: Any = nib.load(path)
    data = np.asanyarray(image.dataobj)
    result = check_image(grid, image.affine, data, samples)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return result, tuple(int(n) for n in image.shape), zooms


def scrub_header(nifti: bytes, description: str) -> bytes:
    """The NIfTI with its free-text header fields replaced: ``descrip`` (dcm2niix writes the
    acquisition time there), ``aux_file`` (ImageComments), ``db_name`` and ``intent_name``."""
    import nibabel as nib

    size = int.from_bytes(nifti[:4], "little")
    if size not in (348, 540):
        size = int.from_bytes(nifti[:4], "big")
    header_class = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(nifti[:size]))
    header["descrip"] = description.encode()[:79]
    header["aux_file"] = b""
    header["intent_name"] = b""
    if "db_name" in header:
        header["db_name"] = b""
    return bytes(header.binaryblock) + nifti[size:]
