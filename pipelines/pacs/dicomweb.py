"""DICOMweb retrieval through ``dicomweb-client``: WADO-RS streams a series into the spool, one
instance at a time; QIDO-RS lists what the PACS holds of a series.

WADO-RS asks for ``multipart/related; type="application/dicom"; transfer-syntax=*``: every part
is a whole DICOM file in the transfer syntax the PACS stores it in (no transcoding), and it is
written into the spool unchanged as soon as its closing delimiter has arrived. The body is read in
chunks of ``CHUNK`` bytes, so memory holds one instance (and a chunk), never the series.

QIDO-RS is not used for selection: wildcard matching through it is unreliable across servers
(FIELD-NOTES.md: Orthanc's DICOMweb plugin never matches percent-encoded values), so queries go
over DIMSE C-FIND. It is used with a series' UIDs in the path only (no matching), where a
retrieval needs to know what the PACS has: the instances of a series that arrived in part (so
only the missing ones are fetched) and whether a series that sent nothing is still there.

Authentication (``DicomWebNode``): HTTP basic, a bearer token read at every request from
``file:PATH`` (owner-only) or ``env:VARIABLE`` (so a token renewed by another process is used and
none sits in settings files or Prefect parameters), TLS with a CA bundle and a client
certificate, and a hook given the ``requests.Session`` for anything else (OAuth, Kerberos, a
proxy).

Errors: no connection, a timeout, a connection broken mid-answer, HTTP 429 or 503 raise
``PacsUnavailableError`` (the retrieval stops and a rerun resumes); HTTP 404 is a series or
instance the PACS does not have (0 instances); any other HTTP status, an answer that is not
multipart or ends before its closing delimiter, or a part that is not an instance of the series
asked for raise ``PacsError`` naming the URL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cohortflow.pipelines.pacs.errors import PacsError, PacsUnavailableError
from cohortflow.pipelines.pacs.scp import Spool

if TYPE_CHECKING:
    import requests
    from dicomweb_client import DICOMwebClient

#: seconds to open a connection, and seconds the server may stay silent within an answer (a
#: read timeout, not the answer's whole duration: a large series streams for longer)
CONNECT_TIMEOUT = 10.0
TIMEOUT = 120.0
#: bytes read from the body at a time
CHUNK = 1 << 20
#: the instances as stored (``*``: no transcoding), so the spool gets the PACS's bytes
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: statuses of a PACS that is there but will not serve now
BUSY = (429, 503)
_UID = re.compile(r"[0-9.]{1,64}")
_SOP_INSTANCE_UID = "00080018"


@dataclass(frozen=True)
class DicomWebNode:
    """A DICOMweb service and how to authenticate to it."""

    url: str  # the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web
    username: str | None = None  # HTTP basic authentication
    password: str | None = field(default=None, repr=False)
    #: bearer token (``Authorization: Bearer``): ``file:PATH`` or ``env:VARIABLE``, read at
    #: every request
    token_source: str | None = None
    #: PEM bundle of the certificate authorities the server's certificate is checked against
    #: (None: the system's)
    ca_bundle: Path | None = None
    #: mutual TLS: the client's certificate chain (PEM) and its key (None: in the same file)
    client_certificate: Path | None = None
    client_key: Path | None = None
    #: called with the ``requests.Session`` before any request: any other authentication
    session_hook: Callable[[requests.Session], object] | None = field(default=None, compare=False)
    timeout: float = TIMEOUT

    def __post_init__(self) -> None:
        if self.username is not None and self.token_source is not None:
            raise PacsError(f"DICOMweb {self.url}: give a username or a token, not both")
        if self.token_source is not None and not self.token_source.startswith(("file:", "env:")):
            raise PacsError(
                f"DICOMweb token source {self.token_source!r}: use file:PATH or env:VARIABLE"
            )
        if self.client_key is not None and self.client_certificate is None:
            raise PacsError(f"DICOMweb {self.url}: a client key needs its client certificate")


def retrieve_series(
    node: DicomWebNode,
    study_uid: str,
    series_uid: str,
    spool: Spool,
    instances: Sequence[str] = (),
) -> int:
    """Fetch one series (or only ``instances`` of it) into the spool, each instance written as
    it arrives; returns how many were written. A series or instance the server does not have
    counts 0."""
    series = _series_path(study_uid, series_uid)
    paths = [f"{series}/instances/{_checked(sop, 'SOPInstanceUID')}" for sop in instances]
    written = 0
    with _client(node) as client:
        for path in paths or [series]:
            url = client.base_url + path
            with _answers(node, url):
                response = _get(client, url)
                if response is None:
                    continue
                for part in _parts(client, response, url):
                    spool.write(study_uid, series_uid, _identity(part, url, series_uid), part)
                    written += 1
    return written


def list_instances(node: DicomWebNode, study_uid: str, series_uid: str) -> list[str]:
    """The SOPInstanceUIDs the PACS holds of a series (QIDO-RS, the UIDs in the path); none
    for a series it does not have. Pages on with ``offset`` until a page brings nothing new
    (a server may answer in pages; one that ignores the offset ends the loop too)."""
    found: dict[str, None] = {}
    received = 0
    with _client(node) as client:
        url = f"{client.base_url}{_series_path(study_uid, series_uid)}/instances"
        with _answers(node, url):
            while True:
                page = _search(client, study_uid, series_uid, offset=received or None)
                received += len(page)
                new = [sop for sop in map(_sop_of, page) if sop not in found]
                if not new:
                    return list(found)
                found.update((_checked(sop, "SOPInstanceUID", url), None) for sop in new)


def series_exists(node: DicomWebNode, study_uid: str, series_uid: str) -> bool:
    """Does the PACS still hold an instance of the series (QIDO-RS, one result asked for)?"""
    with _client(node) as client:
        url = f"{client.base_url}{_series_path(study_uid, series_uid)}/instances"
        with _answers(node, url):
            return bool(_search(client, study_uid, series_uid, limit=1))


# --- the client ------------------------------------------------------------------------------


class _BearerToken:
    """``requests`` authentication: ``Authorization: Bearer`` with the token read from its
    source at every request (a token another process renews is picked up)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {read_token(self.source)}"
        return request


