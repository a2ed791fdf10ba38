"""Score a step's output against the synthetic cohort's ground truth (for tests and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from models.synth import CohortTruth, SeriesTruth
from pipelines.deface.folder import read_instance
from pipelines.deface.planes import planes_of
from pipelines.synth.anatomy import LPS_FROM_RAS
from pipelines.synth.cohort import DEFACE_TRUTH_FACE, DEFACE_TRUTH_INTRACRANIAL


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
