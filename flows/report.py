"""Rendering results for people: terminal tables (rich) and markdown (Prefect artifacts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from cohortflow.flows.output import SafeTable, cell

if TYPE_CHECKING:  # types only: a command imports this module for its one report
    from cohortflow.flows.protocol_flow import SelectionSummary
    from cohortflow.models.ingest import BatchReport, VerifyReport
    from cohortflow.models.outcomes import ProtocolOutcome
    from cohortflow.pipelines.convert.results import ConvertReport
    from cohortflow.pipelines.export.stats import Comparison, Longitudinal, ModelFit
    from cohortflow.pipelines.quality.folder import QcReport
    from cohortflow.pipelines.retrieve.engine import RetrieveOutcome, RetrieveSummary
    from cohortflow.pipelines.run.outcome import BiomarkerSummary, RunSummary
    from cohortflow.pipelines.select.query import SelectionResult
    from cohortflow.pipelines.synth.summary import CohortSummary
    from cohortflow.pipelines.volumetry.run import VolumetryReport

Rows = list[tuple[str, str, str]]  # (what, detail, count)

#: The colour of a QC verdict in the stages' tables.
VERDICT_COLOUR = {"pass": "green", "warn": "yellow", "fail": "red"}


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
    table = SafeTable(title=title)
    table.add_column("what")
    table.add_column("")
    table.add_column("count", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def rows_markdown(rows: Rows) -> list[str]:
    """The same (what, detail, count) rows as markdown table lines (Prefect artifacts)."""
    return ["| what | | count |", "|---|---|---:|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def counts_markdown(title: str, rows: Sequence[tuple[str, int]], unit: str = "count") -> str:
    """A titled two-column markdown table of counts (Prefect artifacts: counts, no identifiers)."""
    lines = [f"# {title}", f"| what | {unit} |", "|---|---:|"]
    return "\n".join([*lines, *(f"| {k} | {v} |" for k, v in rows)])


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
        lines = SafeTable(title="manifest lines that are not complete")
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
        problems = SafeTable(title=f"files that are not clean DICOM ({len(report.problems)})")
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
    table = SafeTable(title="archive integrity")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name in ("checked", "ok", "changed", "missing", "unreadable", "untracked"):
        table.add_row(name, str(getattr(report, name)))
    console.print(table)
    for problem in report.problems[:SHOWN_PROBLEMS]:
        console.print(f"{problem.problem}: {problem.path}")


# --- selection and retrieval -------------------------------------------------------------------


def selection_json(
    result: SelectionResult, selection_id: int | None, dry_run: bool
) -> dict[str, Any]:
    return {
        "selection_id": selection_id,
        "dry_run": dry_run,
        "protocol": result.protocol,
        "from": str(result.date_from),
        "to": str(result.date_to),
        "pacs": result.pacs,
        "listed_from": result.listed_from,
        "notes": list(result.notes),
        "unanswered_fields": list(result.unanswered),
        "studies_found": len(result.studies),
        "studies_selected": len(result.selected),
        "series_selected": sum(len(s.chosen) for s in result.selected),
        "studies": [
            {
                "study_instance_uid": s.study_instance_uid,
                "accession_number": s.accession_number,
                "study_date": str(s.study_date) if s.study_date else None,
                "study_description": s.study_description,
                "selected": s.selected,
                "why": s.why,
                "series": [
                    {
                        "series_instance_uid": se.series_instance_uid,
                        "series_number": se.attributes.get("SeriesNumber"),
                        "series_description": se.attributes.get("SeriesDescription"),
                        "protocol_name": se.attributes.get("ProtocolName"),
                        "instances": se.expected_instances,
                        "selected": s.selected and se.decision.selected,
                        "rule": se.decision.rule,
                        "why": se.decision.why,
                    }
                    for se in s.series
                ],
            }
            for s in result.studies
        ],
    }


def print_selection(result: SelectionResult, console: Console, dry_run: bool) -> None:
    """The studies the PACS returned, each series with the rule that decided it."""
    title = (
        f"{'dry run: ' if dry_run else ''}protocol {result.protocol}, {result.date_from} to "
        f"{result.date_to}, {result.pacs}: {len(result.selected)} of {len(result.studies)} "
        f"studies selected"
    )
    table = SafeTable(title=title, show_lines=True)
    for name in ("study", "series", "rule", "why"):
        table.add_column(name)
    for study in result.studies:
        mark = cell("selected", "green") if study.selected else cell("rejected", "red")
        head = f"{study.study_date} {study.accession_number or '-'}\n{study.study_description}"
        table.add_row(head, mark, "", study.why)
        if not dry_run and not study.selected:
            continue
        for se in study.series:
            chosen = study.selected and se.decision.selected
            number = se.attributes.get("SeriesNumber") or "?"
            count = se.expected_instances if se.expected_instances is not None else "?"
            label = f"{number} {se.attributes.get('SeriesDescription') or ''} ({count})"
            table.add_row(
                "",
                cell(label, "green" if chosen else "dim"),
                se.decision.rule,
                se.decision.why,
            )
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
    for keyword in result.unanswered:
        console.print(
            f"note: no series had a value for {keyword} (empty, or not returned by this PACS at "
            "series level); rules on it did not match"
        )


def print_retrieval(outcome: RetrieveOutcome, console: Console) -> None:
    table = SafeTable(
        title=f"retrieval of selection {outcome.selection_id} ({outcome.method}): {outcome.state}"
    )
    for name in ("study", "status", "series", "attempts", "problems"):
        table.add_column(name)
    for study in outcome.studies:
        problems = [
            f"{se.rule}: {se.status}: {se.reason}" for se in study.series if se.status != "complete"
        ]
        table.add_row(
            study.accession_number or study.study_instance_uid,
            study.status,
            str(len(study.series)),
            str(study.attempts),
            "\n".join(problems) or "-",
        )
    console.print(table)
    counts = {s: outcome.count(s) for s in ("complete", "already", "incomplete", "failed", "gone")}
    counts["pending"] = outcome.count("pending")
    console.print(
        ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + f"; {outcome.seconds:.1f} s; at most {outcome.associations_peak} association(s) open "
        f"at once ({outcome.associations_opened} opened); waited {outcome.waited_seconds:.0f} s"
    )
    if outcome.message:
        console.print(f"[yellow]{outcome.state}:[/yellow] {outcome.message}; rerun to resume")


def print_protocol_runs(
    runs: Sequence[tuple[SelectionSummary, RetrieveSummary]], console: Console
) -> None:
    table = SafeTable(title="selection and retrieval per protocol (from the PACS into the archive)")
    for name in (
        "protocol",
        "studies found",
        "selected",
        "series",
        "retrieval",
        "studies by status",
    ):
        table.add_column(name)
    for sel, ret in runs:
        table.add_row(
            sel.protocol,
            str(sel.studies_found),
            str(sel.studies_selected),
            str(sel.series_selected),
            ret.state,
            ", ".join(f"{v} {k}" for k, v in ret.by_status.items()) or "-",
        )
    console.print(table)


def qc_json(report: QcReport) -> dict[str, Any]:
    """The QC of a folder as one JSON document (``cohortflow qc --json``)."""
    counts = Counter(s.verdict.value for s in report.series)
    return {
        "checked": len(report.series),
        "passed": counts.get("pass", 0),
        "warned": counts.get("warn", 0),
        "failed": counts.get("fail", 0),
        "series": [
            {
                "study": s.study,
                "series": s.series,
                "folder": s.folder,
                "description": s.description,
                "protocol": s.protocol,
                "role": s.role,
                "evidence": s.evidence,
                "scanner": {
                    "manufacturer": s.manufacturer,
                    "model": s.model,
                    "software_versions": s.software_versions,
                },
                "verdict": s.verdict.value,
                "reason_code": s.reason.check if s.reason else None,
                "reason": s.reason.message if s.reason else None,
                "input_sha256": s.input_sha256,
                "files": s.files,
                "stages": [
                    {
                        "stage": st.stage,
                        "verdict": st.verdict.value,
                        "seconds": st.seconds,
                        "findings": [f.as_dict() for f in st.findings],
                        "metrics": st.metrics,
                    }
                    for st in s.stages
                ],
            }
            for s in report.series
        ],
        "not_checked": [asdict(n) for n in report.not_checked],
        "skipped": [asdict(s) for s in report.skipped],
    }


def print_qc_report(report: QcReport, console: Console) -> None:
    """One line per series checked (verdict and deciding finding), then each finding of the
    series that did not pass, then what was not checked and why."""
    table = SafeTable(title="QC: header and image")
    for name in ("series", "role", "verdict", "reason"):
        table.add_column(name)
    for s in report.series:
        deciding = s.reason
        table.add_row(
            f"{s.folder} ({s.description})" if s.description else s.folder,
            s.role,
            cell(s.verdict.value, VERDICT_COLOUR[s.verdict.value]),
            f"{deciding.check}: {deciding.message}" if deciding else "",
        )
    console.print(table)
    for s in report.series:
        extra = [f for st in s.stages for f in st.findings if f is not s.reason]
        for f in extra:
            console.print(f"  {s.folder}: {f.severity.value} {f.check}: {f.message}")
    for n in report.not_checked:
        console.print(f"not checked: {n.folder}: {n.reason_code}: {n.reason}")
    for skipped in report.skipped:
        console.print(f"skipped: {skipped.source}: {skipped.reason}")
    counts = Counter(s.verdict.value for s in report.series)
    console.print(
        f"{len(report.series)} series checked: {counts.get('pass', 0)} passed, "
        f"{counts.get('warn', 0)} with warnings, {counts.get('fail', 0)} failed; "
        f"{len(report.not_checked)} not checked"
    )


def print_convert_report(report: ConvertReport, console: Console, title: str) -> None:
    """One line per series converted or refused (image, converter, verdict and deciding
    finding), then what was not converted or skipped and why."""
    table = SafeTable(title=title)
    for column in ("series", "image", "converter", "verdict", "reason"):
        table.add_column(column)
    for s in report.series:
        deciding = s.reason
        table.add_row(
            f"{s.folder} ({s.description})" if s.description else s.folder,
            s.name if s.converted else "",
            s.converter or "",
            cell(s.verdict.value, VERDICT_COLOUR[s.verdict.value]),
            f"{deciding.check}: {deciding.message}" if deciding else "",
        )
    console.print(table)
    for n in report.not_converted:
        console.print(f"not converted: {n.folder}: {n.reason_code}: {n.reason}")
    for skipped in report.skipped:
        console.print(f"skipped: {skipped.source}: {skipped.reason}")


def print_volumetry_report(
    report: VolumetryReport, console: Console, title: str, overlays: Path
) -> None:
    """One line per T1 measured (volumes, verdict and deciding check), then what was not
    measured or skipped, and where the overlays are."""
    table = SafeTable(title=title)
    for column in ("image", "ICV ml", "GM ml", "WM ml", "CSF ml", "brain ml", "BPF", "QC"):
        table.add_column(column)
    for r in report.results:
        v = r.volumes
        deciding = r.reason
        qc = cell(r.verdict.value, VERDICT_COLOUR[r.verdict.value])
        if deciding is not None:
            qc.append(f" {deciding.check}")
        numbers = (
            [
                f"{v.icv_ml:.0f}",
                f"{v.gm_ml:.0f}",
                f"{v.wm_ml:.0f}",
                f"{v.csf_ml:.0f}",
                f"{v.brain_ml:.0f}",
                f"{v.bpf:.3f}",
            ]
            if v is not None
            else [""] * 6
        )
        table.add_row(r.source.name, *numbers, qc)
    console.print(table)
    for name, code, message in report.not_measured:
        console.print(f"not measured: {name}: {code}: {message}")
    for skipped in report.skipped:
        console.print(f"skipped: {skipped.source}: {skipped.reason}", markup=False)
    if report.results:
        console.print(f"overlays in {overlays}")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


def outcome_rows(outcome: ProtocolOutcome) -> Rows:
    """A protocol's success rates as rows: overall, per stage, per scanner, reasons."""
    rows: Rows = [
        ("selected", "studies", str(outcome.studies_selected)),
        ("selected", "series", str(outcome.series_selected)),
        ("selected", "T1 series (biomarker role)", str(outcome.t1_series)),
        (
            "with biomarkers",
            "studies",
            f"{outcome.studies_with_biomarkers} ({_percent(outcome.study_rate)})",
        ),
        (
            "with biomarkers",
            "T1 series",
            f"{outcome.t1_with_biomarkers} ({_percent(outcome.t1_rate)})",
        ),
    ]
    for stage in outcome.stages:
        rows.append(
            (
                "stage: pass+warn / reached",
                stage.stage,
                f"{stage.passed + stage.warned} / {stage.reached} ({_percent(stage.rate)})",
            )
        )
    for scanner in outcome.scanners:
        rows.append(
            (
                "T1s with biomarkers by scanner",
                scanner.group,
                f"{scanner.with_biomarkers} / {scanner.t1_series} ({_percent(scanner.rate)})",
            )
        )
    for code, n in outcome.t1_reasons.items():
        rows.append(
            (
                "T1s without biomarkers: why",
                f"{code} (at {outcome.reason_stage.get(code, '?')})",
                str(n),
            )
        )
    other = {k: v - outcome.t1_reasons.get(k, 0) for k, v in outcome.series_reasons.items()}
    for code, n in other.items():
        if n > 0:
            rows.append(
                (
                    "other series stopped: why",
                    f"{code} (at {outcome.reason_stage.get(code, '?')})",
                    str(n),
                )
            )
    return rows


