"""What every worker of a run needs first, made before the workers start."""

from __future__ import annotations

from cohortflow.models.settings import Settings


def prepare_models(settings: Settings) -> None:
    """Make the head model, defacing's labels and the volumetry atlas in the cache (on first
    use about three minutes on one core; afterwards a few seconds to read them), so that the
    run's workers read them rather than wait for them. Nothing is kept in this process."""
    from cohortflow.pipelines.atlas.template import load_brain_template, load_template
    from cohortflow.pipelines.volumetry.atlas import load_atlas

    policy = settings.deface
    load_template(settings.cache, policy.brain_margin_mm, policy.face_margin_mm, policy.brow_mm)
    load_atlas(settings.cache)
    for cached in (load_template, load_brain_template, load_atlas):
        cached.cache_clear()
