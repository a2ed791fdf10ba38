"""Every reporting command over a corpus of at least 200 hostile entries (tests/hostile_corpus):
no internal error, no stopped run, no hang, peak memory under 1 GB, and nothing outside the
test's folders changed (a planted outside tree is hashed and stat-ed before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.hostile_corpus import build
from tests.ingest_helpers import run_measured

pytestmark = [pytest.mark.slow]

BIN = Path(sys.executable).parent
#: each command's wall-clock bound: a hang fails the test instead of stalling the suite
BOUND_S = 600
MEMORY_LIMIT = 1 << 30

#: (command, its arguments after the corpus folder)
COMMANDS = {
    "ingest": ["ingest", "{corpus}", "--json"],
    "anonymize": ["anonymize", "{corpus}", "{out}/anonymized", "--json"],
    "deface": ["deface", "{corpus}", "{out}/defaced", "--json"],
    "qc": ["qc", "{corpus}", "--no-record", "--json"],
    "convert": ["convert", "{corpus}", "{out}/nifti", "--all", "--no-record", "--json"],
    "volumetry": ["volumetry", "{corpus}", "--out", "{out}/volumetry", "--no-record", "--json"],
}


def _snapshot(tree: Path) -> dict[str, tuple[str, int, int]]:
    """path -> (sha256, mode, size) of every file under ``tree`` (links not followed)."""
    out = {}
    for path in sorted(tree.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[str(path)] = (digest, st.st_mode, st.st_size)
    return out


def _entries(folder: Path) -> int:
    """What a command is given: every entry but the folders it walks into (a link to a folder
    is an entry: it is not followed)."""
    count = 0
    for root, dirs, files in os.walk(folder):
        count += len(files) + sum(1 for d in dirs if os.path.islink(os.path.join(root, d)))
    return count


def _accounted(command: str, report: dict[str, Any]) -> int:
    """The entries a command's --json report accounts for."""
    if command == "ingest":
        return int(report["report"]["files"])
    if command == "anonymize":
        return int(report["written"]) + sum(
            len(report[k]) for k in ("excluded", "skipped", "failed")
        )
    if command == "deface":
        return sum(s["instances"] for s in report["series"]) + len(report["skipped"])
    if command == "volumetry":
        return int(report["files"]) + len(report["skipped"])
    others = {"qc": "not_checked", "convert": "not_converted"}[command]
    in_series = sum(s["files"] for s in (*report["series"], *report[others]))
    return int(in_series) + len(report["skipped"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"  # what links point to: must be untouched
    outside.mkdir()
    (outside / "project.key").write_bytes(b"secret key material")
    (outside / "project.key").chmod(0o600)
    (outside / "notes.dcm").write_bytes(b"not yours")
    folder = base / "corpus"
    kinds = build(folder)
    (folder / "link_key.dcm").symlink_to(outside / "project.key")
    (folder / "link_outside_dir").symlink_to(outside, target_is_directory=True)
    kinds["symlink_outside"] += 2
    return {"base": base, "folder": folder, "outside": outside, "kinds": kinds}


def test_the_corpus_covers_every_case(corpus: dict[str, Any]) -> None:
    kinds = corpus["kinds"]
    assert sum(kinds.values()) >= 200
    for kind in ("byte_flip", "truncated", "huge_length", "deep_nesting", "no_delimiter",
                 "huge_pixels", "bad_charset", "bad_vr", "bad_transfer_syntax", "deflate_bomb",
                 "symlink_inside", "symlink_outside", "fifo", "empty", "directory_named_dcm",
                 "odd_name", "pydicom_test_file"):  # fmt: skip
        assert kinds[kind] >= 1, kind


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_accounts_for_the_corpus_within_bounds(
    corpus: dict[str, Any], command: str, tmp_path: Path, figures: Any
) -> None:
    before = _snapshot(corpus["outside"])
    corpus_before = {p: v for p, v in _snapshot(corpus["folder"]).items() if "fifo" not in p}
    home = tmp_path / "home"
    args = [a.format(corpus=corpus["folder"], out=tmp_path / "out") for a in COMMANDS[command]]
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's code, not another's
    env = {**os.environ, "COHORTFLOW_HOME": str(home), "PYTHONPATH": root}
    started = time.monotonic()
    done, peak = run_measured([str(BIN / "cohortflow"), *args], env=env, timeout=BOUND_S)
    seconds = time.monotonic() - started
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 2: usage, other: a crash
    report = json.loads(done.stdout)  # the --json document parses
    text = json.dumps(report)
    assert "internal_error" not in text, [
        line for line in text.split("{") if "internal_error" in line
    ][:5]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert peak < MEMORY_LIMIT, f"{command}: peak {peak / 2**20:.0f} MB"
    assert _snapshot(corpus["outside"]) == before  # nothing outside the folders touched
    corpus_after = {p: v for p, v in _snapshot(corpus["folder"]).items() if "fifo" not in p}
    assert corpus_after == corpus_before  # the input itself is left as it was
    # every entry is in the report: in a series (counted there) or named with its reason
    assert _accounted(command, report) == _entries(corpus["folder"]), command
    figures(
        f"hostile corpus ({sum(corpus['kinds'].values())} entries), {command}: exit "
        f"{done.returncode}, {seconds:.1f} s, peak {peak / 2**20:.0f} MB"
    )


def _push_raw(port: int, path: Path) -> str:
    """C-STORE one file as its bytes are (pynetdicom streams a file's data set undecoded):
    the SCP's status in hex, or why the sender could not offer it."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    try:
        meta = read_file_meta_info(path)
        sop, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        ae = AE(ae_title="HOSTILE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(sop, syntax)
    except Exception as exc:  # the sender cannot even offer it: nothing reaches the SCP
        return f"not sent: {type(exc).__name__}"
    assoc = ae.associate("127.0.0.1", port, ae_title="COHORTFLOW")
    if not assoc.is_established:
        return "no association"
    try:
        status = assoc.send_c_store(path)
        return f"0x{int(status.Status):04X}" if status else "no response"
    except Exception as exc:  # e.g. no accepted context for a transfer syntax it refused
        return f"not sent: {type(exc).__name__}"
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.integration
def test_listen_takes_the_corpus_over_dicom_networking_within_bounds(
    corpus: dict[str, Any], tmp_path: Path, figures: Any
) -> None:
    import signal
    import socket

    from tests.ingest_helpers import finish_measured, free_port, start_measured

    before = _snapshot(corpus["outside"])
    home = tmp_path / "home"
    port = free_port()
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "COHORTFLOW_HOME": str(home),
        "PYTHONPATH": root,
        "COHORTFLOW_RETRIEVE__CALLING_AETS": '["HOSTILE"]',
    }
    args = ["listen", "--port", str(port), "--idle", "1", "--seconds", str(BOUND_S), "--json"]
    started = time.monotonic()
    process = start_measured([str(BIN / "cohortflow"), *args], env=env)
    try:
        while True:  # until the SCP accepts connections
            assert process.poll() is None, process.communicate()[1][-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() - started < 60, "listen did not start"
                time.sleep(0.2)
        files = sorted(
            Path(r) / f
            for r, _, names in os.walk(corpus["folder"])
            for f in names
            if (Path(r) / f).is_file() and not (Path(r) / f).is_symlink()
        )
        outcomes = {str(p): _push_raw(port, p) for p in files}
        # after everything hostile, the SCP still takes a clean instance
        assert _push_raw(port, corpus["folder"] / "clean.dcm") == "0x0000"
        time.sleep(2.5)  # past --idle: the spool is ingested
    finally:
        process.send_signal(signal.SIGTERM)
        done, peak = finish_measured(process, timeout=BOUND_S)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    stored = sum(1 for s in outcomes.values() if s == "0x0000") + 1  # and the clean one
    assert outcome["received"] == stored
    # every file the spool received was ingested: nothing lost (an instance sent again with
    # the same bytes is one file; other bytes under a UID received before are kept beside it)
    assert outcome["ingested"] == outcome["files"] <= outcome["received"]
    assert peak < MEMORY_LIMIT, f"listen: peak {peak / 2**20:.0f} MB"
    assert _snapshot(corpus["outside"]) == before
    spool = home / "spool"
    assert not [p for p in spool.rglob("*") if p.is_file()]  # the spool was handed over
    assert {p.name for p in (home / "archive").rglob("*") if p.is_file()}  # into the archive
    refused = sum(1 for s in outcomes.values() if s.startswith("0x") and s != "0x0000")
    not_sent = len(outcomes) - stored + 1 - refused
    figures(
        f"hostile corpus through listen: {len(outcomes)} files pushed, {stored - 1} stored "
        f"({outcome['files']} distinct files with the clean one, all ingested), "
        f"{refused} refused by the SCP, {not_sent} not offered or not negotiated; "
        f"{seconds:.1f} s, peak {peak / 2**20:.0f} MB"
    )
