"""The synthetic clinical cohort: plan patients, studies, series and faults, then render them.

Planning is cheap and sequential (one random stream from the seed); rendering is per patient with
its own seeded stream, so the output is byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from cohortflow.models.geometry import LPS_FROM_RAS
from cohortflow.models.synth import (
    CohortTruth,
    Fault,
    FaultCount,
    PatientTruth,
    PlantedIdentifier,
    SeriesTruth,
    StudyTruth,
    SynthConfig,
)
from cohortflow.pipelines.atlas.headmodel import CSF, GM, WM, HeadModel
from cohortflow.pipelines.synth import anatomy, generators
from cohortflow.pipelines.synth.dicomio import (
    Planter,
    StudyContext,
    burned_in_sc,
    enhanced_mr,
    make_uid,
    mr_slice,
    write,
)
from cohortflow.pipelines.synth.errors import SynthError
from cohortflow.pipelines.synth.identities import INSTITUTIONS, Identity, make_identity, staff_name
from cohortflow.pipelines.synth.scanners import (
    CONTRASTS,
    SC_SERIES,
    SCANNERS,
    STUDY_DESCRIPTIONS,
    UNKNOWN_SCANNERS,
    Scanner,
    SeriesSpec,
    body_series,
    brain_series,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
BRAIN_PROTOCOLS = ("dementia", "ms", "open")
ORIENTATIONS = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}
# Faults are drawn in this order; a series carries at most one fault of each group.
_GROUPS: dict[str, tuple[Fault, ...]] = {
    "content": (
        Fault.ENHANCED_MULTIFRAME,
        Fault.MISSING_SLICES,
        Fault.DUPLICATE_SLICES,
        Fault.WRONG_PARAMETERS,
        Fault.PARTIAL_COVERAGE,
        Fault.MOTION,
        Fault.NOISE,
    ),
    "encoding": (Fault.NO_PREAMBLE, Fault.JPEG_LOSSLESS, Fault.IMPLICIT_VR),
    "file": (Fault.TRUNCATED_FILE, Fault.DUPLICATE_INSTANCE),
}


@dataclass
class SeriesPlan:
    spec: SeriesSpec
    number: int
    uid: str
    folder: str
    faults: list[Fault] = field(default_factory=list)


@dataclass
class StudyPlan:
    index: int
    folder: str
    protocol: str
    date: dt.date
    scanner: Scanner
    description: str
    accession: str
    study_uid: str
    series: list[SeriesPlan]
    atrophy: float | None
    age: int
    faults: list[Fault] = field(default_factory=list)


@dataclass
class PatientPlan:
    key: str
    seed: int
    group: str
    identity: Identity
    target_icv_ml: float
    studies: list[StudyPlan]


@dataclass(frozen=True)
class CohortResult:
    truth: CohortTruth
    out_dir: Path
    truth_file: Path


def _folder_name(spec: SeriesSpec, number: int) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in spec.series_description)[:32]
    return f"SE{number:02d}_{safe}"


def plan_cohort(config: SynthConfig) -> tuple[list[PatientPlan], dict[Fault, FaultCount]]:
    """Decide every patient, study, series and fault (cheap, no pixels)."""
    rng = np.random.default_rng([config.seed, 1])
    names = list(config.protocol_weights)
    weights = np.array([config.protocol_weights[n] for n in names], float)
    weights /= weights.sum()
    patients: list[PatientPlan] = []
    n_studies = 0
    while n_studies < config.studies:
        p_index = len(patients) + 1
        protocol = str(rng.choice(names, p=weights))
        sex = "F" if rng.random() < 0.55 else "M"
        age0 = int(rng.integers(58, 88) if protocol == "dementia" else rng.integers(22, 80))
        visits = 1
        if protocol in BRAIN_PROTOCOLS and rng.random() < config.repeat_visit_rate:
            visits = int(rng.integers(2, 4))
        visits = min(visits, config.studies - n_studies)
        first = dt.date(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 10)))
        birth = first - dt.timedelta(days=int(age0 * 365.25 + rng.integers(0, 365)))
        identity = make_identity(rng, sex, birth.strftime("%Y%m%d"), p_index)
        if protocol == "dementia":
            group = "dementia" if rng.random() < config.dementia_prevalence else "control"
        else:
            group = "other"
        lo, hi = config.dementia_atrophy if group == "dementia" else config.control_atrophy
        atrophy0 = float(rng.uniform(lo, hi))
        yearly = 0.015 if group == "dementia" else 0.003
        target_icv = float(rng.normal(1380.0 if sex == "F" else 1560.0, 110.0))
        pkey = f"P{p_index:04d}"
        scanner = SCANNERS[int(rng.integers(len(SCANNERS)))]
        studies: list[StudyPlan] = []
        date = first
        for v in range(visits):
            n_studies += 1
            if v:
                date = date + dt.timedelta(days=int(rng.integers(300, 1100)))
                if rng.random() < 0.3:  # moved to another scanner
                    scanner = SCANNERS[int(rng.integers(len(SCANNERS)))]
            age = int((date - birth).days // 365.25)
            years = (date - first).days / 365.25
            sfolder = f"ST{n_studies:04d}"
            study_uid = make_uid(config.seed, "study", n_studies)
            if protocol in BRAIN_PROTOCOLS:
                specs = brain_series(scanner, protocol, int(rng.integers(0, 2)))
                if n_studies % 3 == 1:
                    specs = [*specs, SC_SERIES]
            else:
                specs = body_series(scanner, protocol)
            series = [
                SeriesPlan(
                    spec=s,
                    number=i + 1,
                    uid=make_uid(config.seed, "series", n_studies, i),
                    folder=f"{sfolder}/{_folder_name(s, i + 1)}",
                )
                for i, s in enumerate(specs)
            ]
            studies.append(
                StudyPlan(
                    index=n_studies,
                    folder=sfolder,
                    protocol=protocol,
                    date=date,
                    scanner=scanner,
                    description=str(rng.choice(STUDY_DESCRIPTIONS[protocol])),
                    accession=f"A{int(rng.integers(10_000_000, 99_999_999))}",
                    study_uid=study_uid,
                    series=series,
                    atrophy=min(0.45, atrophy0 + yearly * years)
                    if protocol in BRAIN_PROTOCOLS
                    else None,
                    age=age,
                )
            )
        patients.append(
            PatientPlan(pkey, int(rng.integers(0, 2**31)), group, identity, target_icv, studies)
        )
    return patients, _assign_faults(patients, config, rng)


def _assign_faults(
    patients: list[PatientPlan], config: SynthConfig, rng: np.random.Generator
) -> dict[Fault, FaultCount]:
    studies = [s for p in patients for s in p.studies]
    all_series = [se for s in studies for se in s.series if se.spec.kind != "burned_in_sc"]
    t1s = [se for s in studies for se in s.series if se.spec.kind == "t1_3d"]
    counts: dict[Fault, FaultCount] = {}

    def group_of(f: Fault) -> str | None:
        return next((g for g, fs in _GROUPS.items() if f in fs), None)

    def pick(fault: Fault, pool: list[SeriesPlan] | list[StudyPlan]) -> list[int]:
        rate = config.fault_rates.get(fault, 0.0)
        n = 0 if rate <= 0 or not pool else min(len(pool), max(1, round(rate * len(pool))))
        counts[fault] = FaultCount(rate=rate, eligible=len(pool), planted=n)
        return sorted(int(i) for i in rng.choice(len(pool), size=n, replace=False)) if n else []

    for fault in (*_GROUPS["content"], *_GROUPS["encoding"], *_GROUPS["file"]):
        base = t1s if fault in _GROUPS["content"] else all_series
        g = group_of(fault)
        pool = [
            se
            for se in base
            if not any(group_of(f) == g for f in se.faults)
            and Fault.ENHANCED_MULTIFRAME not in se.faults
            and not (
                fault in (Fault.TRUNCATED_FILE, Fault.DUPLICATE_INSTANCE) and se.spec.shape[0] < 2
            )
        ]
        for i in pick(fault, pool):
            pool[i].faults.append(fault)
    brain_studies = [s for s in studies if s.protocol in BRAIN_PROTOCOLS]
    for i in pick(Fault.UNKNOWN_SCANNER, brain_studies):
        st = brain_studies[i]
        st.faults.append(Fault.UNKNOWN_SCANNER)
        st.scanner = UNKNOWN_SCANNERS[i % len(UNKNOWN_SCANNERS)]
    for i in pick(Fault.NON_DICOM, studies):
        studies[i].faults.append(Fault.NON_DICOM)
    later = studies[1:]
    for i in pick(Fault.DUPLICATE_ACCESSION, later):
        st = later[i]
        st.faults.append(Fault.DUPLICATE_ACCESSION)
        st.accession = studies[i].accession  # an earlier study, usually another patient's
    return counts


def generate(
    config: SynthConfig,
    out_dir: Path,
    cache_dir: Path,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    generator: str = generators.DEFAULT_GENERATOR,
    deface_truth: bool = True,
) -> CohortResult:
    """Generate the cohort into ``out_dir`` (DICOM under ``dicom/``, truth beside it); the
    heads are drawn from ``generator`` (``pipelines.synth.generators``). ``deface_truth``:
    write each head series' face and intracranial map (what defacing is scored against; a
    tenth of the time, which the demo, scoring nothing, saves). The DICOM files are the same
    either way."""
    gen = generators.get(generator)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise SynthError(
                f"output folder {out_dir} is not empty: choose an empty folder or pass --overwrite"
            )
        for name in ("dicom", "truth", "ground_truth.json", "clinical_labels.csv"):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = gen.load(cache_dir)
    patients, fault_counts = plan_cohort(config)
    jobs = [
        (p, str(out_dir), config.seed, gen.texture_sd, gen.crop_to_model, deface_truth)
        for p in patients
    ]
    results: list[tuple[PatientTruth, list[PlantedIdentifier]]] = []
    if workers <= 1:
        for i, job in enumerate(jobs):
            results.append(_render_patient_with(model, *job))
            if progress:
                progress(i + 1, len(jobs))
    else:
        with ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker, initargs=(str(cache_dir), gen.name)
        ) as pool:
            for i, res in enumerate(pool.map(_render_patient, jobs)):
                results.append(res)
                if progress:
                    progress(i + 1, len(jobs))
    identifiers: list[PlantedIdentifier] = []
    cleaned: list[PatientTruth] = []
    for pt, ids in results:
        identifiers.extend(ids)
        cleaned.append(pt)
    truth = CohortTruth(
        generator_version=GENERATOR_VERSION,
        head_model=model.digest,
        generator=gen.name,
        config=config,
        patients=cleaned,
        fault_counts=fault_counts,
        identifiers=identifiers,
    )
    truth_file = out_dir / "ground_truth.json"
    truth_file.write_text(truth.model_dump_json(indent=1))
    write_labels(cleaned, out_dir / "clinical_labels.csv")
    return CohortResult(truth=truth, out_dir=out_dir, truth_file=truth_file)


def write_labels(patients: Sequence[PatientTruth], path: Path) -> None:
    """The clinical labels a radiology information system would give: the diagnosis group by
    accession number, one line each. A study planted with the duplicate-accession fault
    carries an accession number that is another study's in the RIS: the label is that
    study's, so the copy adds no line (two lines with two groups would be a conflict)."""
    written: set[str] = set()
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["accession_number", "diagnosis"])
        for pt in patients:
            for st in pt.studies:
                if Fault.DUPLICATE_ACCESSION in st.faults or st.accession_number in written:
                    continue
                written.add(st.accession_number)
                w.writerow([st.accession_number, pt.group])


