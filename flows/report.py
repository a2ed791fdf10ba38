"""Rendering results for people: terminal tables (rich) and markdown (Prefect artifacts)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from models.ingest import BatchReport, VerifyReport
from pipelines.synth.summary import CohortSummary

Rows = list[tuple[str, str, str]]  # (what, detail, count)


def summary_rows(summary: CohortSummary) -> Rows:
    rows: Rows = [
        ("cohort", "patients", str(summary.patients)),
        ("cohort", "studies", str(summary.studies)),
        ("cohort", "series", str(summary.series)),
        ("cohort", "files", str(summary.files)),
        ("cohort", "planted identifier locations", str(summary.identifiers)),
    ]
    rows += [("patients by group", k, str(v)) for k, v in summary.groups.items()]
    rows += [
        ("studies / series by protocol", k, f"{v} / {summary.series_by_protocol.get(k, 0)}")
        for k, v in summary.studies_by_protocol.items()
    ]
    rows += [("series by kind", k, str(v)) for k, v in summary.series_by_kind.items()]
    rows += [("planted faults", k, str(v)) for k, v in summary.faults.items()]
    return rows


def rows_table(rows: Rows, title: str) -> Table:
    """A (what, detail, count) table for the terminal."""
    table = Table(title=title)
    table.add_column("what")
    table.add_column("")
    table.add_column("count", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def rows_markdown(rows: Rows) -> list[str]:
    """The same (what, detail, count) rows as markdown table lines (Prefect artifacts)."""
    return ["| what | | count |", "|---|---|---:|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def print_summary(summary: CohortSummary, console: Console, title: str) -> None:
    console.print(rows_table(summary_rows(summary), title))


def summary_markdown(summary: CohortSummary) -> str:
    return "\n".join(rows_markdown(summary_rows(summary)))


def summary_json(summary: CohortSummary) -> dict[str, Any]:
    return asdict(summary)


# --- ingest ------------------------------------------------------------------------------------

SHOWN_PROBLEMS = 20


def batch_report_rows(report: BatchReport) -> Rows:
    rows: Rows = [
        ("batch", "state", report.state),
        ("batch", "files", str(report.files)),
    ]
    rows += [("files by status", c.status.value, str(c.files)) for c in report.by_status]
    rows += [
        ("content", "new to the archive", str(report.new_content)),
        ("content", "identical copies (stored once)", str(report.identical_copies)),
        (
            "indexed",
            "patients / studies / series",
            f"{report.patients} / {report.studies} / {report.series}",
        ),
        ("indexed", "instances", str(report.instances)),
        ("duplicates", "SOPInstanceUID with different content", str(len(report.sop_conflicts))),
        ("duplicates", "accession number on several studies", str(len(report.accession_conflicts))),
        ("duplicates", "batch delivered before as", ", ".join(report.delivered_before) or "-"),
        ("manifest", "verdict", report.manifest),
    ]
    by_line: dict[str, int] = {}
    for line in report.manifest_lines:
        by_line[line.status] = by_line.get(line.status, 0) + 1
    rows += [("manifest", f"studies {k}", str(v)) for k, v in sorted(by_line.items())]
    if report.manifest != "no manifest":
        rows.append(("manifest", "unexpected studies", str(len(report.unexpected_studies))))
    rows += [
        ("scanner alert", f"{a.manufacturer} {a.model} ({a.software_versions})", f"{a.files} files")
        for a in report.scanner_alerts
    ]
    return rows


def print_batch_report(report: BatchReport, console: Console) -> None:
    console.print(rows_table(batch_report_rows(report), f"batch {report.batch}: {report.source}"))
    shown = [line for line in report.manifest_lines if line.status != "complete"]
    if shown:
        lines = Table(title="manifest lines that are not complete")
        for name in ("accession", "status", "expected", "instances", "detail"):
            lines.add_column(name)
        for line in shown[:SHOWN_PROBLEMS]:
            lines.add_row(
                line.accession_number,
                line.status,
                str(line.expected_files or "-"),
                str(line.received_instances),
                line.detail,
            )
        console.print(lines)
    for conflict in report.accession_conflicts:
        console.print(
            f"accession {conflict.accession_number} is on {len(conflict.study_instance_uids)} "
            "studies: " + ", ".join(conflict.study_instance_uids)
        )
    for alert in report.scanner_alerts:
        console.print(f"[yellow]unknown scanner:[/yellow] {alert.reason}")
    if report.problems:
        problems = Table(title=f"files that are not clean DICOM ({len(report.problems)})")
        for name in ("status", "reason", "path"):
            problems.add_column(name)
        for p in report.problems[:SHOWN_PROBLEMS]:
            problems.add_row(p.status.value, p.reason, p.path)
        console.print(problems)
        if len(report.problems) > SHOWN_PROBLEMS:
            console.print(f"... and {len(report.problems) - SHOWN_PROBLEMS} more (see --json)")


def batch_report_markdown(report: BatchReport) -> str:
    lines = rows_markdown(batch_report_rows(report))
    if report.problems:
        lines += ["", "| status | reason | file |", "|---|---|---|"]
        lines += [
            f"| {p.status.value} | {p.reason} | {p.path} |"
            for p in report.problems[:SHOWN_PROBLEMS]
        ]
    return "\n".join(lines)


def print_verify_report(report: VerifyReport, console: Console) -> None:
    table = Table(title="archive integrity")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name in ("checked", "ok", "changed", "missing", "unreadable", "untracked"):
        table.add_row(name, str(getattr(report, name)))
    console.print(table)
    for problem in report.problems[:SHOWN_PROBLEMS]:
        console.print(f"{problem.problem}: {problem.path}")