def biomarker_rows(summary: BiomarkerSummary) -> Rows:
    rows: Rows = [("biomarkers", "T1s measured, no stage failed", str(summary.n))]
    for name, mean in summary.means.items():
        sd = summary.sds.get(name, 0.0)
        shown = f"{mean:.3f} ± {sd:.3f}" if name == "bpf" else f"{mean:.0f} ± {sd:.0f}"
        rows.append(("biomarkers: mean ± SD", name, shown))
    return rows


def outcome_table(summary: RunSummary) -> list[dict[str, Any]]:
    """The per-stage table artifact."""
    return [
        {
            "stage": s.stage,
            "reached": s.reached,
            "passed": s.passed,
            "warned": s.warned,
            "failed": s.failed,
            "success": _percent(s.rate),
        }
        for s in summary.rates.stages
    ]


def outcome_markdown(summary: RunSummary) -> str:
    lines = [
        f"# protocol {summary.protocol}: run {summary.run_id} ({summary.state})",
        "",
        *rows_markdown(outcome_rows(summary.rates) + biomarker_rows(summary.biomarkers)),
    ]
    return "\n".join(lines)


def print_outcome(outcome: ProtocolOutcome, console: Console, title: str) -> None:
    console.print(rows_table(outcome_rows(outcome), title))


