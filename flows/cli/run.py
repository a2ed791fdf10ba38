"""``cohortflow run``, ``status`` and ``demo``: a protocol's whole flow, its success rates, and
the demo end to end."""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cohortflow.flows.cli.common import date, emit, open_index
from cohortflow.flows.output import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, add_json, stdout_console
from cohortflow.models.settings import Settings
from cohortflow.models.synth import DEMO_SEED, DEMO_STUDIES

if TYPE_CHECKING:
    from cohortflow.pipelines.export.stats import Comparison
    from cohortflow.pipelines.run.outcome import RunSummary


def add_commands(sub: Any) -> None:
    """Register run, status and demo, each with its handler."""
    run = sub.add_parser(
        "run",
        help="the whole flow for a protocol: PACS query to biomarkers",
        description="Select the protocol's studies in the PACS over a date range, retrieve "
        "them, then anonymize, deface, check, convert and measure each study on a Dask "
        "cluster (local by default); store and print the success rates. Rerunning skips "
        "what is done for the same input and redoes what failed.",
    )
    run.add_argument("protocol", help="protocol name, e.g. dementia, ms, open")
    run.add_argument(
        "--from", dest="date_from", type=date, metavar="DATE", help="default: --to minus lookback"
    )
    run.add_argument("--to", dest="date_to", type=date, metavar="DATE", help="default: today")
    run.add_argument(
        "--lookback-days",
        type=int,
        default=7,
        metavar="N",
        help="without --from: query the N days up to --to (default 7, as the nightly schedule)",
    )
    run.add_argument(
        "--max-studies", type=int, metavar="N", help="process at most N studies (UID order)"
    )
    run.add_argument(
        "--no-retrieve",
        action="store_true",
        help="do not query the PACS: process what the archive holds of the latest selection",
    )
    run.add_argument(
        "--cohort",
        metavar="NAME",
        help="process exactly the studies of this saved cohort (cohortflow cohort save) instead "
        "of a PACS query over dates: archived ones from the index, the others from the PACS",
    )
    run.add_argument("--method", choices=("move", "get", "dicomweb"), help="retrieval method")
    run.add_argument(
        "--dask-address", metavar="ADDR", help="an existing Dask scheduler (tcp://host:8786)"
    )
    run.add_argument(
        "--workers", type=int, metavar="N", help="local Dask cluster size (default: settings)"
    )
    add_json(run, "the outcome")
    run.set_defaults(handler=_run)

    status = sub.add_parser(
        "status",
        help="success rates per protocol, stage and scanner, and the reasons for the rest",
        description="What became of every series the latest selection of each protocol chose: "
        "per stage, per scanner, the share that yielded biomarkers and why the rest did not.",
    )
    status.add_argument("protocol", nargs="?", help="one protocol (default: every selected one)")
    add_json(status, "the outcomes")
    status.set_defaults(handler=_status)

    demo = sub.add_parser(
        "demo",
        help="run the demo flow on embedded defaults",
        description="The product end to end on a synthetic cohort: generate dementia-protocol "
        "studies (half of the patients with dementia, a few planted faults) under "
        "$COHORTFLOW_HOME/demo, load them into the project's own Orthanc, run the dementia "
        "flow (select, retrieve, de-identify, QC, measure), then print the success rates with "
        "each failure's reason, dementia against controls (a linear model), and where to look "
        "next: the biomarker export it writes and the QC dashboard with a demo reviewer "
        "account it makes.",
    )
    demo.add_argument(
        "--studies",
        type=int,
        default=DEMO_STUDIES,
        help=f"number of studies (default {DEMO_STUDIES})",
    )
    demo.add_argument(
        "--seed", type=int, default=DEMO_SEED, help=f"random seed (default {DEMO_SEED})"
    )
    demo.add_argument("--protocol", default="dementia", help="protocol to run (default dementia)")
    add_json(demo, "the summary")
    demo.set_defaults(handler=_demo)