_WORKER_MODEL: HeadModel | None = None


def _init_worker(cache_dir: str, generator: str) -> None:
    global _WORKER_MODEL  # noqa: PLW0603 - one read-only model per worker process
    _WORKER_MODEL = generators.get(generator).load(Path(cache_dir))


def _render_patient(
    job: tuple[PatientPlan, str, int, float, bool, bool],
) -> tuple[PatientTruth, list[PlantedIdentifier]]:
    assert _WORKER_MODEL is not None
    return _render_patient_with(_WORKER_MODEL, *job)


def _render_patient_with(
    model: HeadModel,
    plan: PatientPlan,
    out: str,
    seed: int,
    texture_sd: float = 0.0,
    crop_to_model: bool = False,
    deface_truth: bool = True,
) -> tuple[PatientTruth, list[PlantedIdentifier]]:
    out_dir = Path(out)
    rng = np.random.default_rng([seed, 2, plan.seed])
    shape = anatomy.sample_shape(model, rng, plan.target_icv_ml)
    warp = None
    if any(st.atrophy is not None for st in plan.studies):
        coords = anatomy.warp_coordinates(model, shape)
        # One texture per patient, the same in every study and contrast (it is anatomy); drawn
        # only when asked, so that flat generators keep their random stream.
        texture = None
        if texture_sd > 0:
            spacing = anatomy.model_spacing(model)
            texture = anatomy.texture_gain(model.labels.shape, spacing, rng, texture_sd)
        warp = _Warped(
            coords,
            anatomy.warp_volume(model.head, coords, order=1).astype(np.float32),
            anatomy.warp_volume(model.face, coords, order=0).astype(np.uint8),
            texture,
            crop_to_model,
        )
    studies: list[StudyTruth] = []
    planted: list[PlantedIdentifier] = []
    for st in plan.studies:
        truth, ids = _render_study(model, plan, st, shape, warp, rng, out_dir, seed, deface_truth)
        studies.append(truth)
        planted.extend(ids)
    idn = plan.identity
    return (
        PatientTruth(
            key=plan.key,
            group=plan.group,
            sex=idn.sex,
            birth_date=idn.birth_date,
            patient_id=idn.patient_id,
            patient_name=idn.dicom_name,
            studies=studies,
        ),
        planted,
    )


