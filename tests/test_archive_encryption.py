"""The identified archive encrypted at rest (issue 22): AES-256-GCM sealed blobs, a key ring kept
as the project key is, ``verify`` on the plaintext hash, and ``cohortflow archive rekey``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from cohortflow.flows.cli import main
from cohortflow.models.schema import AuditEntry
from cohortflow.pipelines.archive import sealed
from cohortflow.pipelines.archive.sealed import HEADER, SEGMENT, TAG, SealError, load_ring
from cohortflow.pipelines.archive.store import ArchiveStore
from tests.ingest_helpers import pydicom_file

WINDOW = 17  # no run of the original longer than 16 bytes may be found in the file on disk


def _longest_shared_window(original: bytes, stored: bytes) -> bool:
    """Whether any 17-byte run of ``original`` appears in ``stored``."""
    runs = {stored[i : i + WINDOW] for i in range(len(stored) - WINDOW + 1)}
    return any(original[i : i + WINDOW] in runs for i in range(len(original) - WINDOW + 1))


def _sealed_store(tmp_path: Path) -> ArchiveStore:
    return ArchiveStore(tmp_path / "archive", f"file:{tmp_path / 'secrets' / 'archive.key'}")


def _put(store: ArchiveStore, data: bytes) -> str:
    name = hashlib.sha256(data).hexdigest()
    assert store.put(name, data)
    return name


def test_a_sealed_blob_holds_no_plaintext_and_reads_back(tmp_path: Path) -> None:
    store = _sealed_store(tmp_path)
    original = pydicom_file("MR_small.dcm").read_bytes()
    name = _put(store, original)
    on_disk = store.path_for(name).read_bytes()
    assert len(on_disk) == sealed.sealed_size(len(original))
    assert not _longest_shared_window(original, on_disk)
    assert _longest_shared_window(original, original)  # the check itself finds a run
    assert store.read(name) == original and store.digest(name) == name
    assert not store.put(name, original)  # stored once: the same content is not written again
    ring = tmp_path / "secrets" / "archive.key"
    assert ring.stat().st_mode & 0o777 == 0o600
    assert store.path_for(name).stat().st_mode & 0o777 == 0o400


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT + 7])
def test_segment_edges_read_back(tmp_path: Path, size: int) -> None:
    store = _sealed_store(tmp_path)
    data = os.urandom(size)
    name = _put(store, data)
    assert store.read(name) == data
    assert store.unseal(store.path_for(name).read_bytes(), name) == data


def test_every_change_to_a_sealed_blob_fails_authentication(tmp_path: Path) -> None:
    store = _sealed_store(tmp_path)
    data = os.urandom(2 * SEGMENT + 100)
    name = _put(store, data)
    other = _put(store, os.urandom(50))
    path = store.path_for(name)
    good = path.read_bytes()
    one = SEGMENT + TAG

    def altered(stored: bytes, blob: str = name) -> str:
        path.chmod(0o600)
        path.write_bytes(stored)
        try:
            store.read(blob)
        except SealError as error:
            return error.code
        finally:
            path.write_bytes(good)
        return "read"

    flipped = bytearray(good)
    flipped[HEADER + 5] ^= 1
    assert altered(bytes(flipped)) == "changed"  # a flipped byte
    wrapped = bytearray(good)
    wrapped[30] ^= 1
    assert altered(bytes(wrapped)) == "changed"  # the wrapped data key
    assert altered(good[: HEADER + 2 * one]) == "changed"  # the last segment cut off
    assert altered(good[:-1]) == "changed"
    swapped = good[:HEADER] + good[HEADER + one : HEADER + 2 * one] + good[HEADER : HEADER + one]
    assert altered(swapped + good[HEADER + 2 * one :]) == "changed"  # segments reordered
    assert altered(store.path_for(other).read_bytes()) == "changed"  # another blob's file
    unknown = bytearray(good)
    unknown[4] ^= 1
    assert altered(bytes(unknown)) == "unreadable"  # a key id the ring does not hold
    assert store.read(name) == data


def test_a_ring_others_can_read_is_refused(tmp_path: Path) -> None:
    from cohortflow.models.errors import ArchiveKeyError

    store = _sealed_store(tmp_path)
    _put(store, b"content")
    ring = tmp_path / "secrets" / "archive.key"
    ring.chmod(0o644)
    with pytest.raises(ArchiveKeyError, match="readable by others"):
        _sealed_store(tmp_path).put("0" * 64, b"x")


def test_a_lost_ring_is_not_silently_replaced(tmp_path: Path) -> None:
    from cohortflow.models.errors import ArchiveKeyError

    store = _sealed_store(tmp_path)
    name = _put(store, b"content")
    (tmp_path / "secrets" / "archive.key").rename(tmp_path / "elsewhere.key")
    for use in (lambda s: s.read(name), lambda s: s.put("0" * 64, b"x")):
        with pytest.raises(ArchiveKeyError, match="holds sealed blobs: restore the ring"):
            use(_sealed_store(tmp_path))
    assert not (tmp_path / "secrets" / "archive.key").exists()


def test_rekey_rotates_the_key_while_the_archive_is_in_use(tmp_path: Path) -> None:
    # blobs stored before encryption was turned on, then sealed ones
    plain = ArchiveStore(tmp_path / "archive")
    legacy = os.urandom(3000)
    legacy_name = _put(plain, legacy)
    store = _sealed_store(tmp_path)
    contents = {_put(store, os.urandom(n)): None for n in (10, 5000, SEGMENT + 3)}
    for name in contents:
        contents[name] = store.read(name)  # type: ignore[assignment]
    ring_file = tmp_path / "secrets" / "archive.key"
    old_ring = load_ring(f"file:{ring_file}")
    reader = _sealed_store(tmp_path)  # another process: it read the ring before the rotation
    assert reader.read(next(iter(contents))) is not None

    report = _sealed_store(tmp_path).rekey()
    assert (report.rewrapped, report.sealed, report.failed, report.retired) == (3, 1, [], 1)
    new_ring = load_ring(f"file:{ring_file}")
    assert len(new_ring.keys) == 1 and new_ring.primary != old_ring.primary
    assert new_ring.primary[0].hex() == report.key_id
    for name, data in contents.items():
        head = store.path_for(name).read_bytes()[:HEADER]
        assert head[4:12].hex() == report.key_id
        assert reader.read(name) == data  # the stale reader reads the ring again
    sealed_legacy = store.path_for(legacy_name).read_bytes()
    assert sealed.is_sealed(sealed_legacy) and not _longest_shared_window(legacy, sealed_legacy)
    assert store.read(legacy_name) == legacy
    # a writer that read the ring before the rotation seals with the new key
    fresh = _put(reader, b"written after the rotation")
    assert store.path_for(fresh).read_bytes()[4:12].hex() == report.key_id
    # a rerun is idempotent but for the new key
    again = _sealed_store(tmp_path).rekey()
    assert (again.rewrapped, again.sealed, again.failed) == (5, 0, [])


def test_rekey_keeps_the_old_keys_when_a_blob_cannot_be_opened(tmp_path: Path) -> None:
    store = _sealed_store(tmp_path)
    good = _put(store, b"good content" * 100)
    bad = _put(store, b"bad content" * 100)
    path = store.path_for(bad)
    damaged = bytearray(path.read_bytes())
    damaged[40] ^= 0xFF  # inside the wrapped data key
    path.chmod(0o600)
    path.write_bytes(bytes(damaged))
    report = store.rekey()
    assert report.rewrapped == 1 and [b for b, _ in report.failed] == [bad]
    assert report.retired == 0
    assert len(load_ring(f"file:{tmp_path / 'secrets' / 'archive.key'}").keys) == 2
    assert store.read(good) == b"good content" * 100


def test_encrypted_by_default_through_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    drop = tmp_path / "drop"
    drop.mkdir()
    originals = {}
    for name in ("MR_small.dcm", "CT_small.dcm", "rtplan.dcm"):
        shutil.copy(pydicom_file(name), drop / name)
        originals[hashlib.sha256((drop / name).read_bytes()).hexdigest()] = name
    assert main(["ingest", str(drop), "--workers", "2"]) == 0  # sealed in worker processes
    blobs = [p for p in (home / "archive" / "blobs").rglob("*") if p.is_file()]
    assert sorted(p.name for p in blobs) == sorted(originals)
    for blob in blobs:
        stored = blob.read_bytes()
        assert sealed.is_sealed(stored)
        assert not _longest_shared_window((drop / originals[blob.name]).read_bytes(), stored)
    assert (home / "secrets" / "archive.key").stat().st_mode & 0o777 == 0o600
    capsys.readouterr()

    assert main(["archive", "rekey", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert (rotated["rewrapped"], rotated["failed"], rotated["retired_keys"]) == (3, 0, 1)
    assert main(["verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 3

    victim = blobs[0]
    flipped = bytearray(victim.read_bytes())
    flipped[HEADER + 100] ^= 0x01  # same size: only the authentication tag can tell
    victim.chmod(0o600)
    victim.write_bytes(bytes(flipped))
    assert main(["verify", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["changed"]) == (2, 1)
    assert result["problems"][0]["sha256"] == victim.name

    from cohortflow.models.database import open_index

    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    with index.session() as session:
        actions = session.scalars(select(AuditEntry.action)).all()
    index.dispose()
    assert "archive.rekey" in actions


def test_an_unusable_ring_stops_ingest_before_any_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    monkeypatch.setenv("COHORTFLOW_ARCHIVE_KEY_SOURCE", f"file:{tmp_path / 'ring.key'}")
    (tmp_path / "ring.key").write_text("not a key\n")
    (tmp_path / "ring.key").chmod(0o600)
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(pydicom_file("MR_small.dcm"), drop / "a.dcm")
    assert main(["ingest", str(drop), "--workers", "2"]) == 2
    message = "".join(capsys.readouterr().err.split())  # rich wraps it at the terminal's width
    assert "ring.keyline1:nothexadecimal" in message
    assert not (home / "archive" / "blobs").exists()


def test_readers_starting_at_once_make_one_ring(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    source = f"file:{tmp_path / 'secrets' / 'archive.key'}"
    with ThreadPoolExecutor(8) as pool:
        rings = list(pool.map(lambda _: load_ring(source), range(8)))
    assert len({ring.primary for ring in rings}) == 1
    assert not [p for p in (tmp_path / "secrets").iterdir() if p.name.startswith(".")]
