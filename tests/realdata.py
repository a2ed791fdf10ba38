"""The real, openly licensed scans of ``../shared/realdata`` (its README: sources, licences,
reference masks), found through ``$COHORTFLOW_REALDATA`` and unpacked once into the test cache.

Where they are absent the tests that need them skip, saying how to get them; everything else
runs. Nothing of them is ever copied into the repository.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "realdata"
HOW = (
    "real data not found at {where}: set COHORTFLOW_REALDATA to the folder holding the real "
    "test-set archives, their MANIFEST.tsv and extract.sh (the project's shared/realdata; its "
    "README.md says what each holds)"
)


def source() -> Path:
    """Where the archives are: ``$COHORTFLOW_REALDATA``, else ``../shared/realdata``."""
    return Path(os.environ.get("COHORTFLOW_REALDATA") or DEFAULT).resolve()


def unpacked(cache: Path) -> Path:
    """``unpack`` for a test: skips it, saying how to get them, when the archives are absent."""
    try:
        return unpack(cache)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def unpack(cache: Path) -> Path:
    """The archives unpacked and verified under ``cache/realdata`` (once; later calls check a
    marker named after the manifest's digest); FileNotFoundError saying how to get them when
    they are absent (benchmarks and tests share this)."""
    where = source()
    manifest, extract = where / "MANIFEST.tsv", where / "extract.sh"
    if not (manifest.is_file() and extract.is_file()):
        raise FileNotFoundError(HOW.format(where=where))
    target = cache / "realdata"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    marker = target / f".verified-{digest}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not marker.is_file():
            done = subprocess.run(
                ["sh", str(extract), str(target)],
                check=False,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{extract} failed:\n{done.stdout}\n{done.stderr}")
            marker.touch()
    return target
