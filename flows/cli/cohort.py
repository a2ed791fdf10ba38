"""``cohortflow cohort``: feasibility counts and cohort lists from the archive index.

The de-identified layer is the default. ``--identified`` asks for a steward account
(``--user``, the password from the terminal or ``--password-stdin``) and every use is audited.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cohortflow.flows.cli.common import open_index, steward_login
from cohortflow.flows.output import (
    EXIT_OK,
    EXIT_USAGE,
    SafeTable,
    add_json,
    document,
    stdout_console,
    write_json,
)
from cohortflow.models.settings import Settings
from cohortflow.models.spreadsheet import neutralised

if TYPE_CHECKING:
    from cohortflow.models.database import IndexDB


def _add_filters(parser: argparse.ArgumentParser) -> None:
    from cohortflow.models.cohort import FILTERS

    group = parser.add_argument_group("filters (all must hold)")
    for spec in FILTERS:
        group.add_argument(
            f"--{spec.name.replace('_', '-')}",
            dest=f"where_{spec.name}",
            metavar="VALUE" if spec.kind != "choice" else "|".join(spec.choices),
            help=spec.help,
        )


def _add_layer(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the identified layer (steward accounts only; audited)")
    group.add_argument(
        "--identified",
        action="store_true",
        help="patient IDs, accession numbers, real dates and UIDs; no small-cell suppression",
    )
    _add_user(group)


def _add_user(group: Any) -> None:
    group.add_argument("--user", metavar="NAME", help="your steward account (cohortflow users)")
    group.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (else: asked for)",
    )


def add_commands(sub: Any) -> None:
    """Register cohort and its sub-commands, each with its handler."""
    cohort = sub.add_parser(
        "cohort",
        help="feasibility counts and cohort lists from the archive index",
        description="How many series, studies and patients match, grouped; lists of them; "
        "saved cohorts for `cohortflow run PROTOCOL --cohort NAME`. De-identified by default: "
        "pseudonyms, shifted dates and ages only, counts of fewer than "
        "cohort.min_cell_patients patients suppressed.",
    )
    cohort_sub = cohort.add_subparsers(dest="what", metavar="WHAT", required=True)
    count = cohort_sub.add_parser(
        "count",
        help="patients, studies, series and instances matching the filters, grouped",
        description="Counts of the series matching every filter, in total and per group.",
    )
    _add_filters(count)
    count.add_argument(
        "--by",
        metavar="GROUPS",
        help="comma-separated: year, scanner, protocol, role, sex, age_band, modality, "
        "field_strength, manufacturer, body_part, acquisition, qc, biomarkers",
    )
    count.add_argument("--age-band", type=int, metavar="YEARS", help="default: settings (10)")
    _add_layer(count)
    add_json(count, "the counts")
    count.set_defaults(handler=_count)

    listing = cohort_sub.add_parser(
        "list", help="the matching series, one a line", description="The matching series."
    )
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="0: all (100)")
    listing.add_argument("--offset", type=int, default=0, metavar="N")
    listing.add_argument("--csv", type=Path, metavar="FILE", help="write the rows as CSV too")
    _add_layer(listing)
    add_json(listing, "the rows")
    listing.set_defaults(handler=_list)

    save = cohort_sub.add_parser(
        "save",
        help="save the matching series as a named cohort",
        description="Save the series matching the filters now as cohort NAME: the input of "
        "`cohortflow run PROTOCOL --cohort NAME`. Audited.",
    )
    save.add_argument("name")
    _add_filters(save)
    save.add_argument("--description", default="", help="what the cohort is for")
    save.add_argument("--replace", action="store_true", help="renew a cohort of that name")
    add_json(save, "the saved cohort")
    save.set_defaults(handler=_save)

    saved = cohort_sub.add_parser("saved", help="the saved cohorts")
    add_json(saved, "the saved cohorts")
    saved.set_defaults(handler=_saved)
    drop = cohort_sub.add_parser("delete", help="delete a saved cohort (audited)")
    drop.add_argument("name")
    drop.set_defaults(handler=_delete)

    manifest = cohort_sub.add_parser(
        "manifest",
        help="a saved cohort's studies as a retrieval manifest (steward; audited)",
        description="Write the saved cohort's studies (accession number, instances, "
        "StudyInstanceUID, study date, series) as CSV: `cohortflow select PROTOCOL --manifest "
        "FILE` queries the PACS for the studies not yet archived, `cohortflow ingest "
        "--manifest FILE` accounts for a delivery of them. Identifiers: steward accounts only.",
    )
    manifest.add_argument("name")
    manifest.add_argument("--out", metavar="PATH", help="file to write (default: standard output)")
    _add_user(manifest)
    manifest.set_defaults(handler=_manifest)

    refresh = cohort_sub.add_parser(
        "refresh",
        help="bring the cohort table up to date (every query does it first)",
    )
    add_json(refresh, "what was refreshed")
    refresh.set_defaults(handler=_refresh)


@contextmanager
def _index(settings: Settings, setup: Any = None) -> Iterator[IndexDB]:
    """The index, brought up to date by ``setup`` (a ``CohortSetup``) when given."""
    with open_index(settings) as index:
        if setup is not None:
            setup.refresh(index)
        yield index


def _setup(settings: Settings) -> Any:
    from cohortflow.pipelines.cohort.configured import CohortSetup

    return CohortSetup.load(settings)


def _filter(args: argparse.Namespace, setup: Any) -> Any:
    from cohortflow.models.cohort import FILTER_NAMES, CohortFilter

    values = {name: getattr(args, f"where_{name}", None) for name in FILTER_NAMES}
    return CohortFilter.parse(values, setup.roles())


def _layer(args: argparse.Namespace, index: IndexDB, err: Console) -> tuple[str, str | None]:
    from cohortflow.models.cohort import DEIDENTIFIED, IDENTIFIED

    if not args.identified:
        if args.user or args.password_stdin:
            err.print("[yellow]--user is only used with --identified[/yellow]")
        return DEIDENTIFIED, None
    steward = steward_login(args, index, err)
    return (IDENTIFIED, steward) if steward else ("", None)


def _count(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.cohort import count, parse_groups

    setup = _setup(settings)
    flt = _filter(args, setup)
    by = parse_groups(args.by)
    with _index(settings, setup) as index:
        layer, actor = _layer(args, index, err)
        if not layer:
            return EXIT_USAGE
        with index.session() as session:
            result = count(
                session,
                flt,
                by,
                layer=layer,
                disclosure=setup.disclosure,
                age_band=args.age_band or settings.cohort.age_band_years,
                actor=actor,
            )
    if args.json:
        write_json(result.as_dict())
        return EXIT_OK
    print_counts(result, stdout_console())
    return EXIT_OK


def _shown(value: int | None, suppressed: str | None, min_cell: int) -> str:
    if suppressed is not None:
        return f"<{min_cell}" if suppressed == "small" else "*"
    return "" if value is None else f"{value:,}"


def print_counts(result: Any, console: Console) -> None:
    layer = "identified layer" if result.layer == "identified" else "de-identified layer"
    where = ", ".join(f"{k}={v}" for k, v in result.filters.items()) or "no filter"
    table = SafeTable(title=f"cohort count ({layer}): {where}")
    for group in result.by:
        table.add_column(group)
    for name in ("patients", "studies", "series", "instances"):
        table.add_column(name, justify="right")
    k = result.min_cell
    for cell in result.cells:
        counts = (cell.patients, cell.studies, cell.series, cell.instances)
        table.add_row(*cell.key, *(_shown(v, cell.suppressed, k) for v in counts))
    total = result.total
    counts = (total.patients, total.studies, total.series, total.instances)
    table.add_row(
        *(["total"] + [""] * (len(result.by) - 1) if result.by else []),
        *(_shown(v, total.suppressed, k) for v in counts),
        style="bold",
    )
    if not result.by:
        table.title = f"{table.title} (total)"
    console.print(table)
    if any(c.suppressed for c in (*result.cells, total)):
        console.print(
            f"<{k}: fewer than {k} patients, suppressed; *: suppressed so that it cannot be "
            "worked out from the total"
        )
    if result.layer == "deidentified":
        console.print(
            "counts are perturbed (by up to 3, the same for the same patients every time) and "
            "rounded (cohort.round_to) so that no subtraction gives a small group away: they need "
            "not add up"
        )
    if result.layer == "deidentified" and "year" in result.by:
        console.print("years are those of the shifted dates the pseudonymized data carry")


def _list(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.cohort import list_series

    if args.limit < 0 or args.offset < 0:
        err.print("[red]usage error:[/red] --limit and --offset must not be negative")
        return EXIT_USAGE
    setup = _setup(settings)
    flt = _filter(args, setup)
    with _index(settings, setup) as index:
        layer, actor = _layer(args, index, err)
        if not layer:
            return EXIT_USAGE
        with index.session() as session:
            found = list_series(
                session, flt, layer=layer, disclosure=setup.disclosure,
                limit=args.limit or None, offset=args.offset, actor=actor,
            )  # fmt: skip
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(found.columns))
            writer.writeheader()
            writer.writerows({k: neutralised(v) for k, v in row.items()} for row in found.rows)
    if args.json:
        write_json(found.as_dict())
        return EXIT_OK
    shown: tuple[str, ...] = (
        "pseudonym",
        "date",
        "age",
        "sex",
        "protocols",
        "series_description",
        "field_strength",
        "instances",
        "qc",
    )
    if layer == "identified":
        shown = ("patient_id", "accession_number", "study_date", *shown)
    table = SafeTable(title=f"{found.total} series ({layer} layer)")
    for name in shown:
        table.add_column(name)
    for row in found.rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in shown))
    stdout_console().print(table)
    if found.total > found.offset + len(found.rows):
        err.print(
            f"rows {found.offset + 1}-{found.offset + len(found.rows)} of {found.total}: "
            "--offset / --limit for more (--limit 0: all), --json or --csv for every column"
        )
    return EXIT_OK


def _save(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.cohort import save_cohort
    from cohortflow.models.linkage import os_user

    setup = _setup(settings)
    flt = _filter(args, setup)
    with _index(settings, setup) as index, index.session() as session:
        info = save_cohort(
            session,
            args.name,
            flt,
            actor=os_user(),
            disclosure=setup.disclosure,
            description=args.description,
            replace=args.replace,
        )
    if args.json:
        write_json(info.as_dict())
    else:
        err.print(
            f"cohort {info.name} saved: {info.patients} patients, {info.studies} studies, "
            f"{info.series} series; `cohortflow run PROTOCOL --cohort {info.name}` processes it"
        )
    return EXIT_OK


def _saved(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.cohort import saved_cohorts

    with _index(settings) as index, index.session() as session:
        found = saved_cohorts(session)
    if args.json:
        write_json({"cohorts": [c.as_dict() for c in found]})
        return EXIT_OK
    table = SafeTable(title="saved cohorts")
    for name in ("name", "patients", "studies", "series", "filters", "by", "at"):
        table.add_column(name)
    for c in found:
        where = ", ".join(f"{k}={v}" for k, v in c.filters.items())
        table.add_row(c.name, str(c.patients), str(c.studies), str(c.series), where,
                      c.created_by, f"{c.created_at:%Y-%m-%d %H:%M}")  # fmt: skip
    stdout_console().print(table)
    return EXIT_OK


def _delete(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.cohort import delete_cohort
    from cohortflow.models.linkage import os_user

    with _index(settings) as index, index.session() as session:
        delete_cohort(session, args.name, actor=os_user())
    err.print(f"cohort {args.name} deleted")
    return EXIT_OK


def _manifest(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.cohort import manifest
    from cohortflow.pipelines.cohort.configured import write_manifest

    with _index(settings) as index:
        steward = steward_login(args, index, err)
        if steward is None:
            return EXIT_USAGE
        with index.session() as session:
            rows = manifest(session, args.name, actor=steward)
    if args.out and args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_manifest(rows, out)
        err.print(f"{len(rows)} studies written to {out}")
    else:
        write_manifest(rows, document())  # type: ignore[arg-type]
    return EXIT_OK


def _refresh(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from dataclasses import asdict

    from cohortflow.pipelines.cohort.configured import refresh_configured

    with open_index(settings) as index:
        summary = refresh_configured(settings, index)
    if args.json:
        write_json(asdict(summary))
    else:
        what = "rebuilt" if summary.rebuilt else "brought up to date"
        err.print(
            f"cohort table {what}: {summary.series} series of {summary.studies} studies "
            f"written, {summary.verdicts} QC verdicts, {summary.seconds:.1f} s"
        )
    return EXIT_OK
