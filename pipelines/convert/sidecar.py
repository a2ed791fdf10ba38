"""The JSON sidecar of a converted image: an allowlist of BIDS acquisition keys, nothing else.

dcm2niix's own anonymization is not enough: even with ``-ba y`` its sidecar keeps
InstitutionName, InstitutionAddress, StationName, DeviceSerialNumber and ImageComments (free text
that may hold a name). So every key not listed in :data:`ALLOWED` is dropped, whatever wrote
the sidecar; dates and times are never listed. SeriesDescription and ProtocolName are kept (a
reader needs them) but they are free text: they are cleaned by the anonymizer's cleaner built
from the series' own header (names, IDs, institution, station, serial number, written dates,
long numbers; pipelines/dicom/cleaner.py), and any other kept text value holding one of those is
dropped; both are reported.

The same sidecar is built from the DICOM headers (pydicom) when SimpleITK converted the series;
times become seconds as BIDS asks. cohortflow adds its own keys, all prefixed ``Cohortflow``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.dataset import Dataset

from cohortflow.pipelines.dicom.cleaner import Cleaner

#: The acquisition keys a sidecar may hold (BIDS names, in BIDS' order of topics). Changing this
#: list changes what leaves the identified side: review it like the de-identification profile.
ALLOWED: tuple[str, ...] = (
    # scanner
    "Modality",
    "Manufacturer",
    "ManufacturersModelName",
    "MagneticFieldStrength",
    "ImagingFrequency",
    "SoftwareVersions",
    # sequence
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "AcquisitionNumber",
    "ImageType",
    "MRAcquisitionType",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "SequenceName",
    "PulseSequenceType",
    "NonlinearGradientCorrection",
    "SpoilingState",
    "MTState",
    # timing and contrast
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "PixelBandwidth",
    "SliceTiming",
    # spatial encoding
    "SliceThickness",
    "SpacingBetweenSlices",
    "PhaseEncodingDirection",
    "PhaseEncodingAxis",
    "AcquisitionMatrixPE",
    "ReconMatrixPE",
    "PercentPhaseFOV",
    "PartialFourier",
    "ParallelReductionFactorInPlane",
    "ImageOrientationPatientDICOM",
    "BodyPart",
    "PatientPosition",
    # coil and sequence details BIDS recommends: ReceiveCoilName is public DICOM (0018,1250),
    # which the de-identification profile keeps; dcm2niix reads the others from the vendor's
    # private header (Siemens CSA) where the de-identified series still has it
    "ReceiveCoilName",
    "ReceiveCoilActiveElements",
    "MatrixCoilMode",
    "CoilCombinationMethod",
    "PulseSequenceDetails",
    "DwellTime",
    # provenance
    "ConversionSoftware",
    "ConversionSoftwareVersion",
)

#: Free text a reader needs, kept cleaned (pipelines/dicom/cleaner.py) rather than dropped.
DESCRIPTORS = ("SeriesDescription", "ProtocolName")


def from_dcm2niix(raw: Mapping[str, Any]) -> dict[str, Any]:
    """dcm2niix's sidecar, allowlisted (key order of :data:`ALLOWED`)."""
    return {key: raw[key] for key in ALLOWED if key in raw}


