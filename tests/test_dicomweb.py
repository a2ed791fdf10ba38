"""DICOMweb retrieval (pipelines/pacs/dicomweb.py) against a small HTTP server in a thread:
streaming part by part, the bytes as sent, the error mapping the retrieval's throttle relies on,
QIDO-RS paging, and every authentication hook reaching the server (basic, bearer token from a
file or a variable, a session hook, TLS with a CA bundle and a client certificate).

The retrieval against a real Orthanc is in tests/test_pacs_retrieve.py.
"""

from __future__ import annotations

import base64
import io
import json
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import certifi
import pydicom
import pytest

from cohortflow.models.errors import ConfigurationError
from cohortflow.models.settings import load_settings
from cohortflow.pipelines.pacs import dicomweb
from cohortflow.pipelines.pacs.dicomweb import DicomWebNode
from cohortflow.pipelines.pacs.errors import PacsError, PacsUnavailableError
from cohortflow.pipelines.pacs.scp import Received, Spool
from cohortflow.pipelines.retrieve.config import dicomweb_node
from tests.ingest_helpers import free_port, pydicom_file
from tests.test_scp_tls import Authority

STUDY = "1.2.826.0.1.3680043.10.1.1"
SERIES = "1.2.826.0.1.3680043.10.1.1.2"
SERIES_PATH = f"/dicom-web/studies/{STUDY}/series/{SERIES}"
BOUNDARY = "cf-boundary-1"

Handler = Callable[[BaseHTTPRequestHandler], None]


def instance(number: int, series: str = SERIES, sop: str | None = None) -> bytes:
    """An MR image of the series as a Part 10 file. Its comment and its last bytes are what a
    naive multipart splitter trips on (CRLFs, a blank line, dashes); the file ends in CRLF."""
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = number
    ds.ImageComments = "line\r\n\r\n--not-a-boundary--\r\n"
    ds.DataSetTrailingPadding = b"\r\n"
    out = io.BytesIO()
    with warnings.catch_warnings():  # pydicom warns of the invalid UIDs some tests plant
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = sop or f"{series}.{number}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    assert data.endswith(b"\r\n")
    return data


def part(data: bytes) -> bytes:
    return f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data


CLOSING = f"\r\n--{BOUNDARY}--\r\n".encode()
MULTIPART = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def body(*instances: bytes) -> bytes:
    # the first delimiter needs no CRLF before it
    return b"".join(part(d) for d in instances)[2:] + CLOSING


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class Server:
    """What the server answers, per path; what it was asked."""

    url: str
    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def node(self, **kwargs: Any) -> DicomWebNode:
        return DicomWebNode(f"{self.url}/dicom-web", **kwargs)


@contextmanager
def serving(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    port = free_port()
    scheme = "https" if tls else "http"
    state = Server(f"{scheme}://127.0.0.1:{port}")

    class Handle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            split = urlsplit(self.path)
            state.seen.append(Seen(split.path, parse_qs(split.query), dict(self.headers)))
            self.close_connection = True
            route = state.routes.get(split.path)
            if route is None:
                send(self, 404, b"", "text/plain")
            else:
                route(self)

        def log_message(self, *_args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handle)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()  # let a handler that waits go
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as running:
        yield running


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def send(h: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str) -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(data)


def answer(data: bytes, content_type: str = MULTIPART, status: int = 200) -> Handler:
    return lambda h: send(h, status, data, content_type)


def spooled(spool: Spool, series: str = SERIES) -> dict[str, bytes]:
    folder = spool.series_folder(STUDY, series)
    return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.dcm"))} if folder.exists() else {}


# --- streaming ---------------------------------------------------------------------------------


def test_a_series_streams_into_the_spool_instance_by_instance_as_sent(
    server: Server, tmp_path: Path
) -> None:
    """The server sends the second instance only once the first is in the spool: a client
    that held the series in memory until its end would wait forever (the server gives up)."""
    first, second = instance(1), instance(2)
    in_spool = threading.Event()
    gave_up: list[bool] = []

    def chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", MULTIPART)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        # the first instance and the start of the next delimiter: it is whole now
        chunk(part(first)[2:] + f"\r\n--{BOUNDARY}".encode())
        if not in_spool.wait(10):
            gave_up.append(True)
            return  # the connection closes mid-answer
        chunk(part(second)[len(f"\r\n--{BOUNDARY}") :] + CLOSING)
        h.wfile.write(b"0\r\n\r\n")

    server.routes[SERIES_PATH] = chunked
    arrived: list[Received] = []

    def heard(item: Received) -> None:
        arrived.append(item)
        in_spool.set()

    spool = Spool(tmp_path / "spool", on_received=heard)
    assert dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool) == 2
    assert not gave_up
    assert [a.sop_uid for a in arrived] == [f"{SERIES}.1", f"{SERIES}.2"]
    # the files as the server sent them, to the byte (CRLFs inside and at the end kept)
    assert spooled(spool) == {f"{SERIES}.1": first, f"{SERIES}.2": second}
    accept = server.seen[0].headers["Accept"]
    assert 'type="application/dicom"' in accept and "transfer-syntax=*" in accept


