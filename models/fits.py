"""Head fits kept by the content they were made from (register once).

A rerun, or another stage given the same image, reads the transform the first registration made
instead of registering again (``pipelines.imaging.register.fit_affine``). The key hashes the
image's voxels and geometry, the template file's content and the registration's settings: the
same key gives the same transform, as a registration with ITK single-threaded (the default)
does; with more threads a stored fit stands for one that differs in its last digits. A file holds
a 4 x 4 matrix and nothing of the image. A damaged or foreign file is ignored and replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
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
        path = self._path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(
                json.dumps({"subject_to_template": np.asarray(matrix, dtype=np.float64).tolist()}),
                encoding="utf-8",
            )
            os.replace(temporary, path)  # whole or absent: processes may race to write it
        except OSError as exc:
            log.warning("head fit not kept in %s: %s", self.folder, exc)
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return False
        return True
