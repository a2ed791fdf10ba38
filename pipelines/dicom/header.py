"""A DICOM header as plain attributes, the way a series C-FIND answers: keyword -> value.

Classic MR objects keep their acquisition physics in top-level elements (RepetitionTime,
ScanningSequence, ...). Enhanced MR objects (one file, many frames) keep them in the shared or
per-frame functional groups and describe the sequence with other attributes (EchoPulseSequence,
InversionRecovery, Spoiling, ...). ``attributes`` reads both and answers in the classic keywords,
so that one set of rules reads every vendor's objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

QueryValue = str | float | int | list[str] | list[float] | None
Attributes = dict[str, QueryValue]

#: classic keyword -> (functional group sequence, attribute in it) of Enhanced MR objects
_FUNCTIONAL = {
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    "FlipAngle": ("MRTimingAndRelatedParametersSequence", "FlipAngle"),
    "EchoTrainLength": ("MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
    "InversionTime": ("MRModifierSequence", "InversionTimes"),
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
    "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing"),
    "SpacingBetweenSlices": ("PixelMeasuresSequence", "SpacingBetweenSlices"),
    "DiffusionBValue": ("MRDiffusionSequence", "DiffusionBValue"),
}
#: Enhanced MR sequence attributes -> the classic (ScanningSequence, SequenceVariant) terms
_ENHANCED_SEQUENCE = ("ScanningSequence", "SequenceVariant")


def plain(value: Any) -> QueryValue:
    """A pydicom element value as plain Python (multi-valued -> list, numbers -> float)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat

    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        items = [plain(v) for v in value]
        if all(isinstance(v, (int, float)) for v in items):
            return [float(v) for v in items]  # type: ignore[arg-type]
        return [str(v) for v in items]
    if isinstance(value, (DSfloat, float)):
        return float(value)
    if isinstance(value, (IS, int)):
        return int(value)
    if isinstance(value, bytes):
        return value.decode("latin-1").strip("\x00 ")
    return str(value).strip()


def _get(ds: Any, keyword: str) -> QueryValue:
    try:
        value = ds.get(keyword)
    except Exception:  # an invalid value in one element must not lose the others
        return None
    if value in ("", None) or (isinstance(value, (list, tuple)) and not value):
        return None
    try:
        return plain(value)
    except Exception:
        return None


def _functional_items(ds: Any) -> Iterator[Any]:
    """The shared functional group item, then the first frame's."""
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            sequence = ds.get(group)
            if sequence:
                yield sequence[0]
        except Exception:
            continue


def _functional(ds: Any, keyword: str) -> QueryValue:
    where = _FUNCTIONAL.get(keyword)
    if where is None:
        return None
    macro, inner = where
    for item in _functional_items(ds):
        try:
            found = item.get(macro)
        except Exception:
            continue
        if found:
            value = _get(found[0], inner)
            if isinstance(value, list) and keyword != "PixelSpacing":
                value = value[0] if value else None  # InversionTimes: the first inversion
            if value is not None:
                return value
    return None


def _enhanced_sequence(ds: Any) -> tuple[list[str], list[str]] | None:
    """ScanningSequence and SequenceVariant terms of an Enhanced MR object (PS3.3 C.8.13.5.1);
    None for a classic object."""
    echo = _get(ds, "EchoPulseSequence")
    if echo is None:
        return None

    def flag(keyword: str) -> str:
        value = _get(ds, keyword)
        if value is None:
            for item in _functional_items(ds):
                try:
                    modifier = item.get("MRModifierSequence")
                except Exception:
                    continue
                if modifier:
                    value = _get(modifier[0], keyword)
                    if value is not None:
                        break
        return str(value or "").upper()

    scanning = {"GRADIENT": ["GR"], "SPIN": ["SE"], "BOTH": ["SE", "GR"]}.get(str(echo), [])
    if flag("InversionRecovery") == "YES":
        scanning.append("IR")
    if flag("EchoPlanarPulseSequence") == "YES":
        scanning.append("EP")
    variant = []
    if flag("SegmentedKSpaceTraversal") in ("PARTIAL", "FULL"):
        variant.append("SK")
    if flag("Spoiling") in ("RF", "GRADIENT", "RF_AND_GRADIENT"):
        variant.append("SP")
    if flag("SteadyStatePulseSequence") not in ("", "NONE"):
        variant.append("SS")
    if "GR" in scanning and (flag("InversionRecovery") == "YES" or flag("T2Preparation") == "YES"):
        variant.append("MP")  # an inversion- or T2-prepared gradient echo
    if flag("MagnetizationTransfer") not in ("", "NONE"):
        variant.append("MTC")
    if flag("OversamplingPhase") not in ("", "NONE"):
        variant.append("OSP")
    return scanning, variant or ["NONE"]


def attributes(ds: Any, keywords: Sequence[str]) -> Attributes:
    """The asked keywords of a header or a C-FIND response, None for what it does not hold.

    Values an Enhanced MR object keeps in its functional groups are read from there, and its
    sequence attributes answer for ScanningSequence and SequenceVariant.
    """
    out: Attributes = {}
    enhanced: list[tuple[list[str], list[str]] | None] = []  # read once, when first needed
    for keyword in keywords:
        value = _get(ds, keyword)
        if value is None:
            value = _functional(ds, keyword)
        if value is None and keyword in _ENHANCED_SEQUENCE:
            if not enhanced:
                enhanced.append(_enhanced_sequence(ds))
            terms = enhanced[0]
            if terms is not None:
                value = list(terms[_ENHANCED_SEQUENCE.index(keyword)])
        out[keyword] = value
    return out