def test_only_the_instances_asked_for_are_fetched(server: Server, spool: Spool) -> None:
    for n in (2, 3):
        server.routes[f"{SERIES_PATH}/instances/{SERIES}.{n}"] = answer(body(instance(n)))
    sops = [f"{SERIES}.2", f"{SERIES}.3", f"{SERIES}.4"]  # the fourth is not there: 404
    assert dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool, sops) == 2
    assert set(spooled(spool)) == set(sops[:2])
    assert [s.path.rsplit("/", 1)[1] for s in server.seen] == sops


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, error, words",
    [
        (503, PacsUnavailableError, "busy: HTTP 503"),
        (429, PacsUnavailableError, "busy: HTTP 429"),
        (500, PacsError, "HTTP 500"),
        (401, PacsError, "credentials were refused"),
    ],
)
def test_http_errors_map_to_the_pacs_errors_naming_the_url(
    server: Server, spool: Spool, status: int, error: type[PacsError], words: str
) -> None:
    server.routes[SERIES_PATH] = answer(b"no", "text/plain", status)
    with pytest.raises(error, match=words) as raised:
        dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool)
    assert f"{server.url}{SERIES_PATH}" in str(raised.value)
    if error is PacsError:
        assert not isinstance(raised.value, PacsUnavailableError)
    assert len(server.seen) == 1  # the client's own retries are off: the throttle retries


def test_a_series_the_server_does_not_have_counts_zero(server: Server, spool: Spool) -> None:
    assert dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool) == 0
    assert dicomweb.list_instances(server.node(), STUDY, SERIES) == []
    assert not dicomweb.series_exists(server.node(), STUDY, SERIES)


def test_a_truncated_multipart_answer_is_a_pacs_error_and_keeps_only_whole_instances(
    server: Server, spool: Spool
) -> None:
    first, second = instance(1), instance(2)
    whole = body(first, second)
    cut = whole[: whole.index(second) + len(second) // 2]  # a whole HTTP body, a part cut
    server.routes[SERIES_PATH] = answer(cut)
    with pytest.raises(PacsError, match="ends inside a part") as raised:
        dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool)
    assert f"{server.url}{SERIES_PATH}" in str(raised.value)
    assert not isinstance(raised.value, PacsUnavailableError)
    assert spooled(spool) == {f"{SERIES}.1": first}  # never the half instance
    # every part whole, but no closing delimiter: what followed is unknown
    server.routes[SERIES_PATH] = answer(whole[: -len(CLOSING)] + f"\r\n--{BOUNDARY}".encode())
    with pytest.raises(PacsError, match="without its closing delimiter"):
        dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool)
    assert spooled(spool) == {f"{SERIES}.1": first, f"{SERIES}.2": second}


