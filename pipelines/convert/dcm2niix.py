"""dcm2niix, the converter of first choice: find it, ask its version, run it on one series.

The binary is the one the PyPI package installs next to the Python interpreter (``.venv/bin``),
else the first on PATH. It runs on a folder holding only the series' files, with defaults files
ignored (``-g i``), no comment in the NIfTI header (``-c ""``: dcm2niix otherwise copies
ImageComments, which may hold a name, into ``aux_file``), a BIDS sidecar and uncompressed output
(the caller checks it, then writes the final gzip file itself). One series may give several
images: :func:`classify_output` says what each is.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cohortflow.pipelines.convert.errors import ConvertError

log = logging.getLogger(__name__)

#: Seconds allowed for ``dcm2niix --version``.
VERSION_TIMEOUT = 10.0
#: Seconds allowed for converting one series (a 3D T1 takes about half a second).
DEFAULT_TIMEOUT = 120.0
#: Base name of the files dcm2niix writes (``-f``); its postfixes follow.
BASE_NAME = "series"


@dataclass(frozen=True)
class Dcm2niix:
    executable: Path
    version: str  # as dcm2niix reports it, e.g. "v1.0.20260724"


def find_dcm2niix(executable: Path | None = None, timeout: float = VERSION_TIMEOUT) -> Dcm2niix:
    """The dcm2niix to use: ``executable`` when given, else the one beside the Python
    interpreter, else the first on PATH; its version checked by running it.

    Raises ConvertError ``convert.dcm2niix_unavailable`` saying what was tried."""
    if executable is not None:
        candidates = [Path(executable)]
    else:
        beside = Path(sys.executable).parent / "dcm2niix"
        found = shutil.which("dcm2niix")
        candidates = [beside] + ([Path(found)] if found else [])
    tried = []
    for candidate in candidates:
        if not candidate.is_file():
            tried.append(f"{candidate}: no such file")
            continue
        try:
            done = subprocess.run(
                [str(candidate), "--version"],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            tried.append(f"{candidate}: no answer to --version within {timeout:g} s")
            continue
        except OSError as exc:
            tried.append(f"{candidate}: cannot run it ({exc.strerror or exc})")
            continue
        # dcm2niix prints its banner and then the version, and exits with status 3
        match = re.search(r"^(v\d+\.\d+\.\d+\S*)\s*$", done.stdout, re.MULTILINE)
        if match is None:
            tried.append(f"{candidate}: --version gave no version (exit status {done.returncode})")
            continue
        return Dcm2niix(candidate, match.group(1))
    raise ConvertError(
        "convert.dcm2niix_unavailable",
        "dcm2niix not found or not working ("
        + "; ".join(tried or ["nothing beside the interpreter or on PATH"])
        + "): install the dcm2niix package into the environment",
    )


@dataclass(frozen=True)
class Output:
    """One image dcm2niix wrote for the series."""

    path: Path  # the NIfTI file
    postfix: str  # what dcm2niix appended to the base name ("" for the plain image)
    kind: str  # see :data:`KINDS`

    @property
    def label(self) -> str:
        return f"{self.postfix or '(plain)'} ({KINDS[self.kind]})"


#: What each kind of output is.
KINDS = {
    "image": "the series as stored",
    "tilt_corrected": "resampled to remove gantry tilt",
    "equalized": "slices interpolated to equal spacing",
    "tilt_corrected_equalized": "tilt removed and slices equalized",
    "roi": "a region-of-interest image",
    "echo": "one echo of a multi-echo series",
    "instance": "images split off by instance (different geometry or parameters)",
    "phase": "a phase or complex component",
    "other": "another image of the series",
}

_PATTERNS = (
    (re.compile(r"^_Tilt_Eq_\d+$"), "tilt_corrected_equalized"),
    (re.compile(r"^_Tilt_\d+$"), "tilt_corrected"),
    (re.compile(r"^_Eq_\d+$"), "equalized"),
    (re.compile(r"^_ROI\d*$"), "roi"),
    (re.compile(r"^_e\d+$"), "echo"),
    (re.compile(r"^_i\d+$"), "instance"),
    (re.compile(r"^_(ph|real|imaginary)(_.*)?$"), "phase"),
)


def classify_output(postfix: str) -> str:
    """The kind of an output from its postfix (``_Tilt_1``, ``_Eq_1``, ``_ROI1``, ``_e2``,
    ``_i00004`` ...)."""
    if not postfix:
        return "image"
    for pattern, kind in _PATTERNS:
        if pattern.match(postfix):
            return kind
    return "other"


@dataclass(frozen=True)
class Run:
    returncode: int
    outputs: tuple[Output, ...]
    log: str  # dcm2niix's messages (stdout and stderr), for the debug log and error messages
    seconds: float

    def sidecar_for(self, output: Output) -> Path | None:
        """The JSON dcm2niix wrote for ``output`` (the plain image's one for derived images such
        as ``_Eq_1`` and ``_Tilt_1``, which get none of their own)."""
        own = output.path.with_name(output.path.name.split(".nii")[0] + ".json")
        if own.is_file():
            return own
        plain = output.path.with_name(BASE_NAME + ".json")
        return plain if plain.is_file() else None

    def last_message(self) -> str:
        """The last error or warning line dcm2niix printed (repeats skipped), or ''."""
        lines = [ln.strip() for ln in self.log.splitlines() if ln.strip()]
        for line in reversed(lines):
            if line.lower().startswith(("error", "warning")):
                return line
        return lines[-1] if lines else ""


def run_dcm2niix(
    tool: Dcm2niix, series_dir: Path, out_dir: Path, timeout: float = DEFAULT_TIMEOUT
) -> Run:
    """Convert the DICOM files in ``series_dir`` (that series only) into ``out_dir``.

    Raises ConvertError ``convert.dcm2niix_timeout`` (the process is killed) or
    ``convert.dcm2niix_failed`` when it cannot be started; a non-zero exit status is returned in
    the Run for the caller to judge."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(tool.executable),
        "-g", "i",  # ignore any defaults file of the user
        "-b", "y",
        "-ba", "y",
        "-c", "",
        "-z", "n",
        "-f", BASE_NAME,
        "-o", str(out_dir),
        "-w", "1",
        "-d", "0",
        "-i", "n",
        "-x", "n",
        "-l", "o",
        "-v", "0",
        str(series_dir),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        # a session of its own: on timeout the whole process group goes (dcm2niix may start
        # pigz), and no orphan keeps the output pipes open
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        raise ConvertError(
            "convert.dcm2niix_failed",
            f"dcm2niix ({tool.executable}) cannot be started: {exc.strerror or exc}",
        ) from None
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise ConvertError(
            "convert.dcm2niix_timeout",
            f"dcm2niix did not finish within {timeout:g} s on {series_dir.name}: stopped",
        ) from None
    except BaseException:
        _kill_group(process)
        process.communicate()
        raise
    seconds = time.perf_counter() - start
    messages = stdout + stderr
    log.debug("dcm2niix exit %d in %.2f s:\n%s", process.returncode, seconds, messages)
    outputs = []
    for path in sorted(out_dir.iterdir()):
        name = path.name
        stem = next((name[: -len(e)] for e in (".nii.gz", ".nii") if name.endswith(e)), None)
        if stem is None or not stem.startswith(BASE_NAME):
            continue
        postfix = stem[len(BASE_NAME) :]
        outputs.append(Output(path, postfix, classify_output(postfix)))
    return Run(process.returncode, tuple(outputs), messages, seconds)


def _kill_group(process: subprocess.Popen[str]) -> None:
    """Kill the process dcm2niix runs in and whatever it started (its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        process.kill()
