"""``cohortflow pacs``, ``select``, ``retrieve`` and ``listen``: the project's own Orthanc, and
studies from a PACS into the archive."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from cohortflow.flows.cli.common import add_protocols_file, audit_read, date, emit, open_index
from cohortflow.flows.output import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    add_json,
    progress_bar,
    stdout_console,
)
from cohortflow.models.settings import Settings


def add_commands(sub: Any) -> None:
    """Register pacs, select, retrieve and listen, each with its handler."""
    pacs = sub.add_parser(
        "pacs",
        help="start, stop or check the project's own PACS (Orthanc)",
        description="The project's own Orthanc under $COHORTFLOW_HOME/orthanc: loopback "
        "only, HTTP with a generated password, DICOM open to cohortflow's AE only.",
    )
    pacs.add_argument(
        "action",
        choices=("start", "stop", "status", "run"),
        help="start (in the background), stop, status, or run (in the foreground, until "
        "stopped: for a service manager, as cohortflow-orthanc.service does)",
    )
    add_json(pacs, "the state")
    pacs.set_defaults(handler=_pacs)

    select = sub.add_parser(
        "select",
        help="find a protocol's studies and series in the PACS",
        description="C-FIND at study level (date range, modality, study description patterns) "
        "then series level; the protocol's series rules (protocols.yaml) decide. Without "
        "--dry-run the selection is stored for `cohortflow retrieve`.",
    )
    select.add_argument("protocol", help="protocol name, e.g. dementia, ms, open")
    select.add_argument("--from", dest="date_from", type=date, metavar="DATE")
    select.add_argument("--to", dest="date_to", type=date, metavar="DATE")
    select.add_argument(
        "--manifest",
        type=Path,
        metavar="CSV",
        help="instead of a date range: the studies of a manifest (cohortflow cohort manifest, or "
        "a CSV with a StudyInstanceUID or AccessionNumber column); archived ones are decided "
        "from the index, the PACS is queried for the others",
    )
    select.add_argument(
        "--dry-run",
        action="store_true",
        help="print every candidate study and series with the rule that selected or rejected "
        "it; store nothing",
    )
    add_protocols_file(select)
    add_json(select, "the selection")
    select.set_defaults(handler=_select)

    retrieve = sub.add_parser(
        "retrieve",
        help="fetch a selection from the PACS into the archive",
        description="C-MOVE to cohortflow's storage SCP, C-GET or DICOMweb WADO-RS; received "
        "files are ingested at once and each series is checked complete. Throttled; a study "
        "already complete in the archive is not fetched again; rerun to resume.",
    )
    retrieve.add_argument("--selection", type=int, help="selection id (default: the latest)")
    retrieve.add_argument("--method", choices=("move", "get", "dicomweb"))
    retrieve.add_argument("--max-associations", type=int, metavar="N")
    retrieve.add_argument("--studies-per-hour", type=float, metavar="N")
    retrieve.add_argument(
        "--window",
        action="append",
        dest="windows",
        metavar="SPEC",
        help="allowed time window, e.g. 'Mon-Fri 19:00-07:00' (repeatable; default: settings)",
    )
    retrieve.add_argument("--outside-window", choices=("wait", "stop"))
    retrieve.add_argument("--retries", type=int, metavar="N")
    add_json(retrieve, "the outcome")
    retrieve.set_defaults(handler=_retrieve)

    listen = sub.add_parser(
        "listen",
        help="run a storage SCP that ingests what is pushed to it",
        description="Receive studies pushed by a PACS or modality (C-STORE to cohortflow's AE "
        "title on retrieve.scp_port) and ingest them once no instance arrived for "
        "--idle seconds. Runs until interrupted (or --seconds).",
    )
    listen.add_argument("--port", type=int, help="port (default: settings retrieve.scp_port)")
    listen.add_argument("--host", help="address to listen on (default: settings)")
    listen.add_argument("--idle", type=float, default=5.0, help="seconds of quiet before ingest")
    listen.add_argument("--seconds", type=float, help="stop after this many seconds")
    listen.add_argument("--batch", help="batch name (default: listen-YYYY-MM-DD)")
    add_json(listen, "what was received")
    listen.set_defaults(handler=_listen)


def _pacs(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.pipelines.pacs import orthanc
    from cohortflow.pipelines.retrieve.config import own_orthanc

    config = own_orthanc(settings)
    pid = orthanc.running_pid(config.folder)
    if args.action == "run":
        if pid is not None:
            err.print(f"[red]error:[/red] Orthanc already runs (pid {pid}): `cohortflow pacs stop`")
            return EXIT_FAILURES
        command = orthanc.foreground_command(config)
        sys.stdout.flush()
        sys.stderr.flush()
        # this process becomes Orthanc: the service manager's signals reach it directly
        os.execve(command[0], command, orthanc.environment())
    if args.action == "start" and pid is None:
        server = orthanc.OrthancServer(config).start()
        pid = server.detach()
        err.print(f"Orthanc started (pid {pid}) in {config.folder}")
    elif args.action == "stop":
        stopped = orthanc.stop_running(config.folder)
        err.print("Orthanc stopped" if stopped else "Orthanc was not running")
        pid = None
    state = {
        "running": pid is not None,
        "pid": pid,
        "folder": str(config.folder),
        "aet": config.aet,
        "dicom_port": config.dicom_port,
        "http_url": f"http://127.0.0.1:{config.http_port}",
    }
    if args.json:
        emit(args, state)
    elif args.action == "status":
        stdout_console().print(
            f"Orthanc {'running, pid ' + str(pid) if pid else 'not running'}: "
            f"{config.aet}@127.0.0.1:{config.dicom_port}, {state['http_url']}, {config.folder}"
        )
    return EXIT_OK


def _select(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_selection, selection_json
    from cohortflow.pipelines.retrieve.config import pacs_node, select_configured
    from cohortflow.pipelines.select.query import record_selection

    if args.manifest is not None:
        if args.date_from or args.date_to or args.protocols:
            err.print("[red]usage error:[/red] --manifest lists the studies: no --from, --to")
            return EXIT_USAGE
        from cohortflow.pipelines.cohort.configured import select_manifest

        with open_index(settings) as index:
            result, protocols_file = select_manifest(settings, index, args.protocol, args.manifest)
    else:
        if args.date_from is None or args.date_to is None:
            err.print("[red]usage error:[/red] give --from and --to, or --manifest")
            return EXIT_USAGE
        if args.date_to < args.date_from:
            err.print("[red]usage error:[/red] --to is before --from")
            return EXIT_USAGE
        err.print(
            f"querying {pacs_node(settings)} for protocol {args.protocol}, "
            f"{args.date_from} to {args.date_to}"
        )
        result, protocols_file = select_configured(
            settings, args.protocol, args.date_from, args.date_to, args.protocols
        )
    selection_id = None
    with open_index(settings) as index:
        if not args.dry_run:
            selection_id = record_selection(index, result, protocols_file)
        # the studies found (accession numbers, dates) are shown: an identified read
        detail = {"protocol": args.protocol, "studies": len(result.studies),
                  "selection": selection_id, "dry_run": args.dry_run}  # fmt: skip
        audit_read(index, "read.select", detail)
    if args.json:
        emit(args, selection_json(result, selection_id, dry_run=args.dry_run))
    else:
        print_selection(result, stdout_console(), dry_run=args.dry_run)
        if selection_id is not None:
            err.print(f"stored as selection {selection_id}: `cohortflow retrieve` fetches it")
    return EXIT_OK


def _retrieve(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_retrieval
    from cohortflow.models import retrieval
    from cohortflow.pipelines.retrieve.config import retrieve_configured, retrieve_policy

    policy = retrieve_policy(
        settings,
        max_associations=args.max_associations,
        studies_per_hour=args.studies_per_hour,
        windows=args.windows,
        outside_window=args.outside_window,
        retries=args.retries,
    )
    with open_index(settings) as index:
        with index.session() as session:
            chosen = retrieval.selection(session, args.selection)
        if chosen is None:
            which = f"selection {args.selection}" if args.selection else "a selection"
            err.print(f"[red]usage error:[/red] no {which}: run `cohortflow select` first")
            return EXIT_USAGE
        audit_read(index, "retrieve", {"selection": chosen.id, "protocol": chosen.protocol})
        with progress_bar(err, f"retrieving selection {chosen.id} ({chosen.protocol})") as bar:
            # studies against the selection's total, and every instance as it arrives (a study
            # of a thousand images is not one silent step)
            task = bar.add_task("studies", total=chosen.studies)
            received = bar.add_task("instances received", total=None)
            outcome = retrieve_configured(
                settings,
                index,
                chosen.id,
                method=args.method,
                policy=policy,
                progress=lambda _o: bar.advance(task, 1),
                on_instance=lambda _r: bar.advance(received, 1),
            )
    if args.json:
        emit(args, asdict(outcome))
    else:
        print_retrieval(outcome, stdout_console())
    return EXIT_OK if outcome.state == "complete" else EXIT_FAILURES


def _listen(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.scanners import load_known_scanners
    from cohortflow.pipelines.archive.store import ArchiveStore
    from cohortflow.pipelines.retrieve.config import scp_tls
    from cohortflow.pipelines.retrieve.listen import listen

    port = args.port or settings.retrieve.scp_port
    host = args.host or settings.retrieve.scp_host
    batch = args.batch or f"listen-{dt.date.today():%Y-%m-%d}"
    callers = settings.storage_callers()
    tls = scp_tls(settings)
    err.print(
        f"listening as {settings.local_aet} on {host}:{port}{' (DICOM TLS)' if tls else ''} for "
        f"{'any calling AE' if callers is None else 'calling AE ' + ', '.join(callers)}; "
        f"ingesting into batch {batch} after {args.idle:g} s without new instances "
        "(Ctrl-C stops)"
    )
    with open_index(settings) as index:
        outcome = listen(
            index,
            ArchiveStore.of(settings),
            load_known_scanners(settings.known_scanners_file),
            settings.home / "spool" / "listen",
            aet=settings.local_aet,
            host=host,
            port=port,
            batch=batch,
            calling_aets=callers,
            tls=tls,
            idle_seconds=args.idle,
            seconds=args.seconds,
            on_ingest=lambda n: err.print(f"ingested {n} files into batch {batch}"),
        )
    if args.json:
        emit(args, asdict(outcome))
    else:
        err.print(f"received {outcome.received} instances; {outcome.ingested} files ingested")
    return EXIT_OK
