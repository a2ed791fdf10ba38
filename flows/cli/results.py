"""``cohortflow export``, ``stats``, ``users`` and ``dashboard``: the commands of statisticians
and reviewers."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cohortflow.flows.cli.common import open_index
from cohortflow.flows.output import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    add_json,
    document,
    stdout_console,
    write_json,
)
from cohortflow.models.settings import Settings
from cohortflow.pipelines.safeio import printable

if TYPE_CHECKING:
    from cohortflow.models.export import BiomarkerTable, Labels


def add_commands(sub: Any) -> None:
    """Register export biomarkers, stats compare, users and dashboard, each with its handler."""
    export = sub.add_parser(
        "export",
        help="write the biomarker table (CSV or Parquet)",
        description="Tables for statisticians. Pseudonyms only: clinical labels given by "
        "accession number are joined on the identified side.",
    )
    export_sub = export.add_subparsers(dest="what", metavar="WHAT", required=True)
    biomarkers = export_sub.add_parser(
        "biomarkers",
        help="one row per measured T1",
        description="One row per measured T1: pseudonym, pseudonymized study and series, age "
        "(whole years, 90 and over as 90), sex, scanner, field strength, ICV, GM, WM, CSF, "
        "brain volume, BPF, the QC verdict, the newest review, whether it is usable, the "
        "method version, then the label columns. Every export is audited.",
    )
    biomarkers.add_argument("--protocol", help="one protocol (default: every one)")
    biomarkers.add_argument("--format", choices=("csv", "parquet"), default="csv")
    biomarkers.add_argument(
        "--labels",
        type=Path,
        metavar="CSV",
        help="clinical labels: a CSV with an accession_number column and label columns",
    )
    _add_skip_conflicting(biomarkers)
    biomarkers.add_argument(
        "--out",
        metavar="PATH",
        help="file to write (default: $COHORTFLOW_HOME/exports/biomarkers-...; '-': CSV on "
        "standard output)",
    )
    add_json(biomarkers, "what was written")
    biomarkers.set_defaults(handler=_export)

    stats = sub.add_parser(
        "stats",
        help="compare biomarkers between groups",
        description="Statistics over the biomarker table.",
    )
    stats_sub = stats.add_subparsers(dest="what", metavar="WHAT", required=True)
    compare = stats_sub.add_parser(
        "compare",
        help="per group n, mean, SD; a linear model per biomarker with covariates, 95 %% CI, "
        "Holm-corrected p",
        description="Group the usable rows of the biomarker table by a column (a label such as "
        "diagnosis, or sex, scanner...), one row per patient (the first study), and compare "
        "each biomarker: per group n, mean and SD; a linear model (OLS) of the biomarker on "
        "the group and the covariates (default ICV, age and sex; BPF and ICV without ICV); "
        "each group against the reference: the difference at equal covariates with its 95 % "
        "confidence interval, p, and p corrected across the biomarkers (Holm), the raw "
        "difference and Cohen's d; each model's table. Writes a box plot PNG.",
    )
    _add_source(compare)
    compare.add_argument("--by", required=True, metavar="COLUMN", help="the column to group by")
    compare.add_argument(
        "--covariates",
        metavar="LIST",
        help="comma-separated among icv, age, sex, or none (default: icv,age,sex); rows "
        "without one are dropped and counted",
    )
    compare.add_argument(
        "--adjust",
        choices=("icv",),
        help="as --covariates icv (kept for scripts written before --covariates)",
    )
    compare.add_argument("--reference", metavar="GROUP", help="default: the first group by name")
    compare.add_argument(
        "--every-study",
        action="store_true",
        help="every usable row counts (default: each patient's first study only; later ones "
        "are repeated measures: see stats longitudinal)",
    )
    compare.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="box plot (default: $COHORTFLOW_HOME/exports/compare-<by>.png)",
    )
    add_json(compare, "the comparison and its model tables")
    compare.set_defaults(handler=_compare)
    trend = stats_sub.add_parser(
        "longitudinal",
        help="annualised change per biomarker in patients with two or more studies (mixed "
        "model), with its plot",
        description="The patients with two or more usable studies (the others are counted and "
        "left out): per biomarker a linear mixed model (MixedLM, REML) of the biomarker on the "
        "years since the patient's first study, with a random intercept per patient; with "
        "--by, a rate per group (the group of the first study) and each group's difference "
        "from the reference. Annualised change with its 95 % confidence interval (per year and "
        "in % of the baseline level), p and p corrected across the biomarkers (Holm); each "
        "model's table. Writes a PNG of the trajectories.",
    )
    _add_source(trend)
    trend.add_argument("--by", metavar="COLUMN", help="a rate per group of this column")
    trend.add_argument("--reference", metavar="GROUP", help="default: the first group by name")
    trend.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="trajectories (default: $COHORTFLOW_HOME/exports/longitudinal[-<by>].png)",
    )
    add_json(trend, "the rates and their model tables")
    trend.set_defaults(handler=_longitudinal)

    users = sub.add_parser(
        "users",
        help="dashboard accounts",
        description="Accounts of the QC dashboard and cohort discovery. Roles: reviewer (read, "
        "review), researcher (read, export, save cohorts), steward (read, save cohorts, the "
        "identified layer of cohort discovery, the audit log), admin (review, export, the "
        "audit log). Names are unique without regard to case; passwords have at least 12 "
        "characters, not one repeated, not containing the name.",
    )
    users_sub = users.add_subparsers(dest="what", metavar="WHAT", required=True)
    add = users_sub.add_parser("add", help="make an account or change its role and password")
    add.add_argument("name")
    add.add_argument(
        "--role", required=True, choices=("reviewer", "researcher", "steward", "admin")
    )
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (else: asked for)",
    )
    add.set_defaults(handler=_users_add)
    listing = users_sub.add_parser("list", help="the accounts")
    add_json(listing, "the accounts")
    listing.set_defaults(handler=_users_list)
    disable = users_sub.add_parser("disable", help="stop an account logging in")
    disable.add_argument("name")
    disable.set_defaults(handler=_users_disable)
    unlock = users_sub.add_parser(
        "unlock", help="let an account locked after failed logins log in again"
    )
    unlock.add_argument("name")
    unlock.set_defaults(handler=_users_unlock)

    dashboard = sub.add_parser(
        "dashboard",
        help="serve the QC dashboard",
        description="Serve the QC dashboard (overview, failures, series pages, reviews, "
        "export) over HTTP. Make an account first: cohortflow users add NAME --role reviewer.",
    )
    dashboard.add_argument("--host", help="address to listen on (default: settings, 127.0.0.1)")
    dashboard.add_argument("--port", type=int, help="port (default: settings, 8765)")
    dashboard.add_argument(
        "--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM; default: settings)"
    )
    dashboard.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    dashboard.set_defaults(handler=_dashboard)


def _add_skip_conflicting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-conflicting-labels",
        action="store_true",
        help="an accession number given on several lines with different labels is left "
        "unlabelled and reported (default: it stops the command, naming the lines)",
    )


def _add_source(parser: argparse.ArgumentParser) -> None:
    """Where the rows of a statistic come from: the index (and a labels file) or a table."""
    parser.add_argument("--protocol", help="one protocol (default: every one)")
    parser.add_argument("--labels", type=Path, metavar="CSV", help="clinical labels (as export)")
    _add_skip_conflicting(parser)
    parser.add_argument(
        "--table", type=Path, metavar="FILE", help="an exported table (CSV or Parquet) instead"
    )


def _report_conflicts(labels: Any, err: Console) -> list[dict[str, Any]]:
    """Say which label lines were skipped (lines only: the accession numbers are identifiers);
    the same as a list for --json."""
    if labels is None or not labels.conflicts:
        return []
    lines = "; ".join(", ".join(map(str, c.lines)) for c in labels.conflicts[:10])
    more = " ..." if len(labels.conflicts) > 10 else ""
    err.print(
        f"[yellow]{len(labels.conflicts)} accession number(s) with conflicting labels left "
        f"unlabelled: lines {lines}{more} of {printable(labels.source)}[/yellow]"
    )
    return [{"lines": list(c.lines)} for c in labels.conflicts]


def _rows(
    args: argparse.Namespace, settings: Settings, err: Console
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The rows a statistic works on (with ``--table``: the file's), and the label conflicts
    skipped; None after a usage error was said."""
    from cohortflow.models.export import biomarker_table, read_labels, read_table

    if args.table is not None:
        if args.labels is not None or args.protocol is not None:
            err.print("[red]usage error:[/red] --table already holds its rows and labels")
            return None
        return read_table(args.table), []
    labels = (
        read_labels(args.labels, args.skip_conflicting_labels) if args.labels is not None else None
    )
    with open_index(settings) as index, index.session() as session:
        rows = biomarker_table(session, args.protocol, labels).records()
    return rows, _report_conflicts(labels, err)


