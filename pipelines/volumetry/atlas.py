"""The volumetry atlas: pydeface's whole head with an intracranial mask and tissue priors.

Everything comes from installed packages (``pipelines.atlas.headmodel``): the head is
pydeface's mean T1 (face, skull and neck, what a clinical T1 shows), the intracranial mask and
the CSF / GM / WM labels are nilearn's MNI152 2009a brain mask and tissue maps registered to that
head. The priors are the labels smoothed by a 1 mm Gaussian: a prior, not an answer, so the
classification follows the subject's intensities (``segment.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.pipelines.atlas.building import building
from cohortflow.pipelines.atlas.headmodel import (
    CSF,
    GM,
    WM,
    HeadModel,
    load_or_build,
    tissue_image,
)
from cohortflow.pipelines.atlas.template import Template, load_brain_template

logger = logging.getLogger(__name__)

PRIOR_SIGMA_MM = 1.0


@dataclass(frozen=True, eq=False)  # hashed by identity: one atlas per cache folder
class Atlas:
    head: npt.NDArray[np.float32]  # the T1 template registered to subjects (see template_t1)
    icv: npt.NDArray[np.float32]  # 1 inside the intracranial space, on the head's grid
    priors: npt.NDArray[np.float32]  # (3, ...) CSF, GM, WM probabilities on the head's grid
    affine: npt.NDArray[np.float64]  # voxel -> RAS mm of that grid
    digest: str
    #: the head model's template as defacing fits heads to it (the same grid and digest)
    fitting: Template


@lru_cache(maxsize=2)
def load_atlas(cache_dir: Path, fits: Path | None = None) -> Atlas:
    """The atlas from the cached head model (built on first use, about a minute); ``fits``:
    where heads fitted to it are kept (``Settings.fits``), none: every head is fitted.

    The registration template and the priors derived from the model are kept beside it
    (:func:`_derived`): made from the model they took 5 to 7 s of every process that measures
    (each command, each worker of a run), read back a fraction of a second."""
    model = load_or_build(cache_dir)
    head, icv, priors = _derived(cache_dir, model)
    return Atlas(
        head=head,
        icv=icv,
        priors=priors,
        affine=model.affine,
        digest=model.digest,
        fitting=(
            load_brain_template(cache_dir)
            if fits is None
            else load_brain_template(cache_dir).keeping_fits(fits)
        ),
    )


def _make_derived(
    model: HeadModel,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The registration template, the intracranial mask and the tissue priors of ``model``."""
    voxel = np.sqrt((model.affine[:3, :3] ** 2).sum(axis=0))
    priors = np.stack(
        [
            ndimage.gaussian_filter((model.labels == k).astype(np.float32), PRIOR_SIGMA_MM / voxel)
            for k in (CSF, GM, WM)
        ]
    )
    return (
        template_t1(model.head, model.labels),
        np.isin(model.labels, (CSF, GM, WM)).astype(np.float32),
        priors.astype(np.float32),
    )


def _derived(
    cache_dir: Path, model: HeadModel
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """:func:`_make_derived`, kept in the cache under a name that holds the model's digest and
    what the derivation depends on (a change of either makes a new file). A file that cannot
    be read is made again; one that cannot be written is not kept (the atlas is used all the
    same). Written under a temporary name and renamed: a reader never sees half a file."""
    key = hashlib.sha256(
        json.dumps([model.digest, PRIOR_SIGMA_MM, T1_LEVELS, (CSF, GM, WM)]).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"volumetry-atlas-{key}.npz"
    kept = _read_derived(path)
    if kept is not None:
        return kept
    with building(path):
        kept = _read_derived(path)
        return kept if kept is not None else _derive_and_keep(path, model, cache_dir)


def _read_derived(
    path: Path,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
    try:
        with np.load(path) as kept:
            return kept["head"], kept["icv"].astype(np.float32), kept["priors"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _derive_and_keep(
    path: Path, model: HeadModel, cache_dir: Path
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    head, icv, priors = _make_derived(model)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as out:
            np.savez(out, head=head, icv=icv.astype(np.uint8), priors=priors)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        logger.warning("the volumetry atlas is not kept in %s: %s", cache_dir, exc)
    return head, icv, priors


#: T1 intensities of the template's classes (fractions of white matter's).
T1_LEVELS = {"csf": 0.25, "gm": 0.62, "wm": 1.0, "skull": 0.05, "head": 1.1}


def template_t1(
    head: npt.NDArray[np.float32], labels: npt.NDArray[np.uint8]
) -> npt.NDArray[np.float32]:
    """The registration template: pydeface's head outside the intracranial space, the labels'
    T1 intensities inside, and the inner table of the skull drawn dark just outside the mask.

    pydeface's own mean head is not used as it is: its skull lies 1 to 3 mm outside the
    intracranial mask (nilearn's brain mask placed by an affine), so a registration that fits
    the skull carries the mask inside the subject's intracranial space (measured: ICV 10 %
    low). Drawing the inner table at the mask's edge makes the template's image and its mask
    agree.
    """
    return tissue_image(head, labels, T1_LEVELS)
