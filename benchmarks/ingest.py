"""Ingest throughput and memory against a naive baseline, and index query time at 1M instances.

    python benchmarks/ingest.py [--quick] [--files N] [--out DIR] [--keep]

1. Generates N MR slice files (default 20,000; 256 x 256, 16-bit, Explicit VR Little Endian,
   vendor-like headers) in series of 160 slices, the first 5,000 in their own folder.
2. Runs ``cohortflow ingest`` (a subprocess, as users run it) on the first 5,000 files and, in a
   fresh home, on all N; samples the resident memory of its whole process tree (main process,
   fork server, readers) every 50 ms and prints the peaks. Then ``cohortflow ingest --move`` on
   all N handed over as a spool (hard-linked into the archive instead of copied). Rates are
   files / wall time of the whole command, start-up included; "after_startup" rates use the
   time ingest itself reports. The archive is encrypted (the default); the same ingest of all N
   storing blobs as received (``archive_key_source: none``) runs alternately with it, two runs
   each, and the ratio of the faster runs' rates is printed.
3. Runs the naive baseline on the same files: a sequential loop of full ``pydicom.dcmread``,
   ``hashlib.sha256`` of the file, and one database insert (committed) per file.
4. Fills a fresh index with 1,000,000 instance rows (inserted directly: patients, studies, series,
   instances) and times selecting the series of one protocol in a one-year date range.

The generated files are written just before the runs, so both runs read them from the page cache
(this machine does not allow dropping it); dirty pages are synced to disk before each run. The
figures compare reading + hashing + parsing + archiving + indexing, not the disk.
Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
SLICES = 160


def _series_dataset(study: int, series: int, rng: np.random.Generator) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.PatientName = f"BENCH^PATIENT{study:05d}"
    ds.PatientID = f"P{study:07d}"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "F" if study % 2 else "M"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.543.{study}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.543.{study}.{series}"
    ds.AccessionNumber = f"B{study:08d}"
    ds.StudyDate = (dt.date(2020, 1, 1) + dt.timedelta(days=study)).strftime("%Y%m%d")
    ds.StudyTime = "101010"
    ds.StudyDescription = "MRI HEAD DEMENTIA"
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Prisma_fit"
    ds.SoftwareVersions = "syngo MR E11"
    ds.MagneticFieldStrength = 3
    ds.SeriesNumber = series
    ds.SeriesDescription = "t1_mprage_sag"
    ds.ProtocolName = "t1_mprage_sag_p2_iso"
    ds.BodyPartExamined = "HEAD"
    ds.RepetitionTime = 2300
    ds.EchoTime = 2.98
    ds.InversionTime = 900
    ds.FlipAngle = 9
    ds.MRAcquisitionType = "3D"
    ds.SliceThickness = 1
    ds.PixelSpacing = [1, 1]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4000, (256, 256), dtype=np.uint16).tobytes()
    return ds


def generate(out: Path, files: int, first_part: int) -> tuple[Path, Path]:
    """Write ``files`` slices: ``part1`` holds the first ``first_part``, ``part2`` the rest."""
    rng = np.random.default_rng(2026)
    written = 0
    series_index = 0
    while written < files:
        part = "part1" if written < first_part else "part2"
        study, series = divmod(series_index, 4)
        ds = _series_dataset(study, series + 1, rng)
        folder = out / part / f"ST{study:05d}" / f"SE{series + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        limit = first_part if written < first_part else files
        for number in range(1, min(SLICES, limit - written) + 1):
            ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{number}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number
            ds.ImagePositionPatient = [float(number), -128.0, 128.0]
            ds.save_as(folder / f"IM{number:05d}.dcm", enforce_file_format=True)
            written += 1
        series_index += 1
    return out / "part1", out


def _tree_rss_kib(root_pid: int) -> tuple[int, int]:
    """(RSS of the root process, RSS summed over its session) in KiB, from /proc."""
    total = root = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != root_pid:  # session id (the ingest runs in its own session)
                continue
            with open(f"/proc/{entry}/status") as handle:
                rss = next(int(x.split()[1]) for x in handle if x.startswith("VmRSS:"))
        except (OSError, StopIteration, IndexError, ValueError):
            continue
        total += rss
        if int(entry) == root_pid:
            root = rss
    return root, total


def run_ingest(
    source: Path, home: Path, move: bool = False, sealed: bool = True
) -> tuple[float, float, int, int, int]:
    """Run ``cohortflow ingest`` on ``source`` (the archive encrypted, as by default, unless
    not ``sealed``).

    Returns (wall seconds of the whole command, seconds ingest itself reported, files,
    peak main KiB, peak tree KiB).
    """
    env = {**os.environ, "COHORTFLOW_HOME": str(home), "COHORTFLOW_WORKERS": "2"}
    if not sealed:
        env["COHORTFLOW_ARCHIVE_KEY_SOURCE"] = "none"
    command = [
        sys.executable,
        "-m",
        "cohortflow",
        "ingest",
        str(source),
        "--batch",
        "bench",
        "--json",
        *(["--move"] if move else []),
    ]
    peaks = [0, 0]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            root, total = _tree_rss_kib(process.pid)
            peaks[0], peaks[1] = max(peaks[0], root), max(peaks[1], total)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode not in (0, 1):
        raise SystemExit(f"cohortflow ingest failed with status {process.returncode}")
    payload = json.loads(out)
    inner = float(payload["ingest"]["seconds"])
    return seconds, inner, int(payload["ingest"]["seen"]), peaks[0], peaks[1]


def run_baseline(source: Path, database: Path, limit: int | None) -> tuple[float, int]:
    """Sequential dcmread + sha256 + one committed insert per file."""
    connection = sqlite3.connect(database)
    connection.execute(
        "CREATE TABLE instances (path TEXT, sha256 TEXT, sop_instance_uid TEXT, "
        "series_instance_uid TEXT, study_instance_uid TEXT, modality TEXT, protocol_name TEXT)"
    )
    paths = sorted(p for p in source.rglob("*.dcm"))[:limit]
    started = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        connection.execute(
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                str(path),
                digest,
                ds.SOPInstanceUID,
                ds.SeriesInstanceUID,
                ds.StudyInstanceUID,
                ds.Modality,
                ds.ProtocolName,
            ),
        )
        connection.commit()
    seconds = time.perf_counter() - started
    connection.close()
    return seconds, len(paths)


PROTOCOLS = ("dementia", "ms", "open", "knee", "spine")


def fill_index(url: str, instances: int) -> tuple[float, int]:
    """Insert ``instances`` instance rows with their patients, studies and series."""
    from cohortflow.models.database import open_index

    index = open_index(url)
    rng = np.random.default_rng(1)
    # series sizes as in clinical MR studies: localizer 3, 2D 25, 3D 176 (mean about 50)
    sizes = (3, 25, 25, 25, 176)
    started = time.perf_counter()
    raw = index.engine.raw_connection()
    cursor = raw.cursor()
    stamp = dt.datetime.now(dt.UTC).isoformat()
    made = study = series_pk = 0
    cursor.execute(
        "INSERT INTO batches (id, name, source, created_at, started_at, state) "
        "VALUES (1, 'filled', 'benchmark', ?, ?, 'complete')",
        (stamp, stamp),
    )
    instance_rows: list[tuple[object, ...]] = []
    while made < instances:
        study += 1
        protocol = PROTOCOLS[int(rng.integers(0, len(PROTOCOLS)))]
        date = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
        cursor.execute(
            "INSERT INTO patients (id, patient_key, patient_id) VALUES (?, ?, ?)",
            (study, f"P{study}^", f"P{study}"),
        )
        cursor.execute(
            "INSERT INTO studies (id, study_instance_uid, patient_pk, accession_number, "
            "study_date, study_description) VALUES (?, ?, ?, ?, ?, ?)",
            (study, f"1.2.3.{study}", study, f"A{study}", date.isoformat(), f"MRI {protocol}"),
        )
        for number, size in enumerate(sizes, start=1):
            series_pk += 1
            cursor.execute(
                "INSERT INTO series (id, series_instance_uid, study_pk, modality, series_number, "
                "protocol_name, series_description) VALUES (?, ?, ?, 'MR', ?, ?, ?)",
                (
                    series_pk,
                    f"1.2.3.{study}.{number}",
                    study,
                    number,
                    f"{protocol}_{'t1_3d' if size == 176 else 'seq'}_{number}",
                    f"series {number}",
                ),
            )
            for i in range(size):
                made += 1
                sha = f"{made:064x}"
                instance_rows.append((made, f"1.2.3.{study}.{number}.{i}", sha, series_pk, i))
                if made >= instances:
                    break
            if made >= instances:
                break
        if len(instance_rows) >= 50_000:
            _flush(cursor, instance_rows, stamp)
    _flush(cursor, instance_rows, stamp)
    raw.commit()
    raw.close()
    seconds = time.perf_counter() - started
    index.dispose()
    return seconds, series_pk


def _flush(cursor: object, rows: list[tuple[object, ...]], stamp: str) -> None:
    execute = cursor.executemany  # type: ignore[attr-defined]
    execute(
        "INSERT INTO blobs (sha256, size, first_batch_id, archived_at) VALUES (?, 131072, 1, ?)",
        [(r[2], stamp) for r in rows],
    )
    execute(
        "INSERT INTO instances (id, sop_instance_uid, sha256, series_pk, instance_number, "
        "sop_conflict) VALUES (?, ?, ?, ?, ?, 0)",
        rows,
    )
    rows.clear()


def time_protocol_query(url: str, repeats: int = 20) -> tuple[float, float, int]:
    """Median ms of: series of protocol 'dementia' in 2019 (and with instance counts)."""
    from cohortflow.models.database import open_index
    from cohortflow.models.schema import Instance, Series, Study

    index = open_index(url)
    lo, hi = dt.date(2019, 1, 1), dt.date(2019, 12, 31)
    series_only = (
        select(Series.series_instance_uid, Series.protocol_name, Study.study_date)
        .join(Study, Study.id == Series.study_pk)
        .where(Series.protocol_name.like("dementia%"), Study.study_date.between(lo, hi))
    )
    with_counts = (
        select(Series.series_instance_uid, Study.study_date, func.count(Instance.id))
        .join(Study, Study.id == Series.study_pk)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.protocol_name.like("dementia%"), Study.study_date.between(lo, hi))
        .group_by(Series.series_instance_uid, Study.study_date)
    )
    timings: dict[str, list[float]] = {"series": [], "counts": []}
    rows = 0
    with index.engine.connect() as connection:
        for _ in range(repeats):
            for name, query in (("series", series_only), ("counts", with_counts)):
                started = time.perf_counter()
                result = connection.execute(query).all()
                timings[name].append((time.perf_counter() - started) * 1000)
                if name == "series":
                    rows = len(result)
    index.dispose()
    return statistics.median(timings["series"]), statistics.median(timings["counts"]), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 files and 100,000 rows")
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "output" / "ingest")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    files = 2_000 if args.quick else args.files
    rows = 100_000 if args.quick else args.rows
    first = min(5_000, files // 4) if args.quick else 5_000
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    figures: dict[str, str] = {}

    started = time.perf_counter()
    part1, everything = generate(args.out / "data", files, first)
    figures["generated_files"] = str(files)
    figures["generate_seconds"] = f"{time.perf_counter() - started:.1f}"
    size = sum(p.stat().st_size for p in everything.rglob("*.dcm"))
    figures["generated_megabytes"] = f"{size / 1e6:.0f}"
    os.sync()  # each run starts with no dirty pages of an earlier step being written back

    seconds, _, seen, main_kib, tree_kib = run_ingest(part1, args.out / "home-small")
    figures[f"peak_rss_main_mib_at_{seen}_files"] = f"{main_kib / 1024:.0f}"
    figures[f"peak_rss_all_processes_mib_at_{seen}_files"] = f"{tree_kib / 1024:.0f}"

    os.sync()
    seconds, inner, seen, main_kib, tree_kib = run_ingest(everything, args.out / "home-large")
    copy_rate = seen / seconds
    figures[f"peak_rss_main_mib_at_{seen}_files"] = f"{main_kib / 1024:.0f}"
    figures[f"peak_rss_all_processes_mib_at_{seen}_files"] = f"{tree_kib / 1024:.0f}"
    figures["ingest_copy_seconds"] = f"{seconds:.2f}"
    figures["ingest_copy_files_per_second"] = f"{copy_rate:.0f}"
    figures["ingest_copy_files_per_second_after_startup"] = f"{seen / inner:.0f}"

    # Encryption at rest (AES-256-GCM, on by default) against the same ingest storing blobs as
    # received: two rounds each, alternating, fresh homes; the faster run of each counts.
    rates: dict[bool, list[float]] = {True: [copy_rate], False: []}
    for round_number in range(2):
        for sealed in (False, True) if round_number == 0 else (False,):
            os.sync()
            home = args.out / f"home-{'sealed' if sealed else 'plain'}-{round_number}"
            seconds, inner, seen, _, _ = run_ingest(everything, home, sealed=sealed)
            rates[sealed].append(seen / seconds)
            shutil.rmtree(home, ignore_errors=True)
    figures["ingest_plain_archive_files_per_second"] = f"{max(rates[False]):.0f}"
    figures["ingest_encrypted_archive_files_per_second"] = f"{max(rates[True]):.0f}"
    figures["ingest_encrypted_vs_plain_ratio"] = f"{max(rates[True]) / max(rates[False]):.3f}"

    # --move: a folder handed over to cohortflow (its retrieval spool). The spool is a tree of
    # hard links to the generated files, so the generated tree stays for the baseline.
    spool = args.out / "spool"
    subprocess.run(["cp", "-al", str(everything), str(spool)], check=True)
    os.sync()
    seconds, inner, seen, _, _ = run_ingest(spool, args.out / "home-move", move=True)
    move_rate = seen / seconds
    figures["ingest_move_seconds"] = f"{seconds:.2f}"
    figures["ingest_move_files_per_second"] = f"{move_rate:.0f}"
    figures["ingest_move_files_per_second_after_startup"] = f"{seen / inner:.0f}"

    # What copying alone costs here (the copy mode's floor; the baseline stores nothing).
    os.sync()
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(everything), str(args.out / "plain-copy")], check=True)
    os.sync()
    figures["plain_cp_of_all_files_seconds"] = f"{time.perf_counter() - started:.2f}"
    shutil.rmtree(args.out / "plain-copy")

    os.sync()
    seconds, count = run_baseline(everything, args.out / "baseline.sqlite", None)
    baseline = count / seconds
    figures[f"baseline_{count}_files_seconds"] = f"{seconds:.2f}"
    figures["baseline_files_per_second"] = f"{baseline:.0f}"
    figures["ingest_copy_vs_baseline_ratio"] = f"{copy_rate / baseline:.2f}"
    figures["ingest_move_vs_baseline_ratio"] = f"{move_rate / baseline:.2f}"

    url = f"sqlite:///{args.out / 'filled.sqlite'}"
    seconds, series = fill_index(url, rows)
    figures[f"fill_{rows}_instance_rows_seconds"] = f"{seconds:.1f}"
    figures["filled_series_rows"] = str(series)
    series_ms, counts_ms, found = time_protocol_query(url)
    figures["protocol_date_range_series_found"] = str(found)
    figures["protocol_date_range_query_ms"] = f"{series_ms:.1f}"
    figures["protocol_date_range_query_with_instance_counts_ms"] = f"{counts_ms:.1f}"

    if not args.keep:
        shutil.rmtree(args.out / "data", ignore_errors=True)
        for home in ("home-small", "home-large", "home-move", "spool"):
            shutil.rmtree(args.out / home, ignore_errors=True)
    for name, value in figures.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
