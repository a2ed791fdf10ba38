"""Flows around the synthetic cohort: thin wrappers, one pipeline call per task."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from models.synth import SynthConfig
from pipelines.synth.cohort import generate
from pipelines.synth.summary import CohortSummary, summarize


@task(name="generate-synthetic-cohort")
def generate_cohort(
    config: SynthConfig, out_dir: Path, cache_dir: Path, workers: int
) -> CohortSummary:
    result = generate(config, out_dir, cache_dir, workers=workers, overwrite=True)
    return summarize(result.truth)


@task(name="publish-summary")
def publish_summary(summary: CohortSummary) -> None:
    from flows.report import summary_markdown

    create_markdown_artifact(
        summary_markdown(summary),
        key="synthetic-cohort",
        description="What the synthetic cohort contains",
    )


@flow(name="cohortflow-demo")
def demo_flow(
    out_dir: Path, cache_dir: Path, studies: int = 12, seed: int = 0, workers: int = 2
) -> CohortSummary:
    """Generate a small synthetic clinical cohort and report what it holds.

    Later capabilities extend this flow until it runs the whole mission on the cohort.
    """
    summary = generate_cohort(SynthConfig(studies=studies, seed=seed), out_dir, cache_dir, workers)
    publish_summary(summary)
    return summary