def print_run_summary(summary: RunSummary, console: Console) -> None:
    title = f"protocol {summary.protocol}: run {summary.run_id} ({summary.state})"
    console.print(
        rows_table(outcome_rows(summary.rates) + biomarker_rows(summary.biomarkers), title)
    )


def print_comparison(result: Comparison, console: Console, models: bool = True) -> None:
    """Each biomarker per group (n, mean ± SD); each group against the reference at equal
    covariates (estimate, 95 % CI, p, Holm-corrected p, Cohen's d); then (``models``) each
    model's table."""
    from cohortflow.pipelines.export.stats import LABELS

    first = result.biomarkers[0].groups
    table = SafeTable(title=f"by {result.by}, one study per patient (n={result.n})")
    table.add_column("biomarker")
    for g in first:
        table.add_column(f"{g.group} (n={g.n})\nmean ± SD", justify="right")
    for b in result.biomarkers:
        digits = 4 if b.biomarker == "bpf" else 1
        cells = [f"{g.mean:.{digits}f} ± {g.sd:.{digits}f}" for g in b.groups]
        table.add_row(LABELS.get(b.biomarker, b.biomarker), *cells)
    console.print(table)
    adjusted = ", ".join(result.covariates) or "nothing"
    table = SafeTable(title=f"against {result.reference}, adjusted for {adjusted}")
    for name in ("biomarker", "group", "estimate (%)", "95 % CI", "p", "p Holm", "Cohen's d"):
        table.add_column(name, justify="left" if name in ("biomarker", "group") else "right")
    for b in result.biomarkers:
        digits = 4 if b.biomarker == "bpf" else 1
        name = LABELS.get(b.biomarker, b.biomarker) + (" adj." if b.adjusted else "")
        for c in b.contrasts:
            table.add_row(
                name,
                c.group,
                f"{c.estimate:+.{digits}f} ({c.percent:+.1f} %)",
                f"[{c.ci_low:+.{digits}f}, {c.ci_high:+.{digits}f}]",
                _p(c.p),
                _p(c.p_holm),
                f"{c.cohens_d:+.2f}",
            )
    console.print(table)
    for b in result.biomarkers if models else ():
        console.print(_model_table(b.model))
    left = []
    if result.excluded:
        left.append(f"{result.excluded} rows left out (not usable, or no {result.by})")
    if result.later_studies:
        left.append(
            f"{result.later_studies} later studies of the same patients set aside "
            "(stats longitudinal models them; --every-study counts them)"
        )
    for line in [*left, *result.notes]:
        console.print(line)


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _model_table(model: ModelFit) -> Table:
    """One fitted model's coefficients: estimate, SE, statistic, p, 95 % CI."""
    facts = [f"n={model.n}"]
    if model.df_resid is not None:
        facts.append(f"df={model.df_resid:g}")
    if model.r_squared is not None:
        facts.append(f"R²={model.r_squared:.3f}")
    if model.patients is not None:
        facts.append(f"patients={model.patients}")
    if model.random_intercept_sd is not None:
        facts.append(f"patient SD={model.random_intercept_sd:.4g}")
    if not model.converged:
        facts.append("NOT CONVERGED")
    table = SafeTable(title=f"{model.method}: {model.formula} ({', '.join(facts)})")
    for name in ("term", "estimate", "SE", "t" if model.df_resid is not None else "z", "p"):
        table.add_column(name, justify="left" if name == "term" else "right")
    table.add_column("95 % CI", justify="right")
    for t in model.terms:
        table.add_row(
            t.term,
            f"{t.estimate:.4g}",
            f"{t.se:.3g}",
            f"{t.statistic:.2f}",
            _p(t.p),
            f"[{t.ci_low:.4g}, {t.ci_high:.4g}]",
        )
    return table


