"""Score a step's output against the synthetic cohort's ground truth (for tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from cohortflow.models.geometry import LPS_FROM_RAS, planes_of
from cohortflow.models.synth import CohortTruth, Fault, SeriesTruth
from cohortflow.pipelines.dicomfolder import read_instance
from cohortflow.pipelines.synth.cohort import DEFACE_TRUTH_FACE, DEFACE_TRUTH_INTRACRANIAL

if TYPE_CHECKING:
    from cohortflow.pipelines.quality.folder import SeriesQc


@dataclass(frozen=True)
class DefaceScore:
    folder: str  # the series folder, relative to the cohort's dicom/ folder
    kind: str
    face_voxels: int  # true face voxels in the series' planes
    face_removed: int  # ... set to 0 by defacing
    intracranial_voxels: int
    intracranial_changed: int  # must be 0

    @property
    def face_removed_fraction(self) -> float:
        return self.face_removed / self.face_voxels if self.face_voxels else 1.0


def score_deface(cohort_dir: Path, truth: CohortTruth, defaced_dir: Path) -> list[DefaceScore]:
    """Compare every defaced series having a defacing truth map with its input, plane by plane.

    ``defaced_dir`` mirrors ``cohort_dir / "dicom"`` (what ``cohortflow deface`` writes); series
    that were not written are left out (the caller checks they were reported).
    """
    scores = []
    for patient in truth.patients:
        for study in patient.studies:
            for series in study.series:
                if series.deface_truth_file is None:
                    continue
                rel = Path(series.folder).relative_to("dicom")
                if not (defaced_dir / rel).is_dir():
                    continue
                scores.append(_score_series(cohort_dir, series, rel, defaced_dir / rel))
    return scores


def _score_series(cohort_dir: Path, series: SeriesTruth, rel: Path, out_dir: Path) -> DefaceScore:
    assert series.deface_truth_file is not None
    img = nib.load(cohort_dir / series.deface_truth_file)
    labels = np.asarray(img.dataobj)  # type: ignore[attr-defined]
    to_voxel = np.linalg.inv(img.affine)  # type: ignore[attr-defined]
    face = removed = icv = changed = 0
    for out_file in sorted(out_dir.iterdir()):
        after_ds = read_instance(out_file)
        before_ds = read_instance(cohort_dir / "dicom" / rel / out_file.name)
        after_all, before_all = after_ds.pixel_array, before_ds.pixel_array
        for plane in planes_of(after_ds, 0):
            ras = LPS_FROM_RAS[:3, :3] @ plane.origin  # the flip is its own inverse
            k = round(float((to_voxel @ np.append(ras, 1.0))[2]))
            truth = labels[:, :, k].T  # (x, y) = (c, r) -> (r, c)
            f = plane.frame
            after = after_all if f is None else after_all[f]
            before = before_all if f is None else before_all[f]
            is_face = truth == DEFACE_TRUTH_FACE
            is_icv = truth == DEFACE_TRUTH_INTRACRANIAL
            face += int(is_face.sum())
            removed += int((after[is_face] == 0).sum())
            icv += int(is_icv.sum())
            changed += int((after[is_icv] != before[is_icv]).sum())
    return DefaceScore(str(rel), series.kind, face, removed, icv, changed)


#: The QC check that must catch each planted fault class (a family covers its members).
#: A cut file: QC of the delivered folder reads it as damaged; after defacing, which writes only
#: readable files, the series misses that slice.
QC_EXPECTED: dict[Fault, tuple[str, ...]] = {
    Fault.MISSING_SLICES: ("header.missing_slices",),
    Fault.DUPLICATE_SLICES: ("header.duplicate_slices",),
    Fault.WRONG_PARAMETERS: ("header.conformance",),
    Fault.PARTIAL_COVERAGE: ("image.coverage",),
    Fault.MOTION: ("image.motion",),
    Fault.NOISE: ("image.snr",),
    Fault.UNKNOWN_SCANNER: ("header.unknown_scanner",),
    Fault.TRUNCATED_FILE: ("header.unreadable_file", "header.missing_slices"),
}


def _matches(check: str, expected: tuple[str, ...]) -> bool:
    return any(check == e or check.startswith(e + ".") for e in expected)


@dataclass(frozen=True)
class QcClassScore:
    """How QC did on the series of one planted fault class (or the clean ones)."""

    name: str  # a fault class, or "clean"
    series: int
    caught: int  # the expected check fired, at its configured severity (warn or fail)
    decided: int  # ... and is the series' deciding reason
    rejected: int  # verdict fail
    checks: dict[str, int]  # every check that fired on these series -> series count


@dataclass(frozen=True)
class QcScore:
    classes: list[QcClassScore]
    unmatched: int  # series QC checked that the truth does not know

    def of(self, name: str) -> QcClassScore | None:
        return next((c for c in self.classes if c.name == name), None)


def score_qc(truth: CohortTruth, results: Sequence[SeriesQc]) -> QcScore:
    """Compare QC outcomes with the planted faults. A series counts in every class planted on
    it (a study's unknown scanner counts for each of its series); clean series carry none of
    the faults in :data:`QC_EXPECTED` (encodings such as JPEG or Enhanced MR are not faults)."""
    planted: dict[str, list[Fault]] = {}
    for patient in truth.patients:
        for study in patient.studies:
            for series in study.series:
                faults = [f for f in (*series.faults, *study.faults) if f in QC_EXPECTED]
                planted[series.series_instance_uid] = faults
    groups: dict[str, list[SeriesQc]] = {}
    unmatched = 0
    for result in results:
        if result.series not in planted:
            unmatched += 1
            continue
        for name in [f.value for f in planted[result.series]] or ["clean"]:
            groups.setdefault(name, []).append(result)
    classes = []
    for name in [*(f.value for f in QC_EXPECTED), "clean"]:
        members = groups.get(name, [])
        expected = QC_EXPECTED.get(Fault(name), ()) if name != "clean" else ()
        checks: dict[str, int] = {}
        caught = decided = rejected = 0
        for r in members:
            fired = {f.check for s in r.stages for f in s.findings if f.severity.value != "ignore"}
            for check in fired:
                checks[check] = checks.get(check, 0) + 1
            if expected and any(_matches(c, expected) for c in fired):
                caught += 1
                if r.reason is not None and _matches(r.reason.check, expected):
                    decided += 1
            rejected += r.verdict.value == "fail"
        classes.append(QcClassScore(name, len(members), caught, decided, rejected, checks))
    return QcScore(classes, unmatched)
