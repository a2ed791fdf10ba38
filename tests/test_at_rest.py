"""Identified data at rest is the owner's only: the index (file, WAL, shared memory), the
archive, the restricted side, the spool and the secrets (flows/prefect_env.protect_identified,
pipelines/safeio.lock_down).

Before: ``index.sqlite`` and its WAL were 0644 (the linkage, password hashes, the audit log),
archive blobs 0444 in 0755 folders, ``restricted/`` 0755/0644: readable by every local user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from cohortflow.flows.cli import main
from cohortflow.models.settings import load_settings


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    delivered = tmp_path / "delivered"
    delivered.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm"):
        (delivered / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    saved = os.umask(0o022)  # a usual login umask: cohortflow must not rely on it
    try:
        assert main(["ingest", str(delivered)]) == 0
    finally:
        os.umask(saved)
    return tmp_path / "home"


def test_what_ingest_writes_is_the_owners_only(home: Path) -> None:
    settings = load_settings()
    index = Path(settings.index.removeprefix("sqlite:///"))
    written = [p for p in (index, Path(f"{index}-wal"), Path(f"{index}-shm")) if p.exists()]
    assert written and all(_mode(p) & 0o077 == 0 for p in written), {
        str(p): oct(_mode(p)) for p in written
    }
    blobs = [p for p in settings.archive.rglob("*") if p.is_file()]
    assert len(blobs) == 2 and all(_mode(p) == 0o400 for p in blobs)
    folders = [settings.archive, *(p for p in settings.archive.rglob("*") if p.is_dir())]
    assert all(_mode(p) & 0o077 == 0 for p in folders)
    key = Path(str(settings.pseudonym_key_source).removeprefix("file:"))
    if key.exists():
        assert _mode(key) == 0o600


def test_loosened_modes_are_repaired_at_start_with_a_message(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings()
    index = Path(settings.index.removeprefix("sqlite:///"))
    restricted = home / "restricted"
    restricted.mkdir(mode=0o755)
    restricted.chmod(0o755)
    settings.archive.chmod(0o755)
    index.chmod(0o644)
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    # the terminal wraps long lines anywhere: compared without white space
    err = "".join(capsys.readouterr().err.split())
    for path in (restricted, settings.archive, index):
        expected = f"repaired: {path} held identified data readable by others"
        assert "".join(expected.split()) in err, err
        assert _mode(path) & 0o077 == 0
    assert main(["status", "--json"]) == 0
    assert "repaired" not in capsys.readouterr().err  # nothing left to repair


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_identified_data_another_user_owns_and_others_can_read_is_refused(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings()
    index = Path(settings.index.removeprefix("sqlite:///"))
    index.chmod(0o644)
    os.chown(index, 4242, -1)
    try:
        capsys.readouterr()
        assert main(["status"]) == 2
        err = "".join(capsys.readouterr().err.split())  # wrapped anywhere by the terminal
        expected = f"refused: {index} holds identified data, is readable by others"
        assert "".join(expected.split()) in err
        assert "chmodgo-rwx" in err and _mode(index) == 0o644  # not changed behind its owner
    finally:
        os.chown(index, 0, -1)


def test_pool_workers_take_the_umask_of_the_pools_starter_not_of_the_forkserver() -> None:
    """The forkserver starts once per process, with the umask of then; its workers inherited
    that one: an ingest worker made archive folders 0755 after an earlier pool in the same
    process had started under a login umask (seen in the parallel test run)."""
    from cohortflow.pipelines.ingest.engine import _reader_pool
    from cohortflow.pipelines.safeio import current_umask

    saved = os.umask(0o022)
    try:
        with _reader_pool(1) as pool:  # starts the forkserver (if none yet) under 022
            assert pool.submit(current_umask).result() == 0o022
        os.umask(0o077)  # as the command line sets it
        with _reader_pool(1) as pool:
            assert pool.submit(current_umask).result() == 0o077
    finally:
        os.umask(saved)