def _first(ds: Dataset, keyword: str) -> Any:
    """``keyword`` at the top level, else in the shared or first per-frame functional groups
    (Enhanced MR keeps TR, TE, flip angle and thickness there)."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if groups not in ds or not ds[groups].value:
            continue
        group = ds[groups].value[0]
        for element in group:
            if element.VR != "SQ" or not element.value:
                continue
            item = element.value[0]
            if keyword in item and item[keyword].value not in (None, ""):
                return item[keyword].value
    return None


def _number(value: Any) -> float | None:
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _text(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    text = str(value).strip()
    return text or None


def from_headers(ds: Dataset) -> dict[str, Any]:
    """The allowlisted sidecar built from a DICOM header (BIDS units: seconds, Tesla)."""
    out: dict[str, Any] = {}
    for key, keyword in (
        ("Modality", "Modality"),
        ("Manufacturer", "Manufacturer"),
        ("ManufacturersModelName", "ManufacturerModelName"),
        ("SoftwareVersions", "SoftwareVersions"),
        ("SeriesDescription", "SeriesDescription"),
        ("ProtocolName", "ProtocolName"),
        ("ImageType", "ImageType"),
        ("MRAcquisitionType", "MRAcquisitionType"),
        ("ScanningSequence", "ScanningSequence"),
        ("SequenceVariant", "SequenceVariant"),
        ("ScanOptions", "ScanOptions"),
        ("SequenceName", "SequenceName"),
        ("BodyPart", "BodyPartExamined"),
        ("ReceiveCoilName", "ReceiveCoilName"),
        ("PatientPosition", "PatientPosition"),
    ):
        value = _text(_first(ds, keyword))
        if isinstance(value, list) and key not in ("ImageType",):
            value = "\\".join(value)
        if value:
            out[key] = value
    for key, keyword, scale in (
        ("MagneticFieldStrength", "MagneticFieldStrength", 1.0),
        ("ImagingFrequency", "ImagingFrequency", 1.0),
        ("SeriesNumber", "SeriesNumber", 1.0),
        ("AcquisitionNumber", "AcquisitionNumber", 1.0),
        ("EchoTime", "EchoTime", 1e-3),
        ("EchoTime", "EffectiveEchoTime", 1e-3),
        ("RepetitionTime", "RepetitionTime", 1e-3),
        ("InversionTime", "InversionTime", 1e-3),
        ("InversionTime", "InversionTimes", 1e-3),
        ("FlipAngle", "FlipAngle", 1.0),
        ("EchoTrainLength", "EchoTrainLength", 1.0),
        ("PixelBandwidth", "PixelBandwidth", 1.0),
        ("SliceThickness", "SliceThickness", 1.0),
        ("SpacingBetweenSlices", "SpacingBetweenSlices", 1.0),
    ):
        if key in out:
            continue
        number = _number(_first(ds, keyword))
        if number is not None:
            scaled = round(number * scale, 9)  # 2300 ms is 2.3 s, not 2.3000000000000003
            out[key] = int(scaled) if key in _INTEGERS else scaled
    axis = _text(_first(ds, "InPlanePhaseEncodingDirection"))
    if axis in ("ROW", "COL"):
        out["PhaseEncodingAxis"] = "i" if axis == "ROW" else "j"
    orientation = _first(ds, "ImageOrientationPatient")
    if orientation is not None:
        with contextlib.suppress(TypeError, ValueError):
            out["ImageOrientationPatientDICOM"] = [float(v) for v in orientation]
    return {key: out[key] for key in ALLOWED if key in out}


_INTEGERS = ("SeriesNumber", "AcquisitionNumber", "EchoTrainLength")

#: Public DICOM keys a converter may leave out, taken from the header then (dcm2niix writes
#: Siemens' receive coil as ``CoilString``, which may also be the private element list).
FROM_HEADER = ("ReceiveCoilName",)


def completed(sidecar: Mapping[str, Any], ds: Dataset) -> dict[str, Any]:
    """``sidecar`` with the :data:`FROM_HEADER` keys it lacks taken from the header ``ds``
    (key order of :data:`ALLOWED`)."""
    header = from_headers(ds)
    out = {**{k: header[k] for k in FROM_HEADER if k in header}, **sidecar}
    return {key: out[key] for key in ALLOWED if key in out}


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def clean_identifiers(
    sidecar: Mapping[str, Any], clean: Cleaner
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The sidecar with its descriptors cleaned by ``clean`` (the header's cleaner) and without
    any other text value that holds one of the header's identifying words (a version number is
    no date); the keys cleaned and the keys dropped."""
    kept: dict[str, Any] = {}
    cleaned: list[str] = []
    dropped: list[str] = []
    for key, value in sidecar.items():
        if key in DESCRIPTORS and isinstance(value, str):
            text = clean(value)
            if text != value:
                cleaned.append(key)
            if text:
                kept[key] = text
            continue
        if any(clean.names(text) for text in _strings(value)):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, cleaned, dropped


def with_provenance(
    sidecar: Mapping[str, Any],
    converter: str,
    version: str,
    method_version: str,
    series_key: str,
    fallback_reason: str | None,
    *,
    deidentified: bool,
    defaced: bool,
) -> dict[str, Any]:
    """The sidecar with the converter that made the image and cohortflow's own keys (the series
    key is a hash of its SeriesInstanceUID, so reruns find the files of a series again; whether
    the source DICOM said it was de-identified and defaced)."""
    out = dict(sidecar)
    out["ConversionSoftware"] = converter
    out["ConversionSoftwareVersion"] = version
    out["CohortflowConverter"] = f"{converter} {version}"
    out["CohortflowMethodVersion"] = method_version
    out["CohortflowSeriesKey"] = series_key
    out["CohortflowDeidentified"] = deidentified
    out["CohortflowDefaced"] = defaced
    if fallback_reason is not None:
        out["CohortflowFallbackReason"] = fallback_reason
    return out
