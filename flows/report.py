"""Rendering results for people: terminal tables (rich) and markdown (Prefect artifacts)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.synth.summary import CohortSummary


def summary_rows(summary: CohortSummary) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = [
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


def print_summary(summary: CohortSummary, console: Console, title: str) -> None:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("")
    table.add_column("count", justify="right")
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)


def summary_markdown(summary: CohortSummary) -> str:
    lines = ["| what | | count |", "|---|---|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(summary)]
    return "\n".join(lines)


def summary_json(summary: CohortSummary) -> dict[str, Any]:
    return asdict(summary)
