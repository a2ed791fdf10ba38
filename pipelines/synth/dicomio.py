"""Building and writing the synthetic DICOM objects (MR slices, Enhanced MR, secondary capture)."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from cohortflow.models.synth import PlantedIdentifier
from cohortflow.pipelines.synth.anatomy import Grid
from cohortflow.pipelines.synth.identities import Identity
from cohortflow.pipelines.synth.scanners import Scanner, SeriesSpec, vendor

IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.10.1455.1")  # a synthetic-data root
IMPLEMENTATION_VERSION = "COHORTFLOW_SYN1"
_UID_NAMESPACE = uuid.UUID("5b0c3c1e-6f3a-4c1e-9a49-3c6f6c0f1a55")  # cohortflow synth


def make_uid(*parts: object) -> UID:
    """A deterministic UID (2.25 form, a name-based UUID) from the given parts.

    Not pydicom's ``generate_uid(prefix=None, entropy_srcs=...)``: with no prefix it returns a
    random UUID and ignores the entropy sources, which made every run differ.
    """
    name = "|".join(str(p) for p in parts)
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


@dataclass
class StudyContext:
    """Everything shared by the series of one study, identifiers included."""

    seed: int
    identity: Identity
    scanner: Scanner
    study_uid: str
    frame_uid: str
    accession: str
    study_id: str
    study_date: str
    study_time: str
    study_description: str
    age_years: int
    size_m: float
    weight_kg: float
    institution: tuple[str, str]
    referring: str
    performing: str
    operator: str
    station: str
    device_serial: str
    body_part: str
    history: str
    planted: list[PlantedIdentifier] = field(default_factory=list)


class Planter:
    """Writes identifying values into a dataset and records where (once per series)."""

    def __init__(self, ctx: StudyContext, series_folder: str, record: bool) -> None:
        self.ctx = ctx
        self.folder = series_folder
        self.record = record

    def put(self, ds: Dataset, keyword: str, value: str, kind: str, path: str = "") -> None:
        setattr(ds, keyword, value)
        self.note(kind, value, f"{path}{keyword}")

    def note(self, kind: str, value: str, location: str) -> None:
        if self.record:
            self.ctx.planted.append(
                PlantedIdentifier(
                    kind=kind, value=value, series_folder=self.folder, location=location
                )
            )


def _common(
    ds: Dataset,
    ctx: StudyContext,
    planter: Planter,
    spec: SeriesSpec,
    series_uid: str,
    series_number: int,
    series_time: str,
) -> None:
    idn = ctx.identity
    ds.SpecificCharacterSet = "ISO_IR 100"
    planter.put(ds, "PatientName", idn.dicom_name, "patient_name")
    planter.put(ds, "PatientID", idn.patient_id, "patient_id")
    ds.IssuerOfPatientID = "HOSPITAL_MRN"
    planter.put(ds, "PatientBirthDate", idn.birth_date, "birth_date")
    ds.PatientSex = idn.sex
    ds.PatientAge = f"{ctx.age_years:03d}Y"
    ds.PatientSize = f"{ctx.size_m:.2f}"
    ds.PatientWeight = f"{ctx.weight_kg:.0f}"
    planter.put(ds, "PatientAddress", idn.address, "address")
    planter.put(ds, "PatientTelephoneNumbers", idn.phone, "phone")
    planter.put(ds, "PatientMotherBirthName", f"{idn.mother_maiden}^", "mother_maiden_name")
    other = Dataset()
    planter.put(other, "PatientID", idn.other_id, "other_patient_id", "OtherPatientIDsSequence[0].")
    other.IssuerOfPatientID = "NATIONAL_HEALTH_ID"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    planter.put(ds, "AdditionalPatientHistory", ctx.history, "free_text")

    ds.StudyInstanceUID = ctx.study_uid
    planter.put(ds, "StudyDate", ctx.study_date, "study_date")
    ds.StudyTime = ctx.study_time
    planter.put(ds, "AccessionNumber", ctx.accession, "accession_number")
    planter.put(ds, "StudyID", ctx.study_id, "study_id")
    ds.StudyDescription = ctx.study_description
    planter.put(ds, "ReferringPhysicianName", ctx.referring, "physician")
    planter.put(ds, "PerformingPhysicianName", ctx.performing, "physician")
    planter.put(ds, "OperatorsName", ctx.operator, "operator")
    planter.put(ds, "InstitutionName", ctx.institution[0], "institution")
    planter.put(ds, "InstitutionAddress", ctx.institution[1], "institution_address")
    planter.put(ds, "StationName", ctx.station, "station")
    planter.put(ds, "DeviceSerialNumber", ctx.device_serial, "device_serial")
    req = Dataset()
    planter.put(
        req,
        "RequestedProcedureID",
        ctx.accession,
        "accession_number",
        "RequestAttributesSequence[0].",
    )
    planter.put(
        req,
        "ScheduledProcedureStepID",
        f"SPS{ctx.accession}",
        "accession_number",
        "RequestAttributesSequence[0].",
    )
    req.RequestedProcedureDescription = ctx.study_description
    ds.RequestAttributesSequence = Sequence([req])

    ds.Manufacturer = ctx.scanner.manufacturer
    ds.ManufacturerModelName = ctx.scanner.model
    ds.SoftwareVersions = ctx.scanner.software_versions
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = spec.series_description
    ds.ProtocolName = spec.protocol_name
    planter.put(ds, "SeriesDate", ctx.study_date, "study_date")
    ds.SeriesTime = series_time
    ds.BodyPartExamined = ctx.body_part
    ds.PatientPosition = "FFS" if ctx.body_part == "KNEE" else "HFS"
    ds.FrameOfReferenceUID = ctx.frame_uid
    ds.PositionReferenceIndicator = ""
    _vendor_private(ds, ctx, planter)


def _vendor_private(ds: Dataset, ctx: StudyContext, planter: Planter) -> None:
    """Vendor private blocks: some safe (acquisition details), one carrying the patient name."""
    v = vendor(ctx.scanner)
    name = ctx.identity.dicom_name
    if v == "siemens":
        csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        csa.add_new(0x08, "CS", "IMAGE NUM 4")
        csa.add_new(0x10, "OB", b"SV10\x04\x03\x02\x01" + bytes(56))
        hdr = ds.private_block(0x0051, "SIEMENS MR HEADER", create=True)
        hdr.add_new(0x0B, "SH", "256p*256")
        hdr.add_new(0x19, "LO", f"A/{name}")  # free text in a private tag
        planter.note("patient_name", f"A/{name}", "(0051,1019) private SIEMENS MR HEADER")
    elif v == "ge":
        iden = ds.private_block(0x0009, "GEMS_IDEN_01", create=True)
        iden.add_new(0x02, "SH", "MR01")
        iden.add_new(0x04, "SH", name[:16])
        planter.note("patient_name", name[:16], "(0009,1004) private GEMS_IDEN_01")
        parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        parm.add_new(0x39, "IS", ["0", "0", "0", "0"])
    else:
        img = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        img.add_new(0x03, "FL", 0.0)
        mr = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        mr.add_new(0x0E, "FL", 1.0)
        mr.add_new(0x10, "LO", name)
        planter.note("patient_name", name, "(2005,1010) private Philips MR Imaging DD 001")


def _mr_acquisition(ds: Dataset, spec: SeriesSpec, scanner: Scanner) -> None:
    ds.ScanningSequence = spec.scanning_sequence
    ds.SequenceVariant = spec.sequence_variant
    ds.ScanOptions = "IR" if spec.ti else ""
    ds.MRAcquisitionType = spec.acquisition
    ds.SequenceName = spec.sequence_name
    ds.RepetitionTime = f"{spec.tr:g}"
    ds.EchoTime = f"{spec.te:g}"
    if spec.ti is not None:
        ds.InversionTime = f"{spec.ti:g}"
    ds.FlipAngle = f"{spec.flip:g}"
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = f"{42.577478 * scanner.field_strength:.6f}"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = f"{scanner.field_strength:g}"
    ds.EchoTrainLength = "1" if spec.acquisition == "3D" else "15"
    ds.PixelBandwidth = "240"
    ds.SliceThickness = f"{spec.slice_thickness:g}"
    ds.SpacingBetweenSlices = f"{spec.spacing[0]:g}"


def _pixel_module(ds: Dataset, pixels: npt.NDArray[np.uint16]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _file_meta(sop_class: str, sop_uid: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def mr_slice(
    ctx: StudyContext,
    planter: Planter,
    spec: SeriesSpec,
    *,
    series_uid: str,
    series_number: int,
    series_time: str,
    instance_number: int,
    sop_uid: str,
    grid: Grid,
    k: int,
    pixels: npt.NDArray[np.uint16],
    tr_te_ti_flip: tuple[float, float, float | None, float] | None = None,
) -> Dataset:
    """One single-frame MR Image Storage instance (slice ``k`` of ``grid``)."""
    ds = Dataset()
    ds.file_meta = _file_meta(MRImageStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = list(spec.image_type)
    ds.Modality = "MR"
    _common(ds, ctx, planter, spec, series_uid, series_number, series_time)
    planter.put(ds, "AcquisitionDate", ctx.study_date, "study_date")
    planter.put(ds, "ContentDate", ctx.study_date, "study_date")
    ds.AcquisitionTime = series_time
    ds.ContentTime = series_time
    _mr_acquisition(ds, spec, ctx.scanner)
    if tr_te_ti_flip is not None:
        tr, te, ti, flip = tr_te_ti_flip
        ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = f"{tr:g}", f"{te:g}", f"{flip:g}"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", ""
        if ti is None and "InversionTime" in ds:
            del ds.InversionTime
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    pos = grid.slice_position(k)
    ds.ImagePositionPatient = [f"{x:.6f}" for x in pos]
    ds.ImageOrientationPatient = [f"{x:.6f}" for x in (*grid.row_dir, *grid.col_dir)]
    ds.SliceLocation = f"{float(np.dot(pos, grid.normal)):.6f}"
    ds.PixelSpacing = [f"{grid.spacing[1]:g}", f"{grid.spacing[2]:g}"]
    ds.WindowCenter = "1200"
    ds.WindowWidth = "2400"
    if spec.kind == "localizer" or instance_number == 1:
        ds.ImageComments = f"{ctx.identity.display_name} DOB {ctx.identity.birth_date}"
        planter.note("patient_name", ctx.identity.display_name, "ImageComments")
        planter.note("birth_date", ctx.identity.birth_date, "ImageComments")
    _pixel_module(ds, pixels)
    return ds


def enhanced_mr(
    ctx: StudyContext,
    planter: Planter,
    spec: SeriesSpec,
    *,
    series_uid: str,
    series_number: int,
    series_time: str,
    sop_uid: str,
    grid: Grid,
    volume: npt.NDArray[np.uint16],
) -> Dataset:
    """The whole series as one Enhanced MR Image Storage object with per-frame positions."""
    ds = Dataset()
    ds.file_meta = _file_meta(EnhancedMRImageStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Modality = "MR"
    _common(ds, ctx, planter, spec, series_uid, series_number, series_time)
    planter.put(ds, "ContentDate", ctx.study_date, "study_date")
    planter.put(ds, "AcquisitionDateTime", f"{ctx.study_date}{series_time}", "study_date")
    ds.ContentTime = series_time
    ds.InstanceNumber = 1
    ds.AcquisitionContrast = "T1"
    ds.MRAcquisitionType = spec.acquisition
    ds.PulseSequenceName = spec.sequence_name.strip("*")
    ds.MagneticFieldStrength = f"{ctx.scanner.field_strength:g}"
    ds.ResonantNucleus = "1H"
    ds.ImagingFrequency = f"{42.577478 * ctx.scanner.field_strength:.6f}"
    ds.NumberOfFrames = int(volume.shape[0])
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{grid.spacing[1]:g}", f"{grid.spacing[2]:g}"]
    measures.SliceThickness = f"{spec.slice_thickness:g}"
    measures.SpacingBetweenSlices = f"{spec.spacing[0]:g}"
    shared.PixelMeasuresSequence = Sequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{x:.6f}" for x in (*grid.row_dir, *grid.col_dir)]
    shared.PlaneOrientationSequence = Sequence([orient])
    timing = Dataset()
    timing.RepetitionTime = spec.tr
    timing.FlipAngle = spec.flip
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = spec.te
    shared.MREchoSequence = Sequence([echo])
    if spec.ti is not None:
        mod = Dataset()
        mod.InversionRecovery = "YES"
        mod.InversionTimes = [spec.ti]
        shared.MRModifierSequence = Sequence([mod])
    ftype = Dataset()
    ftype.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ftype.PixelPresentation = "MONOCHROME"
    ftype.VolumetricProperties = "VOLUME"
    ftype.VolumeBasedCalculationTechnique = "NONE"
    ftype.ComplexImageComponent = "MAGNITUDE"
    ftype.AcquisitionContrast = "T1"
    shared.MRImageFrameTypeSequence = Sequence([ftype])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    frames = []
    for k in range(volume.shape[0]):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [f"{x:.6f}" for x in grid.slice_position(k)]
        item.PlanePositionSequence = Sequence([pos])
        content = Dataset()
        content.FrameAcquisitionNumber = 1
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        content.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = Sequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    dim_org = make_uid(ctx.seed, series_uid, "dimorg")
    org = Dataset()
    org.DimensionOrganizationUID = dim_org
    ds.DimensionOrganizationSequence = Sequence([org])
    idx1, idx2 = Dataset(), Dataset()
    idx1.DimensionOrganizationUID = dim_org
    idx1.DimensionIndexPointer = 0x00209056  # StackID
    idx1.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
    idx2.DimensionOrganizationUID = dim_org
    idx2.DimensionIndexPointer = 0x00209057  # InStackPositionNumber
    idx2.FunctionalGroupPointer = 0x00209111
    ds.DimensionIndexSequence = Sequence([idx1, idx2])
    _pixel_module(ds, volume)
    return ds


def burned_in_sc(
    ctx: StudyContext,
    planter: Planter,
    spec: SeriesSpec,
    *,
    series_uid: str,
    series_number: int,
    series_time: str,
    sop_uid: str,
) -> Dataset:
    """A screen capture of the scanner's patient page: identifiers burned into the pixels."""
    from PIL import Image, ImageDraw, ImageFont

    idn = ctx.identity
    lines = [
        f"Name: {idn.dicom_name}",
        f"ID: {idn.patient_id}",
        f"DOB: {idn.birth_date}",
        f"{ctx.institution[0]}",
        f"Acc: {ctx.accession}",
    ]
    img = Image.new("L", (spec.shape[2], spec.shape[1]), 0)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=28)
    for i, text in enumerate(lines):
        draw.text((24, 24 + 44 * i), text, fill=255, font=font)
    planter.note("patient_name", idn.dicom_name, "pixels (burned-in text)")
    planter.note("patient_id", idn.patient_id, "pixels (burned-in text)")
    planter.note("birth_date", idn.birth_date, "pixels (burned-in text)")
    planter.note("institution", ctx.institution[0], "pixels (burned-in text)")
    planter.note("accession_number", ctx.accession, "pixels (burned-in text)")
    pixels = (np.asarray(img, dtype=np.uint16) * 16).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = _file_meta(SecondaryCaptureImageStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = list(spec.image_type)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    _common(ds, ctx, planter, spec, series_uid, series_number, series_time)
    del ds.FrameOfReferenceUID, ds.PositionReferenceIndicator
    planter.put(ds, "ContentDate", ctx.study_date, "study_date")
    ds.ContentTime = series_time
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    _pixel_module(ds, pixels)
    return ds


def write(
    ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian, legacy: bool = False
) -> None:
    """Write ``ds`` to ``path`` in the given transfer syntax.

    ``legacy`` writes what old archives hold: no preamble, no "DICM", no file meta, implicit VR.
    JPEG Lossless (Process 14, SV1) is encoded by GDCM, which pydicom cannot do.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return
    if syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
        return
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    if syntax == JPEGLosslessSV1:
        _gdcm_transcode(path, JPEGLosslessSV1)


def _gdcm_transcode(path: Path, syntax: str) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise OSError(f"GDCM could not read {path} for transcoding")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise OSError(f"GDCM could not encode {path} as {syntax}")
    writer = gdcm.ImageWriter()
    tmp = path.with_suffix(".tmp")
    writer.SetFileName(str(tmp))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OSError(f"GDCM could not write {tmp}")
    shutil.move(tmp, path)
