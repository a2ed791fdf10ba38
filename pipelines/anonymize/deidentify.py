"""De-identify DICOM data sets: PS3.15 Annex E Basic Profile plus the profile's options.

One pass over each data set, nested sequences included:
- attributes of the standard's table get its action (D dummy, Z empty, X removed, U remapped
  UID; for combined actions the one that keeps the object valid while removing the value);
- the options change that for what they name: dates moved by the patient's keyed offset
  (intervals exact), patient characteristics and (optionally) device identity kept, descriptors
  kept but cleaned of the identifying values the data set itself holds;
- every UID that is not a registered DICOM UID is remapped with the project key, so references
  between objects stay intact; private attributes go unless on the safe-private allow-list;
- PatientID and PatientName become the pseudonym; PatientIdentityRemoved, DeidentificationMethod
  and its code sequence (CID 7050) say what was done.
Instances that may carry burned-in text are refused with a reason instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from cohortflow.models.ingest import patient_key
from cohortflow.pipelines.anonymize.profile import Profile
from cohortflow.pipelines.dicom.cleaner import IDENTIFYING, Cleaner, identifying_words
from cohortflow.pipelines.dicom.keys import ProjectKey

#: CID 7050 De-identification Method codes (scheme DCM).
CID_7050 = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "retain_longitudinal_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants (.7.x)
_BIRTH_DATE = 0x00100030
_PATIENT_ID, _PATIENT_NAME = 0x00100020, 0x00100010
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "IS": "0",
    "DS": "0",
    "AS": "000D",
    "UI": "",
}
_MAX = {"SH": 16, "CS": 16, "AE": 16, "LO": 64, "PN": 64}
#: the tags of the values descriptors are cleaned of (pipelines/dicom/cleaner.py)
_IDENTIFYING_TAGS = tuple((k, BaseTag(tag_for_keyword(k) or 0)) for k in IDENTIFYING)
#: Character sets whose raw bytes decode with one Python codec (no code extensions).
_RAW_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


@dataclass(frozen=True)
class Excluded:
    reason_code: str
    reason: str


@dataclass(frozen=True)
class Deidentified:
    dataset: Dataset
    patient_key: str
    pseudonym: str
    date_offset_days: int


def burned_in(ds: Dataset) -> Excluded | None:
    """Why an instance may carry burned-in identifying text, or None."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return Excluded("burned_in_annotation", "BurnedInAnnotation is YES")
    sop = str(ds.get("SOPClassUID", ""))
    if sop == SECONDARY_CAPTURE or sop.startswith(SECONDARY_CAPTURE + "."):
        return Excluded("secondary_capture", "a secondary capture (screenshots carry text)")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "SCREEN SAVE" in image_type:
        return Excluded("screen_capture", f"ImageType {'/'.join(image_type)}: a screen capture")
    overlays = any(tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000 for tag in ds.keys())  # noqa: SIM118
    if "SECONDARY" in image_type and overlays:
        # reformats (DERIVED/SECONDARY) are common and clean; with overlay planes, text may
        # have been burned in when they were made
        return Excluded(
            "secondary_with_overlay", "a secondary image with overlays (text may be burned in)"
        )
    return None


def _shift(value: str, vr: str, days: int) -> str:
    """Move a DA or DT value by ``days``; unparseable values are emptied (never kept)."""
    text = value.strip()
    try:
        moved = dt.datetime.strptime(text[:8], "%Y%m%d") + dt.timedelta(days=days)
    except ValueError:
        return ""
    return moved.strftime("%Y%m%d") + (text[8:] if vr == "DT" else "")


