"""DICOMweb WADO-RS retrieval (httpx): a series as ``multipart/related; type="application/dicom"``.

Each part is a whole DICOM file as the PACS stores it; it is written into the spool unchanged.
QIDO-RS is not used for selection: wildcard matching through it is unreliable across servers
(FIELD-NOTES.md: Orthanc's DICOMweb plugin never matches percent-encoded values), so queries go
over DIMSE C-FIND and only the bulk transfer uses HTTP.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cohortflow.pipelines.pacs.errors import PacsError, PacsUnavailableError
from cohortflow.pipelines.pacs.scp import Spool

TIMEOUT = 120.0
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


@dataclass(frozen=True)
class DicomWebNode:
    url: str  # the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web
    username: str | None = None
    password: str | None = None


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart/related body (RFC 2046), headers stripped."""
    found = _BOUNDARY.search(content_type)
    if not found:
        raise PacsError(f"WADO-RS answer is not multipart: Content-Type {content_type!r}")
    delimiter = b"--" + found.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        header_end = chunk.find(b"\r\n\r\n")
        if header_end < 0:
            raise PacsError("WADO-RS answer has a part without headers")
        payload = chunk[header_end + 4 :]
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def retrieve_series(
    node: DicomWebNode,
    study_uid: str,
    series_uid: str,
    spool: Spool,
    instances: Sequence[str] = (),
) -> int:
    """Fetch one series (or only ``instances`` of it) into the spool; returns how many
    instances were written. A series or instance the server does not have counts 0."""
    base = f"{node.url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
    urls = [f"{base}/instances/{sop}" for sop in instances] or [base]
    return sum(_fetch(node, url, study_uid, series_uid, spool) for url in urls)


def _fetch(node: DicomWebNode, url: str, study_uid: str, series_uid: str, spool: Spool) -> int:
    import httpx
    import pydicom

    auth = (node.username, node.password or "") if node.username else None
    try:
        response = httpx.get(
            url,
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            auth=auth,
            timeout=TIMEOUT,
        )
    except httpx.TransportError as exc:
        raise PacsUnavailableError(f"DICOMweb {node.url} did not answer: {exc}") from exc
    if response.status_code == 404:
        return 0
    if response.status_code in (429, 503):
        raise PacsUnavailableError(f"DICOMweb {node.url} is busy: HTTP {response.status_code}")
    if response.status_code != 200:
        raise PacsError(f"WADO-RS {url}: HTTP {response.status_code}")
    written = 0
    for part in split_multipart(response.content, response.headers.get("content-type", "")):
        header = pydicom.dcmread(
            io.BytesIO(part), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
        sop_uid = str(header.get("SOPInstanceUID", ""))
        if not sop_uid or not re.fullmatch(r"[0-9.]{1,64}", sop_uid):
            raise PacsError(f"WADO-RS {url}: a part without a valid SOPInstanceUID")
        spool.write(study_uid, series_uid, sop_uid, part)
        written += 1
    return written