def _study_context(
    plan: PatientPlan, st: StudyPlan, rng: np.random.Generator, seed: int
) -> StudyContext:
    inst = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
    referring = staff_name(rng, "Dr")
    body = {"knee": "KNEE", "spine": "LSPINE"}.get(st.protocol, "BRAIN")
    history = (
        f"Referred by {referring.replace('^', ' ')}; {plan.identity.display_name} "
        f"reports memory problems"
        if st.protocol == "dementia"
        else f"{plan.identity.display_name}, call {plan.identity.phone} before the scan"
    )
    return StudyContext(
        seed=seed,
        identity=plan.identity,
        scanner=st.scanner,
        study_uid=st.study_uid,
        frame_uid=make_uid(seed, "frame", st.index),
        accession=st.accession,
        study_id=f"{int(rng.integers(1000, 99999))}",
        study_date=st.date.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00",
        study_description=st.description,
        age_years=st.age,
        size_m=float(rng.normal(1.66 if plan.identity.sex == "F" else 1.78, 0.06)),
        weight_kg=float(rng.normal(68 if plan.identity.sex == "F" else 82, 10)),
        institution=inst,
        referring=referring,
        performing=staff_name(rng, "Dr"),
        operator=staff_name(rng),
        station=f"{st.scanner.station_prefix}{int(rng.integers(10, 99))}",
        device_serial=f"{int(rng.integers(10000, 99999))}",
        body_part=body,
        history=history,
    )


