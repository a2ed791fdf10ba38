"""The QC flow: header and image QC of a folder, recorded in the index, published as artifacts.

Thin: one task calls the pipeline step. It runs on de-identified folders (the output of the
deidentify flow), so its results and artifacts carry counts by reason code, never identifiers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cohortflow.flows.prefect_env import configure_itk, protect_identified
from cohortflow.flows.report import counts_markdown
from cohortflow.models.database import open_index
from cohortflow.models.settings import load_settings
from cohortflow.pipelines.quality.folder import qc_configured


@dataclass(frozen=True)
class QcSummary:
    checked: int
    passed: int
    warned: int
    failed: int
    #: series by the check id that decided their verdict (failures and warnings)
    reasons: dict[str, int]
    #: series not checked, by why (not_selected, no_protocol, unreadable)
    not_checked: dict[str, int]


@task(name="qc-folder")
def qc_task(source: Path, protocol: str | None, config: Path | None) -> QcSummary:
    settings = load_settings(config)
    configure_itk(settings.itk_threads)  # before the first registration in this process
    protect_identified(settings)
    index = open_index(settings.index)
    try:
        report = qc_configured(settings, source, index, protocol=protocol)
    finally:
        index.dispose()
    verdicts = Counter(s.verdict.value for s in report.series)
    return QcSummary(
        checked=len(report.series),
        passed=verdicts.get("pass", 0),
        warned=verdicts.get("warn", 0),
        failed=verdicts.get("fail", 0),
        reasons=dict(Counter(s.reason.check for s in report.series if s.reason is not None)),
        not_checked=dict(Counter(n.reason_code for n in report.not_checked)),
    )


@task(name="publish-qc")
def publish(name: str, summary: QcSummary) -> None:
    key = f"qc-{name}".lower().replace("_", "-")[:100]
    create_table_artifact(
        [{"reason": k, "series": v} for k, v in sorted(summary.reasons.items())],
        key=f"{key}-reasons",
        description="Series by the QC check that decided their verdict",
    )
    rows = [
        ("series checked", summary.checked),
        ("passed", summary.passed),
        ("passed with warnings", summary.warned),
        ("failed", summary.failed),
        *((f"not checked: {k}", v) for k, v in summary.not_checked.items()),
    ]
    create_markdown_artifact(
        counts_markdown(f"QC of {name}", rows, "series"),
        key=key,
        description="Header and image QC",
    )


@flow(name="cohortflow-qc")
def qc_flow(source: Path, protocol: str | None = None, config: Path | None = None) -> QcSummary:
    """Header and image QC of every series under ``source`` that a protocol selects (named, or
    chosen per study by its description), recorded in the archive index."""
    summary = qc_task(source, protocol, config)
    publish(source.name, summary)
    return summary
