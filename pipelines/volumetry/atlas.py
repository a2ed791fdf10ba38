"""The volumetry atlas: pydeface's whole head with an intracranial mask and tissue priors.

Everything comes from installed packages (``pipelines.atlas.headmodel``): the head is
pydeface's mean T1 (face, skull and neck, what a clinical T1 shows), the intracranial mask and
the CSF / GM / WM labels are nilearn's MNI152 2009a brain mask and tissue maps registered to that
head. The priors are the labels smoothed by a 1 mm Gaussian: a prior, not an answer, so the
classification follows the subject's intensities (``segment.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.pipelines.atlas.headmodel import CSF, GM, WM, load_or_build, tissue_image
from cohortflow.pipelines.atlas.template import Template, load_brain_template

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
    where heads fitted to it are kept (``Settings.fits``), none: every head is fitted."""
    model = load_or_build(cache_dir)
    voxel = np.sqrt((model.affine[:3, :3] ** 2).sum(axis=0))
    priors = np.stack(
        [
            ndimage.gaussian_filter((model.labels == k).astype(np.float32), PRIOR_SIGMA_MM / voxel)
            for k in (CSF, GM, WM)
        ]
    )
    return Atlas(
        head=template_t1(model.head, model.labels),
        icv=np.isin(model.labels, (CSF, GM, WM)).astype(np.float32),
        priors=priors.astype(np.float32),
        affine=model.affine,
        digest=model.digest,
        fitting=(
            load_brain_template(cache_dir)
            if fits is None
            else load_brain_template(cache_dir).keeping_fits(fits)
        ),
    )


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
