"""DICOM networking with a PACS (pynetdicom): C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET.

Every association has explicit timeouts; failures become ``PacsError`` with the node and the
reason, never a hang. Files are classified with the ingest reader before C-STORE, so what is not
DICOM or is damaged is reported and skipped instead of being sent. Query results are returned as
plain Python values keyed by DICOM keyword (``Attributes``), so the rules that read them never
see pydicom types.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from cohortflow.pipelines.dicom.header import Attributes, attributes
from cohortflow.pipelines.pacs.errors import PacsError, PacsUnavailableError
from cohortflow.pipelines.safeio import RefusedError, read_regular

log = logging.getLogger(__name__)

ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 60.0
NETWORK_TIMEOUT = 60.0
SUCCESS = 0x0000
#: New storage associations after one died (a dropped response times out and aborts it).
STORE_RECONNECTS = 3


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


def new_ae(local_aet: str) -> Any:
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


def connection_handlers() -> list[tuple[Any, Callable[[Any], Any]]]:
    from pynetdicom import evt

    return [(evt.EVT_CONN_OPEN, _no_delay)]


def echo(node: PacsNode, local_aet: str) -> None:
    """C-ECHO; PacsUnavailableError if the node cannot be reached or refuses."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = new_ae(local_aet)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, node)
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
    from cohortflow.pipelines.dicom.reader import classify  # the header only: no hash needed here

    result = StoreResult()
    sendable: list[tuple[Path, str, str]] = []
    for path in paths:
        try:
            verdict = classify(read_regular(path)[0])
        except RefusedError as refused:
            result.skipped.append((str(path), refused.reason))
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
    queue = deque(sendable)
    reconnects = 0
    while queue:
        assoc = _associate_storage(node, local_aet, contexts)
        try:
            while queue:
                path, _sop, syntax = queue[0]
                try:
                    ds = pydicom.dcmread(path, force=True)
                    if (
                        not getattr(ds, "file_meta", None)
                        or "TransferSyntaxUID" not in ds.file_meta
                    ):
                        ds.file_meta = ds.file_meta if ds.file_meta else FileMetaDataset()
                        ds.file_meta.TransferSyntaxUID = UID(syntax)  # legacy: the encoding read
                    status = assoc.send_c_store(ds)
                except Exception as exc:  # one bad file must not stop the others
                    queue.popleft()
                    result.failed.append((str(path), f"{type(exc).__name__}: {exc}"))
                    continue
                if not status and not assoc.is_established:
                    break  # the association died under this file: send it again on a new one
                queue.popleft()
                if status and status.Status in (SUCCESS, 0xB000, 0xB007, 0xB006):
                    result.sent += 1
                else:
                    code = f"0x{status.Status:04X}" if status else "no answer"
                    result.failed.append((str(path), f"C-STORE status {code}"))
                if progress is not None:
                    progress(1)
        finally:
            if assoc.is_established:
                assoc.release()
        if queue:
            reconnects += 1
            if reconnects > STORE_RECONNECTS:
                raise PacsUnavailableError(
                    f"{node} dropped the storage association {reconnects} times; "
                    f"{len(queue)} files not sent"
                )
            log.warning("%s dropped the storage association; reconnecting", node)
    return result


def _associate_storage(node: PacsNode, local_aet: str, contexts: Sequence[tuple[str, str]]) -> Any:
    ae = new_ae(local_aet)
    for sop, syntax in contexts:
        ae.add_requested_context(sop, [syntax])
    return _associate(ae, node)


def _associate(
    ae: Any, node: PacsNode, roles: list[Any] | None = None, handlers: list[Any] | None = None
) -> Any:
    """Open an association (PacsUnavailableError with the reason when it fails), guarded."""
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.aet,
        ext_neg=roles or None,
        evt_handlers=handlers or connection_handlers(),
    )
    if not assoc.is_established:
        reason = "rejected the association" if assoc.is_rejected else "did not answer"
        raise PacsUnavailableError(f"{node} {reason}")
    return _guard_reactor(assoc)


def _guard_reactor(assoc: Any) -> Any:
    """Keep pynetdicom's association thread from taking our responses; returns ``assoc``.

    pynetdicom 3.0.4 runs a "reactor" thread per association that polls the DIMSE queue for
    requests from the peer. Its pause handshake with ``send_c_*()`` has a window (the reactor
    can be between its checkpoint and the poll when a send starts), so it sometimes takes the
    PACS's response and drops it ("Received unexpected C-FIND service message", pynetdicom issue
    #875): a lost C-FIND match shortens a selection silently, a lost final response costs a
    DIMSE timeout. Seen here under load about once in a few thousand messages. Our associations
    never serve requests from the peer on the reactor (C-GET's C-STOREs are handled by the
    thread that sent the C-GET), so the reactor is simply given nothing.
    """
    poll = assoc.dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if threading.current_thread() is assoc:
            return None, None
        return poll(block)

    assoc.dimse.get_msg = get_msg
    return assoc


# --- query / retrieve --------------------------------------------------------------------------