@dataclass(frozen=True)
class _Warped:
    coords: npt.NDArray[np.float32]
    head: npt.NDArray[np.float32]
    face: npt.NDArray[np.uint8]
    texture: npt.NDArray[np.float32] | None = None  # tissue texture gain on the model grid
    crop_to_model: bool = False  # series end where the model's image ends


def _render_study(
    model: HeadModel,
    plan: PatientPlan,
    st: StudyPlan,
    shape: anatomy.SubjectShape,
    warp: _Warped | None,
    rng: np.random.Generator,
    out_dir: Path,
    seed: int,
    deface_truth: bool = True,
) -> tuple[StudyTruth, list[PlantedIdentifier]]:
    ctx = _study_context(plan, st, rng, seed)
    placement = anatomy.sample_placement(rng)
    volumes = None
    labels_file = None
    labels = None
    if st.atrophy is not None:
        assert warp is not None, "a patient with brain studies always has a warp"
        labels = anatomy.warp_volume(
            anatomy.atrophied_labels(model, shape, st.atrophy), warp.coords, order=0
        ).astype(np.uint8)
        tgrid = anatomy.truth_grid(shape)
        tl = anatomy.sample_grid(
            labels, model, shape, anatomy.IDENTITY_PLACEMENT, tgrid, order=0
        ).astype(np.uint8)
        volumes = anatomy.truth_volumes(tl, 0.001)
        labels_file = f"truth/{st.folder}_labels.nii.gz"
        _save_truth_labels(out_dir / labels_file, tl, tgrid)
    codes = None
    if deface_truth and labels is not None and warp is not None:
        codes = _deface_codes(labels, warp)
    series_truth: list[SeriesTruth] = []
    contrast_cache: dict[str, npt.NDArray[np.float32]] = {}
    hour = int(ctx.study_time[:2])
    for se in st.series:
        series_time = f"{hour:02d}{min(59, 2 + se.number * 4):02d}{int(rng.integers(0, 60)):02d}"
        planter = Planter(ctx, f"dicom/{se.folder}", record=True)
        series_truth.append(
            _render_series(
                model,
                shape,
                placement,
                labels,
                warp,
                codes,
                contrast_cache,
                ctx,
                planter,
                st,
                se,
                series_time,
                rng,
                out_dir,
            )
        )
    non_dicom: list[str] = []
    if Fault.NON_DICOM in st.faults:
        folder = out_dir / "dicom" / st.folder
        (folder / "Thumbs.db").write_bytes(rng.bytes(2048))
        (folder / "README.TXT").write_text("Exported by PACS workstation. Do not edit.\n")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + rng.bytes(512))
        non_dicom = [f"dicom/{st.folder}/{n}" for n in ("Thumbs.db", "README.TXT", ".DS_Store")]
    truth = StudyTruth(
        folder=f"dicom/{st.folder}",
        study_instance_uid=st.study_uid,
        accession_number=st.accession,
        study_date=ctx.study_date,
        study_description=st.description,
        protocol=st.protocol,
        manufacturer=st.scanner.manufacturer,
        model=st.scanner.model,
        software_versions=st.scanner.software_versions,
        field_strength_t=st.scanner.field_strength,
        age_years=st.age,
        volumes=volumes,
        atrophy_fraction=st.atrophy,
        labels_file=labels_file,
        series=series_truth,
        faults=list(st.faults),
        non_dicom_files=non_dicom,
    )
    return truth, list(ctx.planted)


