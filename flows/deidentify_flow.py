"""The de-identification flow: anonymize the headers of a folder, then deface its images.

Thin: each task calls one pipeline function. The anonymized but not yet defaced copy and the
before / after pictures still show faces: they stay on the restricted side under
``$COHORTFLOW_HOME/restricted``; only ``out_dir`` is meant to leave it. Tasks return counts by
reason code, never identifiers (Prefect stores parameters and results).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from cohortflow.flows.prefect_env import configure_itk, protect_identified
from cohortflow.flows.report import counts_markdown
from cohortflow.models.database import open_index
from cohortflow.models.settings import Settings, load_settings
from cohortflow.pipelines.anonymize.files import anonymize_configured
from cohortflow.pipelines.deface.folder import deface_configured


@dataclass(frozen=True)
class AnonymizeSummary:
    written: int
    patients: int
    new_linkage: int
    excluded: dict[str, int]  # by reason code
    skipped: dict[str, int]
    failed: int


@dataclass(frozen=True)
class DefaceSummary:
    defaced: int
    excluded: dict[str, int]  # series, by reason code
    failed: dict[str, int]
    skipped_files: int


def restricted(settings: Settings, what: str, name: str) -> Path:
    """A folder on the restricted side (faces, identifiers) for the run delivering ``name``."""
    return settings.home / "restricted" / what / name


@task(name="anonymize-folder")
def anonymize_task(source: Path, staging: Path, config: Path | None) -> AnonymizeSummary:
    settings = load_settings(config)
    index = open_index(settings.index)
    try:
        run = anonymize_configured(settings, source, staging, index)
    finally:
        index.dispose()
    report = run.report
    return AnonymizeSummary(
        report.written,
        len(report.linkage),
        run.new_linkage,
        dict(Counter(o.reason_code or "" for o in report.excluded)),
        dict(Counter(o.reason_code or "" for o in report.skipped)),
        len(report.failed),
    )


@task(name="deface-folder")
def deface_task(staging: Path, out_dir: Path, previews: Path, config: Path | None) -> DefaceSummary:
    settings = load_settings(config)
    configure_itk(settings.itk_threads)  # before the first registration in this process
    protect_identified(settings)
    report = deface_configured(settings, staging, out_dir, previews)
    return DefaceSummary(
        len(report.with_status("defaced")),
        dict(Counter(o.reason_code or "" for o in report.with_status("excluded"))),
        dict(Counter(o.reason_code or "" for o in report.with_status("failed"))),
        len(report.skipped),
    )


@task(name="publish-deidentification")
def publish(name: str, anonymized: AnonymizeSummary, defaced: DefaceSummary) -> None:
    rows = [
        ("files de-identified", anonymized.written),
        ("patients", anonymized.patients),
        *((f"files excluded: {k}", v) for k, v in anonymized.excluded.items()),
        *((f"files skipped: {k}", v) for k, v in anonymized.skipped.items()),
        ("files failed", anonymized.failed),
        ("series defaced", defaced.defaced),
        *((f"series excluded: {k}", v) for k, v in defaced.excluded.items()),
        *((f"series failed: {k}", v) for k, v in defaced.failed.items()),
    ]
    create_markdown_artifact(
        counts_markdown(f"de-identification of {name}", rows),
        key=f"deidentify-{name}".lower().replace("_", "-")[:100],
        description="Header anonymization and defacing",
    )


@flow(name="cohortflow-deidentify")
def deidentify_flow(
    source: Path, out_dir: Path, config: Path | None = None
) -> tuple[AnonymizeSummary, DefaceSummary]:
    """Anonymize the DICOM files under ``source`` (PS3.15 profile, project key) and deface them
    into ``out_dir``, laid out by pseudonym / study / series."""
    settings = load_settings(config)
    staging = restricted(settings, "anonymized", out_dir.name)
    previews = restricted(settings, "deface-previews", out_dir.name)
    anonymized = anonymize_task(source, staging, config)
    defaced = deface_task(staging, out_dir, previews, config)
    publish(out_dir.name, anonymized, defaced)
    return anonymized, defaced
