"""``cohortflow synth``, ``ingest``, ``verify`` and ``report batch``: the synthetic cohort, and
delivered folders into the archive and its index."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cohortflow.flows.cli.common import audit_read, emit, fault_rate, open_index
from cohortflow.flows.output import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    add_json,
    progress_bar,
    stdout_console,
)
from cohortflow.models.settings import Settings
from cohortflow.models.synth import DEFAULT_FAULT_RATES, Fault, SynthConfig

if TYPE_CHECKING:
    from cohortflow.pipelines.pacs.dimse import StoreResult


def add_commands(sub: Any) -> None:
    """Register synth, ingest, verify and report batch, each with its handler."""
    synth = sub.add_parser(
        "synth",
        help="generate a synthetic clinical cohort with ground truth",
        description="Write a clinical-like MR cohort (DICOM, vendor-like headers, planted "
        "identifiers and archive faults) and its ground truth (ground_truth.json, label maps).",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (empty or new)")
    synth.add_argument("--studies", type=int, default=20, help="number of studies (default 20)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    synth.add_argument(
        "--fault-rate",
        type=fault_rate,
        action="append",
        default=[],
        metavar="NAME=RATE",
        help="override a fault rate, e.g. motion=0.1 (repeatable; 0 disables a fault)",
    )
    synth.add_argument("--no-faults", action="store_true", help="plant no faults at all")
    synth.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: settings, one per core)",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace a cohort already in --out")
    synth.add_argument(
        "--pacs",
        action="store_true",
        help="also load the cohort into the PACS (C-STORE; default: the project's own Orthanc, "
        "started by `cohortflow pacs start`)",
    )
    add_json(synth, "the summary")
    synth.set_defaults(handler=_synth)

    ingest = sub.add_parser(
        "ingest",
        help="archive and index a delivered folder",
        description="Hash, classify (modern / legacy / corrupt / not DICOM / unreadable), "
        "archive (content-addressed, stored once) and index every file under PATH; compare "
        "with the batch manifest. Rerunning does no work for files already indexed.",
    )
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="folders or files")
    ingest.add_argument(
        "--batch", help="batch name (default: the folder name; rerun with it to resume)"
    )
    ingest.add_argument(
        "--manifest",
        type=Path,
        help="CSV with an AccessionNumber column and optionally ExpectedFiles",
    )
    ingest.add_argument(
        "--workers", type=int, default=None, help="reader processes (default: one per core)"
    )
    ingest.add_argument(
        "--move",
        action="store_true",
        help="for folders handed over to cohortflow (its retrieval spool): hard-link files into "
        "the archive instead of copying, and remove them from PATH once indexed",
    )
    add_json(ingest, "the accounting")
    ingest.set_defaults(handler=_ingest)

    verify = sub.add_parser(
        "verify",
        help="re-hash the archive",
        description="Re-hash every file in the archive and report files changed, missing, "
        "unreadable, or present but unknown to the index.",
    )
    add_json(verify, "the result")
    verify.set_defaults(handler=_verify)

    report = sub.add_parser(
        "report",
        help="print the accounting of a batch",
        description="Reports from the archive index.",
    )
    report_sub = report.add_subparsers(dest="report", metavar="WHAT", required=True)
    report_batch = report_sub.add_parser(
        "batch",
        help="accounting of one batch",
        description="Files by status, duplicates, manifest accounting (missing, incomplete, "
        "unexpected, duplicated, complete), unknown scanners, and every problem file.",
    )
    report_batch.add_argument("name", help="the batch name")
    add_json(report_batch, "the report")
    report_batch.set_defaults(handler=_report)


def _synth(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_summary, summary_json
    from cohortflow.pipelines.synth.cohort import generate
    from cohortflow.pipelines.synth.summary import summarize

    if args.studies < 1:
        err.print("[red]usage error:[/red] --studies must be at least 1")
        return EXIT_USAGE
    rates = {f: 0.0 for f in Fault} if args.no_faults else None
    try:
        merged = dict(rates if rates is not None else DEFAULT_FAULT_RATES)
        merged.update(dict(args.fault_rate))
        config = SynthConfig(studies=args.studies, seed=args.seed, fault_rates=merged)
    except ValueError as exc:
        err.print(f"[red]usage error:[/red] {exc}")
        return EXIT_USAGE
    workers = args.workers if args.workers is not None else settings.worker_count
    with progress_bar(err, "synthesizing patients") as bar:
        task = bar.add_task("synth", total=None)
        result = generate(
            config,
            args.out,
            settings.cache,
            workers=workers,
            overwrite=args.overwrite,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    summary = summarize(result.truth)
    loaded = _load_into_pacs(settings, args.out / "dicom", err) if args.pacs else None
    if args.json:
        payload = {
            "out": str(args.out),
            "ground_truth": str(result.truth_file),
            **summary_json(summary),
        }
        if loaded is not None:
            payload["pacs"] = asdict(loaded)
        emit(args, payload)
    else:
        print_summary(summary, stdout_console(), f"synthetic cohort in {args.out}")
    return EXIT_FAILURES if loaded is not None and loaded.failed else EXIT_OK


def _load_into_pacs(settings: Settings, folder: Path, err: Console) -> StoreResult:
    from cohortflow.pipelines.pacs.dimse import store_files
    from cohortflow.pipelines.retrieve.config import pacs_node

    node = pacs_node(settings)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with progress_bar(err, f"C-STORE into {node}") as bar:
        task = bar.add_task("store", total=len(files))
        result = store_files(
            node, files, settings.local_aet, progress=lambda n: bar.advance(task, n)
        )
    err.print(
        f"loaded into {node}: {result.sent} instances sent, {len(result.skipped)} files skipped "
        f"(not DICOM or damaged), {len(result.failed)} refused"
    )
    for path, reason in result.failed:
        err.print(f"  refused: {path}: {reason}")
    return result


def _ingest(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_batch_report
    from cohortflow.models.scanners import load_known_scanners
    from cohortflow.pipelines.archive.store import ArchiveStore
    from cohortflow.pipelines.ingest.accounting import batch_report
    from cohortflow.pipelines.ingest.engine import choose_batch_name, ingest
    from cohortflow.pipelines.ingest.manifest import read_manifest
    from cohortflow.pipelines.walk import count_files

    missing = [str(p) for p in args.paths if not os.path.lexists(p)]
    if missing:
        err.print(f"[red]usage error:[/red] no such file or folder: {', '.join(missing)}")
        return EXIT_USAGE
    if args.workers is not None and args.workers < 1:
        err.print("[red]usage error:[/red] --workers must be at least 1")
        return EXIT_USAGE
    manifest = read_manifest(args.manifest) if args.manifest else None
    scanners = load_known_scanners(settings.known_scanners_file)
    store = ArchiveStore.of(settings)
    with open_index(settings) as index:
        batch = args.batch or choose_batch_name(index, args.paths)
        total = count_files(args.paths, skip=store.root)
        with progress_bar(err, f"ingesting batch {batch}") as bar:
            task = bar.add_task("ingest", total=total)
            outcome = ingest(
                args.paths,
                index,
                store,
                scanners,
                batch=batch,
                manifest=manifest,
                workers=args.workers or settings.worker_count,
                progress=lambda n: bar.advance(task, n),
                move=args.move,
            )
        report = batch_report(index, batch)
    if args.json:
        emit(
            args,
            {"ingest": outcome.model_dump(mode="json"), "report": report.model_dump(mode="json")},
        )
    else:
        print_batch_report(report, stdout_console())
        err.print(
            f"ingested {outcome.seen} files in {outcome.seconds:.1f} s "
            f"({outcome.files_per_second:.0f} files/s): {outcome.processed} read, "
            f"{outcome.unchanged} already indexed, {outcome.reused} known from earlier batches"
        )
    return EXIT_FAILURES if report.failed else EXIT_OK


def _verify(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_verify_report
    from cohortflow.pipelines.archive.store import ArchiveStore
    from cohortflow.pipelines.ingest.verify import verify

    with open_index(settings) as index, progress_bar(err, "verifying the archive") as bar:
        task = bar.add_task("verify", total=None)
        report = verify(index, ArchiveStore.of(settings), progress=lambda n: bar.advance(task, n))
    if args.json:
        emit(args, report.model_dump(mode="json"))
    else:
        print_verify_report(report, stdout_console())
    return EXIT_FAILURES if report.failed else EXIT_OK


def _report(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.report import print_batch_report
    from cohortflow.pipelines.ingest.accounting import batch_report

    with open_index(settings) as index:
        report = batch_report(index, args.name)
        audit_read(index, "read.batch_report", {"batch": args.name})
    if args.json:
        emit(args, report.model_dump(mode="json"))
    else:
        print_batch_report(report, stdout_console())
    return EXIT_FAILURES if report.failed else EXIT_OK
