"""The archive index on a real PostgreSQL server: migrations, ingest, reruns, long values.

A throwaway server is started from the Debian ``postgresql`` package's binaries (installed by
``make setup``) in a temporary folder, on 127.0.0.1 and a free port, and removed afterwards.
PostgreSQL is required in CI: when it is missing these tests fail, they never skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select

from cohortflow.models.database import IndexDB, current_revision, head_revision, open_index
from cohortflow.models.disclosure import DISCLOSURE, NOISE_MAX, Disclosure
from cohortflow.models.scanners import load_known_scanners
from cohortflow.models.schema import Base, File, Instance, Patient, Series, Study
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.ingest.manifest import read_manifest
from tests.ingest_helpers import Archive, free_port, make_archive, open_at_once, pydicom_file

pytestmark = pytest.mark.integration

SETUP_HINT = "run `make setup` (as root it installs the Debian package postgresql)"


# --- the throwaway server ----------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"cohortflow_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{name}"


def _postgres_bin() -> Path:
    def version(initdb: Path) -> int:  # /usr/lib/postgresql/<major>/bin/initdb
        major = initdb.parent.parent.name
        return int(major) if major.isdigit() else 0

    found = sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")), key=version)
    if not found:
        pytest.fail(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): it is required "
            f"for these tests, in CI too; {SETUP_HINT}",
            pytrace=False,
        )
    return found[-1].parent  # the newest major version


def _run_as_postgres(args: list[str], cwd: Path, timeout: float = 120) -> None:
    """Run a server command; as root via runuser (PostgreSQL refuses to run as root)."""
    command = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bindir = _postgres_bin()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail(f"psycopg (the 'postgres' extra) is not installed; {SETUP_HINT}", pytrace=False)
    # Not under pytest's tmp_path: its parents are 0700 root, out of the postgres user's reach.
    root = Path(tempfile.mkdtemp(prefix="cohortflow-pg-", dir="/tmp"))
    root.chmod(0o755)
    data, sockets, logfile = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    port = free_port()
    running = False
    try:
        _run_as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            cwd=root,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "60"]
        try:
            _run_as_postgres([*start, "-o", options, "start"], cwd=root)
        except RuntimeError as exc:
            log = logfile.read_text(errors="replace") if logfile.exists() else "(no log)"
            raise RuntimeError(f"{exc}\nserver log:\n{log}") from exc
        running = True
        yield PostgresServer(
            host="127.0.0.1",
            port=port,
            user="postgres",
        )
    finally:
        if running:
            _run_as_postgres(
                [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], cwd=root
            )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_index(postgres: PostgresServer) -> Iterator[IndexDB]:
    """The index on a fresh PostgreSQL database, migrated by open_index."""
    index = open_index(postgres.create_database())
    yield index
    index.dispose()


def _archive(index: IndexDB, root: Path) -> Archive:
    return Archive(index, ArchiveStore(root / "archive"), load_known_scanners())


def _drop(folder: Path) -> Path:
    """A delivery of every kind: modern, legacy, corrupt, not DICOM, a copy, a SOP conflict."""
    folder.mkdir(parents=True)
    for name in (
        "MR_small.dcm",
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "ExplVR_BigEndNoMeta.dcm",
        "MR_truncated.dcm",
        "README.txt",
    ):
        shutil.copy(pydicom_file(name), folder / name)
    shutil.copy(pydicom_file("MR_small.dcm"), folder / "MR_small_copy.dcm")
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.WindowCenter = 1234  # same SOPInstanceUID, other content
    ds.save_as(folder / "MR_small_resent.dcm")
    return folder


def _comparable(report: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = report.model_dump()
    dumped.pop("source")
    return dumped


# --- the tests -----------------------------------------------------------------------------------


def test_migrations_match_the_models_on_postgres(pg_index: IndexDB) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert pg_index.dialect == "postgresql"
    assert current_revision(pg_index.engine) == head_revision()
    with pg_index.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    again = open_index(pg_index.url, upgrade=False)  # at head: opens without migrating
    again.dispose()


def test_ingest_reports_the_same_on_postgres_and_sqlite(tmp_path: Path, pg_index: IndexDB) -> None:
    drop = _drop(tmp_path / "drop")
    lite = make_archive(tmp_path / "sqlite")
    try:
        lite_outcome, lite_report = lite.ingest(drop, batch="b1")
    finally:
        lite.index.dispose()
    pg_outcome, pg_report = _archive(pg_index, tmp_path / "pg").ingest(drop, batch="b1")

    assert pg_outcome.seen == lite_outcome.seen == pg_outcome.processed == 8
    assert _comparable(pg_report) == _comparable(lite_report)
    # and the report is the one expected, not merely the same wrong one twice
    counts = {c.status.value: c.files for c in pg_report.by_status if c.files}
    assert counts == {"modern": 5, "legacy": 1, "corrupt": 1, "not_dicom": 1}
    assert pg_report.identical_copies == 1  # MR_small_copy.dcm
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    # MR_small (+ its copy), MR_small_implicit (other transfer syntax) and the re-sent one
    assert [(c.sop_instance_uid, c.versions) for c in pg_report.sop_conflicts] == [
        (ds.SOPInstanceUID, 3)
    ]
    assert {(Path(p.path).name, p.reason_code) for p in pg_report.problems} >= {
        ("MR_truncated.dcm", "truncated_pixel_data"),
        ("README.txt", "not_dicom"),
    }
    assert pg_report.failed and pg_report.state == "complete"
    with pg_index.session() as session:
        flags = list(
            session.scalars(
                select(Instance.sop_conflict).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
            )
        )
    assert flags == [True, True, True]


def test_rerun_on_postgres_does_no_work(tmp_path: Path, pg_index: IndexDB) -> None:
    drop = _drop(tmp_path / "drop")
    archive = _archive(pg_index, tmp_path / "pg")
    first, first_report = archive.ingest(drop, batch="b1")
    assert first.processed == 8
    again, again_report = archive.ingest(drop, batch="b1")
    assert (again.processed, again.unchanged) == (0, 8)
    assert _comparable(again_report) == _comparable(first_report)
    with pg_index.session() as session:
        rows = session.execute(select(File.path, func.count()).group_by(File.path))
        per_path = {path: count for path, count in rows}
    assert len(per_path) == 8 and set(per_path.values()) == {1}
    assert sorted(Path(p).name for p in per_path) == sorted(p.name for p in drop.iterdir())


def test_long_values_stored_on_postgres(tmp_path: Path, pg_index: IndexDB) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    long = {
        "SeriesDescription": "S" * 500,
        "InstitutionName": "I" * 100,
        "StudyDescription": "D" * 300,
        "ProtocolName": "P" * 200,
        "AccessionNumber": "A" * 40,
        "StationName": "N" * 80,
        "PatientID": "X" * 120,
        "Manufacturer": "M" * 90,
        "SoftwareVersions": "V" * 90,
    }
    uid_prefix = "1.2.826.0.1.3680043.10.1." + "9" * 80
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom: values over their VR's length
        for keyword, value in long.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID = uid_prefix + ".1"  # UIDs longer than 64 characters
        ds.SeriesInstanceUID = uid_prefix + ".2"
        ds.SOPInstanceUID = uid_prefix + ".3"
        ds.save_as(drop / "long.dcm")

    outcome, report = _archive(pg_index, tmp_path / "pg").ingest(drop, batch="long")
    assert outcome.processed == 1
    assert [(c.status.value, c.files) for c in report.by_status if c.files] == [("modern", 1)]
    with pg_index.session() as session:
        series = session.scalars(select(Series)).one()
        study = session.scalars(select(Study)).one()
        patient = session.scalars(select(Patient)).one()
        instance = session.scalars(select(Instance)).one()
    assert series.series_description == long["SeriesDescription"]
    assert series.protocol_name == long["ProtocolName"]
    assert series.station_name == long["StationName"]
    assert series.manufacturer == long["Manufacturer"]
    assert series.software_versions == long["SoftwareVersions"]
    assert series.series_instance_uid == uid_prefix + ".2"
    assert study.institution_name == long["InstitutionName"]
    assert study.study_description == long["StudyDescription"]
    assert study.accession_number == long["AccessionNumber"]
    assert study.study_instance_uid == uid_prefix + ".1"
    assert patient.patient_id == long["PatientID"]
    assert instance.sop_instance_uid == uid_prefix + ".3"


def test_accounting_order_same_on_postgres_and_sqlite(tmp_path: Path, pg_index: IndexDB) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    for study, accession in (("1", "ACC1"), ("2", None), ("3", "ACC3"), ("4", "ACC9")):
        uid = f"1.2.826.0.1.3680043.10.1.{study}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, uid + ".1", uid + ".2"
        if accession is None:
            del ds.AccessionNumber  # a study without an accession number: unexpected too
        else:
            ds.AccessionNumber = accession
        ds.save_as(drop / f"s{study}.dcm")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("AccessionNumber,ExpectedFiles\nACC1,1\nACC2,1\n", encoding="utf-8")

    lite = make_archive(tmp_path / "sqlite")
    try:
        _, lite_report = lite.ingest(drop, manifest=read_manifest(manifest))
    finally:
        lite.index.dispose()
    _, pg_report = _archive(pg_index, tmp_path / "pg").ingest(
        drop, manifest=read_manifest(manifest)
    )
    assert {line.accession_number: line.status for line in pg_report.manifest_lines} == {
        "ACC1": "complete",
        "ACC2": "missing",
    }
    assert len(pg_report.unexpected_studies) == 3
    assert _comparable(pg_report) == _comparable(lite_report)


def test_stage_results_replace_on_rerun_and_feed_outliers_on_postgres(pg_index: IndexDB) -> None:
    from cohortflow.models.stages import (
        StageRecord,
        cohort_metrics,
        record_stages,
        stage_records,
        status_counts,
    )

    def record(uid: str, status: str, snr: float) -> StageRecord:
        return StageRecord(
            series_uid=uid,
            study_uid="2.25.1",
            stage="image_qc",
            status=status,
            method_version="qc-1",
            protocol="dementia",
            manufacturer="SIEMENS",
            model="Skyra",
            reason_code=None if status == "pass" else "image.snr",
            findings=[] if status == "pass" else [{"check": "image.snr", "value": snr}],
            metrics={"snrd_wm": snr},
        )

    with pg_index.session() as session:
        record_stages(session, [record("2.25.10", "pass", 30.0), record("2.25.11", "fail", 4.0)])
    with pg_index.session() as session:
        record_stages(session, [record("2.25.11", "pass", 31.0)])  # the same key: replaced
    with pg_index.session() as session:
        rows = stage_records(session, "image_qc")
        assert [(r.series_uid, r.status) for r in rows] == [
            ("2.25.10", "pass"),
            ("2.25.11", "pass"),
        ]
        assert rows[1].metrics == {"snrd_wm": 31.0} and rows[1].findings == []
        assert cohort_metrics(session, "image_qc", "dementia", "SIEMENS", "Skyra", ["2.25.10"]) == [
            {"snrd_wm": 31.0}
        ]
        assert status_counts(session, "image_qc", "dementia") == {"pass": 2}


def test_processes_opening_a_new_index_together_migrate_it_once_on_postgres(
    postgres: PostgresServer,
) -> None:
    url = postgres.create_database()
    for done in open_at_once(url):
        assert done.returncode == 0, done.stderr[-2000:]
    index = open_index(url, upgrade=False)
    assert current_revision(index.engine) == head_revision()
    index.dispose()


def test_cohort_discovery_answers_the_same_on_postgres_and_sqlite(
    tmp_path: Path, pg_index: IndexDB
) -> None:
    """The cohort table built and queried on both backends: the same counts, cells and lists."""
    from cohortflow.models.cohort import IDENTIFIED, CohortFilter, count, list_series, save_cohort
    from cohortflow.pipelines.cohort.refresh import refresh
    from cohortflow.pipelines.dicom.keys import ProjectKey
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from tests.review_helpers import build

    sqlite_index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    key, protocols = ProjectKey(b"k" * 32, "test"), load_protocols()
    control = Disclosure(key.derived(DISCLOSURE), 3)  # the same noise on both backends
    answers = []
    try:
        for index in (sqlite_index, pg_index):
            build(index)
            first = refresh(index, key, protocols)
            assert first.rebuilt and first.series == 40
            assert refresh(index, key, protocols).series == 0  # nothing to do
            got = []
            with index.session() as session:
                for where, by in (
                    ({}, ("year", "scanner")),
                    ({"sex": "F", "age": "80.."}, ("age_band", "field_strength")),
                    ({"manufacturer": "siemens", "date": "1870..1880"}, ("sex",)),
                    ({"study_description": "dementia"}, ("protocol", "qc", "biomarkers")),
                ):
                    flt = CohortFilter.parse(where)
                    got.append(count(session, flt, by, disclosure=control).as_dict())
                    got.append(count(session, flt, by, layer=IDENTIFIED, actor="t").as_dict())
                men = CohortFilter.parse({"sex": "M"})
                got.append(list_series(session, men, disclosure=control).as_dict())
                saved = save_cohort(session, "men", men, actor="t", disclosure=control)
                got.append((saved.patients, saved.studies, saved.series))
                saved = save_cohort(session, "men.all", men, actor="t", layer=IDENTIFIED)
                got.append((saved.patients, saved.studies, saved.series))
            for answer in got:
                if isinstance(answer, dict):
                    answer.pop("seconds", None)
            answers.append(got)
    finally:
        sqlite_index.dispose()
    assert answers[0] == answers[1]
    assert answers[0][-1] == (20, 20, 20)  # the identified layer's counts are exact
    assert all(abs(n - 20) <= NOISE_MAX + 2 and n % 5 == 0 for n in answers[0][-2])


def test_a_postgresql_index_behind_waits_for_db_upgrade_and_backs_up_and_restores(
    tmp_path: Path,
    postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An index of the previous version is refused by every command but `db upgrade`, which
    pg_dumps it first; `backup` (pg_dump) restored into a new database verifies clean."""
    import json

    from cohortflow.flows.cli import main
    from cohortflow.models.database import create_index_engine, migrate
    from cohortflow.models.errors import IndexDatabaseError

    def answer() -> dict[str, Any]:
        return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]

    url = postgres.create_database()
    engine = create_index_engine(url)
    migrate(engine, "0010")  # made by the previous version
    engine.dispose()
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_INDEX_URL", url)
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    with pytest.raises(IndexDatabaseError, match=r"run `cohortflow db upgrade`"):
        open_index(url)
    assert main(["status", "--json"]) == 2
    assert "cohortflow db upgrade" in answer()["error"]["message"]
    assert main(["db", "status", "--json"]) == 1
    assert answer()["needs_db_upgrade"] is True
    assert main(["db", "upgrade", "--backup", str(tmp_path / "before"), "--json"]) == 0
    upgraded = answer()
    assert upgraded["migrated"] and upgraded["from"] == "0010"
    dump = tmp_path / "before" / "index.pgdump"
    assert dump.stat().st_size > 0 and dump.stat().st_mode & 0o777 == 0o600

    drop = tmp_path / "drop"
    drop.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm"):
        shutil.copy(pydicom_file(name), drop / name)
    assert main(["ingest", str(drop), "--workers", "1"]) == 0
    assert main(["backup", str(tmp_path / "backup")]) == 0
    # destroyed: an empty database in its place
    monkeypatch.setenv("COHORTFLOW_INDEX_URL", postgres.create_database())
    capsys.readouterr()
    assert main(["restore", str(tmp_path / "backup"), "--json"]) == 0
    restored = answer()
    assert restored["dialect"] == "postgresql" and restored["revision"] == head_revision()
    # the archive key file is the backup's; no project key was made (nothing anonymized)
    assert {k["role"]: k["outcome"] for k in restored["keys"]} == {
        "pseudonym": "not_in_backup",
        "archive": "present",
    }
    assert main(["verify", "--json"]) == 0
    verified = answer()
    assert (verified["checked"], verified["ok"]) == (2, 2)
