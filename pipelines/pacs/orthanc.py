"""The project's own PACS: an Orthanc server started from the Debian package with a generated
configuration (demos and tests; any other DICOM node works by configuration instead).

"Loopback only" for Orthanc 1.10.1, which has no bind-address option (FIELD-NOTES.md): remote
HTTP refused (``RemoteAccessAllowed: false``), HTTP authentication on with a generated password,
and DICOM accepted only from the configured modalities, checked by AE title *and* host 127.0.0.1
(``DicomAlwaysAllow*`` off, ``DicomCheckModalityHost`` on).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cohortflow.pipelines.pacs.errors import PacsError, PacsUnavailableError

log = logging.getLogger(__name__)

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT = 30.0
PID_FILE = "orthanc.pid"


@dataclass(frozen=True)
class Modality:
    """A DICOM node Orthanc may talk to (cohortflow's own AE, usually)."""

    name: str
    aet: str
    host: str
    port: int


@dataclass(frozen=True)
class OrthancConfig:
    """Everything the generated configuration needs."""

    folder: Path  # holds the storage, the configuration and the log
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    username: str = "cohortflow"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    modalities: tuple[Modality, ...] = ()

    def as_json(self) -> dict[str, Any]:
        plugins = [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else []
        storage = self.folder / "storage"
        return {
            "Name": "cohortflow-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": {
                m.name: {
                    "AET": m.aet,
                    "Host": m.host,
                    "Port": m.port,
                    "AllowEcho": True,
                    "AllowFind": True,
                    "AllowGet": True,
                    "AllowMove": True,
                    "AllowStore": True,
                }
                for m in self.modalities
            },
            "DicomScpTimeout": 30,
            # Large PDUs: a slice travels in one PDU instead of eight 16 KB ones, which on
            # loopback otherwise stall on TCP delayed acknowledgements (about 50 ms a file).
            "MaximumPduLength": 131072,
            "DicomAssociationCloseDelay": 0,
            "UnknownSopClassAccepted": True,
            "SaveJobs": False,
            "StableAge": 2,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "Plugins": plugins,
            "DicomWeb": {"Enable": bool(plugins), "Root": "/dicom-web/"},
        }


def available() -> bool:
    """Is the Orthanc binary installed (Debian package ``orthanc``)?"""
    return shutil.which(ORTHANC_BINARY) is not None or Path("/usr/sbin/Orthanc").is_file()


def _binary() -> str:
    found = shutil.which(ORTHANC_BINARY)
    if found:
        return found
    if Path("/usr/sbin/Orthanc").is_file():
        return "/usr/sbin/Orthanc"
    raise PacsUnavailableError(
        "Orthanc is not installed: run `make setup` as root (Debian packages orthanc and "
        "orthanc-dicomweb)"
    )


def write_config(config: OrthancConfig) -> Path:
    """Write Orthanc's configuration file into ``config.folder`` (owner-only: it holds the
    password) and return its path."""
    config.folder.mkdir(parents=True, exist_ok=True)
    path = config.folder / "orthanc.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(config.as_json(), handle, indent=1)
    return path


def environment() -> dict[str, str]:
    """Orthanc's environment: this process's, with TCP_NODELAY. DCMTK (Orthanc's DICOM layer)
    disables Nagle's algorithm when it is set; without it every C-STORE response waits for a
    delayed ACK (about 50 ms a file)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def foreground_command(config: OrthancConfig) -> list[str]:
    """The command that runs Orthanc in the foreground on ``config`` (its file written), for a
    service manager that supervises the process itself (``cohortflow pacs run``)."""
    return [_binary(), str(write_config(config))]


class OrthancServer:
    """A running Orthanc process; use as a context manager or call ``start`` and ``stop``."""

    def __init__(self, config: OrthancConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.http_port}"

    def start(self, timeout: float = START_TIMEOUT) -> OrthancServer:
        folder = self.config.folder
        path = write_config(self.config)
        logfile = open(folder / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [_binary(), str(path)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=folder,
            start_new_session=True,
            env=environment(),
        )
        logfile.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PacsUnavailableError(
                    f"Orthanc exited with status {self.process.returncode} at start; see "
                    f"{folder / 'orthanc.log'}"
                )
            try:
                self.get("/system")
                (folder / PID_FILE).write_text(f"{self.process.pid}\n", encoding="ascii")
                return self
            except PacsError:
                time.sleep(0.1)
        self.stop()
        raise PacsUnavailableError(f"Orthanc did not answer within {timeout:.0f} s; see the log")

    def stop(self, timeout: float = 20.0) -> None:
        process, self.process = self.process, None
        (self.config.folder / PID_FILE).unlink(missing_ok=True)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def detach(self) -> int:
        """Leave the server running after this process exits (``cohortflow pacs start``)."""
        process, self.process = self.process, None
        assert process is not None
        return process.pid

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- REST (administration and checks; data moves over DICOM) -----------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        raw: bool = False,
    ) -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        token = base64.b64encode(f"{self.config.username}:{self.config.password}".encode())
        request.add_header("Authorization", f"Basic {token.decode()}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise PacsError(f"Orthanc {method} {path}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise PacsError(f"Orthanc {method} {path}: {exc}") from exc
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def get_bytes(self, path: str) -> bytes:
        data: bytes = self._request("GET", path, raw=True)
        return data

    def post_json(self, path: str, body: Any) -> Any:
        return self._request("POST", path, json.dumps(body).encode())

    def post_bytes(self, path: str, body: bytes) -> Any:
        return self._request("POST", path, body, "application/dicom")

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/statistics")
        return result


def running_pid(folder: Path) -> int | None:
    """The pid of the Orthanc started in ``folder`` if it still runs."""
    try:
        pid = int((folder / PID_FILE).read_text(encoding="ascii").strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"Orthanc" in cmdline and str(folder).encode() in cmdline else None


def stop_running(folder: Path, timeout: float = 20.0) -> bool:
    """Stop the Orthanc started in ``folder`` (by ``cohortflow pacs start``); False if none ran."""
    pid = running_pid(folder)
    (folder / PID_FILE).unlink(missing_ok=True)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _state(pid) == b"Z":  # gone, or a zombie
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return b""