class Deidentifier:
    """Applies one profile with one project key; reusable across files and threads."""

    def __init__(self, profile: Profile, key: ProjectKey) -> None:
        self.profile = profile
        self.key = key
        self._uids: dict[str, str] = {}
        # descriptor cleaners by the identifying words they remove: the files of a series share
        # them, and compiling the pattern is the costly part
        self._cleaners: dict[tuple[str, ...], Callable[[str], str]] = {}
        # the same for every file: what was done, in words and as CID 7050 codes
        self._method = f"cohortflow {profile.name}; PS3.15 {profile.table.edition}"[:64]
        chosen = profile.options.model_dump()
        self._codes = ["basic", *(k for k in CID_7050 if k != "basic" and chosen.get(k))]
        # safe private attributes by group, then creator: element bytes
        self._safe_by_group: dict[int, dict[str, list[int]]] = {}
        for creator, group, element in profile.safe_private:
            self._safe_by_group.setdefault(group, {}).setdefault(creator, []).append(element)

    def uid(self, value: str) -> str:
        if not value or value in UID_dictionary:
            return value  # registered UIDs (SOP classes, transfer syntaxes) identify nobody
        found = self._uids.get(value)
        if found is None:
            found = self._uids[value] = self.key.uid(value)
        return found

    def deidentify(self, ds: Dataset) -> Deidentified | Excluded:
        """De-identify ``ds`` in place, or say why it must not be passed on."""
        opts = self.profile.options
        if not opts.keep_burned_in:
            refused = burned_in(ds)
            if refused is not None:
                return refused
        identity = patient_key(
            str(ds.get("PatientID", "")).strip() or None,
            str(ds.get("IssuerOfPatientID", "")).strip() or None,
            str(ds.get("PatientName", "")).strip() or None,
            str(ds.get("PatientBirthDate", "")).strip() or None,
        )
        pseudonym = self.key.pseudonym(identity)
        days = self.key.date_offset_days(identity)
        cleaner = self._cleaner(ds) if opts.clean_descriptors else None
        self._walk(ds, days, cleaner)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self._method
        ds.DeidentificationMethodCodeSequence = Sequence([self._code(n) for n in self._codes])
        if opts.retain_longitudinal_modified_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = self.uid(str(meta.MediaStorageSOPInstanceUID))
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"):
                if keyword in meta:
                    del meta[keyword]
        return Deidentified(ds, identity, pseudonym, days)

    @staticmethod
    def _code(name: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodeMeaning = CID_7050[name]
        item.CodingSchemeDesignator = "DCM"
        return item

    def _cleaner(self, ds: Dataset) -> Callable[[str], str]:
        values: list[str] = []
        codec = _RAW_CODECS.get(str(ds.get("SpecificCharacterSet") or ""))
        for keyword, tag in _IDENTIFYING_TAGS:
            element = ds.get_item(tag)
            if element is None:
                continue
            if isinstance(element, RawDataElement) and codec is not None:
                # read as text without building pydicom values (PersonName is slow to make)
                raw = (element.value or b"").decode(codec, "replace").strip("\x00 ")
            else:
                value = ds.get(keyword, "") or ""
                multi = isinstance(value, (list, tuple, MultiValue))
                raw = "\\".join(str(v) for v in value) if multi else str(value)
            values.append(raw)
        others = [
            str(item.get("PatientID", "")) for item in ds.get("OtherPatientIDsSequence") or []
        ]
        words = identifying_words(values, others)
        cached = self._cleaners.get(words)
        if cached is not None:
            return cached
        clean = Cleaner(words)
        if len(self._cleaners) > 4096:  # a long run over many patients: bound the memory
            self._cleaners.clear()
        self._cleaners[words] = clean
        return clean

    def _walk(self, ds: Dataset, days: int, cleaner: Callable[[str], str] | None) -> None:
        # Elements are looked at raw (``get_item``: no value conversion) and converted only when
        # they change; untouched ones are written back as read, which is most of the speed.
        profile, opts = self.profile, self.profile.options
        allowed_private = self._allowed_private(ds) if opts.retain_safe_private else set()
        for tag in list(ds.keys()):
            tag_int = int(tag)
            if tag.is_private:
                if tag_int not in allowed_private:
                    del ds[tag]
                continue
            vr = _vr(ds.get_item(tag), tag_int)
            if vr == "SQ":
                action = profile.table.action(tag_int)
                if action in ("X", "X/Z", "X/D", "X/Z/D"):
                    del ds[tag]
                    continue
                element = ds[tag]
                if action in ("Z", "Z/D", "D"):
                    element.value = Sequence()
                    continue
                for item in element.value or []:
                    self._walk(item, days, cleaner)
                continue
            if vr == "UI":
                self._remap(ds[tag])
                continue
            if tag_int in profile.patient_characteristics and opts.retain_patient_characteristics:
                continue
            if tag_int in profile.device_identity and opts.retain_device_identity:
                continue
            action = profile.table.action(tag_int)
            if action is None:
                continue  # not in the table: not identifying
            if tag_int in profile.descriptors and cleaner is not None:
                element = ds[tag]
                element.value = cleaner(str(element.value or ""))
                continue
            if opts.retain_longitudinal_modified_dates and tag_int != _BIRTH_DATE:
                if vr in ("DA", "DT"):
                    element = ds[tag]
                    element.value = _shift_value(element.value, vr, days)
                    continue
                if vr == "TM":
                    continue  # whole days move: times stay consistent with them
            if action == "X":
                del ds[tag]  # no need to convert what goes
                continue
            self._apply(ds, tag, ds[tag], action)

    def _allowed_private(self, ds: Dataset) -> set[int]:
        """Tags of the safe private attributes present (their creators included)."""
        wanted = self._safe_by_group
        allowed: set[int] = set()
        for tag in ds.keys():  # noqa: SIM118 - tags, in order, without converting values
            group, element = tag.group, tag.element
            if group not in wanted or not 0x10 <= element <= 0xFF:
                continue  # not a private creator element of a group with safe attributes
            creator = str(ds[tag].value).strip()
            for offset in wanted[group].get(creator, ()):
                allowed.add(int(tag))
                allowed.add((group << 16) | (element << 8) | offset)
        return allowed

    def _remap(self, element: DataElement) -> None:
        value = element.value
        if isinstance(value, (list, tuple, MultiValue)):
            element.value = [self.uid(str(v)) for v in value]
        elif value:
            element.value = self.uid(str(value))

    @staticmethod
    def _apply(ds: Dataset, tag: BaseTag, element: DataElement, action: str) -> None:
        # Combined actions: keep the attribute (empty, else a dummy) rather than remove it, so
        # the object stays valid (Type 2 attributes must be present) with the value gone.
        if action == "X":
            del ds[tag]
        elif action in ("Z", "X/Z", "X/Z/U*"):
            element.value = None if element.VR not in ("OB", "OW", "UN") else b""
        elif action in ("Z/D", "X/Z/D") and element.is_empty:
            # an empty value hides nothing and says something: an empty ContrastBolusAgent is
            # "no contrast". A dummy there made every anonymized pre-contrast Philips T1 a
            # post-contrast one to the series rules, and its study lost its reference T1.
            element.value = None if element.VR not in ("OB", "OW", "UN") else b""
        elif action in ("D", "X/D", "Z/D", "X/Z/D"):
            # D where the table allows it: some IODs make these Type 1 (DeviceSerialNumber in
            # Enhanced General Equipment), and an empty Type 1 value is invalid
            element.value = _dummy(element.VR)
        # U on a non-UI value would be a table error: empty it rather than keep it
        elif action == "U":
            element.value = None


def _vr(element: object, tag: int) -> str:
    """The VR of a (possibly raw) element; implicit VR files leave it to the dictionary."""
    vr = getattr(element, "VR", None)
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _dummy(vr: str) -> object:
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 0
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    return _DUMMY_TEXT[: _MAX.get(vr, 64)]


def _shift_value(value: object, vr: str, days: int) -> object:
    if value in (None, ""):
        return value
    if isinstance(value, (list, tuple, MultiValue)):
        return [_shift(str(v), vr, days) for v in value]
    return _shift(str(value), vr, days)
