"""Records of the synthetic clinical cohort: its configuration and its ground truth.

The generator (``pipelines.synth``) writes one ``CohortTruth`` as ``ground_truth.json`` beside the
DICOM folders. Later stages are scored against it: volumetry against the true volumes, ingest
against the planted file faults, anonymization against every planted identifier, QC against the
planted image and header faults.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cohortflow.models.volumes import Volumes


class Fault(StrEnum):
    """Fault classes that clinical archives really contain, planted at configurable rates."""

    # file level (ingest)
    NO_PREAMBLE = "no_preamble"  # series written without the 128-byte preamble and "DICM"
    TRUNCATED_FILE = "truncated_file"  # one file of the series cut short
    DUPLICATE_INSTANCE = "duplicate_instance"  # one file delivered twice under another name
    NON_DICOM = "non_dicom"  # stray non-DICOM files in a study folder
    DUPLICATE_ACCESSION = "duplicate_accession"  # a study reuses another study's AccessionNumber
    # encoding variety (not errors, but they break naive readers)
    JPEG_LOSSLESS = "jpeg_lossless"  # JPEG Lossless SV1 transfer syntax
    IMPLICIT_VR = "implicit_vr"  # Implicit VR Little Endian transfer syntax
    ENHANCED_MULTIFRAME = "enhanced_multiframe"  # the 3D T1 as one Enhanced MR object
    # content (header and image QC)
    MISSING_SLICES = "missing_slices"
    DUPLICATE_SLICES = "duplicate_slices"  # two instances at the same position
    WRONG_PARAMETERS = "wrong_parameters"  # the T1 acquired with another sequence's parameters
    PARTIAL_COVERAGE = "partial_coverage"  # the T1 does not cover the whole head
    MOTION = "motion"
    NOISE = "noise"  # very low SNR
    UNKNOWN_SCANNER = "unknown_scanner"  # a model / software version not in the knowledge base


#: Which objects each fault is planted on: a series of a given kind, or a study.
FAULT_TARGETS: dict[Fault, str] = {
    Fault.NO_PREAMBLE: "series",
    Fault.TRUNCATED_FILE: "series",
    Fault.DUPLICATE_INSTANCE: "series",
    Fault.NON_DICOM: "study",
    Fault.DUPLICATE_ACCESSION: "study",
    Fault.JPEG_LOSSLESS: "series",
    Fault.IMPLICIT_VR: "series",
    Fault.ENHANCED_MULTIFRAME: "t1",
    Fault.MISSING_SLICES: "t1",
    Fault.DUPLICATE_SLICES: "t1",
    Fault.WRONG_PARAMETERS: "t1",
    Fault.PARTIAL_COVERAGE: "t1",
    Fault.MOTION: "t1",
    Fault.NOISE: "t1",
    Fault.UNKNOWN_SCANNER: "brain_study",
}

DEFAULT_FAULT_RATES: dict[Fault, float] = {
    Fault.NO_PREAMBLE: 0.03,
    Fault.TRUNCATED_FILE: 0.03,
    Fault.DUPLICATE_INSTANCE: 0.03,
    Fault.NON_DICOM: 0.1,
    Fault.DUPLICATE_ACCESSION: 0.05,
    Fault.JPEG_LOSSLESS: 0.08,
    Fault.IMPLICIT_VR: 0.08,
    Fault.ENHANCED_MULTIFRAME: 0.05,
    Fault.MISSING_SLICES: 0.05,
    Fault.DUPLICATE_SLICES: 0.05,
    Fault.WRONG_PARAMETERS: 0.05,
    Fault.PARTIAL_COVERAGE: 0.05,
    Fault.MOTION: 0.05,
    Fault.NOISE: 0.05,
    Fault.UNKNOWN_SCANNER: 0.05,
}


#: The demo's planted faults (``cohortflow demo``): one T1 with motion and one with missing
#: slices (the run's reasons), a truncated file and stray non-DICOM files (ingest goes on), a
#: compressed series and a scanner model the knowledge base does not know; each planted once.
#: Every other fault class is tested by the test cohort, not shown to a first-time user.
DEMO_FAULT_RATES: dict[Fault, float] = {
    Fault.MOTION: 0.05,
    Fault.MISSING_SLICES: 0.05,
    Fault.TRUNCATED_FILE: 0.02,
    Fault.NON_DICOM: 0.05,
    Fault.JPEG_LOSSLESS: 0.1,
    Fault.UNKNOWN_SCANNER: 0.05,
}
#: The demo's protocols: dementia-protocol studies, and knee studies the selection leaves out.
DEMO_PROTOCOL_WEIGHTS: dict[str, float] = {"dementia": 0.85, "knee": 0.15}
#: With 9 studies, seed 18 gives 8 dementia-protocol studies of 8 patients: 3 with dementia and 3
#: memory-clinic controls measured (men and women, aged 58 to 81), and 2 controls whose T1
#: has a planted fault (``plan_cohort``); and a knee study. Twelve studies (seed 13: 4 + 4
#: measured) took 12 minutes with set-up on a fresh machine, over the demo's 10.
DEMO_STUDIES, DEMO_SEED = 9, 18


class SynthConfig(BaseModel):
    """What to generate. Same config and seed: byte-identical output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    studies: int = Field(20, ge=1, le=100_000)
    seed: int = Field(0, ge=0)
    fault_rates: dict[Fault, float] = Field(default_factory=lambda: dict(DEFAULT_FAULT_RATES))
    #: Share of brain studies acquired with each protocol; the rest are knee and spine.
    protocol_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "dementia": 0.4,
            "ms": 0.25,
            "open": 0.2,
            "knee": 0.08,
            "spine": 0.07,
        }
    )
    #: Share of patients seen more than once (longitudinal follow-up).
    repeat_visit_rate: float = Field(0.2, ge=0, le=1)
    #: Brain-volume loss of the dementia group (fraction of brain), drawn uniformly in this range.
    dementia_atrophy: tuple[float, float] = (0.05, 0.11)
    #: Brain-volume loss of controls, drawn uniformly in this range.
    control_atrophy: tuple[float, float] = (0.0, 0.03)
    #: Share of dementia-protocol patients with dementia (the others: memory-clinic controls).
    dementia_prevalence: float = Field(0.5, ge=0, le=1)

    @classmethod
    def demo(cls, studies: int = DEMO_STUDIES, seed: int = DEMO_SEED) -> SynthConfig:
        """The demo's cohort: dementia-protocol studies with a few planted faults."""
        return cls(
            studies=studies,
            seed=seed,
            fault_rates=dict(DEMO_FAULT_RATES),
            protocol_weights=dict(DEMO_PROTOCOL_WEIGHTS),
            repeat_visit_rate=0.15,
        )

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        for fault, rate in self.fault_rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate of {fault.value} must be in [0, 1], not {rate}")
        unknown = set(self.protocol_weights) - {"dementia", "ms", "open", "knee", "spine"}
        if unknown:
            raise ValueError(f"unknown protocols in protocol_weights: {sorted(unknown)}")
        if sum(self.protocol_weights.values()) <= 0:
            raise ValueError("protocol_weights must not all be zero")
        for name in ("dementia_atrophy", "control_atrophy"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi < 0.5:
                raise ValueError(f"{name} must be a range within [0, 0.5), not {(lo, hi)}")
        return self


class PlantedIdentifier(BaseModel):
    """One identifying value written somewhere in the cohort."""

    model_config = ConfigDict(frozen=True)

    kind: str  # patient_name, patient_id, birth_date, address, phone, physician, ...
    value: str
    series_folder: str  # relative to the cohort folder
    location: str  # tag path such as "OtherPatientIDsSequence[0].PatientID", or "pixels"


class SeriesTruth(BaseModel):
    model_config = ConfigDict(frozen=True)

    folder: str
    series_instance_uid: str
    series_number: int
    kind: str  # localizer, t1_3d, t2_2d, flair_2d, flair_3d, t1_post, derived, burned_in_sc, ...
    series_description: str
    protocol_name: str
    sop_class_uid: str
    transfer_syntax_uid: str
    orientation: str  # sagittal, axial, coronal, mixed
    rows: int
    columns: int
    slices: int  # slices acquired
    instances: int  # distinct SOP instances written
    files: int  # files written, duplicates included
    voxel_mm: tuple[float, float, float]
    faults: list[Fault] = Field(default_factory=list)
    #: brain studies: label map on the series grid, 1 = face to remove, 2 = intracranial to keep
    deface_truth_file: str | None = None


class StudyTruth(BaseModel):
    model_config = ConfigDict(frozen=True)

    folder: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    study_description: str
    protocol: str  # dementia, ms, open, knee, spine
    manufacturer: str
    model: str
    software_versions: str
    field_strength_t: float
    age_years: int
    volumes: Volumes | None  # None for studies without a brain (knee, spine)
    atrophy_fraction: float | None
    labels_file: str | None  # ground-truth label map (NIfTI, 0 bg, 1 CSF, 2 GM, 3 WM, 4 head)
    series: list[SeriesTruth]
    faults: list[Fault] = Field(default_factory=list)
    non_dicom_files: list[str] = Field(default_factory=list)


class PatientTruth(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str  # the generator's own handle (P0001), not an identifier
    group: str  # dementia, control, other
    sex: str
    birth_date: str
    patient_id: str
    patient_name: str
    studies: list[StudyTruth]


class FaultCount(BaseModel):
    model_config = ConfigDict(frozen=True)

    rate: float
    eligible: int
    planted: int


class CohortTruth(BaseModel):
    """Everything the generator planted; ``ground_truth.json``."""

    model_config = ConfigDict(frozen=True)

    generator_version: str
    head_model: str
    #: The anatomy the heads were drawn from (``pipelines.synth.generators``).
    generator: str = "mni"
    config: SynthConfig
    patients: list[PatientTruth]
    fault_counts: dict[Fault, FaultCount]
    identifiers: list[PlantedIdentifier]