def read_token(source: str) -> str:
    """The bearer token of ``file:PATH`` (owner-only, surrounding white space dropped) or
    ``env:VARIABLE``. A token that cannot be read raises ``PacsUnavailableError``: no request
    can be made, so the retrieval stops instead of failing every study."""
    kind, _, where = source.partition(":")
    if kind == "env":
        token = os.environ.get(where, "").strip()
        if not token:
            raise PacsUnavailableError(f"DICOMweb token: the variable {where} is unset or empty")
        return token
    path = Path(where)
    try:
        if path.stat().st_mode & 0o077:
            raise PacsUnavailableError(
                f"DICOMweb token: {path} is readable by others: chmod 600 it"
            )
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PacsUnavailableError(f"DICOMweb token: cannot read {path}: {exc}") from exc
    if not token or any(c in token for c in "\r\n"):
        raise PacsUnavailableError(f"DICOMweb token: {path} holds no token on one line")
    return token


@contextmanager
def _client(node: DicomWebNode) -> Iterator[DICOMwebClient]:
    """A ``DICOMwebClient`` on a session of its own, authenticated as ``node`` says, its
    retries off: the retrieval's throttle retries with backoff (``pipelines/retrieve``); the
    client's own would retry any failure five times outside it."""
    import requests
    from dicomweb_client import DICOMwebClient

    for name, path in (
        ("CA bundle", node.ca_bundle),
        ("client certificate", node.client_certificate),
        ("client key", node.client_key),
    ):
        if path is not None and not path.is_file():
            # requests would raise a bare OSError at the first request
            raise PacsUnavailableError(f"DICOMweb {node.url}: the {name} {path} is not a file")
    with requests.Session() as session:
        if node.username is not None:
            session.auth = (node.username, node.password or "")
        elif node.token_source is not None:
            session.auth = _BearerToken(node.token_source)
        if node.ca_bundle is not None:
            session.verify = str(node.ca_bundle)
            session.mount("https://", _trusting(str(node.ca_bundle)))
        if node.client_certificate is not None:
            certificate = str(node.client_certificate)
            session.cert = (certificate, str(node.client_key)) if node.client_key else certificate
        if node.session_hook is not None:
            node.session_hook(session)
        try:
            client = DICOMwebClient(
                node.url.rstrip("/"),
                session=session,
                timeout=(CONNECT_TIMEOUT, node.timeout),
                chunk_size=CHUNK,
            )
        except ValueError as exc:
            raise PacsError(f"DICOMweb URL {node.url!r} cannot be used: {exc}") from exc
        client.set_http_retry_params(retry=False)
        yield client


