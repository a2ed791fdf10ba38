"""Flows around the synthetic cohort: thin wrappers, one pipeline call per task."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.ingest_flow import ingest_flow
from models.ingest import BatchReport
from models.synth import CohortTruth, SynthConfig
from pipelines.synth.cohort import generate
from pipelines.synth.summary import CohortSummary, summarize, write_manifest


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


@task(name="write-manifest")
def write_delivery_manifest(out_dir: Path) -> Path:
    truth = CohortTruth.model_validate_json((out_dir / "ground_truth.json").read_text("utf-8"))
    return write_manifest(truth, out_dir / "manifest.csv", undelivered=True)


@flow(name="cohortflow-demo")
def demo_flow(
    out_dir: Path,
    cache_dir: Path,
    studies: int = 12,
    seed: int = 0,
    workers: int = 2,
    config: Path | None = None,
) -> tuple[CohortSummary, BatchReport]:
    """Generate a small synthetic clinical cohort, ingest it as a delivery, report both.

    The manifest lists one study the delivery lacks, so the accounting shows a missing study.
    Later capabilities extend this flow until it runs the whole mission on the cohort.
    """
    summary = generate_cohort(SynthConfig(studies=studies, seed=seed), out_dir, cache_dir, workers)
    publish_summary(summary)
    manifest = write_delivery_manifest(out_dir)
    report = ingest_flow(
        [out_dir / "dicom"], batch=f"demo-seed{seed}", manifest=manifest, config=config
    )
    return summary, report
