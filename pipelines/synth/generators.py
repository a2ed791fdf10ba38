"""Which anatomy synthetic heads are drawn from: the generators a cohort or a benchmark names.

- ``mni``: the atlas model (pydeface's mean head with the MNI152 2009a maps), the very templates
  defacing and volumetry register, with flat intensities per tissue class. Figures on it flatter
  those methods; kept as the default so that earlier cohorts and figures are reproduced.
- ``colin``: Colin27 (one person's head; tissue classes by Otsu inside FSL BET's mask,
  ``pipelines.atlas.colin``) with tissue texture: anatomy apart from what the methods register.
  Its image ends below the nose (the model adds a crude neck below), so its scans end there (as
  a real scan ends at the edge of its field of view), not in air where a jaw would be.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cohortflow.models.errors import did_you_mean
from cohortflow.pipelines.atlas.colin import load_or_build_colin
from cohortflow.pipelines.atlas.headmodel import HeadModel, load_or_build
from cohortflow.pipelines.synth.errors import SynthError


@dataclass(frozen=True)
class Generator:
    """A head model and how its tissue is rendered.

    ``load`` builds or loads the model in a cache folder; ``texture_sd`` is the relative SD of
    the smooth tissue texture (``anatomy.texture_gain``), 0 for flat classes.
    """

    name: str
    load: Callable[[Path], HeadModel]
    texture_sd: float
    description: str
    #: scans end where the model's image ends (``anatomy.within_model``): a model without a neck
    crop_to_model: bool = False


GENERATORS: dict[str, Generator] = {
    "mni": Generator(
        "mni",
        load_or_build,
        0.0,
        "pydeface's mean head with the MNI152 2009a maps (the templates our methods register), "
        "flat tissue classes",
    ),
    "colin": Generator(
        "colin",
        load_or_build_colin,
        0.06,
        "Colin27 (one person's head, Debian's mricron-data): Otsu tissue classes inside FSL "
        "BET's mask, tissue texture of 6 %; a crude neck below its field of view",
        crop_to_model=True,
    ),
}
DEFAULT_GENERATOR = "mni"


def get(name: str) -> Generator:
    """The generator called ``name``."""
    try:
        return GENERATORS[name]
    except KeyError:
        raise SynthError(
            f"unknown head generator {name!r}{did_you_mean(name, GENERATORS)}: choose one of "
            f"{', '.join(sorted(GENERATORS))}"
        ) from None
