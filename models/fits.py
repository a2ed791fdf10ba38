"""Head fits kept by the content they were made from (register once).

A rerun, or another stage given the same image, reads the transform the first registration made
instead of registering again (``pipelines.imaging.register.fit_affine``). The key hashes the
image's voxels and geometry, the template file's content and the registration's settings: the
same key gives the same transform, as a registration with ITK single-threaded (the default)
does; with more threads a stored fit stands for one that differs in its last digits. A file holds
a 4 x 4 matrix and nothing of the image. A damaged or foreign file is ignored and replaced.

A deformable registration's transforms (volumetry's SyN: a displacement field at a few
millimetres and the affine it started from, ANTs' own files) are kept the same way, as files
beside a manifest written last (:meth:`FitStore.get_files`, :meth:`FitStore.put_files`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)


class FitStore:
    """A folder of fits, one JSON file per key (``Settings.fits``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @staticmethod
    def key(
        pixels: npt.NDArray[np.generic],
        geometry: tuple[Any, Any, Any],
        settings: Mapping[str, Any],
    ) -> str:
        """The key of a fit to ``pixels`` placed by ``geometry`` (origin, spacing, direction),
        made with ``settings`` (JSON-serialisable: the template's digest among them)."""
        voxels = np.ascontiguousarray(pixels, dtype=np.float32)
        described = {
            "shape": list(voxels.shape),
            "geometry": [[float(v) for v in np.asarray(part).ravel()] for part in geometry],
            "settings": settings,
        }
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
        digest.update(voxels.tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> npt.NDArray[np.float64] | None:
        """The stored 4 x 4 matrix, None when there is none (or it is damaged)."""
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
            matrix = np.asarray(data["subject_to_template"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            return None
        return matrix

    def put(self, key: str, matrix: npt.NDArray[np.float64]) -> bool:
        """Keep ``matrix`` under ``key``; False when it cannot be written (a full disk, a
        read-only cache): the store only saves work, so the fit is used all the same."""
        text = json.dumps({"subject_to_template": np.asarray(matrix, dtype=np.float64).tolist()})
        try:
            _replace(self._path(key), lambda temporary: temporary.write_text(text, "utf-8"))
        except OSError as exc:
            log.warning("head fit not kept in %s: %s", self.folder, exc)
            return False
        return True

    def get_files(self, key: str) -> list[Path] | None:
        """The transform files kept under ``key``, in the order they were given, None when there
        are none (or one is missing: a store emptied by hand)."""
        manifest = self._path(key)
        try:
            names = [
                str(name) for name in json.loads(manifest.read_text(encoding="utf-8"))["files"]
            ]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # names only, each under this key: a manifest pointing elsewhere is foreign
        if not names or any(not name.startswith(f"{key}.") or "/" in name for name in names):
            return None
        files = [manifest.with_name(name) for name in names]
        return files if all(path.is_file() for path in files) else None

    def put_files(self, key: str, files: Sequence[Path]) -> bool:
        """Keep copies of ``files`` under ``key`` (each named by the key, its position and its
        suffixes); the manifest that lists them is written last, so a reader sees all or none.
        False when they cannot be written."""
        manifest = self._path(key)
        names = [f"{key}.{n}{''.join(Path(f).suffixes)}" for n, f in enumerate(files)]
        try:
            for source, name in zip(files, names, strict=True):
                _replace(manifest.with_name(name), functools.partial(shutil.copyfile, source))
            text = json.dumps({"files": names})
            _replace(manifest, lambda temporary: temporary.write_text(text, "utf-8"))
        except OSError as exc:
            log.warning("registration not kept in %s: %s", self.folder, exc)
            return False
        return True


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it to ``path``: whole or absent,
    as processes may race to write the same key (they write the same content)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
