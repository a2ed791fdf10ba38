"""Dementia against controls, end to end: does ``cohortflow stats compare`` find a 3 % atrophy?

    python benchmarks/stats.py [--quick] [--studies N] [--work DIR] [--cache DIR]

With ``--work``, a cohort a finished generation left there is used again when its config and
generator version are this run's (the index and the PACS are always made anew).

1. Generates N dementia-protocol studies of N different patients (default 40; --quick 12),
   about half with dementia. Brain loss is drawn from 2 to 8 % in controls and from 5 to 11 %
   in the dementia group: 3 % more on average. No file or image fault is planted, so every T1
   can be measured (the faults are the QC tests' business). Loaded into a throwaway Orthanc.
2. Runs ``cohortflow run dementia --workers 2`` as users do.
3. Writes the clinical labels a radiology report would give (diagnosis by accession number),
   then ``cohortflow export biomarkers --labels`` (CSV) and checks every volume in it against
   the index, to the last digit.
4. ``cohortflow stats compare --by diagnosis`` without covariates and with ICV, age and sex:
   n, mean and SD per group; the group's estimate with its 95 % CI, p, Holm-corrected p and
   Cohen's d of brain volume and BPF; and the model without covariates (a pooled-variance
   t-test) on the generator's true volumes.

Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scipy import stats as scipy_stats  # noqa: E402
from sqlalchemy import select  # noqa: E402

from benchmarks.end_to_end import AET, free_port, run_once  # noqa: E402
from cohortflow.models.database import open_index  # noqa: E402
from cohortflow.models.schema import Biomarker  # noqa: E402
from cohortflow.models.synth import CohortTruth, Fault, SynthConfig  # noqa: E402
from cohortflow.models.volumes import VOLUME_NAMES as VOLUMES  # noqa: E402
from cohortflow.pipelines.pacs import orthanc  # noqa: E402
from cohortflow.pipelines.pacs.dimse import PacsNode, store_files  # noqa: E402
from cohortflow.pipelines.synth.cohort import GENERATOR_VERSION, CohortResult, generate  # noqa: E402


def cohortflow(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTFLOW_", "PREFECT_"))}
    env["COHORTFLOW_HOME"] = str(home)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("cohortflow")), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"cohortflow {' '.join(args)} failed ({done.returncode})")
    return done.stdout


def _kept_cohort(folder: Path, config: SynthConfig) -> CohortResult | None:
    """The cohort an earlier run left in ``--work``, if it was made by this generator and config.

    ``ground_truth.json`` is written last, so its presence means the generation finished.
    """
    truth_file = folder / "ground_truth.json"
    if not truth_file.is_file():
        return None
    truth = CohortTruth.model_validate_json(truth_file.read_text())
    if truth.generator_version != GENERATOR_VERSION or truth.config != config:
        return None
    return CohortResult(truth=truth, out_dir=folder, truth_file=truth_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 studies")
    parser.add_argument("--studies", type=int)
    parser.add_argument("--work", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--cache", type=Path, help="head model cache (default: under --work)")
    args = parser.parse_args()
    studies = args.studies or (12 if args.quick else 40)
    work = args.work or Path(tempfile.mkdtemp(prefix="cohortflow-stats-"))
    cache = args.cache or Path(os.environ.get("COHORTFLOW_TEST_CACHE", work / "cache"))
    config = SynthConfig(
        studies=studies,
        seed=29,
        protocol_weights={"dementia": 1.0},
        fault_rates=dict.fromkeys(Fault, 0.0),
        repeat_visit_rate=0.0,
        control_atrophy=(0.02, 0.08),
        dementia_atrophy=(0.05, 0.11),
    )
    started = time.perf_counter()
    figures: dict[str, str] = {"studies": str(studies)}
    cohort = _kept_cohort(work / "cohort", config)
    if cohort is None:
        cohort = generate(config, work / "cohort", cache, workers=2, overwrite=True)
        figures["generate_seconds"] = f"{time.perf_counter() - started:.0f}"
    else:
        figures["generate_seconds"] = "0 (the cohort kept in --work from an earlier run)"
    scp_port = free_port()
    pacs_config = orthanc.OrthancConfig(
        folder=work / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", AET, "127.0.0.1", scp_port),),
    )
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    with orthanc.OrthancServer(pacs_config) as server:
        files = sorted(p for p in (cohort.out_dir / "dicom").rglob("*") if p.is_file())
        store_files(PacsNode(pacs_config.aet, "127.0.0.1", pacs_config.dicom_port), files, AET)
        seconds, outcome = run_once(home, server, scp_port, cache, workers=2)
    figures["run_seconds"] = f"{seconds:.0f}"
    figures["t1_with_biomarkers"] = f"{outcome['t1_with_biomarkers']}/{outcome['t1_series']}"

    diagnosis: dict[str, str] = {}
    truth: dict[str, list[tuple[float, float]]] = {"dementia": [], "control": []}
    for patient in cohort.truth.patients:
        for study in patient.studies:
            diagnosis[study.accession_number] = patient.group
            if study.volumes is not None and patient.group in truth:
                truth[patient.group].append((study.volumes.brain_ml, study.volumes.bpf))
    labels = work / "clinical.csv"
    labels.write_text(
        "accession_number,diagnosis\n" + "".join(f"{a},{d}\n" for a, d in diagnosis.items())
    )
    table = work / "biomarkers.csv"
    report = json.loads(
        cohortflow(
            home, "export", "biomarkers", "--labels", str(labels), "--out", str(table), "--json"
        )
    )
    rows = list(csv.DictReader(table.open()))
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    try:
        with index.session() as session:
            stored = {b.series_uid: b for b in session.scalars(select(Biomarker))}
    finally:
        index.dispose()
    exact = sum(
        all(float(r[k]) == getattr(stored[r["series"]], k) for k in VOLUMES)
        for r in rows
        if r["series"] in stored
    )
    figures["export_rows"] = str(report["rows"])
    figures["export_rows_matching_index_exactly"] = f"{exact}/{len(stored)}"
    figures["export_labels_matched"] = str(report["labels_matched"])
    for covariates in ("none", "icv,age,sex"):
        tag = "raw" if covariates == "none" else "adjusted"
        plot = work / f"compare-{tag}.png"
        result = json.loads(
            cohortflow(
                home,
                *("stats", "compare", "--by", "diagnosis", "--labels", str(labels)),
                *("--covariates", covariates, "--plot", str(plot), "--json"),
            )
        )
        for item in result["biomarkers"]:
            if item["biomarker"] not in ("brain_ml", "bpf"):
                continue
            groups = {g["group"]: g for g in item["groups"]}
            contrast = item["contrasts"][0]
            name = f"{tag}_{item['biomarker']}"
            figures[f"{name}_groups"] = ", ".join(
                f"{g} n={v['n']} {v['mean']:.4g}±{v['sd']:.3g}" for g, v in groups.items()
            )
            figures[f"{name}_estimate_percent"] = f"{contrast['percent']:+.2f}"
            figures[f"{name}_estimate_ci"] = (
                f"[{contrast['ci_low']:.4g}, {contrast['ci_high']:.4g}]"
            )
            figures[f"{name}_p"] = f"{contrast['p']:.2e}"
            figures[f"{name}_p_holm"] = f"{contrast['p_holm']:.2e}"
            figures[f"{name}_cohens_d"] = f"{contrast['cohens_d']:+.2f}"
        figures[f"{tag}_plot"] = str(plot)
    for i, name in enumerate(("brain_ml", "bpf")):
        a = [v[i] for v in truth["dementia"]]
        b = [v[i] for v in truth["control"]]
        figures[f"truth_{name}_p"] = f"{scipy_stats.ttest_ind(a, b).pvalue:.2e}"
    for name, value in figures.items():
        print(f"{name}: {value}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