def _trusting(bundle: str) -> Any:
    """An HTTPS adapter that checks certificates against ``bundle`` whatever the environment
    says: requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override ``Session.verify``
    (psf/requests#3829), and a server's own CA would not be trusted then."""
    from requests.adapters import HTTPAdapter

    class Trusting(HTTPAdapter):
        def send(
            self,
            request: requests.PreparedRequest,
            stream: bool = False,
            timeout: float | tuple[float | None, float | None] | None = None,
            verify: bool | str = True,
            cert: str | tuple[str, str] | None = None,
            proxies: dict[str, str] | None = None,
        ) -> requests.Response:
            return super().send(request, stream, timeout, bundle, cert, proxies)

    return Trusting()


def _get(client: DICOMwebClient, url: str) -> Any:
    """The streamed WADO-RS answer of ``url``, None for HTTP 404. (``_http_get`` is the
    client's own GET, with its session, timeout and status check; dicomweb-client is pinned:
    its public ``iter_series`` would hand on pydicom data sets, not the bytes sent.)"""
    import requests

    try:
        return client._http_get(url, headers={"Accept": ACCEPT}, stream=True)
    except requests.HTTPError as exc:
        if _status(exc) != 404 or exc.response is None:
            raise
        exc.response.close()
        return None


def _search(
    client: DICOMwebClient,
    study_uid: str,
    series_uid: str,
    limit: int | None = None,
    offset: int | None = None,
) -> list[dict[str, Any]]:
    """A QIDO-RS search for a series' instances; a series the server does not know (HTTP 404)
    has none."""
    import requests

    try:
        return client.search_for_instances(study_uid, series_uid, limit=limit, offset=offset)
    except requests.HTTPError as exc:
        if _status(exc) != 404:
            raise
        return []


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return None if response is None else int(response.status_code)