def _run(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.prefect_env import configure_prefect, prefect_api

    configure_prefect(settings.home)
    from cohortflow.flows.report import print_run_summary

    date_from, date_to = args.date_from, args.date_to
    if date_from and date_to and date_to < date_from:
        err.print("[red]usage error:[/red] --to is before --from")
        return EXIT_USAGE
    if args.lookback_days < 1:
        err.print("[red]usage error:[/red] --lookback-days must be at least 1")
        return EXIT_USAGE
    if args.workers is not None and args.workers < 1:
        err.print("[red]usage error:[/red] --workers must be at least 1")
        return EXIT_USAGE
    from cohortflow.pipelines.dicom.protocols import load_protocols

    load_protocols(settings.protocols_file).get(args.protocol)  # unknown name: usage error
    if args.cohort is not None:
        if date_from or date_to:
            err.print("[red]usage error:[/red] --cohort names the studies: no --from / --to")
            return EXIT_USAGE
        from cohortflow.models.cohort import saved_cohort

        with open_index(settings) as index, index.session() as session:
            saved_cohort(session, args.cohort)  # unknown name: usage error
    with prefect_api(settings.home) as started:
        if started:
            err.print(f"Prefect: a private server for this run at {started.removesuffix('/api')}")
        from cohortflow.flows.protocol_flow import protocol_flow

        summary = protocol_flow(
            args.protocol,
            date_from,
            date_to,
            lookback_days=args.lookback_days,
            max_studies=args.max_studies,
            method=args.method,
            retrieve=not args.no_retrieve,
            dask_address=args.dask_address,
            workers=args.workers,
            config=args.config,
            cohort=args.cohort,
        )
    if args.json:
        emit(args, run_json(summary))
    else:
        print_run_summary(summary, stdout_console())
        err.print(f"outputs under {settings.outputs / args.protocol}")
    rates = summary.rates
    return EXIT_OK if rates.t1_with_biomarkers == rates.t1_series else EXIT_FAILURES


def run_json(summary: RunSummary) -> dict[str, Any]:
    """A run's outcome as the JSON document of ``run`` and ``demo``."""
    return {
        "run_id": summary.run_id,
        "protocol": summary.protocol,
        "state": summary.state,
        **summary.outcome,
        "biomarkers": asdict(summary.biomarkers),
    }


def _status(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from sqlalchemy import select

    from cohortflow.flows.report import print_outcome
    from cohortflow.models.outcomes import protocol_outcome
    from cohortflow.models.schema import Selection

    with open_index(settings) as index, index.session() as session:
        if args.protocol:
            names = [args.protocol]
        else:
            names = sorted(set(session.scalars(select(Selection.protocol))))
        outcomes = [protocol_outcome(session, name) for name in names]
    if args.protocol and outcomes[0].selection_id is None:
        err.print(f"[red]error:[/red] protocol {args.protocol} has no selection in the index")
        return EXIT_USAGE
    if args.json:
        emit(args, {"protocols": [o.as_dict() for o in outcomes]})
    else:
        console = stdout_console()
        if not outcomes:
            err.print("no protocol has been selected yet: `cohortflow run PROTOCOL` starts one")
        for outcome in outcomes:
            print_outcome(
                outcome, console, f"protocol {outcome.protocol} (selection {outcome.selection_id})"
            )
    return EXIT_OK


def _demo(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.prefect_env import configure_prefect, prefect_api

    configure_prefect(settings.home)
    from cohortflow.flows.report import (
        print_comparison,
        print_run_summary,
        print_summary,
        summary_json,
    )
    from cohortflow.flows.synth_flow import demo_flow

    out = settings.home / "demo" / "cohort"
    err.print(
        f"demo: generating {args.studies} studies into {out} (head model cached in "
        f"{settings.cache}; the first run builds it, about two and a half minutes), loading "
        f"them into the project's own Orthanc, then running the {args.protocol} flow end to end"
    )
    from cohortflow.pipelines.run.prepare import prepare_models

    # the models first (the head model: about two and a half minutes on one core on a first run),
    # while Prefect's server starts on the other core
    with prefect_api(settings.home, meanwhile=lambda: prepare_models(settings)) as started:
        if started:
            err.print(f"Prefect: a private server for this run at {started.removesuffix('/api')}")
        summary, run = demo_flow(
            out_dir=out,
            cache_dir=settings.cache,
            studies=args.studies,
            seed=args.seed,
            workers=min(2, settings.worker_count),
            protocol=args.protocol,
            config=args.config,
        )
    truth_file = out / "ground_truth.json"
    comparison = _demo_comparison(settings, args.protocol, truth_file)
    export = _demo_export(settings, args.protocol, out / "clinical_labels.csv", err)
    reviewer = _demo_reviewer(settings)
    scheme = "https" if settings.dashboard.tls_cert else "http"
    url = f"{scheme}://{settings.dashboard.host}:{settings.dashboard.port}/"
    if args.json:
        emit(
            args,
            {
                "out": str(out),
                **summary_json(summary),
                "run": run_json(run),
                "groups": comparison.as_dict() if comparison else None,
                "export": str(export) if export else None,
                "dashboard": {"url": url, "user": reviewer[0], "password": reviewer[1]},
            },
        )
    else:
        console = stdout_console()
        print_summary(summary, console, f"cohortflow demo: synthetic cohort in {out}")
        print_run_summary(run, console)
        if comparison is not None:
            print_comparison(comparison, console, models=False)
        else:
            err.print(
                "dementia vs control: too few usable T1s per group for the model (more --studies)"
            )
        console.print(
            "\n[bold]Where to look next[/bold]\n"
            f"- the QC dashboard: `cohortflow dashboard`, then {url}, signed in as "
            f"{reviewer[0]} with the password {reviewer[1]} (a demo account; "
            f"`cohortflow users disable {reviewer[0]}` ends it)\n"
            + (
                f"- the biomarker table, with the diagnosis: {export} "
                f"(`cohortflow stats compare --table {export} --by diagnosis` for the models)\n"
                if export
                else ""
            )
            + "- the de-identified outputs (DICOM, NIfTI, overlays): "
            f"{settings.outputs / args.protocol}\n"
            f"- the success rates again: `cohortflow status {args.protocol}`; the index: "
            f"{settings.index}; the Prefect UI: `prefect server start` (see the README)",
            soft_wrap=True,  # a path is never cut in two, on a terminal or off it
        )
    rates = run.rates
    return EXIT_OK if run.state == "completed" and rates.t1_with_biomarkers else EXIT_FAILURES


def _demo_export(settings: Settings, protocol: str, labels_file: Path, err: Console) -> Path | None:
    """The demo's biomarker table with the generator's diagnoses, written as ``export
    biomarkers --labels`` writes it (the smallest cell and the release check included); its
    path, or None when it was refused (said on stderr)."""
    from cohortflow.flows.cli.results import export_table
    from cohortflow.models.errors import ExportError
    from cohortflow.models.export import read_labels

    path = settings.home / "exports" / f"biomarkers-{protocol}-demo.csv"
    path.unlink(missing_ok=True)  # a rerun of the demo writes it again
    labels = read_labels(labels_file)
    try:
        _, hits = export_table(settings, protocol, labels, "csv", path, 0, err)
    except ExportError as refused:  # too few patients for a row-level release (--studies)
        err.print(f"[yellow]the biomarker table is not exported:[/yellow] {refused}")
        return None
    return path if not hits else None


#: the account the demo makes for its QC dashboard
DEMO_REVIEWER = "demo-reviewer"


def _demo_reviewer(settings: Settings) -> tuple[str, str]:
    """A reviewer account for the demo's dashboard, with a new random password each run
    (printed once: a demo account on a demo index, never a real one's)."""
    import secrets

    from cohortflow.models.users import set_account

    password = secrets.token_urlsafe(12)
    with open_index(settings) as index, index.session() as session:
        set_account(session, DEMO_REVIEWER, "reviewer", password, actor="demo")
    return DEMO_REVIEWER, password


#: the fewest residual degrees of freedom the demo's comparison keeps (``_demo_comparison``)
DEMO_RESIDUAL_DF = 3


def _demo_comparison(settings: Settings, protocol: str, truth_file: Path) -> Comparison | None:
    """Dementia against controls, as a statistician would compare them: the generator's
    diagnosis given by accession number (as a radiology report would), joined on the
    identified side by the biomarker table."""
    from cohortflow.models.export import Labels, biomarker_table
    from cohortflow.models.synth import CohortTruth
    from cohortflow.pipelines.export.errors import StatsError
    from cohortflow.pipelines.export.stats import DEFAULT_COVARIATES, compare

    truth = CohortTruth.model_validate_json(truth_file.read_text())
    diagnosis: dict[str, dict[str, str]] = {}
    for patient in truth.patients:
        if patient.group in ("dementia", "control"):
            for study in patient.studies:
                diagnosis.setdefault(study.accession_number, {"diagnosis": patient.group})
    labels = Labels(str(truth_file), ("diagnosis",), diagnosis)
    with open_index(settings) as index, index.session() as session:
        rows = biomarker_table(session, protocol, labels).records()
    # adjusted for what the table can carry: a small demo (--studies) has too few patients for
    # every covariate, and says which it left out (the comparison's notes). A model must keep
    # DEMO_RESIDUAL_DF degrees of freedom for its error: three covariates on six patients left
    # one, and a confidence interval wider than the brain
    for covariates in (DEFAULT_COVARIATES, ("icv",), ()):
        try:
            found = compare(rows, "diagnosis", covariates=covariates)
        except StatsError:
            continue
        residual = min((c.df for b in found.biomarkers for c in b.contrasts), default=0.0)
        if covariates and residual < DEMO_RESIDUAL_DF:
            continue
        if covariates != DEFAULT_COVARIATES:
            note = (
                f"too few patients per group for every covariate ({', '.join(DEFAULT_COVARIATES)}):"
                f" adjusted for {', '.join(covariates) or 'nothing'} (more --studies for all)"
            )
            found = replace(found, notes=[*found.notes, note])
        return found
    return None
