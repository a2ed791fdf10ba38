"""DICOM networking with a PACS (pynetdicom): verification and storage so far.

Every association has explicit timeouts; failures become ``PacsError`` with the node and the
reason, never a hang. Files are classified with the ingest reader first, so what is not DICOM or
is damaged is reported and skipped instead of being sent.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from pipelines.pacs.errors import PacsError, PacsUnavailableError

log = logging.getLogger(__name__)

ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 60.0
NETWORK_TIMEOUT = 60.0
SUCCESS = 0x0000


@dataclass(frozen=True)
class PacsNode:
    """A DICOM node: the called AE title, host and port."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


@dataclass
class StoreResult:
    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # not DICOM or damaged


def _ae(local_aet: str) -> object:
    from pynetdicom import AE

    ae = AE(ae_title=local_aet)
    ae.acse_timeout = ACSE_TIMEOUT
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.network_timeout = NETWORK_TIMEOUT
    ae.maximum_pdu_size = 0  # no limit on what we receive; the peer limits what we send
    return ae


def _no_delay(event: Any) -> None:
    """Disable Nagle's algorithm on a new connection (pynetdicom has no option for it).

    With it on, every C-STORE waits for a delayed acknowledgement: 50 ms a file on loopback
    instead of 5.
    """
    raw = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _handlers() -> list[tuple[Any, Callable[[Any], None]]]:
    from pynetdicom import evt

    return [(evt.EVT_CONN_OPEN, _no_delay)]


def echo(node: PacsNode, local_aet: str) -> None:
    """C-ECHO; PacsUnavailableError if the node cannot be reached or refuses."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = _ae(local_aet)
    ae.add_requested_context(Verification)  # type: ignore[attr-defined]
    assoc = ae.associate(  # type: ignore[attr-defined]
        node.host, node.port, ae_title=node.aet, evt_handlers=_handlers()
    )
    if not assoc.is_established:
        raise PacsUnavailableError(f"{node} refused or did not answer the association")
    try:
        status = assoc.send_c_echo()
        if not status or status.Status != SUCCESS:
            raise PacsError(f"C-ECHO to {node} failed: {status}")
    finally:
        assoc.release()


def store_files(
    node: PacsNode,
    paths: Sequence[Path],
    local_aet: str,
    progress: Callable[[int], None] | None = None,
) -> StoreResult:
    """C-STORE the DICOM files among ``paths`` to ``node`` over one association."""
    from pipelines.ingest.reader import classify  # the header only: no hash needed here

    result = StoreResult()
    sendable: list[tuple[Path, str, str]] = []
    for path in paths:
        try:
            verdict = classify(path.read_bytes())
        except OSError as exc:
            result.skipped.append((str(path), f"cannot be read: {exc.strerror or exc}"))
            continue
        header = verdict.header
        if not verdict.status.is_dicom or header is None or not header.sop_class_uid:
            result.skipped.append((str(path), verdict.reason or verdict.status.value))
            continue
        syntax = header.transfer_syntax_uid or pydicom.uid.ImplicitVRLittleEndian
        sendable.append((path, header.sop_class_uid, syntax))
    contexts = sorted({(sop, syntax) for _, sop, syntax in sendable})
    if len(contexts) > 128:
        raise PacsError(f"{len(contexts)} SOP class / transfer syntax pairs: more than 128")
    if not sendable:
        return result
    ae = _ae(local_aet)
    for sop, syntax in contexts:
        ae.add_requested_context(sop, [syntax])  # type: ignore[attr-defined]
    assoc = ae.associate(  # type: ignore[attr-defined]
        node.host, node.port, ae_title=node.aet, evt_handlers=_handlers()
    )
    if not assoc.is_established:
        raise PacsUnavailableError(f"{node} refused or did not answer the storage association")
    try:
        for path, _sop, syntax in sendable:
            try:
                ds = pydicom.dcmread(path, force=True)
                if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
                    ds.file_meta = ds.file_meta if ds.file_meta else FileMetaDataset()
                    ds.file_meta.TransferSyntaxUID = UID(syntax)  # legacy: the encoding read
                status = assoc.send_c_store(ds)
            except Exception as exc:  # one bad file must not stop the others
                result.failed.append((str(path), f"{type(exc).__name__}: {exc}"))
                continue
            if status and status.Status in (SUCCESS, 0xB000, 0xB007, 0xB006):
                result.sent += 1
            else:
                code = f"0x{status.Status:04X}" if status else "no answer"
                result.failed.append((str(path), f"C-STORE status {code}"))
            if progress is not None:
                progress(1)
            if not assoc.is_established:
                raise PacsUnavailableError(f"{node} dropped the association during storage")
    finally:
        if assoc.is_established:
            assoc.release()
    return result