def print_longitudinal(result: Longitudinal, console: Console) -> None:
    """The annualised change of each biomarker (per group), its 95 % CI, p and Holm-corrected
    p; each group's difference from the reference; then each model's table."""
    from cohortflow.pipelines.export.stats import LABELS

    by = f" by {result.by} at the first study" if result.by else ""
    title = (
        f"annualised change{by}: {result.patients} patients with two or more studies, "
        f"{result.studies} studies, follow-up up to {result.follow_up_years:.1f} years"
    )
    table = SafeTable(title=title)
    for name in ("biomarker", "group", "patients", "per year [95 % CI]", "% per year [95 % CI]"):
        table.add_column(name, justify="left" if name in ("biomarker", "group") else "right")
    table.add_column("p", justify="right")
    table.add_column("p Holm", justify="right")
    for trend in result.biomarkers:
        digits = 5 if trend.biomarker == "bpf" else 2
        for r in trend.rates:
            table.add_row(
                LABELS.get(trend.biomarker, trend.biomarker),
                r.group or "all",
                str(r.patients),
                f"{r.per_year:+.{digits}f} [{r.ci_low:+.{digits}f}, {r.ci_high:+.{digits}f}]",
                f"{r.percent_per_year:+.2f} [{r.percent_ci_low:+.2f}, {r.percent_ci_high:+.2f}]",
                _p(r.p),
                _p(r.p_holm),
            )
        for d in trend.differences:
            table.add_row(
                "",
                f"{d.group} - {d.reference}",
                "",
                f"{d.difference:+.{digits}f} [{d.ci_low:+.{digits}f}, {d.ci_high:+.{digits}f}]",
                "",
                _p(d.p),
                _p(d.p_holm),
            )
    console.print(table)
    for trend in result.biomarkers:
        console.print(_model_table(trend.model))
    if result.single_study_patients:
        console.print(f"{result.single_study_patients} patients with one usable study left out")
    if result.ungrouped_patients:
        console.print(
            f"{result.ungrouped_patients} patients without a {result.by} at their first study "
            "left out"
        )
    if result.excluded_rows:
        console.print(f"{result.excluded_rows} rows left out (not usable, or no pseudonym or time)")
    for note in result.notes:
        console.print(note)