def test_a_connection_cut_or_silent_mid_answer_is_unavailable(server: Server, spool: Spool) -> None:
    whole = body(instance(1), instance(2))

    def cut(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", MULTIPART)
        h.send_header("Content-Length", str(len(whole)))
        h.end_headers()
        h.wfile.write(whole[: len(whole) // 2])  # then the connection closes

    server.routes[SERIES_PATH] = cut
    with pytest.raises(PacsUnavailableError, match=r"broke off|did not answer"):
        dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool)

    def silent(h: BaseHTTPRequestHandler) -> None:
        cut(h)
        h.wfile.flush()
        server.released.wait(30)  # alive, holding the connection, silent

    server.routes[SERIES_PATH] = silent
    with pytest.raises(PacsUnavailableError, match="did not answer"):
        dicomweb.retrieve_series(server.node(timeout=0.5), STUDY, SERIES, spool)
    nobody = DicomWebNode(f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(PacsUnavailableError, match="did not answer"):
        dicomweb.retrieve_series(nobody, STUDY, SERIES, spool)
    with pytest.raises(PacsUnavailableError, match="did not answer"):
        dicomweb.list_instances(nobody, STUDY, SERIES)


@pytest.mark.parametrize(
    "content, content_type, words",
    [
        (body(instance(1)), "application/dicom", "not a multipart answer"),
        (body(instance(1)), "multipart/related", "not a multipart answer"),  # no boundary
        (body(instance(1, series=SERIES + ".9")), MULTIPART, "another series"),
        (body(b"%PDF-1.4 not an image"), MULTIPART, "not a DICOM instance"),
        (body(instance(1, sop="1.2.3/../../x")), MULTIPART, "not a valid SOPInstanceUID"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the planted SOPInstanceUID
def test_an_answer_that_is_not_the_series_instances_is_refused(
    server: Server, spool: Spool, content: bytes, content_type: str, words: str
) -> None:
    server.routes[SERIES_PATH] = answer(content, content_type)
    with pytest.raises(PacsError, match=words) as raised:
        dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool)
    assert f"{server.url}{SERIES_PATH}" in str(raised.value)
    assert not any(spool.root.rglob("*.dcm"))


def test_uids_that_cannot_be_a_path_are_refused_before_any_request(
    server: Server, spool: Spool
) -> None:
    with pytest.raises(PacsError, match="SeriesInstanceUID"):
        dicomweb.retrieve_series(server.node(), STUDY, "../../admin", spool)
    with pytest.raises(PacsError, match="SOPInstanceUID"):
        dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool, ["1.2?x=1"])
    assert server.seen == []


# --- QIDO-RS -----------------------------------------------------------------------------------


def _qido(sops: list[str], page: int | None) -> Handler:
    """Instances of the series, ``page`` at a time from ``offset`` (None: the offset ignored,
    every answer the same first page)."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(h.path).query)
        start = int(query.get("offset", ["0"])[0]) if page else 0
        shown = sops[start : start + (page or 3)]
        items = [{"00080018": {"vr": "UI", "Value": [sop]}} for sop in shown]
        send(h, 200, json.dumps(items).encode(), "application/dicom+json")

    return handle


def test_qido_lists_a_series_page_by_page(server: Server) -> None:
    sops = [f"{SERIES}.{n}" for n in range(1, 8)]
    server.routes[f"{SERIES_PATH}/instances"] = _qido(sops, page=3)
    assert dicomweb.list_instances(server.node(), STUDY, SERIES) == sops
    assert [s.query.get("offset") for s in server.seen] == [None, ["3"], ["6"], ["7"]]
    assert dicomweb.series_exists(server.node(), STUDY, SERIES)
    assert server.seen[-1].query["limit"] == ["1"]
    # a server that ignores the offset: the loop ends on the first page that brings nothing new
    server.routes[f"{SERIES_PATH}/instances"] = _qido(sops, page=None)
    assert dicomweb.list_instances(server.node(), STUDY, SERIES) == sops[:3]
    server.routes[f"{SERIES_PATH}/instances"] = answer(b"nope", "text/plain", 500)
    with pytest.raises(PacsError, match="HTTP 500"):
        dicomweb.list_instances(server.node(), STUDY, SERIES)


# --- authentication ----------------------------------------------------------------------------


def add_hook_header(session: Any) -> None:
    """A session hook (``pacs.dicomweb_session_hook: tests.test_dicomweb:add_hook_header``)."""
    session.headers["X-Cohortflow-Hook"] = "called"


def test_every_authentication_reaches_the_server(
    server: Server, spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes[SERIES_PATH] = answer(body(instance(1)))

    def authorization(node: DicomWebNode) -> str | None:
        dicomweb.retrieve_series(node, STUDY, SERIES, spool)
        return server.seen[-1].headers.get("Authorization")

    assert authorization(server.node()) is None
    basic = base64.b64encode(b"ada:s3cret").decode()
    assert authorization(server.node(username="ada", password="s3cret")) == f"Basic {basic}"
    token = tmp_path / "token"
    token.write_text("first-token\n")
    token.chmod(0o600)
    node = server.node(token_source=f"file:{token}")
    assert authorization(node) == "Bearer first-token"
    token.write_text("renewed-token\n")  # read at every request: a renewed token is used
    assert authorization(node) == "Bearer renewed-token"
    monkeypatch.setenv("CF_TEST_DICOMWEB_TOKEN", "from-the-environment")
    assert authorization(server.node(token_source="env:CF_TEST_DICOMWEB_TOKEN")) == (
        "Bearer from-the-environment"
    )
    dicomweb.retrieve_series(server.node(session_hook=add_hook_header), STUDY, SERIES, spool)
    assert server.seen[-1].headers.get("X-Cohortflow-Hook") == "called"
    # a token that cannot be read stops the retrieval before any request is made
    asked = len(server.seen)
    token.chmod(0o644)
    with pytest.raises(PacsUnavailableError, match="readable by others"):
        authorization(node)
    monkeypatch.delenv("CF_TEST_DICOMWEB_TOKEN")
    with pytest.raises(PacsUnavailableError, match="CF_TEST_DICOMWEB_TOKEN is unset"):
        authorization(server.node(token_source="env:CF_TEST_DICOMWEB_TOKEN"))
    assert len(server.seen) == asked


def test_tls_with_a_ca_bundle_and_a_client_certificate(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the system's bundle named in the environment (as on many hosts): the configured bundle
    # must still win (requests prefers the environment to Session.verify)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    authority = Authority(tmp_path, "test-ca")
    certificate, key = authority.issue("server", server=True)
    client = authority.issue("cohortflow", server=False)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=authority.bundle)
    tls.load_cert_chain(certificate, key)
    tls.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    with serving(tls) as server:
        server.routes[SERIES_PATH] = answer(body(instance(1)))
        trusted = server.node(
            ca_bundle=authority.bundle, client_certificate=client[0], client_key=client[1]
        )
        assert dicomweb.retrieve_series(trusted, STUDY, SERIES, spool) == 1
        with pytest.raises(PacsUnavailableError, match="TLS failed"):  # the system's CAs
            dicomweb.retrieve_series(server.node(), STUDY, SERIES, spool)
        with pytest.raises(PacsUnavailableError):  # no client certificate
            dicomweb.retrieve_series(server.node(ca_bundle=authority.bundle), STUDY, SERIES, spool)
        with pytest.raises(PacsUnavailableError, match="is not a file"):
            dicomweb.retrieve_series(
                server.node(ca_bundle=tmp_path / "no.pem"), STUDY, SERIES, spool
            )


# --- settings ----------------------------------------------------------------------------------


def test_settings_give_the_node_its_authentication(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    pacs = {"aet": "PACS", "host": "pacs.example.org", "port": 104}
    web = "https://pacs.example.org/dicom-web"
    settings = load_settings(
        pacs={
            **pacs,
            "dicomweb_url": web,
            "dicomweb_token_source": "env:PACS_TOKEN",
            "dicomweb_ca_bundle": str(tmp_path / "ca.pem"),
            "dicomweb_client_certificate": str(tmp_path / "me.pem"),
            "dicomweb_session_hook": "tests.test_dicomweb:add_hook_header",
        }
    )
    node = dicomweb_node(settings)
    assert node is not None
    assert (node.url, node.username, node.token_source) == (web, None, "env:PACS_TOKEN")
    assert node.ca_bundle == tmp_path / "ca.pem" and node.client_key is None
    assert node.session_hook is add_hook_header
    # the names the command line and the settings files use: basic authentication as before
    basic = load_settings(
        pacs={**pacs, "dicomweb_url": web, "dicomweb_username": "u", "dicomweb_password": "s3cret"}
    )
    node = dicomweb_node(basic)
    assert node is not None and (node.username, node.password) == ("u", "s3cret")
    assert "s3cret" not in repr(node)
    for bad, words in [
        ({"dicomweb_username": "u", "dicomweb_token_source": "env:T"}, "give one"),
        ({"dicomweb_token_source": "vault:x"}, "dicomweb_token_source"),
        ({"dicomweb_client_key": "k.pem"}, "needs dicomweb_client_certificate"),
        ({"dicomweb_session_hook": "not a hook"}, "dicomweb_session_hook"),
        ({"dicomweb_url": "ftp://pacs/dicom-web"}, "dicomweb_url"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            load_settings(pacs={**pacs, "dicomweb_url": web, **bad})
