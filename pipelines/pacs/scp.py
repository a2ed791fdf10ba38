"""cohortflow's storage SCP: where C-MOVE sends, what C-GET hands back, and what `listen` takes.

Received instances are written as they came off the wire (``encoded_dataset``: no decoding, no
re-encoding) into a spool folder, ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOP>.dcm``,
through a temporary name and a rename, so a crash never leaves half a file under a final name.
The spool is handed to ingest (``--move``), which archives and removes what it indexed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import ssl
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import DeflatedExplicitVRLittleEndian

from cohortflow.pipelines.pacs.dimse import connection_handlers, new_ae
from cohortflow.pipelines.safeio import RefusedError, is_inside, link_exclusive, printable

log = logging.getLogger(__name__)

#: Success, and "out of resources" (the spool could not be written).
STORED = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
#: UIDs become folder and file names: digits in dot-separated non-empty components (".." and
#: "1..2" passed the old check, and ".." wrote outside the spool); leading zeros, invalid
#: in the standard but found in real archives, are accepted
_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Received:
    study_uid: str
    series_uid: str
    sop_uid: str
    path: Path


class Spool:
    """A folder that received instances are written into, with per-series counters."""

    def __init__(self, root: Path, on_received: Callable[[Received], None] | None = None) -> None:
        self.root = root
        self.on_received = on_received
        self.received: Counter[str] = Counter()  # SeriesInstanceUID -> instances written
        #: files put in the spool (an instance sent again with the same bytes is no new file)
        self.files = 0
        self.last_received = 0.0
        self._lock = threading.Lock()
        # Files are written beside the spool and renamed in: whoever walks the spool (ingest)
        # never sees a file being written.
        self.partial = root.parent / f"{root.name}.partial"
        root.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(exist_ok=True)

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        return self.root / study_uid / series_uid

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Put one instance in the spool under its final name (atomically, never over another
        file). The same instance sent again lands on its first copy; an instance whose UID is
        taken by other bytes is kept beside it (``<SOP>.<digest>.dcm``) for ingest to record
        both versions: nothing received is lost."""
        folder = self.series_folder(study_uid, series_uid)
        path = folder / f"{sop_uid}.dcm"
        temp = self.partial / f"{sop_uid}.{os.getpid()}.{threading.get_ident()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not is_inside(folder, self.root):  # a link planted in the spool
                raise OSError(f"{folder} leads outside the spool {self.root}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            with os.fdopen(os.open(temp, flags, 0o600), "wb") as handle:
                handle.write(data)
            try:
                placed = link_exclusive(temp, path, data)
            except RefusedError:  # the UID is taken by other bytes: keep both
                path = folder / f"{sop_uid}.{hashlib.sha256(data).hexdigest()[:16]}.dcm"
                try:
                    placed = link_exclusive(temp, path, data)
                except RefusedError as refused:
                    raise OSError(refused.reason) from None
        finally:
            temp.unlink(missing_ok=True)
        with self._lock:
            self.received[series_uid] += 1
            self.files += placed
            self.last_received = time.monotonic()
        if self.on_received is not None:
            self.on_received(Received(study_uid, series_uid, sop_uid, path))
        return path

    def prune(self) -> None:
        """Remove the empty folders ingest left behind."""
        for folder in sorted(self.root.glob("*/*"), reverse=True) + sorted(self.root.glob("*")):
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE handler: write the instance; a DIMSE status for the sender."""
        if event.context.transfer_syntax == DeflatedExplicitVRLittleEndian:
            # decoding inflates the whole data set: a few hundred kilobytes on the wire can
            # hold gigabytes (the file reader has the same check)
            from cohortflow.pipelines.dicom.reader import inflation_limit

            raw = event.request.DataSet
            buffer = raw.getbuffer() if hasattr(raw, "getbuffer") else memoryview(b"")
            size = buffer.nbytes
            if size and inflation_limit(buffer) is not None:
                log.warning(
                    "storage SCP: refused a deflated instance of %d bytes from %s that inflates "
                    "more than the limit (a decompression bomb?)",
                    size,
                    printable(event.assoc.requestor.ae_title),
                )
                return CANNOT_UNDERSTAND
        try:
            ds = event.dataset  # pydicom decodes only the elements asked for
            study_uid = str(ds.get("StudyInstanceUID", "")).strip()
            series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
            sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        except Exception as exc:
            log.warning("storage SCP: cannot read the identifiers of an instance: %s", exc)
            return CANNOT_UNDERSTAND
        if not all(len(u) <= 64 and _SAFE_UID.match(u) for u in (study_uid, series_uid, sop_uid)):
            # UIDs become file names: anything else could escape the spool
            log.warning(
                "storage SCP: refused an instance with invalid UIDs (study %r, series %r, "
                "SOP %r) from %s",
                study_uid,
                series_uid,
                sop_uid,
                event.assoc.requestor.ae_title,
            )
            return CANNOT_UNDERSTAND
        try:
            self.write(study_uid, series_uid, sop_uid, event.encoded_dataset())
        except OSError as exc:
            log.error("storage SCP: cannot write %s into %s: %s", sop_uid, self.root, exc)
            return OUT_OF_RESOURCES
        return STORED


@dataclass(frozen=True)
class ScpTls:
    """DICOM TLS for the storage SCP (PS3.15 B.1): its certificate chain and key (PEM), and
    the CA bundle callers' certificates must chain to (None: no client certificate asked)."""

    certificate: Path
    key: Path
    client_ca: Path | None = None

    def context(self) -> ssl.SSLContext:
        """TLS 1.2 or later; raises :class:`PacsError` naming the file that is wrong."""
        from cohortflow.pipelines.pacs.errors import PacsError

        try:
            mode = self.key.stat().st_mode
        except OSError as exc:
            raise PacsError(f"cannot read the TLS key {self.key}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PacsError(f"the TLS key {self.key} is readable by others: chmod 600 it")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.certificate, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(str(f) for f in (self.certificate, self.key, self.client_ca) if f)
            raise PacsError(f"cannot load the storage SCP's TLS files ({files}): {exc}") from exc
        return context


class StorageSCP:
    """A running storage SCP (a pynetdicom server thread); a context manager."""

    def __init__(
        self,
        spool: Spool,
        aet: str,
        port: int,
        host: str = "127.0.0.1",
        allowed_aets: tuple[str, ...] | None = None,
        tls: ScpTls | None = None,
    ) -> None:
        self.spool = spool
        self.aet = aet
        self.port = port
        self.host = host
        self.allowed_aets = allowed_aets  # None: any calling AE
        self.tls = tls  # None: plain DICOM
        self._server: Any = None

    def start(self) -> StorageSCP:
        from pynetdicom import AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = new_ae(self.aet)
        ae.require_called_aet = True
        if self.allowed_aets is not None:  # an association from any other AE is rejected
            ae.require_calling_aet = list(self.allowed_aets)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [*connection_handlers(), (evt.EVT_C_STORE, self.spool.handle_store)]
        tls = None if self.tls is None else self.tls.context()
        try:
            self._server = ae.start_server(
                (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=tls
            )
        except OSError as exc:
            from cohortflow.pipelines.pacs.errors import PacsError

            raise PacsError(
                f"the storage SCP cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                "(another program uses the port? set retrieve.scp_port)"
            ) from exc
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


#: Accept what the PACS stores, compressed included: the archive keeps the bytes as sent.
ALL_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still found)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
