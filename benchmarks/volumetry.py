"""Volumetry: accuracy against ground truth, scan-rescan precision, a group difference, a real
head, and the time and memory of conversion plus volumetry per 3D T1.

Synthetic subjects (``pipelines.synth.subjects``) are drawn from a head generator
(``--generator``, ``pipelines.synth.generators``): ``colin`` (the default; Colin27's head with
Otsu tissue classes in FSL BET's mask and tissue texture) or ``mni`` (the atlas model, made from
the templates the method registers, flat tissue classes: figures on it flatter the method).
They differ from the atlas by strong smooth warps (5 mm SD at 8 x 8 x 8 control points,
structures move by up to a centimetre), sizes from 1,050 to 1,850 ml, random atrophy; each is
scanned with a random head placement, a bias field and Rician noise; a third of them defaced
(face set to background, as the defacing step leaves it). Then:

1. accuracy: 40 subjects (20 control, 20 "dementia" with 3 % more of the brain turned into CSF),
   each scanned once, 3D sagittal 1 mm and 3D axial 1 x 1 x 1.2 mm in turn; errors of ICV,
   brain, GM, WM, CSF against the truth; the same subjects in a thick-slice 2D T1 (6 of them);
2. group difference: brain volume and BPF of the dementia group against the controls (Welch);
3. scan-rescan: 5 subjects scanned 4 times (sagittal 1 mm twice, axial 1.2 mm twice, each with
   its own placement and noise): coefficient of variation of ICV and brain volume;
4. a real head: Colin27 (``ch2.nii.gz`` of Debian's ``mricron-data``), against its brain mask
   made by FSL BET (``ch2bet``) and its skull-stripped tissue image (``ch2better``); with the
   ``colin`` generator the synthetic heads are this same person, so this part is not
   independent of the others there. BET's mask is a *brain* mask: it leaves out the CSF over
   the convexity, in the interhemispheric fissure and in the basal cisterns, which lie inside
   the skull (``--pictures DIR`` draws both masks on ch2). The ``colin`` generator takes it as
   its intracranial space, so its ICV truth is smaller than the intracranial space the image
   shows, most of all at the skull base: ICV errors there measure that definition too;
5. time and peak memory of ``cohortflow volumetry`` on DICOM (conversion included), per step,
   on the 3D T1s of a small synthetic cohort, one process, ITK single-threaded.

Prints its figures last, one ``name: value`` a line. ``--quick``: 8 subjects, 2 re-scanned;
``--only 3,17``: those subjects' accuracy alone; ``--rows FILE``: every measurement as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLIN = Path("/usr/share/mricron/templates")
GRIDS_3D = ("sagittal_1mm", "axial_1.2mm")
_CACHE: Path | None = None


def _init(cache: str) -> None:
    global _CACHE  # noqa: PLW0603 - one cache folder per worker process
    _CACHE = Path(cache)


def _subject_job(
    job: tuple[int, int, str, float, tuple[str, ...], str, str],
) -> list[dict[str, Any]]:
    """Make subject ``i`` of ``seed``, scan it on each grid, measure each scan."""
    import nibabel as nib
    import numpy as np

    from cohortflow.pipelines.synth import generators, subjects
    from cohortflow.pipelines.volumetry.atlas import load_atlas
    from cohortflow.pipelines.volumetry.method import Parameters
    from cohortflow.pipelines.volumetry.run import Source, measure_source

    i, seed, group, atrophy, grids, tmp, generator = job
    assert _CACHE is not None
    gen = generators.get(generator)
    model = gen.load(_CACHE)
    atlas = load_atlas(_CACHE)
    rng = np.random.default_rng([seed, i])
    icv = float(np.clip(rng.normal(1450, 130), 1050, 1850))
    # age-related atrophy within each group: 2 to 8 % of the brain (SD 1.7 %)
    base = float(rng.uniform(0.02, 0.08))
    subj = subjects.make_subject(
        model,
        rng,
        target_icv_ml=icv,
        atrophy=base + atrophy,
        warp_sd_mm=5.0,
        warp_nodes=8,
        texture_sd=gen.texture_sd,
        crop_to_model=gen.crop_to_model,
    )
    rows = []
    defaced = i % 3 == 2  # a third of the subjects as the defacing step leaves them
    for n, grid in enumerate(grids):
        img, _ = subjects.scan(model, subj, rng, grid, defaced=defaced)
        path = Path(tmp) / f"s{i:03d}_{n}_{grid}.nii.gz"
        nib.save(img, path)
        t0 = time.perf_counter()
        result = measure_source(Source(path, path.name), lambda: atlas, Parameters(), None)
        seconds = time.perf_counter() - t0
        path.unlink()
        v = result.volumes
        assert v is not None
        rows.append(
            {
                "subject": i,
                "group": group,
                "grid": grid,
                "defaced": defaced,
                "truth": subj.volumes.as_dict(),
                "measured": {
                    "icv_ml": v.icv_ml,
                    "gm_ml": v.gm_ml,
                    "wm_ml": v.wm_ml,
                    "csf_ml": v.csf_ml,
                    "brain_ml": v.brain_ml,
                    "bpf": v.bpf,
                },
                "verdict": result.verdict.value,
                "reason": result.reason.check if result.reason else None,
                "seconds": seconds,
            }
        )
    return rows


def _errors(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [100.0 * (r["measured"][key] / r["truth"][key] - 1.0) for r in rows]


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.abs(values), q))


def _adjusted(rows: list[dict[str, Any]], which: str) -> tuple[float, float]:
    """p value and size of the group effect on brain volume with ICV as a covariate."""
    import numpy as np
    from scipy import stats

    y = np.array([r[which]["brain_ml"] for r in rows])
    x = np.column_stack(
        [
            np.ones(len(rows)),
            [r["group"] == "dementia" for r in rows],
            [r[which]["icv_ml"] for r in rows],
        ]
    ).astype(float)
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = len(y) - x.shape[1]
    sigma2 = float(((y - x @ beta) ** 2).sum()) / dof
    se = float(np.sqrt(sigma2 * np.linalg.inv(x.T @ x)[1, 1]))
    p = float(2 * stats.t.sf(abs(beta[1] / se), dof))
    return p, float(beta[1])


def _draw_colin(
    image: Any, bet: Any, ours: Any, registered: Any, path: Path
) -> None:  # arrays on ch2's grid (RAS voxel order)
    """ch2 in six planes with the outlines of BET's brain mask (the colin generator's
    intracranial truth), ours (refined) and the atlas as registration placed it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = [
        ("coronal, through the ventricles", (slice(None), 120, slice(None))),
        ("coronal, through the cerebellum", (slice(None), 80, slice(None))),
        ("coronal, frontal", (slice(None), 150, slice(None))),
        ("sagittal, midline", (90, slice(None), slice(None))),
        ("sagittal, lateral", (60, slice(None), slice(None))),
        ("axial, high", (slice(None), slice(None), 120)),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(18, 12))
    for ax, (title, cut) in zip(axes.ravel(), cuts, strict=True):
        ax.imshow(image[cut].T, origin="lower", cmap="gray")
        for mask, colour in ((bet, "lime"), (ours, "red"), (registered, "cyan")):
            ax.contour(mask[cut].T, [0.5], colors=colour, linewidths=0.8)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(
        "Colin27 (ch2): green BET's brain mask (the colin generator's intracranial truth), "
        "red our intracranial mask, cyan the atlas as registered"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _colin(cache: Path, generator: str, pictures: Path | None) -> list[tuple[str, str]]:
    import nibabel as nib
    import numpy as np

    from cohortflow.pipelines.volumetry.atlas import load_atlas
    from cohortflow.pipelines.volumetry.method import Parameters, measure
    from cohortflow.pipelines.volumetry.run import read_t1

    head = COLIN / "ch2.nii.gz"
    if not head.is_file():
        print(f"\nreal head: {head} not found (Debian package mricron-data)")
        return [("colin27", "not available")]
    image = read_t1(head)
    m = measure(image, load_atlas(cache), Parameters())
    bet: Any = nib.as_closest_canonical(nib.load(COLIN / "ch2bet.nii.gz"))
    bet_mask = np.asarray(bet.dataobj) > 0
    better: Any = nib.load(COLIN / "ch2better.nii.gz")
    tissue_ml = (
        float((np.asarray(better.dataobj) > 0).sum())
        * float(np.prod(better.header.get_zooms()[:3]))
        / 1000.0
    )
    full = np.zeros(bet_mask.shape, dtype=bool)
    full[tuple(slice(a, b) for a, b in m.crop)] = m.mask
    voxel_ml = float(np.prod(bet.header.get_zooms()[:3])) / 1000.0
    bet_ml = float(bet_mask.sum()) * voxel_ml
    dice = 2.0 * float((full & bet_mask).sum()) / float(full.sum() + bet_mask.sum())
    inside_bet = float((bet_mask & ~full).sum()) * voxel_ml
    v = m.volumes
    if pictures is not None:
        registered = np.zeros(bet_mask.shape, dtype=bool)
        registered[tuple(slice(a, b) for a, b in m.crop)] = m.registered
        ch2: Any = nib.as_closest_canonical(nib.load(head))
        pictures.mkdir(parents=True, exist_ok=True)
        drawn = pictures / "colin27_masks.png"
        _draw_colin(np.asarray(ch2.dataobj), bet_mask, full, registered, drawn)
        print(f"  outlines of both masks on ch2: {drawn}")
    print("\nreal head: Colin27 (mricron-data ch2), a single subject's T1 in MNI space")
    if generator == "colin":
        print(
            "  not independent here: the synthetic heads above (generator colin) are made from "
            "this same person"
        )
    print(
        f"  ICV {v.icv_ml:.0f} ml, GM {v.gm_ml:.0f}, WM {v.wm_ml:.0f}, CSF {v.csf_ml:.0f}, "
        f"brain {v.brain_ml:.0f} ml, BPF {v.bpf:.3f}"
    )
    print(
        f"  BET brain mask (ch2bet) {bet_ml:.0f} ml; Dice with our intracranial mask "
        f"{dice:.3f}; BET mask outside ours {inside_bet:.0f} ml"
    )
    print(
        f"  skull-stripped tissue (ch2better, GM + WM) {tissue_ml:.0f} ml; ours "
        f"{v.brain_ml:.0f} ml ({100 * (v.brain_ml / tissue_ml - 1):+.1f} %)"
    )
    return [
        ("colin27_icv_ml", f"{v.icv_ml:.0f}"),
        ("colin27_dice_vs_bet_mask", f"{dice:.3f}"),
        ("colin27_bet_mask_ml", f"{bet_ml:.0f}"),
        ("colin27_brain_ml", f"{v.brain_ml:.0f}"),
        ("colin27_brain_vs_ch2better_pct", f"{100 * (v.brain_ml / tissue_ml - 1):+.1f}"),
    ]


def _timing(cache: Path, studies: int, generator: str) -> list[tuple[str, str]]:
    """``cohortflow volumetry`` on DICOM, conversion included, in this process."""
    from cohortflow.models.settings import Settings
    from cohortflow.models.synth import Fault, SynthConfig
    from cohortflow.pipelines.synth.cohort import generate
    from cohortflow.pipelines.volumetry.run import volumetry_configured

    with tempfile.TemporaryDirectory(prefix="cohortflow-bench-vol-") as tmp:
        base = Path(tmp)
        config = SynthConfig(studies=studies, seed=41, fault_rates={f: 0.0 for f in Fault})
        generate(config, base / "cohort", cache, workers=2, generator=generator)
        settings = Settings(home=base / "home", cache_dir=cache)
        times: list[float] = []
        steps: dict[str, list[float]] = {}
        for study in sorted((base / "cohort" / "dicom").iterdir()):
            t0 = time.perf_counter()
            report = volumetry_configured(settings, study, base / "out" / study.name, None)
            elapsed = time.perf_counter() - t0
            for r in report.results:
                times.append(elapsed / max(1, len(report.results)))
                for k, s in r.seconds.items():
                    steps.setdefault(k, []).append(s)
            convert = elapsed - sum(sum(r.seconds.values()) for r in report.results)
            steps.setdefault("convert (+ index and read)", []).append(convert)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    if not times:
        return [("time_per_t1_s", "no 3D T1 in the cohort")]
    print(f"\ntime per 3D T1 (DICOM in, conversion included; {len(times)} T1s, ITK 1 thread)")
    for k, values in steps.items():
        print(f"  {k:28s} median {statistics.median(values):6.2f} s")
    return [
        ("time_per_t1_median_s", f"{statistics.median(times):.1f}"),
        ("time_per_t1_max_s", f"{max(times):.1f}"),
        ("peak_memory_gb", f"{peak_gb:.2f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 subjects, 2 re-scanned")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "test")
    parser.add_argument(
        "--generator",
        choices=("colin", "mni"),
        default="colin",
        help="the anatomy synthetic heads are drawn from (pipelines.synth.generators)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: {int(v) for v in text.split(",")},
        help="only these subjects (numbers as printed, comma-separated): a look at the worst",
    )
    parser.add_argument("--rows", type=Path, help="write every measurement here (JSON)")
    parser.add_argument(
        "--pictures", type=Path, help="draw Colin27's masks (BET's and ours) into this folder"
    )
    args = parser.parse_args()
    import numpy as np
    from scipy import stats

    from cohortflow.pipelines.atlas.headmodel import load_or_build
    from cohortflow.pipelines.synth import generators

    gen = generators.get(args.generator)
    print(f"synthetic heads: generator {gen.name} ({gen.description})")
    load_or_build(args.cache)  # the method's atlas is made from it, whichever generator
    gen.load(args.cache)
    n = 8 if args.quick else 40
    rescans = 2 if args.quick else 5
    thick = 2 if args.quick else 6
    figures: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="cohortflow-bench-vol-") as tmp:
        jobs = []
        for i in range(n):
            group = "dementia" if i % 2 else "control"
            grids: tuple[str, ...] = (GRIDS_3D[(i // 2) % 2],)
            if i < rescans:
                grids = ("sagittal_1mm", "sagittal_1mm", "axial_1.2mm", "axial_1.2mm")
            elif i < rescans + thick:
                grids = (*grids, "axial_2d_5mm")
            atrophy = 0.03 if group == "dementia" else 0.0
            if args.only is None or i in args.only:
                jobs.append((i, args.seed, group, atrophy, grids, tmp, gen.name))
        t0 = time.perf_counter()
        with ProcessPoolExecutor(
            args.workers, initializer=_init, initargs=(str(args.cache),)
        ) as pool:
            rows = [r for batch in pool.map(_subject_job, jobs) for r in batch]
        wall = time.perf_counter() - t0

    # one 3D scan per subject for accuracy and the group test (the first of the re-scanned)
    first: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["grid"] in GRIDS_3D and r["subject"] not in first:
            first[r["subject"]] = r
    acc = list(first.values())
    if args.rows:
        args.rows.write_text(json.dumps(rows, indent=1))
    print(f"\naccuracy: {len(acc)} subjects, one 3D T1 each ({wall:.0f} s for all scans)")
    head = ("median |err| %", "p95 |err| %", "max |err| %", "mean err %")
    print(f"  {'':8s} {head[0]:>15s} {head[1]:>12s} {head[2]:>12s} {head[3]:>11s}")
    for key in ("icv_ml", "brain_ml", "gm_ml", "wm_ml", "csf_ml", "bpf"):
        e = _errors(acc, key)
        print(
            f"  {key:8s} {_pct(e, 50):15.2f} {_pct(e, 95):12.2f} {_pct(e, 100):12.2f} "
            f"{statistics.mean(e):11.2f}"
        )
    for label, subset in (
        ("defaced", [r for r in acc if r["defaced"]]),
        ("with face", [r for r in acc if not r["defaced"]]),
    ):
        if subset:
            print(
                f"  {label}: {len(subset)} subjects, ICV median |err| "
                f"{_pct(_errors(subset, 'icv_ml'), 50):.2f} %, brain median |err| "
                f"{_pct(_errors(subset, 'brain_ml'), 50):.2f} %"
            )
    worst = sorted(acc, key=lambda r: -abs(_errors([r], "icv_ml")[0]))[:4]
    print(
        "  largest ICV errors: "
        + "; ".join(
            f"subject {r['subject']} ({r['grid']}{', defaced' if r['defaced'] else ''}, "
            f"ICV {r['truth']['icv_ml']:.0f} ml) {_errors([r], 'icv_ml')[0]:+.1f} %"
            for r in worst
        )
    )
    verdicts = [r["verdict"] for r in acc]
    reasons = [r["reason"] for r in acc if r["reason"]]
    print(
        f"  QC verdicts: {', '.join(f'{v} {verdicts.count(v)}' for v in sorted(set(verdicts)))}"
        f"; reasons: {', '.join(f'{c} {reasons.count(c)}' for c in sorted(set(reasons)))}"
    )
    figures += [
        ("accuracy_subjects", str(len(acc))),
        ("icv_median_abs_error_pct", f"{_pct(_errors(acc, 'icv_ml'), 50):.2f}"),
        ("icv_p95_abs_error_pct", f"{_pct(_errors(acc, 'icv_ml'), 95):.2f}"),
        ("brain_median_abs_error_pct", f"{_pct(_errors(acc, 'brain_ml'), 50):.2f}"),
        ("brain_p95_abs_error_pct", f"{_pct(_errors(acc, 'brain_ml'), 95):.2f}"),
    ]
    if args.only is not None:  # a look at some subjects: no group, re-scan or timing figures
        return
    two_d = [r for r in rows if r["grid"] == "axial_2d_5mm"]
    if two_d:
        flagged = sum(r["reason"] == "volumetry.thick_slices" for r in two_d)
        print(
            f"\nthick-slice 2D T1 (5 mm): {len(two_d)} scans, flagged lower confidence: {flagged}"
        )
        for key in ("icv_ml", "brain_ml"):
            e = _errors(two_d, key)
            print(f"  {key:8s} median |err| {_pct(e, 50):.2f} %, max {_pct(e, 100):.2f} %")
        figures += [
            ("thick_2d_icv_median_abs_error_pct", f"{_pct(_errors(two_d, 'icv_ml'), 50):.2f}"),
            ("thick_2d_brain_median_abs_error_pct", f"{_pct(_errors(two_d, 'brain_ml'), 50):.2f}"),
            ("thick_2d_flagged", f"{flagged}/{len(two_d)}"),
        ]

    groups = {g: [r for r in acc if r["group"] == g] for g in ("control", "dementia")}
    print(
        f"\ngroup difference: {len(groups['control'])} controls, {len(groups['dementia'])} "
        "with 3 % more atrophy"
    )
    for key in ("brain_ml", "bpf"):
        a = [r["measured"][key] for r in groups["dementia"]]
        b = [r["measured"][key] for r in groups["control"]]
        ta = [r["truth"][key] for r in groups["dementia"]]
        tb = [r["truth"][key] for r in groups["control"]]
        test = stats.ttest_ind(a, b, equal_var=False)
        true_test = stats.ttest_ind(ta, tb, equal_var=False)
        print(
            f"  {key:8s} dementia {np.mean(a):8.3f} +- {np.std(a, ddof=1):.3f}, control "
            f"{np.mean(b):8.3f} +- {np.std(b, ddof=1):.3f}: Welch p = {test.pvalue:.2e} "
            f"(truth: p = {true_test.pvalue:.2e})"
        )
        figures.append((f"group_{key}_p", f"{test.pvalue:.2e}"))
    p_adj, diff = _adjusted(acc, "measured")
    p_true, diff_true = _adjusted(acc, "truth")
    print(
        f"  brain_ml adjusted for ICV (least squares: brain ~ group + ICV): dementia "
        f"{diff:+.1f} ml, p = {p_adj:.2e} (truth: {diff_true:+.1f} ml, p = {p_true:.2e})"
    )
    figures.append(("group_brain_ml_icv_adjusted_p", f"{p_adj:.2e}"))

    print(f"\nscan-rescan: {rescans} subjects x 4 scans (sagittal 1 mm x 2, axial 1.2 mm x 2)")
    cvs: dict[str, list[float]] = {"icv_ml": [], "brain_ml": []}
    for i in range(rescans):
        scans = [r for r in rows if r["subject"] == i and r["grid"] in GRIDS_3D]
        for key, per_subject in cvs.items():
            values = [r["measured"][key] for r in scans]
            per_subject.append(100.0 * statistics.stdev(values) / statistics.mean(values))
    for key, values in cvs.items():
        print(
            f"  {key:8s} CV per subject: {', '.join(f'{v:.2f}' for v in values)} %; "
            f"mean {statistics.mean(values):.2f} %"
        )
        figures.append(
            (f"rescan_cv_{key.removesuffix('_ml')}_pct", f"{statistics.mean(values):.2f}")
        )

    figures += _colin(args.cache, gen.name, args.pictures)
    figures += _timing(args.cache, 3 if args.quick else 6, gen.name)
    times = [r["seconds"] for r in rows if r["grid"] in GRIDS_3D]
    figures.append(("volumetry_only_median_s_2_processes", f"{statistics.median(times):.1f}"))

    figures.append(("generator", gen.name))

    print()
    for name, value in figures:
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
