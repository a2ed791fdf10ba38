"""Header de-identification speed: cohortflow's anonymizer against dicognito, same files, same run.

Both read each file, de-identify it and write it to a new folder, one process, in turn, twice
(median per tool), on the same DICOM files of a synthetic cohort (default 5,000 files; --quick
500); then cohortflow as its command runs, one process per core (dicognito has no parallel
mode). cohortflow's figures include what it does beyond dicognito: classifying every file first
(damaged and non-DICOM files are refused with a reason) and the burned-in text check.

Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cohort(work: Path, cache: Path, files: int) -> list[Path]:
    from cohortflow.models.synth import SynthConfig
    from cohortflow.pipelines.synth.cohort import generate

    studies = max(2, files // 230 + 1)  # about 260 files a brain study
    out = work / "cohort"
    generate(SynthConfig(studies=studies, seed=11), out, cache, workers=2, overwrite=True)
    found = sorted(p for p in (out / "dicom").rglob("*.dcm"))
    return found[:files]


def _ours(paths: list[Path], out: Path) -> int:
    from cohortflow.pipelines.anonymize.deidentify import Deidentifier
    from cohortflow.pipelines.anonymize.files import anonymize_file
    from cohortflow.pipelines.anonymize.profile import load_profile
    from cohortflow.pipelines.dicom.keys import ProjectKey

    deidentifier = Deidentifier(load_profile(), ProjectKey(b"benchmark-key-0123456789", "bench"))
    written = 0
    for path in paths:
        outcome, _ = anonymize_file(path, out, deidentifier)
        written += outcome.status == "written"
    return written


def _ours_parallel(paths: list[Path], out: Path) -> int:
    from cohortflow.pipelines.anonymize.deidentify import Deidentifier
    from cohortflow.pipelines.anonymize.files import anonymize_folder
    from cohortflow.pipelines.anonymize.profile import load_profile
    from cohortflow.pipelines.dicom.keys import ProjectKey

    # the same files, as `cohortflow anonymize` takes them: a folder, one process per core
    folder = out.parent / "parallel-in"
    if not folder.exists():
        folder.mkdir()
        for i, path in enumerate(paths):
            os.link(path, folder / f"{i:06d}.dcm")
    deidentifier = Deidentifier(load_profile(), ProjectKey(b"benchmark-key-0123456789", "bench"))
    return anonymize_folder(folder, out, deidentifier, workers=os.cpu_count() or 1).written


def _dicognito(paths: list[Path], out: Path) -> int:
    import pydicom
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="benchmark")
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path, force=True)
        anonymizer.anonymize(ds)
        ds.save_as(out / f"{i:06d}.dcm")
    return len(paths)


def _time(
    run: Callable[[list[Path], Path], int], paths: list[Path], out: Path
) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = run(paths, out)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 files, one round")
    parser.add_argument("--files", type=int, help="files to de-identify (default 5000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 2, quick 1)")
    parser.add_argument("--work", type=Path, help="keep the work folder here")
    args = parser.parse_args()
    files = args.files or (500 if args.quick else 5000)
    rounds = args.rounds or (1 if args.quick else 2)
    work = args.work or Path(tempfile.mkdtemp(prefix="cohortflow-anonymize-"))
    cache = Path(os.environ.get("COHORTFLOW_TEST_CACHE") or work / "cache")
    try:
        started = time.perf_counter()
        paths = _cohort(work, cache, files)
        generate_seconds = time.perf_counter() - started
        times: dict[str, list[float]] = {"cohortflow": [], "dicognito": [], "parallel": []}
        written = 0
        for _ in range(rounds):
            for name, run in (
                ("cohortflow", _ours),
                ("dicognito", _dicognito),
                ("parallel", _ours_parallel),
            ):
                seconds, done = _time(run, paths, work / f"out-{name}")
                times[name].append(seconds)
                if name == "cohortflow":
                    written = done
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ours = statistics.median(times["cohortflow"])
    theirs = statistics.median(times["dicognito"])
    print(f"generate_seconds: {generate_seconds:.1f}")
    print(f"files: {len(paths)}")
    print(f"cohortflow_written: {written}")
    print(f"rounds: {rounds}")
    print(f"cohortflow_seconds: {ours:.2f}")
    print(f"dicognito_seconds: {theirs:.2f}")
    print(f"cohortflow_files_per_second: {len(paths) / ours:.0f}")
    print(f"dicognito_files_per_second: {len(paths) / theirs:.0f}")
    parallel = statistics.median(times["parallel"])
    print(f"cohortflow_parallel_seconds: {parallel:.2f}")
    print(f"cohortflow_parallel_files_per_second: {len(paths) / parallel:.0f}")
    print(f"cohortflow_parallel_processes: {os.cpu_count()}")
    print(f"speedup_vs_dicognito: {theirs / ours:.2f}")
    print(f"parallel_speedup_vs_dicognito: {theirs / parallel:.2f}")


if __name__ == "__main__":
    main()
