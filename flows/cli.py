"""The ``cohortflow`` command: parse, call one pipeline or flow, report. No logic of its own.

Exit status: 0 done, 1 done with failures (reported per item), 2 usage or configuration error.
With ``--json`` a command prints exactly one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.errors import CohortflowError, ConfigurationError
from models.settings import Settings, load_settings
from models.synth import DEFAULT_FAULT_RATES, Fault, SynthConfig

if TYPE_CHECKING:
    from models.database import IndexDB

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("cohortflow")


def _fault_rate(text: str) -> tuple[Fault, float]:
    name, sep, value = text.partition("=")
    try:
        fault = Fault(name.strip())
    except ValueError:
        known = ", ".join(f.value for f in Fault)
        raise argparse.ArgumentTypeError(f"unknown fault '{name}'; known: {known}") from None
    try:
        rate = float(value) if sep else float("nan")
    except ValueError:
        rate = float("nan")
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}': give NAME=RATE with a rate in [0, 1]")
    return fault, rate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cohortflow",
        description="Clinical MR brain imaging to research-grade biomarkers. "
        "Data lives under $COHORTFLOW_HOME (default ./cohortflow-data).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML settings file (default: $COHORTFLOW_CONFIG or $COHORTFLOW_HOME/cohortflow.yaml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
        type=_fault_rate,
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
    synth.add_argument("--json", action="store_true", help="print the summary as JSON")

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
    ingest.add_argument("--json", action="store_true", help="print the accounting as JSON")

    verify = sub.add_parser(
        "verify",
        help="re-hash the archive",
        description="Re-hash every file in the archive and report files changed, missing, "
        "unreadable, or present but unknown to the index.",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")

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
    report_batch.add_argument("--json", action="store_true", help="print the report as JSON")

    demo = sub.add_parser(
        "demo",
        help="run the demo flow on embedded defaults",
        description="Run the cohortflow demo flow (Prefect, no server needed): generate a "
        "synthetic cohort under $COHORTFLOW_HOME/demo and print what it holds.",
    )
    demo.add_argument("--studies", type=int, default=12, help="number of studies (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors 2
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    err = Console(stderr=True)
    try:
        settings = load_settings(args.config)
        if args.command == "synth":
            return _synth(args, settings, err)
        if args.command == "demo":
            return _demo(args, settings, err)
        if args.command == "ingest":
            return _ingest(args, settings, err)
        if args.command == "verify":
            return _verify(args, settings, err)
        if args.command == "report":
            return _report(args, settings, err)
    except ConfigurationError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        return EXIT_USAGE
    except CohortflowError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted: rerun the same command to resume where it stopped")
        return EXIT_FAILURES
    except Exception as exc:  # nothing raises past the command line; -v shows the traceback
        if args.verbose:
            err.print_exception()
        err.print(
            f"[red]{args.command} stopped:[/red] {type(exc).__name__}: {exc}. Work already done "
            "is kept; rerun the same command to resume (add -v for details)"
        )
        return EXIT_FAILURES
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _progress(err: Console, what: str) -> Progress:
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


@contextmanager
def _open_index(settings: Settings) -> Iterator[IndexDB]:
    from models.database import open_index

    index = open_index(settings.index)
    try:
        yield index
    finally:
        index.dispose()


def _emit(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=1, default=str) + "\n")


def _synth(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_summary, summary_json
    from pipelines.synth.cohort import generate
    from pipelines.synth.summary import summarize

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
    with _progress(err, "synthesizing patients") as bar:
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
    if args.json:
        _emit(
            args,
            {"out": str(args.out), "ground_truth": str(result.truth_file), **summary_json(summary)},
        )
    else:
        print_summary(summary, Console(), f"synthetic cohort in {args.out}")
    return EXIT_OK


def _ingest(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_batch_report
    from models.scanners import load_known_scanners
    from pipelines.ingest.accounting import batch_report
    from pipelines.ingest.archive import ArchiveStore
    from pipelines.ingest.engine import choose_batch_name, count_files, ingest
    from pipelines.ingest.manifest import read_manifest

    missing = [str(p) for p in args.paths if not os.path.lexists(p)]
    if missing:
        err.print(f"[red]usage error:[/red] no such file or folder: {', '.join(missing)}")
        return EXIT_USAGE
    if args.workers is not None and args.workers < 1:
        err.print("[red]usage error:[/red] --workers must be at least 1")
        return EXIT_USAGE
    manifest = read_manifest(args.manifest) if args.manifest else None
    scanners = load_known_scanners(settings.known_scanners_file)
    store = ArchiveStore(settings.archive)
    with _open_index(settings) as index:
        batch = args.batch or choose_batch_name(index, args.paths)
        total = count_files(args.paths, skip=store.root)
        with _progress(err, f"ingesting batch {batch}") as bar:
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
        _emit(
            args,
            {"ingest": outcome.model_dump(mode="json"), "report": report.model_dump(mode="json")},
        )
    else:
        print_batch_report(report, Console())
        err.print(
            f"ingested {outcome.seen} files in {outcome.seconds:.1f} s "
            f"({outcome.files_per_second:.0f} files/s): {outcome.processed} read, "
            f"{outcome.unchanged} already indexed, {outcome.reused} known from earlier batches"
        )
    return EXIT_FAILURES if report.failed else EXIT_OK


def _verify(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_verify_report
    from pipelines.ingest.archive import ArchiveStore
    from pipelines.ingest.verify import verify

    with _open_index(settings) as index, _progress(err, "verifying the archive") as bar:
        task = bar.add_task("verify", total=None)
        report = verify(
            index, ArchiveStore(settings.archive), progress=lambda n: bar.advance(task, n)
        )
    if args.json:
        _emit(args, report.model_dump(mode="json"))
    else:
        print_verify_report(report, Console())
    return EXIT_FAILURES if report.failed else EXIT_OK


def _report(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_batch_report
    from pipelines.ingest.accounting import batch_report

    with _open_index(settings) as index:
        report = batch_report(index, args.name)
    if args.json:
        _emit(args, report.model_dump(mode="json"))
    else:
        print_batch_report(report, Console())
    return EXIT_FAILURES if report.failed else EXIT_OK


def _demo(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.prefect_env import configure_prefect

    configure_prefect(settings.home)
    from flows.report import print_batch_report, print_summary, summary_json
    from flows.synth_flow import demo_flow

    out = settings.home / "demo" / "cohort"
    err.print(
        f"demo: generating {args.studies} studies into {out} (head model cached in "
        f"{settings.cache}; the first run builds it, about a minute)"
    )
    summary, report = demo_flow(
        out_dir=out,
        cache_dir=settings.cache,
        studies=args.studies,
        seed=args.seed,
        workers=min(2, settings.worker_count),
        config=args.config,
    )
    if args.json:
        _emit(
            args,
            {"out": str(out), **summary_json(summary), "ingest": report.model_dump(mode="json")},
        )
    else:
        console = Console()
        print_summary(summary, console, f"cohortflow demo: synthetic cohort in {out}")
        print_batch_report(report, console)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