def _save_truth_labels(
    path: Path,
    labels: npt.NDArray[np.uint8],
    grid: anatomy.Grid,
    descrip: bytes = b"cohortflow truth 0bg 1csf 2gm 3wm 4head",
) -> None:
    """Label map (NIfTI, RAS affine) on ``grid``, as (x, y, z) = (c, r, k) voxel order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.transpose(labels, (2, 1, 0))  # (k, r, c) -> (c, r, k) = (x, y, z)
    m = grid.index_to_lps()
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = m[:3, 2], m[:3, 1], m[:3, 0], m[:3, 3]
    aff = LPS_FROM_RAS @ aff  # LPS -> RAS (the flip matrix is its own inverse)
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header["descrip"] = descrip
    nib.save(img, path)


#: Values of a series' defacing truth map.
DEFACE_TRUTH_FACE, DEFACE_TRUTH_INTRACRANIAL = 1, 2


def _deface_codes(labels: npt.NDArray[np.uint8], warp: _Warped) -> npt.NDArray[np.uint8]:
    """What defacing must remove and keep, on the model grid (one study): 1 = the subject's
    face (the model's face: pydeface's face region in the atlas model, a plane in front of the
    brain in Colin27's), 2 = intracranial (CSF, GM, WM)."""
    inside = np.isin(labels, (CSF, GM, WM))
    codes = np.where(warp.face > 0, DEFACE_TRUTH_FACE, 0)
    return np.where(inside, DEFACE_TRUTH_INTRACRANIAL, codes).astype(np.uint8)


def _save_deface_truth(
    path: Path,
    model: HeadModel,
    shape: anatomy.SubjectShape,
    placement: anatomy.Placement,
    codes: npt.NDArray[np.uint8],
    grid: anatomy.Grid,
) -> None:
    """The study's deface codes (``_deface_codes``) on the series' own grid: one nearest-
    neighbour resampling (the same voxels as resampling face and intracranial masks apart)."""
    truth = np.asarray(anatomy.sample_grid(codes, model, shape, placement, grid, order=0))
    _save_truth_labels(path, truth.astype(np.uint8), grid, b"cohortflow deface truth 1face 2icv")


def _grids(spec: SeriesSpec, centre: npt.NDArray[np.float64]) -> list[anatomy.Grid]:
    if spec.orientation == "mixed":
        per = spec.shape[0] // 3
        return [
            anatomy.centred_grid(
                (per, *spec.shape[1:]), spec.spacing, *ORIENTATIONS[o], centre=centre
            )
            for o in ("sagittal", "coronal", "axial")
        ]
    return [
        anatomy.centred_grid(
            spec.shape, spec.spacing, *ORIENTATIONS[spec.orientation], centre=centre
        )
    ]


def _render_series(
    model: HeadModel,
    shape: anatomy.SubjectShape,
    placement: anatomy.Placement,
    labels: npt.NDArray[np.uint8] | None,
    warp: _Warped | None,
    codes: npt.NDArray[np.uint8] | None,
    contrast_cache: dict[str, npt.NDArray[np.float32]],
    ctx: StudyContext,
    planter: Planter,
    st: StudyPlan,
    se: SeriesPlan,
    series_time: str,
    rng: np.random.Generator,
    out_dir: Path,
) -> SeriesTruth:
    spec = se.spec
    folder = out_dir / "dicom" / se.folder
    sop = lambda i: make_uid(ctx.seed, "sop", se.uid, i)
    if spec.kind == "burned_in_sc":
        ds = burned_in_sc(
            ctx,
            planter,
            spec,
            series_uid=se.uid,
            series_number=se.number,
            series_time=series_time,
            sop_uid=sop(1),
        )
        write(ds, folder / "IM00001.dcm")
        return _series_truth(se, SecondaryCaptureImageStorage, ExplicitVRLittleEndian, 1, 1, 1)

    centre = placement.translation + rng.uniform(-3, 3, size=3)
    if Fault.PARTIAL_COVERAGE in se.faults:
        centre = centre + np.array([0.0, 0.0, -0.3 * _si_extent(spec)])
    grids = _grids(spec, centre)
    if warp is not None and warp.crop_to_model and len(grids) == 1:  # not the 3-plane scouts
        grids = [anatomy.within_model(grids[0], model, shape, placement)]
    stacks: list[npt.NDArray[np.uint16]] = []
    for grid in grids:
        if labels is not None and warp is not None:
            img = _render_head(model, shape, placement, labels, warp, contrast_cache, spec, grid)
        else:
            img = _render_phantom(grid, spec)
        img *= anatomy.bias_field(img.shape, rng, 0.12)
        sigma = 0.02 * (10.0 if Fault.NOISE in se.faults else 1.0)
        img = anatomy.rician(img, sigma, rng)
        if Fault.MOTION in se.faults:
            img = anatomy.motion_ghosts(img, rng)
        stacks.append(np.clip(img * 3000.0, 0, 4095).astype(np.uint16))
    deface_truth = None
    if codes is not None and len(grids) == 1:
        deface_truth = f"truth/{se.folder}_deface.nii.gz"
        _save_deface_truth(out_dir / deface_truth, model, shape, placement, codes, grids[0])

    if Fault.ENHANCED_MULTIFRAME in se.faults:
        ds = enhanced_mr(
            ctx,
            planter,
            spec,
            series_uid=se.uid,
            series_number=se.number,
            series_time=series_time,
            sop_uid=sop(1),
            grid=grids[0],
            volume=stacks[0],
        )
        write(ds, folder / "IM00001.dcm")
        return _series_truth(
            se,
            EnhancedMRImageStorage,
            ExplicitVRLittleEndian,
            grids[0].shape[0],
            1,
            1,
            deface_truth,
            grids[0].shape,
        )

    syntax = ExplicitVRLittleEndian
    if Fault.JPEG_LOSSLESS in se.faults:
        syntax = JPEGLosslessSV1
    elif Fault.IMPLICIT_VR in se.faults:
        syntax = ImplicitVRLittleEndian
    legacy = Fault.NO_PREAMBLE in se.faults
    wrong = (550.0, 12.0, None, 90.0) if Fault.WRONG_PARAMETERS in se.faults else None

    slices = [(g, k) for g, stack in zip(grids, stacks, strict=True) for k in range(stack.shape[0])]
    pixels = [stack[k] for stack in stacks for k in range(stack.shape[0])]
    order = list(range(len(slices)))
    if Fault.MISSING_SLICES in se.faults:
        mid = len(order) // 2
        order = order[: mid - 1] + order[mid + 2 :]
    if Fault.DUPLICATE_SLICES in se.faults:
        order.append(len(order) // 2)  # the same position again, a new instance
    files: list[Path] = []
    for n, idx in enumerate(order, start=1):
        grid, k = slices[idx]
        px = pixels[idx]
        if n == len(order) and Fault.DUPLICATE_SLICES in se.faults:
            px = np.clip(px.astype(np.int32) + 5, 0, 4095).astype(np.uint16)
        ds = mr_slice(
            ctx,
            Planter(ctx, planter.folder, record=(n == 1)),
            spec,
            series_uid=se.uid,
            series_number=se.number,
            series_time=series_time,
            instance_number=n,
            sop_uid=sop(n),
            grid=grid,
            k=k,
            pixels=px,
            tr_te_ti_flip=wrong,
        )
        path = folder / f"IM{n:05d}.dcm"
        write(ds, path, syntax=syntax, legacy=legacy)
        files.append(path)
    n_files = len(files)
    if Fault.TRUNCATED_FILE in se.faults:
        victim = files[len(files) // 2]
        data = victim.read_bytes()
        victim.write_bytes(data[: int(len(data) * 0.6)])
    if Fault.DUPLICATE_INSTANCE in se.faults:
        src = files[len(files) // 3]
        shutil.copyfile(src, src.with_name(src.stem + "_copy.dcm"))
        n_files += 1
    return _series_truth(
        se,
        MRImageStorage,
        ImplicitVRLittleEndian if legacy else syntax,
        len(slices),
        len(order),
        n_files,
        deface_truth,
        grids[0].shape,
    )


def _si_extent(spec: SeriesSpec) -> float:
    if spec.orientation == "axial":
        return spec.shape[0] * spec.spacing[0]
    return spec.shape[1] * spec.spacing[1]


def _render_head(
    model: HeadModel,
    shape: anatomy.SubjectShape,
    placement: anatomy.Placement,
    labels: npt.NDArray[np.uint8],
    warp: _Warped,
    cache: dict[str, npt.NDArray[np.float32]],
    spec: SeriesSpec,
    grid: anatomy.Grid,
) -> npt.NDArray[np.float32]:
    if spec.contrast not in cache:
        image = anatomy.tissue_image(warp.head, labels, CONTRASTS[spec.contrast])
        if warp.texture is not None:
            image = anatomy.textured(image, labels, warp.texture)
        cache[spec.contrast] = image
    model_img = cache[spec.contrast]
    # A thick 2D slice averages the anatomy across its thickness.
    acc = np.zeros(grid.shape, np.float32)
    offsets = np.linspace(-1 / 3, 1 / 3, spec.sub_samples) if spec.sub_samples > 1 else [0.0]
    for off in offsets:
        g = replace(grid, origin=grid.origin + grid.normal * off * spec.slice_thickness)
        acc += np.asarray(
            anatomy.sample_grid(model_img, model, shape, placement, g, order=1), dtype=np.float32
        )
    return np.asarray(acc / len(offsets), dtype=np.float32)


def _render_phantom(grid: anatomy.Grid, spec: SeriesSpec) -> npt.NDArray[np.float32]:
    """Knee and spine studies: a limb-like phantom (soft tissue, bone, marrow)."""
    ns, nr, nc = grid.shape
    rr, cc = np.mgrid[0:nr, 0:nc].astype(np.float32)
    rr = (rr - nr / 2) / (nr / 2)
    cc = (cc - nc / 2) / (nc / 2)
    c = CONTRASTS.get(spec.contrast, CONTRASTS["t1"])
    out = np.zeros(grid.shape, np.float32)
    for k in range(ns):
        wobble = 0.05 * np.sin(k / 3.0)
        soft = (rr / 0.7) ** 2 + ((cc - wobble) / 0.55) ** 2 < 1
        bone = (rr / 0.25) ** 2 + ((cc - wobble) / 0.2) ** 2 < 1
        marrow = (rr / 0.2) ** 2 + ((cc - wobble) / 0.15) ** 2 < 1
        sl = np.where(soft, c["gm"], 0.0)
        sl = np.where(bone, c["skull"], sl)
        sl = np.where(marrow, c["head"], sl)
        out[k] = sl
    return out


def _series_truth(
    se: SeriesPlan,
    sop_class: str,
    syntax: str,
    slices: int,
    instances: int,
    files: int,
    deface_truth: str | None = None,
    shape: tuple[int, int, int] | None = None,  # the grid's, when it differs from the spec's
) -> SeriesTruth:
    spec = se.spec
    rows, columns = (shape or spec.shape)[1:]
    return SeriesTruth(
        folder=f"dicom/{se.folder}",
        series_instance_uid=se.uid,
        series_number=se.number,
        kind=spec.kind,
        series_description=spec.series_description,
        protocol_name=spec.protocol_name,
        sop_class_uid=str(sop_class),
        transfer_syntax_uid=str(syntax),
        orientation=spec.orientation,
        rows=rows,
        columns=columns,
        slices=slices,
        instances=instances,
        files=files,
        voxel_mm=(spec.spacing[1], spec.spacing[2], spec.slice_thickness),
        faults=list(se.faults),
        deface_truth_file=deface_truth,
    )
