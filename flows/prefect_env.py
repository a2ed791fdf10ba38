"""The process environment of Prefect and ITK, set at the launching edge before either is used."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cohortflow.models.audit import use_key_source
from cohortflow.pipelines.safeio import lock_down

if TYPE_CHECKING:
    from cohortflow.models.settings import Settings


def configure_prefect(home: Path) -> None:
    """Keep Prefect's files under cohortflow's data folder and its telemetry off.

    Values the user already set win: a user with a Prefect server keeps PREFECT_API_URL.
    Prefect creates its home folder but not the parents, and its ephemeral server then fails
    with "unable to open database file": create the whole path here.
    """
    os.environ.setdefault("PREFECT_HOME", str((home / "prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # telemetry off on both sides: the server's analytics and the client's usage events (and
    # the notice about them), and Prefect Cloud's orchestration telemetry
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Dask's scheduler and workers log every connection at INFO; the run's own report is enough
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def protect_identified(settings: Settings) -> list[str]:
    """Owner-only from here on: the process's umask 077 (every file and folder it and its
    children create: index, archive, spool, restricted side), and the identified paths that
    exist made owner-only (``safeio.lock_down``; returns what was repaired, raises
    ``RefusedError`` for a path another user owns). Called first by the command line and every
    flow."""
    os.umask(0o077)
    use_key_source(str(settings.pseudonym_key_source))  # the audit chain's key (models/audit.py)
    return lock_down(settings.identified_paths())


def configure_itk(threads: int) -> None:
    """Fix ITK's thread count (ANTs, through antspyx). ITK reads it once, when it first runs a
    filter in the process, so this must come before any registration; later calls change nothing.
    The memory allocator is set up at the same time (:func:`configure_allocator`)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    configure_allocator()


#: Allocations up to this size come from the heap and freed memory stays there for the next one
#: (glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``; the default maps anything above 32 MB
#: afresh and unmaps it when freed). A head's volumes are 10 to 200 MB and the methods make and
#: free dozens of them: every one was mapped, faulted in page by page and zeroed by the kernel.
#: Measured on the real Philips head (``cohortflow volumetry``, one process): 53.0 s user +
#: 18.8 s system -> 46.0 + 4.3 s, processor time -30 %, peak memory +7 % (1.44 -> 1.55 GB);
#: the volumes identical.
ALLOCATOR_THRESHOLD = 1 << 30


def configure_allocator() -> None:
    """Keep large allocations in the heap (:data:`ALLOCATOR_THRESHOLD`), in this process
    (``mallopt``) and in the processes it starts (the environment glibc reads at their start:
    Dask workers, child commands). Values a user set in the environment are kept; nothing is
    done off glibc."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        os.environ.setdefault(name, str(ALLOCATOR_THRESHOLD))
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl): its own allocator
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    for option, name in ((m_mmap_threshold, "MALLOC_MMAP_THRESHOLD_"),
                         (m_trim_threshold, "MALLOC_TRIM_THRESHOLD_")):  # fmt: skip
        try:
            value = int(os.environ[name])
        except ValueError:
            continue
        mallopt(option, min(value, (1 << 31) - 1))


def _die_with_parent(parent: int) -> None:
    """In the server's process before it starts: SIGTERM when the process that started it dies
    (Linux ``PR_SET_PDEATHSIG``). Without it a run killed with SIGKILL (``finally`` never
    runs) left its private server running, in its own session, for ever."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


@contextmanager
def prefect_api(
    home: Path, timeout: float = 120.0, meanwhile: Callable[[], object] | None = None
) -> Iterator[str | None]:
    """Make sure every process of a run reaches one Prefect API; ``meanwhile`` is called while
    a private server starts (it takes 10 to 30 s), or before the body where none is started.

    With ``PREFECT_API_URL`` set (a ``prefect server start`` the user runs, or Prefect Cloud)
    nothing is started. Otherwise a private ``prefect server start`` on a free loopback port
    runs for the duration, with its database under ``PREFECT_HOME``, so the run's history stays
    browsable there. Prefect's own ephemeral mode would start one temporary server per Dask
    worker process, all on one SQLite file (slow, and they contend for it). Yields the URL of
    the server started, or None.
    """
    if os.environ.get("PREFECT_API_URL"):
        if meanwhile is not None:
            meanwhile()
        yield None
        return
    configure_prefect(home)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    log_file = Path(os.environ["PREFECT_HOME"]) / "server.log"
    with log_file.open("ab") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("prefect")),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the run, not its server
            # before any thread of this process starts (the run has none yet): ctypes only
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),  # noqa: PLW1509
        )
    try:
        started = time.monotonic()
        if meanwhile is not None:
            meanwhile()
        deadline = max(time.monotonic() + 30.0, started + timeout)
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"the private Prefect server stopped at start-up (exit {server.returncode}); "
                    f"see {log_file}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private Prefect server did not answer in {timeout:.0f} s")
            time.sleep(0.3)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # the environment for worker processes started from here, the settings for this one
        os.environ["PREFECT_API_URL"] = url
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if os.environ.get("PREFECT_API_URL") == url:
            del os.environ["PREFECT_API_URL"]
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