def _exports(settings: Settings) -> Path:
    folder = settings.home / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _export(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.export import read_labels

    if args.out == "-" and (args.format != "csv" or args.json):
        err.print("[red]usage error:[/red] --out - writes CSV only, without --json")
        return EXIT_USAGE
    labels = (
        read_labels(args.labels, args.skip_conflicting_labels) if args.labels is not None else None
    )
    conflicts = _report_conflicts(labels, err)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"biomarkers-{args.protocol or 'all'}-{stamp}.{args.format}"
    if args.out == "-":  # written aside first: the release check comes before the terminal
        out = None
        staged = settings.home / "restricted" / "exports" / name
    else:
        out = Path(args.out) if args.out else _exports(settings) / name
        staged = out
    table, hits = export_table(
        settings, args.protocol, labels, args.format, staged, len(conflicts), err, args.out
    )
    if hits:
        return EXIT_FAILURES
    if out is None:
        document().write(staged.read_text(encoding="utf-8"))
        staged.unlink()
    report = {
        "out": str(out) if out else "-",
        "format": args.format,
        "rows": len(table.rows),
        "usable": sum(1 for r in table.rows if r.usable),
        "columns": list(table.columns),
        "labels_matched": table.labels_matched,
        "labels_unmatched": table.labels_unmatched,
        "labels_conflicting": conflicts,
    }
    if args.json:
        write_json(report)
    elif out is not None:
        err.print(f"{len(table.rows)} rows ({report['usable']} usable) written to {out}")
    if labels is not None and table.labels_unmatched:
        err.print(
            f"[yellow]{table.labels_unmatched} of {len(labels.by_accession)} labelled accession "
            "numbers match no measured T1[/yellow]"
        )
    return EXIT_OK


def export_table(
    settings: Settings,
    protocol: str | None,
    labels: Labels | None,
    fmt: str,
    path: Path,
    conflicts: int,
    err: Console,
    asked: str | None = None,
) -> tuple[BiomarkerTable, int]:
    """Write the biomarker table of ``protocol`` (every protocol: None) to ``path`` as ``export
    biomarkers`` does: refused when a release would describe too few patients (the refusal in
    the audit log first), audited, then the release check (a file holding an identifier goes to
    restricted/quarantine). Returns the table and the release check's hits."""
    from cohortflow.models.export import biomarker_table, release_size_refusal, write_table
    from cohortflow.models.linkage import audit

    with open_index(settings) as index, index.session() as session:
        table = biomarker_table(session, protocol, labels)
        refusal = release_size_refusal(
            session, table, settings.cohort.min_cell_patients, protocol, None
        )
        detail = {
            "protocol": protocol,
            "format": fmt,
            "rows": len(table.rows),
            "label_columns": list(table.label_columns),
            "labels_conflicting": conflicts,
            "out": asked if asked is not None else str(path),
        }
        if refusal is None:
            audit(session, "export.biomarkers", json.dumps(detail))
    if refusal is not None:  # raised once the refusal is in the log
        raise refusal
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(table, path, fmt)
    return table, _release_check(
        settings, path, {r.pseudonym for r in table.rows if r.pseudonym}, err
    )


def _release_check(settings: Settings, path: Path, pseudonyms: set[str], err: Console) -> int:
    """The release check of what an export wrote about ``pseudonyms``' patients
    (pipelines/release/scan.py): a file holding an identifier the index knows for them goes to
    restricted/quarantine, said on stderr. Returns the hits."""
    from cohortflow.pipelines.release.scan import release_or_quarantine

    with open_index(settings) as index, index.session() as session:
        report, moved = release_or_quarantine(
            session, path, pseudonyms, settings.home / "restricted", None
        )
    if moved is not None:
        kinds = sorted({h.kind for h in report.hits})
        err.print(
            f"[red]release check:[/red] the export holds identifiers ({', '.join(kinds)}) of "
            f"the patients it is about; not released, moved to {printable(moved)}"
        )
    return len(report.hits)


def release_check_of(settings: Settings) -> Callable[[Any, Path, set[str], str], bool]:
    """The dashboard's release check of an export (it does not import pipelines): True when
    the file may go out; else it was quarantined."""
    from cohortflow.pipelines.release.scan import release_or_quarantine

    def check(session: Any, path: Path, pseudonyms: set[str], actor: str) -> bool:
        _, moved = release_or_quarantine(
            session, path, pseudonyms, settings.home / "restricted", actor
        )
        return moved is None

    return check


def _compare(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_comparison
    from cohortflow.pipelines.export.stats import (
        DEFAULT_COVARIATES,
        box_plot,
        compare,
        parse_covariates,
    )

    if args.adjust is not None and args.covariates is not None:
        err.print("[red]usage error:[/red] --adjust icv is --covariates icv: give one of them")
        return EXIT_USAGE
    if args.covariates is not None:
        covariates = parse_covariates(args.covariates)
    else:
        covariates = (args.adjust,) if args.adjust else DEFAULT_COVARIATES
    found = _rows(args, settings, err)
    if found is None:
        return EXIT_USAGE
    rows, conflicts = found
    result = compare(rows, args.by, covariates, args.reference, every_study=args.every_study)
    plot = args.plot or _exports(settings) / f"compare-{args.by}.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    box_plot(result, plot)
    if args.json:
        write_json(result.as_dict() | {"plot": str(plot), "labels_conflicting": conflicts})
    else:
        print_comparison(result, stdout_console())
        err.print(f"box plot: {plot}")
    return EXIT_OK


def _longitudinal(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_longitudinal
    from cohortflow.pipelines.export.stats import longitudinal, trajectory_plot

    found = _rows(args, settings, err)
    if found is None:
        return EXIT_USAGE
    rows, conflicts = found
    result = longitudinal(rows, args.by, args.reference)
    name = f"longitudinal-{args.by}.png" if args.by else "longitudinal.png"
    plot = args.plot or _exports(settings) / name
    plot.parent.mkdir(parents=True, exist_ok=True)
    trajectory_plot(result, plot)
    if args.json:
        write_json(result.as_dict() | {"plot": str(plot), "labels_conflicting": conflicts})
    else:
        print_longitudinal(result, stdout_console())
        err.print(f"trajectories: {plot}")
    return EXIT_OK


def _users_add(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.users import set_account

    with open_index(settings) as index:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif sys.stdin.isatty():
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                err.print("[red]usage error:[/red] the passwords differ")
                return EXIT_USAGE
        else:
            err.print(
                "[red]usage error:[/red] no terminal to ask for a password: use --password-stdin"
            )
            return EXIT_USAGE
        with index.session() as session:
            made = set_account(session, args.name, args.role, password)
        err.print(f"account {made.username} ({made.role}) ready")
    return EXIT_OK


def _users_disable(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.users import disable_account

    with open_index(settings) as index, index.session() as session:
        disable_account(session, args.name)
    err.print(f"account {args.name} disabled")
    return EXIT_OK


def _users_unlock(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.users import unlock_account

    with open_index(settings) as index, index.session() as session:
        unlocked = unlock_account(session, args.name)
    err.print(f"account {unlocked.username} unlocked")
    return EXIT_OK


def _users_list(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.users import accounts

    with open_index(settings) as index, index.session() as session:
        found = accounts(session)
    if args.json:
        payload = [
            {"name": a.username, "role": a.role, "active": a.active, "locked": a.locked}
            for a in found
        ]
        write_json({"users": payload})
    else:
        for a in found:
            state = "locked" if a.locked else "active" if a.active else "disabled"
            stdout_console().print(f"{a.username}\t{a.role}\t{state}")
    return EXIT_OK


def _dashboard(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    import uvicorn

    from cohortflow.qc.dashboard.app import create_app

    host = args.host or settings.dashboard.host
    port = args.port or settings.dashboard.port
    from cohortflow.pipelines.cohort.configured import CohortSetup
    from cohortflow.pipelines.dicom.protocols import load_protocols

    cohorts = CohortSetup.load(settings)  # once: not a key and YAML read per page
    app = create_app(
        settings,
        refresh=cohorts.refresh,
        protocols=cohorts.roles(),
        disclosure=cohorts.disclosure,
        release=release_check_of(settings),
        # the metrics' acceptance ranges the series page draws
        qc_policy=load_protocols(settings.protocols_file).qc_of,
    )
    board = settings.dashboard
    cert, key = args.tls_cert or board.tls_cert, args.tls_key or board.tls_key
    if (cert is None) != (key is None):
        err.print("[red]usage error:[/red] HTTPS needs both --tls-cert and --tls-key")
        return EXIT_USAGE
    for path in (p for p in (cert, key) if p is not None):
        if not path.is_file():
            err.print(f"[red]usage error:[/red] {path} is not a file")
            return EXIT_USAGE
    scheme = "https" if cert else "http"
    err.print(f"QC dashboard on {scheme}://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        ssl_certfile=str(cert) if cert else None,
        ssl_keyfile=str(key) if key else None,
        # the client's address and scheme from these proxies' headers only
        proxy_headers=bool(board.trusted_proxies),
        forwarded_allow_ips=",".join(board.trusted_proxies) or None,
        server_header=False,
    )
    return EXIT_OK
