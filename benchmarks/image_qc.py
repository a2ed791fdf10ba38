"""Header and image QC on a synthetic cohort: which check catches which planted fault, how many
clean series are rejected, how long one 3D T1 takes, how exact SNR and CNR are on phantoms, and
the image QC metrics of the real T1s (../shared/realdata) beside the synthetic ones.

Generates a cohort (default 50 studies; --quick 12; heads from ``--generator``: ``colin``, the
default, Colin27's head with tissue texture, or ``mni``, the atlas model with flat tissue
classes, ``pipelines.synth.generators``) with the content faults raised to 8 % of the
3D T1s each (motion, noise, missing and duplicated slices, wrong parameters, cut-off coverage)
and unknown scanners in 8 % of the brain studies, the archive faults at their usual rates. Then:

1. defaces it as ``cohortflow deface`` does (QC runs on defaced images in the pipeline; defacing
   keeps paths and UIDs, so each series is still known to the truth) and QCs the defaced folder,
   one process, ITK single-threaded, recording nothing;
2. QCs the delivered folder as well (--no-raw skips it);
3. measures SNR and CNR on head phantoms of known noise and contrast (``pipelines.synth.phantom``;
   always the atlas model with flat classes, whatever the generator: the true SNR and CNR
   follow from one intensity per tissue class).

The confusion table has one row per planted fault class (and the clean series), one column per
check that fired. Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _confusion(title: str, score: object) -> None:
    from cohortflow.pipelines.synth.scoring import QcScore

    assert isinstance(score, QcScore)
    checks = sorted({c for cls in score.classes for c in cls.checks})
    short = {c: c.replace("header.", "h.").replace("image.", "i.") for c in checks}
    print(f"\n{title}: series by planted fault class (rows) and check fired (columns)")
    head = f"{'class':20s} {'n':>4s} {'caught':>7s} {'reason':>7s} {'fail':>5s} "
    print(head + " ".join(f"{short[c]:>{max(5, len(short[c]))}s}" for c in checks))
    for cls in score.classes:
        row = f"{cls.name:20s} {cls.series:4d} {cls.caught:7d} {cls.decided:7d} {cls.rejected:5d} "
        print(
            row
            + " ".join(f"{cls.checks.get(c, 0) or '.':>{max(5, len(short[c]))}}" for c in checks)
        )


def _figures(prefix: str, score: object) -> list[tuple[str, str]]:
    from cohortflow.pipelines.synth.scoring import QcScore

    assert isinstance(score, QcScore)
    out = []
    worst = 1.0
    for cls in score.classes:
        if cls.name == "clean":
            continue
        if cls.series:
            rate = cls.caught / cls.series
            worst = min(worst, rate)
            out.append((f"{prefix}_{cls.name}_caught", f"{cls.caught}/{cls.series} ({rate:.0%})"))
    clean = score.of("clean")
    assert clean is not None
    out.append((f"{prefix}_faults_caught_min", f"{worst:.0%}"))
    rejected = clean.rejected / clean.series if clean.series else 0.0
    out.append((f"{prefix}_clean_series", str(clean.series)))
    out.append((f"{prefix}_clean_rejected", f"{clean.rejected} ({rejected:.1%})"))
    out.append((f"{prefix}_unmatched_series", str(score.unmatched)))
    return out


#: the real T1s with image QC, by folder of the unpacked real data (../shared/realdata): the
#: series QC must pass, except the one with a slice missing (fnndsc series 5 lacks one)
REAL_T1 = (
    "philips_adni_mprage/dicom",
    "fnndsc_adi_brain/dicom",
    "dcm_qa_xa30/In/5_anat-T1w_acq-tfl",
    "dcm_qa_xa30/In/6_anat-T1w_acq-tfl",
    *(f"decubitus_t1_4positions/{p}" for p in ("HFS", "HFP", "HFDL", "HFDR")),
)
REAL_KNOWN_FAULTS = {"fnndsc_adi_brain/dicom": "header.missing_slices"}
METRICS = ("snrd_wm", "cnr", "cjv", "qi1", "efc")


def _real_scans(
    protocols: Any,
    scanners: Any,
    brain_template: Any,
    synthetic: list[dict[str, float | str | None]],
) -> list[tuple[str, str]]:
    """Image QC of the real T1s, their metric values beside the synthetic passed T1s'."""
    from cohortflow.pipelines.quality.folder import IMAGE, qc_folder
    from tests.realdata import unpack

    try:
        data = unpack(Path(os.environ.get("COHORTFLOW_TEST_CACHE", str(ROOT / ".cache" / "test"))))
    except FileNotFoundError as exc:
        print(f"\nreal scans: {exc}")
        return [("real_t1_checked", "n/a")]

    def spread(key: str) -> str:
        values = sorted(float(m[key]) for m in synthetic if isinstance(m.get(key), int | float))
        if not values:
            return "n/a"
        return f"{statistics.median(values):.3g} ({values[0]:.3g}-{values[-1]:.3g})"

    print("\nimage QC metrics: synthetic T1s that passed, median (range)")
    for key in METRICS:
        print(f"  {key:8s} {spread(key)}")
    print("real T1s (../shared/realdata):")
    checked = 0
    false_rejects: list[str] = []
    by_policy: list[str] = []
    caught: list[str] = []
    for folder in REAL_T1:
        report = qc_folder(data / folder, protocols, scanners, lambda: brain_template)
        for r in report.series:
            if not r.role.startswith("t1"):
                continue
            checked += 1
            image = r.stage(IMAGE)
            metrics = image.metrics if image is not None else {}
            checks = [f.check for st in r.stages for f in st.findings if f.severity == "fail"]
            warned = [f.check for st in r.stages for f in st.findings if f.severity == "warn"]
            values = " ".join(
                f"{k} {metrics[k]:.3g}" for k in METRICS if isinstance(metrics.get(k), int | float)
            )
            said = " ".join([*checks, *(f"(warn {w})" for w in warned)])
            print(f"  {folder[:40]:40s} {r.role:6s} {r.verdict:5s} {values} {said}")
            expected = REAL_KNOWN_FAULTS.get(folder)
            if expected is not None:
                if expected in checks:
                    caught.append(folder)
                continue
            # an image check failing a clean real T1 is a false reject; a header policy (the
            # protocol's conformance ranges) refusing it is a decision, reported apart
            image_fails = [c for c in checks if c.startswith("image.")]
            if image_fails:
                false_rejects.append(f"{folder}:{','.join(image_fails)}")
            elif checks:
                by_policy.append(f"{folder}:{','.join(checks)}")
    return [
        ("real_t1_checked", str(checked)),
        (
            "real_clean_t1_image_rejected",
            f"{len(false_rejects)} {' '.join(false_rejects)}".rstrip(),
        ),
        ("real_t1_refused_by_header_policy", f"{len(by_policy)} {' '.join(by_policy)}".rstrip()),
        ("real_known_faults_caught", f"{len(caught)}/{len(REAL_KNOWN_FAULTS)}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="12 studies")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--no-raw", action="store_true", help="QC the defaced folder only")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "test")
    parser.add_argument(
        "--generator",
        choices=("colin", "mni"),
        default="colin",
        help="the anatomy synthetic heads are drawn from (pipelines.synth.generators)",
    )
    args = parser.parse_args()
    studies = 12 if args.quick else args.studies

    from cohortflow.flows.prefect_env import configure_itk

    configure_itk(1)  # as the command line does, before the first registration

    start = time.perf_counter()
    import numpy as np

    from cohortflow.models.scanners import load_known_scanners
    from cohortflow.models.settings import DefaceSettings
    from cohortflow.models.synth import DEFAULT_FAULT_RATES, Fault, SynthConfig
    from cohortflow.pipelines.atlas.headmodel import load_or_build
    from cohortflow.pipelines.atlas.template import load_brain_template, load_template
    from cohortflow.pipelines.deface.folder import deface_folder, reference_rule
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from cohortflow.pipelines.quality.brain import place_brain
    from cohortflow.pipelines.quality.folder import HEADER, IMAGE, qc_folder
    from cohortflow.pipelines.synth import generators
    from cohortflow.pipelines.synth.cohort import generate
    from cohortflow.pipelines.synth.phantom import qc_phantom
    from cohortflow.pipelines.synth.scoring import score_qc
    from cohortflow.qc.image import check_image

    gen = generators.get(args.generator)
    print(f"synthetic heads: generator {gen.name} ({gen.description})")
    protocols = load_protocols()
    scanners = load_known_scanners()
    brain_template = load_brain_template(args.cache)
    import ants  # noqa: F401 - imported by the first registration: a per-process cost

    place_brain  # noqa: B018 - imported with the rest: the start-up cost below is all of it
    startup = time.perf_counter() - start

    rates = dict(DEFAULT_FAULT_RATES)
    for fault in (
        Fault.MOTION,
        Fault.NOISE,
        Fault.PARTIAL_COVERAGE,
        Fault.MISSING_SLICES,
        Fault.DUPLICATE_SLICES,
        Fault.WRONG_PARAMETERS,
        Fault.UNKNOWN_SCANNER,
    ):
        rates[fault] = 0.08
    figures: list[tuple[str, str]] = []
    t1_seconds: list[float] = []
    synthetic_passed: list[dict[str, float | str | None]] = []  # image metrics of passed T1s
    with tempfile.TemporaryDirectory(prefix="cohortflow-bench-qc-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        cohort = generate(
            SynthConfig(studies=studies, seed=args.seed, fault_rates=rates),
            work / "cohort",
            args.cache,
            workers=2,
            generator=gen.name,
        )
        figures.append(("generate_seconds", f"{time.perf_counter() - t:.0f}"))
        settings = DefaceSettings()
        t = time.perf_counter()
        defaced = deface_folder(
            work / "cohort" / "dicom",
            work / "defaced",
            load_template(
                args.cache, settings.brain_margin_mm, settings.face_margin_mm, settings.brow_mm
            ),
            settings,
            reference_rule(protocols, settings.reference_rule),
        )
        figures.append(("deface_seconds", f"{time.perf_counter() - t:.0f}"))
        figures.append(
            ("series_not_defaced", str(len(defaced.series) - len(defaced.with_status("defaced"))))
        )

        runs = [("defaced", work / "defaced")]
        if not args.no_raw:
            runs.append(("raw", work / "cohort" / "dicom"))
        for name, folder in runs:
            t = time.perf_counter()
            report = qc_folder(folder, protocols, scanners, lambda: brain_template)
            wall = time.perf_counter() - t
            score = score_qc(cohort.truth, report.series)
            _confusion(f"QC of the {name} folder", score)
            figures += _figures(name, score)
            figures.append((f"{name}_series_checked", str(len(report.series))))
            figures.append((f"{name}_series_not_checked", str(len(report.not_checked))))
            figures.append((f"{name}_qc_seconds", f"{wall:.0f}"))
            for r in report.series:
                image = r.stage(IMAGE)
                header = r.stage(HEADER)
                if image is not None and header is not None:
                    t1_seconds.append(header.seconds + image.seconds)
                    if name == "raw" and r.verdict == "pass":
                        synthetic_passed.append(image.metrics)

    figures += _real_scans(protocols, scanners, brain_template, synthetic_passed)

    # phantoms: known noise (SNR of white matter) and contrast (grey matter level)
    model = load_or_build(args.cache)
    rng = np.random.default_rng(args.seed)
    policy = protocols.get("dementia").qc
    snr_errors, cnr_errors = [], []
    print("\nphantoms (atlas model, flat classes): true and measured SNRd (white matter) and CNR")
    for snr, gm in ((40, None), (20, None), (10, None), (5, None), (20, 0.55), (20, 0.35)):
        phantom = qc_phantom(model, rng, snr, gm)
        brain = place_brain(phantom.stack, phantom.volume, brain_template)
        measured = check_image(phantom.stack, (1.0, 1.0, 1.0), brain, policy).metrics
        truth = phantom.truth
        snr_err = float(measured["snrd_wm"] or 0) / truth.snrd_wm - 1
        cnr_err = float(measured["cnr"] or 0) / truth.cnr - 1
        snr_errors.append(abs(snr_err))
        cnr_errors.append(abs(cnr_err))
        print(
            f"  snr {snr:>2} gm {gm or 'default':>7}: SNRd {measured['snrd_wm']:.2f} (true "
            f"{truth.snrd_wm:.2f}, {snr_err:+.1%}), CNR {measured['cnr']:.3f} (true "
            f"{truth.cnr:.3f}, {cnr_err:+.1%})"
        )
    print()
    figures += [
        ("cpu_count", str(os.cpu_count())),
        ("studies", str(studies)),
        ("process_startup_seconds", f"{startup:.1f}"),
        ("t1_qc_seconds_median", f"{statistics.median(t1_seconds):.2f}"),
        ("t1_qc_seconds_max", f"{max(t1_seconds):.2f}"),
        ("t1_qc_count", str(len(t1_seconds))),
        ("phantom_snr_error_max", f"{max(snr_errors):.1%}"),
        ("phantom_cnr_error_max", f"{max(cnr_errors):.1%}"),
        ("generator", gen.name),
    ]
    for name, value in figures:
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