#: The statuses of a C-FIND / C-MOVE / C-GET response that mean "more to come".
PENDING = (0xFF00, 0xFF01)
#: Warning: some sub-operations failed (C-MOVE / C-GET), the others succeeded.
SUB_OPERATIONS_FAILED = 0xB000
# Study Root Query/Retrieve Information Model SOP classes
FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"


def _query(level: str, keys: dict[str, Any], keywords: Sequence[str]) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keywords:
        setattr(ds, keyword, keys.get(keyword, ""))  # empty: a return key
    for keyword, value in keys.items():
        if keyword not in keywords:
            setattr(ds, keyword, value)
    return ds


def _status_text(status: Any) -> str:
    if not status:
        return "no answer (timeout or dropped association)"
    code = int(status.Status)
    comment = getattr(status, "ErrorComment", None)
    return f"status 0x{code:04X}" + (f" ({comment})" if comment else "")


class Session:
    """One association to a PACS for query / retrieve; a context manager.

    ``on_open`` / ``on_close`` let a throttle count the associations it holds (the PACS's
    limit is ours to respect).
    """

    def __init__(
        self,
        node: PacsNode,
        local_aet: str,
        contexts: Sequence[str],
        *,
        storage: Callable[[Any], int] | None = None,
        timeout: float = DIMSE_TIMEOUT,
    ) -> None:
        self.node = node
        self.local_aet = local_aet
        self.contexts = contexts
        self.storage = storage  # C-GET: receives the instances on this association
        self.timeout = timeout
        self.assoc: Any = None

    def __enter__(self) -> Session:
        from pynetdicom import StoragePresentationContexts, build_role, evt

        ae = new_ae(self.local_aet)
        ae.dimse_timeout = self.timeout
        ae.acse_timeout = min(ACSE_TIMEOUT, self.timeout)
        ae.network_timeout = max(NETWORK_TIMEOUT, self.timeout)
        for uid in self.contexts:
            ae.add_requested_context(uid)
        roles = []
        handlers = connection_handlers()
        if self.storage is not None:
            # C-GET: the instances come back on this association, so it must offer the storage
            # SOP classes with the SCP role (at most 128 contexts in all).
            room = 128 - len(self.contexts)
            for context in StoragePresentationContexts[:room]:
                ae.add_requested_context(context.abstract_syntax)
                roles.append(build_role(str(context.abstract_syntax), scp_role=True))
            handlers.append((evt.EVT_C_STORE, self.storage))
        self.assoc = _associate(ae, self.node, roles, handlers)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None

    def find(self, level: str, keys: dict[str, Any], keywords: Sequence[str]) -> list[Attributes]:
        """C-FIND (Study Root) at ``level``; returns the asked keywords of every match."""
        found: list[Attributes] = []
        status = None
        query = _query(level, keys, keywords)
        for status, identifier in self.assoc.send_c_find(query, FIND_MODEL):
            if status and int(status.Status) in PENDING and identifier is not None:
                found.append(attributes(identifier, keywords))
        if not status or int(status.Status) != SUCCESS:
            raise PacsError(f"C-FIND {level} on {self.node} failed: {_status_text(status)}")
        return found

    def _retrieve(self, kind: str, keys: dict[str, Any], move_aet: str | None) -> RetrieveStatus:
        level = "IMAGE" if "SOPInstanceUID" in keys else "SERIES"
        query = _query(level, keys, ())
        if move_aet is not None:
            responses = self.assoc.send_c_move(query, move_aet, MOVE_MODEL)
        else:
            responses = self.assoc.send_c_get(query, GET_MODEL)
        status = None
        for response, _identifier in responses:
            status = response  # the last one is final
        if not status:
            raise PacsUnavailableError(
                f"{self.node} gave no final {kind} response (association dropped or timed out)"
            )
        return RetrieveStatus.from_status(kind, status)

    def move(self, keys: dict[str, Any], destination: str) -> RetrieveStatus:
        """C-MOVE the matching series (or listed instances) to AE ``destination``."""
        return self._retrieve("C-MOVE", keys, destination)

    def get(self, keys: dict[str, Any]) -> RetrieveStatus:
        """C-GET the matching series (or listed instances) over this association."""
        return self._retrieve("C-GET", keys, None)


@dataclass(frozen=True)
class RetrieveStatus:
    """The final response of a C-MOVE / C-GET."""

    ok: bool  # success, or warning with every sub-operation accounted for
    completed: int
    failed: int
    warning: int
    message: str

    @classmethod
    def from_status(cls, kind: str, status: Any) -> RetrieveStatus:
        def count(name: str) -> int:
            return int(getattr(status, name, 0) or 0)

        code = int(status.Status)
        completed = count("NumberOfCompletedSuboperations")
        failed = count("NumberOfFailedSuboperations")
        warning = count("NumberOfWarningSuboperations")
        ok = code == SUCCESS or (code == SUB_OPERATIONS_FAILED and failed == 0)
        text = f"{kind} {_status_text(status)}: {completed} completed, {failed} failed"
        return cls(ok, completed, failed, warning, text)


def query_contexts(method: str) -> list[str]:
    return {
        "find": [FIND_MODEL],
        "move": [FIND_MODEL, MOVE_MODEL],
        "get": [FIND_MODEL, GET_MODEL],
    }[method]
