"""Flows around the synthetic cohort: thin wrappers, one pipeline call per task."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from cohortflow.flows.protocol_flow import (
    load_into_pacs,
    protocol_flow,
    start_own_pacs,
    stop_own_pacs,
)
from cohortflow.models.synth import DEMO_SEED, DEMO_STUDIES, SynthConfig
from cohortflow.pipelines.run.outcome import RunSummary
from cohortflow.pipelines.synth.cohort import generate
from cohortflow.pipelines.synth.summary import CohortSummary, summarize

#: The synthetic cohort's studies all lie in this range.
EVERY_DATE = (dt.date(1990, 1, 1), dt.date(2030, 12, 31))


@task(name="generate-synthetic-cohort")
def generate_cohort(
    config: SynthConfig, out_dir: Path, cache_dir: Path, workers: int
) -> CohortSummary:
    # the demo scores no defacing against truth: its maps are not drawn (a tenth of the time)
    result = generate(
        config, out_dir, cache_dir, workers=workers, overwrite=True, deface_truth=False
    )
    return summarize(result.truth)


@task(name="publish-summary")
def publish_summary(summary: CohortSummary) -> None:
    from cohortflow.flows.report import summary_markdown

    create_markdown_artifact(
        summary_markdown(summary),
        key="synthetic-cohort",
        description="What the synthetic cohort contains",
    )


@flow(name="cohortflow-demo")
def demo_flow(
    out_dir: Path,
    cache_dir: Path,
    studies: int = DEMO_STUDIES,
    seed: int = DEMO_SEED,
    workers: int = 2,
    protocol: str = "dementia",
    config: Path | None = None,
) -> tuple[CohortSummary, RunSummary]:
    """Generate a synthetic clinical cohort, load it into the project's own PACS (Orthanc), then
    run one protocol's flow on it end to end, as a hospital run would: selection, retrieval,
    de-identification, QC, conversion, volumetry, success rates. The cohort is the demo's
    (``SynthConfig.demo``): dementia-protocol studies, half of the patients with dementia, a
    few planted faults."""
    summary = generate_cohort(SynthConfig.demo(studies, seed), out_dir, cache_dir, workers)
    publish_summary(summary)
    started = start_own_pacs(config)
    try:
        load_into_pacs(out_dir / "dicom", config)
        run = protocol_flow(protocol, *EVERY_DATE, workers=workers, config=config)
    finally:
        if started:
            stop_own_pacs(config)
    return summary, run
