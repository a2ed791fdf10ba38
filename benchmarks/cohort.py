"""Cohort discovery at archive scale: a grouped count with four filters over 1M instances.

    python benchmarks/cohort.py [--quick] [--studies N] [--work DIR] [--index-url URL]

1. Fills a fresh index (SQLite in --work, or --index-url) directly with N studies (default
   50,000) of 20,000 patients: clinical MR mixes (dementia, MS, routine brain, knee, spine
   protocols; localizer, 3D T1, FLAIR, T2, DWI series; six scanners at 1.5 and 3 T, Siemens'
   2.89 T included), at least 1,000,000 instances. Headers only: what cohort discovery reads.
2. Builds the cohort table (``pipelines.cohort.refresh``, a full build) and times it, then a
   refresh that finds nothing to do (what every query pays first).
3. Times, 15 times each, median and worst: the question of the issue, "3 T dementia-protocol
   T1s of women over 65 per year and scanner" (four filters: protocol=dementia:t1_3d,
   field_strength=3, sex=F, age=65..; grouped by year and scanner) in both layers; four header
   filters without a protocol (modality, field strength, sex, age); and for context a
   free-pattern count, a date-range count by sex and age band, and a list page.

Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cohortflow.models.cohort import (  # noqa: E402
    IDENTIFIED,
    MIN_CELL_PATIENTS,
    CohortFilter,
    count,
    list_series,
)
from cohortflow.models.database import open_index  # noqa: E402
from cohortflow.models.disclosure import DISCLOSURE, Disclosure  # noqa: E402
from cohortflow.pipelines.cohort.configured import roles_of  # noqa: E402
from cohortflow.pipelines.cohort.refresh import refresh  # noqa: E402
from cohortflow.pipelines.dicom.keys import ProjectKey  # noqa: E402
from cohortflow.pipelines.dicom.protocols import load_protocols  # noqa: E402

#: (manufacturer, model, reported field strength)
SCANNERS = (
    ("SIEMENS", "Skyra", 2.89362),
    ("SIEMENS", "Aera", 1.5),
    ("GE MEDICAL SYSTEMS", "DISCOVERY MR750", 3.0),
    ("GE MEDICAL SYSTEMS", "SIGNA HDxt", 1.5),
    ("Philips Medical Systems", "Ingenia", 3.0),
    ("Philips Medical Systems", "Achieva", 1.5),
)
#: study description and series (description, kind) per protocol, with their weights
STUDIES = (
    ("MRI BRAIN DEMENTIA", "BRAIN", ("loc", "t1", "flair", "hippo", "dwi"), 0.3),
    ("MRI BRAIN MS", "BRAIN", ("loc", "t1", "flair", "t2", "t1post"), 0.2),
    ("MRI BRAIN", "BRAIN", ("loc", "t1", "flair", "dwi"), 0.3),
    ("MRI KNEE LEFT", "KNEE", ("loc", "pd", "pd", "t2"), 0.1),
    ("MRI LUMBAR SPINE", "LSPINE", ("loc", "t2", "t1_2d", "t2"), 0.1),
)
#: kind -> (SeriesDescription, MRAcquisitionType, ImageType, TR, TE, TI, flip, thickness)
SERIES = {
    "loc": ("localizer", "2D", "ORIGINAL\\PRIMARY\\LOCALIZER", 8.6, 4.0, None, 20.0, 7.0),
    "t1": ("t1_mprage_sag_p2_iso", "3D", "ORIGINAL\\PRIMARY\\M\\ND", 2300.0, 2.3, 900.0, 9.0, 1.0),
    "flair": ("t2_flair_tra", "2D", "ORIGINAL\\PRIMARY\\M\\ND", 9000.0, 81.0, 2500.0, 150.0, 5.0),
    "hippo": (
        "t2_tse_cor_hippocampus",
        "2D",
        "ORIGINAL\\PRIMARY\\M",
        6000.0,
        90.0,
        None,
        150.0,
        3.0,
    ),
    "t2": ("t2_tse_tra", "2D", "ORIGINAL\\PRIMARY\\M\\ND", 5000.0, 100.0, None, 150.0, 5.0),
    "dwi": ("ep2d_diff_tra", "2D", "ORIGINAL\\PRIMARY\\DIFFUSION", 5000.0, 90.0, None, 90.0, 5.0),
    "t1post": ("t1_mprage_sag_post", "3D", "ORIGINAL\\PRIMARY\\M", 2300.0, 2.3, 900.0, 9.0, 1.0),
    "pd": ("pd_tse_fs_cor", "2D", "ORIGINAL\\PRIMARY\\M", 3000.0, 30.0, None, 150.0, 3.0),
    "t1_2d": ("t1_tse_sag", "2D", "ORIGINAL\\PRIMARY\\M", 600.0, 10.0, None, 150.0, 4.0),
}
#: instances per series of each kind: 3D series as one enhanced multi-frame object or a few
#: classic slices, so that 50,000 studies hold just over 1,000,000 instances
INSTANCES = {"loc": 3, "t1": 3, "t1post": 2, "dwi": 6}
DEFAULT_INSTANCES = 6


def fill(url: str, studies: int, patients: int, seed: int = 5) -> dict[str, int]:
    """Insert ``studies`` studies of ``patients`` patients with their series and instances."""
    index = open_index(url)
    rng = np.random.default_rng(seed)
    stamp = dt.datetime.now(dt.UTC).isoformat()
    raw = index.engine.raw_connection()
    cursor = raw.cursor()
    mark = "%s" if index.dialect == "postgresql" else "?"

    def sql(text: str) -> str:
        return text.replace("?", mark)

    cursor.execute(
        sql(
            "INSERT INTO batches (id, name, source, created_at, started_at, state) "
            "VALUES (1, 'filled', 'benchmark', ?, ?, 'complete')"
        ),
        (stamp, stamp),
    )
    births = [
        dt.date(1925, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 75 * 365, patients)
    ]
    sexes = rng.choice(["F", "M"], patients)
    cursor.executemany(
        sql(
            "INSERT INTO patients (id, patient_key, patient_id, patient_name, patient_birth_date, "
            "patient_sex) VALUES (?, ?, ?, ?, ?, ?)"
        ),
        [
            (p + 1, f"MRN{p + 1:07d}^HOSP", f"MRN{p + 1:07d}", f"DOE^PAT{p + 1}",
             births[p].strftime("%Y%m%d"), str(sexes[p]))
            for p in range(patients)
        ],
    )  # fmt: skip
    weights = np.array([w for *_, w in STUDIES])
    kinds = rng.choice(len(STUDIES), studies, p=weights / weights.sum())
    owners = rng.integers(1, patients + 1, studies)
    scanners = rng.integers(0, len(SCANNERS), studies)
    days = rng.integers(0, 16 * 365, studies)
    study_rows, series_rows, instance_rows, blob_rows = [], [], [], []
    series_pk = instance_pk = 0
    made = {"instances": 0, "series": 0}

    def flush() -> None:
        """Write what was made so far: studies, series, then their blobs and instances."""
        cursor.executemany(
            sql(
                "INSERT INTO studies (id, study_instance_uid, patient_pk, accession_number, "
                "study_date, study_description) VALUES (?, ?, ?, ?, ?, ?)"
            ),
            study_rows,
        )
        cursor.executemany(
            sql(
                "INSERT INTO series (id, series_instance_uid, study_pk, modality, "
                "series_number, series_description, protocol_name, body_part_examined, "
                "manufacturer, manufacturer_model_name, magnetic_field_strength, "
                "repetition_time, echo_time, inversion_time, flip_angle, slice_thickness, "
                "mr_acquisition_type, image_type, scanning_sequence, sequence_variant) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            series_rows,
        )
        cursor.executemany(
            sql(
                "INSERT INTO blobs (sha256, size, first_batch_id, archived_at) VALUES (?, 1, 1, ?)"
            ),
            blob_rows,
        )
        cursor.executemany(
            sql(
                "INSERT INTO instances (id, sop_instance_uid, sha256, series_pk, instance_number, "
                "sop_conflict) VALUES (?, ?, ?, ?, ?, ?)"
            ),
            instance_rows,
        )
        for rows in (study_rows, series_rows, blob_rows, instance_rows):
            rows.clear()

    for s in range(studies):
        study = s + 1
        description, body_part, series_kinds, _ = STUDIES[int(kinds[s])]
        day = dt.date(2010, 1, 1) + dt.timedelta(days=int(days[s]))
        study_rows.append(
            (study, f"1.2.826.0.1.3680043.10.999.{study}", int(owners[s]), f"ACC{study:08d}",
             day.isoformat(), description)
        )  # fmt: skip
        manufacturer, model, tesla = SCANNERS[int(scanners[s])]
        for number, kind in enumerate(series_kinds, start=1):
            series_pk += 1
            name, acq, image_type, tr, te, ti, flip, thick = SERIES[kind]
            series_rows.append(
                (series_pk, f"1.2.826.0.1.3680043.10.999.{study}.{number}", study, "MR", number,
                 name, name, body_part, manufacturer, model, tesla, tr, te, ti, flip, thick, acq,
                 image_type, "GR\\IR" if kind.startswith("t1") and acq == "3D" else "SE",
                 "SP\\MP" if acq == "3D" else "SK")
            )  # fmt: skip
            for i in range(INSTANCES.get(kind, DEFAULT_INSTANCES)):
                instance_pk += 1
                sha = f"{instance_pk:064x}"
                blob_rows.append((sha, stamp))
                instance_rows.append(
                    (instance_pk, f"1.2.826.0.1.3680043.10.999.{study}.{number}.{i}", sha,
                     series_pk, i + 1, False)
                )  # fmt: skip
        if len(instance_rows) > 50_000:
            flush()
    flush()
    raw.commit()
    raw.close()
    index.dispose()
    made.update(instances=instance_pk, series=series_pk, studies=studies, patients=patients)
    return made


def timed(call: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median and worst milliseconds of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 studies")
    parser.add_argument("--studies", type=int)
    parser.add_argument("--work", type=Path, help="keep the index here (default: temporary)")
    parser.add_argument("--index-url", help="an empty PostgreSQL database instead of SQLite")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    studies = args.studies or (5_000 if args.quick else 50_000)
    patients = max(1, studies * 2 // 5)
    work = args.work or Path(tempfile.mkdtemp(prefix="cohortflow-cohort-"))
    work.mkdir(parents=True, exist_ok=True)
    url = args.index_url or f"sqlite:///{work / 'index.sqlite'}"
    if not args.index_url and (work / "index.sqlite").exists():
        raise SystemExit(f"{work / 'index.sqlite'} exists: give an empty --work")
    figures: dict[str, str] = {"backend": url.split(":", 1)[0]}
    started = time.perf_counter()
    made = fill(url, studies, patients)
    figures["fill_seconds"] = f"{time.perf_counter() - started:.1f}"
    figures.update({k: f"{v:,}" for k, v in made.items()})
    index = open_index(url)
    key = ProjectKey(secrets.token_bytes(32), "benchmark")
    protocols = load_protocols()
    built = refresh(index, key, protocols)
    figures["cohort_table_build_seconds"] = f"{built.seconds:.1f}"
    figures["cohort_table_series"] = f"{built.series:,}"
    median, worst, _ = timed(lambda: refresh(index, key, protocols), args.repeats)
    figures["refresh_nothing_to_do_ms"] = f"{median:.1f} (worst {worst:.1f})"
    roles = roles_of(protocols)
    control = Disclosure(key.derived(DISCLOSURE), MIN_CELL_PATIENTS)
    question = CohortFilter.parse(
        {"protocol": "dementia:t1_3d", "field_strength": "3", "sex": "F", "age": "65.."}, roles
    )
    queries: dict[str, Callable[[Any], Any]] = {
        "four_filters_by_year_scanner": lambda s: count(
            s, question, ("year", "scanner"), disclosure=control
        ),
        "four_filters_by_year_scanner_identified": lambda s: count(
            s, question, ("year", "scanner"), layer=IDENTIFIED, actor="benchmark"
        ),
        "four_header_filters_by_year_scanner": lambda s: count(
            s,
            CohortFilter.parse(
                {"modality": "MR", "field_strength": "3", "sex": "F", "age": "65.."}
            ),
            ("year", "scanner"),
            disclosure=control,
        ),
        "pattern_mprage_by_protocol": lambda s: count(
            s,
            CohortFilter.parse({"series_description": "mprage"}),
            ("protocol",),
            disclosure=control,
        ),
        "date_range_brain_by_sex_age_band": lambda s: count(
            s,
            CohortFilter.parse({"date": "1860..1865", "body_part": "^BRAIN$"}),
            ("sex", "age_band"),
            disclosure=control,
        ),
        "list_first_100_rows": lambda s: list_series(s, question, disclosure=control, limit=100),
    }
    for name, query in queries.items():
        with index.session() as session:
            median, worst, result = timed(lambda q=query, s=session: q(s), args.repeats)
        figures[f"{name}_ms"] = f"{median:.1f} (worst {worst:.1f})"
        if name == "four_filters_by_year_scanner":
            figures["four_filters_matching"] = (
                f"{result.total.patients} patients, {result.total.studies} studies, "
                f"{result.total.series} series, {len(result.cells)} cells, "
                f"{sum(1 for c in result.cells if c.suppressed)} suppressed"
            )
    with index.session() as session:
        median, worst, _ = timed(
            lambda: (
                refresh(index, key, protocols),
                count(session, question, ("year", "scanner"), disclosure=control),
            ),
            args.repeats,
        )
    figures["refresh_check_plus_four_filter_count_ms"] = f"{median:.1f} (worst {worst:.1f})"
    index.dispose()
    for name, value in figures.items():
        print(f"{name}: {value}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
