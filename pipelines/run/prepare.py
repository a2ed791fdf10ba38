"""What every worker of a run needs first, made before the workers start."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cohortflow.models.settings import Settings


def prepare_models(settings: Settings) -> None:
    """Make the head model, then defacing's labels and the volumetry atlas side by side (a
    process each: both are derived from the head model, neither from the other) in the
    cache, so that the run's workers read them rather than wait for them. On first use this
    takes about three minutes, afterwards a few seconds. Nothing is kept in this process."""
    from cohortflow.pipelines.atlas.headmodel import load_or_build
    from cohortflow.pipelines.atlas.template import load_brain_template
    from cohortflow.pipelines.volumetry.atlas import load_atlas

    policy = settings.deface
    margins = (policy.brain_margin_mm, policy.face_margin_mm, policy.brow_mm)
    spawn = multiprocessing.get_context("spawn")  # this process may run threads: no fork
    with ProcessPoolExecutor(1, mp_context=spawn) as other:
        # started first: it imports while the head model is made, then waits for it (a lock)
        labels = other.submit(_deface_labels, settings.cache, margins)
        load_or_build(settings.cache)  # in a child process, one ITK thread (reproducible)
        load_atlas(settings.cache)
        labels.result()
    load_atlas.cache_clear()
    load_brain_template.cache_clear()


def _deface_labels(cache: Path, margins: tuple[float, float, float]) -> None:
    from cohortflow.pipelines.atlas.template import load_template

    load_template(cache, *margins)
