"""Running cohortflow as an installation: `db status` / `db upgrade` (a backup first), `backup`
and `restore` round trips (back up, destroy, restore, `verify` clean), the refusal of a
PostgreSQL index behind the newest schema, the systemd units and `pacs run`.

The same on a real PostgreSQL server: tests/test_index_postgres.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from cohortflow.flows.cli import build_parser, main
from cohortflow.models.database import (
    SchemaState,
    create_index_engine,
    migrate,
    needs_explicit_upgrade,
    open_index,
)
from cohortflow.models.errors import IndexDatabaseError
from tests.ingest_helpers import free_port

OLDER = "0010"  # a schema revision before the newest


def _json(capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command said on stderr, its lines joined (rich wraps them)."""
    return " ".join(capsys.readouterr().err.split())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    monkeypatch.delenv("COHORTFLOW_INDEX_URL", raising=False)
    return tmp_path / "home"


def _archive_with_linkage(tmp_path: Path) -> None:
    """An archive (sealed blobs: the archive key) whose anonymization wrote linkage and keyed
    audit entries (the project key)."""
    delivered = tmp_path / "in"
    delivered.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm", "rtplan.dcm"):
        (delivered / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    assert main(["ingest", str(delivered), "--batch", "b1", "--workers", "1"]) == 0
    assert main(["anonymize", str(delivered), str(tmp_path / "out")]) in (0, 1)


def test_backup_destroy_restore_and_verify_is_clean(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _archive_with_linkage(tmp_path)
    dest = tmp_path / "backup"
    capsys.readouterr()
    assert main(["backup", str(dest), "--json"]) == 0
    done = capsys.readouterr()
    report = json.loads(done.out)
    assert report["holds_keys"] and "re-identification key" in report["warning"]
    assert "re-identification key" in " ".join(done.err.split())  # on the terminal too
    assert {k["role"]: k["outcome"] for k in report["keys"]} == {
        "pseudonym": "copied",
        "archive": "copied",
    }
    # owner-only, all of it; the keys as their files held them
    assert _mode(dest) == 0o700 and _mode(dest / "keys") == 0o700
    for path in (dest / "index.sqlite", dest / "MANIFEST.json", *(dest / "keys").iterdir()):
        assert _mode(path) == 0o600, path
    secrets = home / "secrets"
    assert (dest / "keys" / "project.key").read_bytes() == (secrets / "project.key").read_bytes()
    # the copy is one file (no WAL), at the index's schema
    with sqlite3.connect(dest / "index.sqlite") as copy:
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        files = copy.execute("SELECT count(*) FROM files").fetchone()[0]
    assert files == 3

    # destroyed: the index, its WAL and the keys
    for path in home.glob("index.sqlite*"):
        path.unlink()
    shutil.rmtree(secrets)
    assert main(["restore", str(dest), "--json"]) == 0
    restored = _json(capsys)
    assert {k["role"]: k["outcome"] for k in restored["keys"]} == {
        "pseudonym": "restored",
        "archive": "restored",
    }
    assert _mode(secrets) == 0o700 and _mode(secrets / "project.key") == 0o600
    assert main(["verify", "--json"]) == 0
    verified = _json(capsys)
    assert (verified["checked"], verified["ok"], verified["untracked"]) == (3, 3, 0)
    assert main(["audit", "verify", "--json"]) == 0  # the chain, keyed by the restored key
    chain = _json(capsys)
    assert chain["intact"] and chain["unkeyed"] == 0

    # an index there is not replaced without --overwrite; a different key is never replaced
    assert main(["restore", str(dest), "--no-keys"]) == 2
    assert "--overwrite" in _said(capsys)
    (secrets / "project.key").chmod(0o600)
    (secrets / "project.key").write_text("ab" * 32 + "\n")
    assert main(["restore", str(dest), "--overwrite", "--json"]) == 2
    assert "differs from the backup's" in _json(capsys)["error"]["message"]
    # a changed backup is refused
    with (dest / "index.sqlite").open("ab") as tampered:
        tampered.write(b"x")
    assert main(["restore", str(dest), "--overwrite", "--no-keys"]) == 2
    assert "changed since the backup" in _said(capsys)


def test_backup_can_leave_the_keys_out_and_refuses_a_folder_in_use(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backup", str(tmp_path / "b"), "--json"]) == 2  # no index yet
    assert "no index to back up" in _json(capsys)["error"]["message"]
    open_index(f"sqlite:///{home / 'index.sqlite'}").dispose()
    assert main(["backup", str(tmp_path / "b"), "--no-keys", "--json"]) == 0
    report = _json(capsys)
    assert not report["holds_keys"] and report["warning"] is None
    assert not (tmp_path / "b" / "keys").exists()
    assert main(["backup", str(tmp_path / "b")]) == 2  # not empty
    assert "not an empty folder" in _said(capsys)


def test_db_upgrade_backs_the_index_up_then_migrates_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{home / 'index.sqlite'}"
    engine = create_index_engine(url)
    migrate(engine, OLDER)  # an index made by the previous version
    engine.dispose()
    assert main(["db", "status", "--json"]) == 1
    status = _json(capsys)
    assert (status["current"], status["at_head"], status["needs_db_upgrade"]) == (
        OLDER,
        False,
        False,  # SQLite: any command migrates it
    )
    assert main(["db", "upgrade", "--json"]) == 0
    upgraded = _json(capsys)
    assert upgraded["migrated"] and upgraded["from"] == OLDER and upgraded["to"] == status["head"]
    backup = Path(upgraded["backup"]["folder"])
    assert backup.parent == home / "backups" and not (backup / "keys").exists()
    with sqlite3.connect(backup / "index.sqlite") as copy:  # the copy is the index before
        assert copy.execute("SELECT version_num FROM alembic_version").fetchone() == (OLDER,)
    assert main(["db", "status", "--json"]) == 0
    capsys.readouterr()
    assert main(["db", "upgrade", "--json"]) == 0  # at head: nothing copied, nothing changed
    again = _json(capsys)
    assert not again["migrated"] and again["backup"] is None
    # the copy restores (over the migrated index) and migrates again
    assert main(["restore", str(backup), "--overwrite", "--json"]) == 0
    assert _json(capsys)["revision"] == OLDER
    assert main(["db", "status", "--json"]) == 1
    capsys.readouterr()
    assert main(["db", "upgrade", "--no-backup", "--json"]) == 0
    assert _json(capsys)["backup"] is None


def test_only_a_postgresql_index_behind_the_schema_waits_for_db_upgrade(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The policy on its own (the real server: tests/test_index_postgres.py), and the message a
    refused index gives."""

    def state(dialect: str, current: str | None) -> SchemaState:
        return SchemaState("db", dialect, current, "0011", known=True)

    assert needs_explicit_upgrade(state("postgresql", OLDER))
    assert not needs_explicit_upgrade(state("postgresql", None))  # empty: tables made
    assert not needs_explicit_upgrade(state("postgresql", "0011"))
    assert not needs_explicit_upgrade(state("sqlite", OLDER))
    url = f"sqlite:///{home / 'index.sqlite'}"
    engine = create_index_engine(url)
    migrate(engine, OLDER)
    engine.dispose()
    with pytest.raises(IndexDatabaseError, match=r"run `cohortflow db upgrade`"):
        open_index(url, upgrade=False)
    open_index(url).dispose()  # SQLite: migrated as it opens


# --- the services --------------------------------------------------------------------------------


def _exec_start(unit: Path) -> list[str]:
    lines = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, unit
    return shlex.split(lines[0].removeprefix("ExecStart="))


def test_services_install_writes_units_whose_commands_exist(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each unit's ExecStart names an installed executable and a command that parses;
    `systemd-analyze verify` accepts the units when it is installed (the units are not
    started: no systemd runs in the test containers)."""
    system, user = tmp_path / "system", tmp_path / "user"
    assert main(["services", "install", "--dir", str(system), "--json"]) == 0
    written = _json(capsys)["units"]
    assert main(["services", "install", "--dir", str(user), "--user"]) == 0
    assert main(["services", "install", "--dir", str(system)]) == 0  # the same again: fine
    capsys.readouterr()
    assert set(written) == {
        "cohortflow-dashboard.service",
        "cohortflow-listen.service",
        "cohortflow-orthanc.service",
        "cohortflow-prefect-server.service",
        "cohortflow-worker.service",
    }
    parser = build_parser()
    for name in written:
        for folder in (system, user):
            text = (folder / name).read_text()
            assert f'Environment="COHORTFLOW_HOME={home}"' in text
            assert "UMask=0077" in text
            assert ("User=" in text) == (folder == system), name
            assert ("default.target" in text) == (folder == user), name
        argv = _exec_start(system / name)
        assert os.access(argv[0], os.X_OK), argv
        if Path(argv[0]).name == "cohortflow":
            args = parser.parse_args(argv[1:])  # exits (fails the test) when it does not parse
            assert callable(args.handler)
        else:  # prefect: its own command line answers the same arguments
            done = subprocess.run(
                [*argv, "--help"], capture_output=True, text=True, timeout=120, check=False
            )
            assert done.returncode == 0, done.stderr[-2000:]
    worker = (system / "cohortflow-worker.service").read_text()
    code = Path(worker.split("COHORTFLOW_CODE=")[1].split('"')[0])
    assert (code / "flows" / "protocol_flow.py").is_file()  # prefect.yaml's pull step
    # a unit someone changed is not replaced silently
    (system / "cohortflow-listen.service").write_text("[Service]\nExecStart=/bin/true\n")
    assert main(["services", "install", "--dir", str(system)]) == 2
    assert "--overwrite" in _said(capsys)
    assert main(["services", "install", "--dir", str(system), "--overwrite"]) == 0

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units' syntax was not verified")
    for folder in (system, user):
        done = subprocess.run(
            [analyze, "verify", "--man=no", *sorted(str(p) for p in folder.glob("*.service"))],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_pacs_run_is_orthanc_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    """The ExecStart of cohortflow-orthanc.service: the process becomes Orthanc (the service
    manager's signals reach it), serves, and ends on SIGTERM."""
    http = free_port()
    env = {
        **os.environ,
        "COHORTFLOW_HOME": str(tmp_path / "home"),
        "COHORTFLOW_ORTHANC__HTTP_PORT": str(http),
        "COHORTFLOW_ORTHANC__DICOM_PORT": str(free_port()),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cohortflow", "pacs", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=2)
            except urllib.error.HTTPError as answer:  # it answers: 401 without the password
                assert answer.code == 401
                break
            except OSError:
                assert time.monotonic() < deadline, "Orthanc did not answer"
                time.sleep(0.3)
        assert Path(f"/proc/{process.pid}/exe").resolve().name == "Orthanc"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    config = tmp_path / "home" / "orthanc" / "orthanc.json"
    assert _mode(config) == 0o600