@contextmanager
def _answers(node: DicomWebNode, url: str) -> Iterator[None]:
    """Map what ``requests`` and the client raise on ``url`` to the PACS errors."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        status = _status(exc)
        if exc.response is not None:
            exc.response.close()  # a streamed answer holds its connection until closed
        if status in BUSY:
            raise PacsUnavailableError(f"DICOMweb {url} is busy: HTTP {status}") from exc
        hint = (
            " (the credentials were refused: check pacs.dicomweb_username and password, or "
            "the token)"
            if status in (401, 403)
            else ""
        )
        raise PacsError(f"DICOMweb {url}: HTTP {status}{hint}") from exc
    except requests.exceptions.SSLError as exc:
        raise PacsUnavailableError(
            f"DICOMweb {url}: TLS failed ({exc}); check pacs.dicomweb_ca_bundle and the client "
            "certificate"
        ) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise PacsUnavailableError(
            f"DICOMweb {url} did not answer (timeouts {CONNECT_TIMEOUT:.0f} s to connect, "
            f"{node.timeout:.0f} s silent): {exc}"
        ) from exc
    except requests.exceptions.ChunkedEncodingError as exc:  # the connection broke mid-answer
        raise PacsUnavailableError(f"DICOMweb {url}: the answer broke off: {exc}") from exc
    except requests.RequestException as exc:
        raise PacsError(f"DICOMweb {url}: {exc}") from exc
    except ValueError as exc:  # the client's multipart decoder on a malformed answer
        raise PacsError(f"DICOMweb {url}: malformed answer: {exc}") from exc


# --- the answer ------------------------------------------------------------------------------


class _Watched:
    """The streamed response as the client's multipart decoder reads it, watched for the
    closing delimiter. The decoder hands on whatever follows the last delimiter when the body
    ends: in a body cut short, a truncated file. A part it yields after the body ended is that
    remainder."""

    def __init__(self, response: Any, boundary: bytes) -> None:
        self.response = response
        self.headers = response.headers
        self.closing = b"\r\n--" + boundary + b"--"
        self.closed = False  # the closing delimiter went by
        self.ended = False  # the body was read to its end
        self._tail = b""

    def __enter__(self) -> _Watched:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.response.close()

    def iter_content(self, chunk_size: int) -> Iterator[bytes]:
        keep = len(self.closing) - 1
        for chunk in self.response.iter_content(chunk_size=chunk_size):
            if not self.closed:
                # the delimiter may straddle two chunks: look at the end of the one before too
                self.closed = self.closing in self._tail + chunk[:keep] or self.closing in chunk
                self._tail = (self._tail + chunk[-keep:])[-keep:]
            yield chunk
        self.ended = True


def _parts(client: DICOMwebClient, response: Any, url: str) -> Iterator[bytes]:
    """The parts of a streamed WADO-RS answer, each as soon as it is whole (the client's
    multipart decoder: a part's headers dropped, its bytes as sent)."""
    content_type = response.headers.get("Content-Type", "")
    # read as the decoder reads it (which, without a boundary, would take the body as one part)
    media_type, *parameters = (p.strip() for p in content_type.split(";"))
    boundary = next(
        (
            value.strip('"')
            for name, _, value in (p.partition("=") for p in parameters)
            if name.lower() == "boundary"
        ),
        None,
    )
    if media_type.lower() != "multipart/related" or not boundary:
        response.close()
        raise PacsError(f"DICOMweb {url}: not a multipart answer (Content-Type {content_type!r})")
    watched = _Watched(response, boundary.encode())
    # the decoder reads a response's headers, ``with`` and iter_content only: _Watched has them
    decoded = client._decode_multipart_message(cast("requests.Response", watched), stream=True)
    for part in decoded:
        if watched.ended:
            raise PacsError(
                f"DICOMweb {url}: the answer ends inside a part (no closing delimiter): "
                "a truncated transfer"
            )
        yield bytes(part)  # the decoder's bytearray: the spool and the reader take bytes
    if not watched.closed:
        raise PacsError(f"DICOMweb {url}: the answer ends without its closing delimiter")


def _identity(part: bytes, url: str, series_uid: str) -> str:
    """The part's SOPInstanceUID, checked: a DICOM file of the series asked for, with a UID
    that can name a file. Its header only is read (the reader ingest uses, which refuses a
    deflated data set that would inflate past its limit)."""
    from cohortflow.pipelines.dicom.reader import classify

    reading = classify(part)
    ds = reading.dataset
    if ds is None:
        raise PacsError(f"DICOMweb {url}: a part is not a DICOM instance: {reading.reason}")
    if str(ds.get("SeriesInstanceUID", "")).strip() != series_uid:
        raise PacsError(f"DICOMweb {url}: a part is an instance of another series")
    return _checked(str(ds.get("SOPInstanceUID", "")).strip(), "SOPInstanceUID", url)


def _sop_of(item: dict[str, Any]) -> str:
    values = (item.get(_SOP_INSTANCE_UID) or {}).get("Value") or [""]
    return str(values[0])


def _checked(uid: str, keyword: str, url: str | None = None) -> str:
    """``uid`` when it is a plausible UID (it names a spool file and goes into URLs)."""
    if not _UID.fullmatch(uid):
        where = f"DICOMweb {url}: " if url else ""
        raise PacsError(f"{where}not a valid {keyword}: {uid[:80]!r}")
    return uid


def _series_path(study_uid: str, series_uid: str) -> str:
    study = _checked(study_uid, "StudyInstanceUID")
    return f"/studies/{study}/series/{_checked(series_uid, 'SeriesInstanceUID')}"
