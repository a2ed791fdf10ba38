"""Defacing on a synthetic cohort: time per series, face removed, intracranial voxels touched.

Generates a cohort with the usual archive faults (default 20 studies; --quick 6), defaces its
DICOM folder as ``cohortflow deface`` does (one process, ITK single-threaded for reproducible
registrations) and scores every defaced series against the generator's per-series truth: the
subject's face and its intracranial space. The heads come from ``--generator``: ``colin`` (the
default; Colin27's head, its face a plane in front of its brain, independent of pydeface) or
``mni`` (the atlas model, pydeface's own head and face region: figures on it flatter defacing).
A T1's time includes loading it and fitting the template; the other series of its study reuse
the fit.

Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="6 studies")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "test")
    parser.add_argument(
        "--generator",
        choices=("colin", "mni"),
        default="colin",
        help="the anatomy synthetic heads are drawn from (pipelines.synth.generators)",
    )
    args = parser.parse_args()
    studies = 6 if args.quick else args.studies

    from cohortflow.flows.prefect_env import configure_itk

    configure_itk(1)  # as the command line does, before the first registration

    from cohortflow.models.settings import DefaceSettings
    from cohortflow.models.synth import SynthConfig
    from cohortflow.pipelines.atlas.template import load_template
    from cohortflow.pipelines.deface.folder import deface_folder, reference_rule
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from cohortflow.pipelines.synth import generators
    from cohortflow.pipelines.synth.cohort import generate
    from cohortflow.pipelines.synth.scoring import score_deface

    gen = generators.get(args.generator)
    print(f"synthetic heads: generator {gen.name} ({gen.description})")
    settings = DefaceSettings()
    with tempfile.TemporaryDirectory(prefix="cohortflow-bench-deface-") as tmp:
        work = Path(tmp)
        cohort = generate(
            SynthConfig(studies=studies, seed=args.seed),
            work / "cohort",
            args.cache,
            workers=2,
            generator=gen.name,
        )
        template = load_template(
            args.cache, settings.brain_margin_mm, settings.face_margin_mm, settings.brow_mm
        )
        is_reference = reference_rule(load_protocols(), settings.reference_rule)
        start = time.perf_counter()
        report = deface_folder(
            work / "cohort" / "dicom", work / "out", template, settings, is_reference
        )
        wall = time.perf_counter() - start
        scores = score_deface(work / "cohort", cohort.truth, work / "out")

    defaced = report.with_status("defaced")
    seconds = [o.metrics["seconds"] for o in defaced]
    t1_folders = {s.folder for s in scores if s.kind == "t1_3d"}
    t1_seconds = [o.metrics["seconds"] for o in defaced if o.folder in t1_folders]
    correlations = sorted({o.metrics["correlation"] for o in defaced})
    study_count = len({o.study for o in report.series})
    t1 = [s for s in scores if s.kind == "t1_3d"]
    reasons: dict[str, int] = {}
    for o in report.series:
        if o.status != "defaced":
            key = f"{o.status}:{o.reason_code}"
            reasons[key] = reasons.get(key, 0) + 1
    for key, count in sorted(reasons.items()):
        print(f"series {key}: {count}")
    print(f"cpu_count: {os.cpu_count()}")
    print(f"studies: {study_count}")
    print(f"series_defaced: {len(defaced)}")
    print(f"series_not_defaced: {len(report.series) - len(defaced)}")
    print(f"series_scored_against_truth: {len(scores)}")
    print(f"t1_scored: {len(t1)}")
    print(f"face_removed_min: {min(s.face_removed_fraction for s in scores):.4f}")
    print(f"face_removed_t1_median: {statistics.median(s.face_removed_fraction for s in t1):.4f}")
    print(f"true_face_voxels_scored: {sum(s.face_voxels for s in scores)}")
    print(f"intracranial_voxels_scored: {sum(s.intracranial_voxels for s in scores)}")
    print(f"intracranial_voxels_changed: {sum(s.intracranial_changed for s in scores)}")
    print(f"placement_correlation_min: {correlations[0]:.3f}")
    print(f"placement_correlation_max: {correlations[-1]:.3f}")
    print(f"seconds_per_series_median: {statistics.median(seconds):.2f}")
    print(f"seconds_per_t1_median: {statistics.median(t1_seconds):.2f}")
    print(f"seconds_per_t1_max: {max(t1_seconds):.2f}")
    print(f"seconds_per_study_mean: {wall / study_count:.2f}")
    print(f"generator: {gen.name}")


if __name__ == "__main__":
    main()
