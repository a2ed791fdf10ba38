"""The ``cohortflow`` command: parse, call one pipeline or flow, report. No logic of its own.

Exit status: 0 done, 1 done with failures (reported per item), 2 usage or configuration error.
With ``--json`` a command prints exactly one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from flows.cli_audit import add_commands as add_audit_commands
from flows.cli_audit import run_command as run_audit_command
from flows.cli_cohort import add_commands as add_cohort_commands
from flows.cli_cohort import run_command as run_cohort_command
from flows.cli_data import add_commands as add_data_commands
from flows.cli_data import run_command as run_data_command
from flows.output import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    add_json,
    cell,
    json_only_on_stdout,
    progress_bar,
    write_json,
)
from flows.prefect_env import configure_itk, protect_identified
from models.errors import CohortflowError, ConfigurationError
from models.settings import Settings, load_settings
from models.synth import DEFAULT_FAULT_RATES, Fault, SynthConfig
from pipelines.pacs.errors import PacsError
from pipelines.safeio import RefusedError

if TYPE_CHECKING:
    from models.database import IndexDB
    from pipelines.export.stats import Comparison
    from pipelines.pacs.dimse import StoreResult
    from pipelines.run.outcome import RunSummary

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


def _date(text: str) -> dt.date:
    for pattern in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"'{text}' is not a date (YYYY-MM-DD)")


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: ``-v`` is accepted after the command too (``cohortflow qc DIR -v``),
    as before it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,  # absent here: the top-level value stands
            help="log details to stderr",
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cohortflow")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


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
    parser.add_argument("--version", action="version", version=f"cohortflow {_version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser
    )

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
    synth.add_argument(
        "--pacs",
        action="store_true",
        help="also load the cohort into the PACS (C-STORE; default: the project's own Orthanc, "
        "started by `cohortflow pacs start`)",
    )
    add_json(synth, "the summary")

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

    verify = sub.add_parser(
        "verify",
        help="re-hash the archive",
        description="Re-hash every file in the archive and report files changed, missing, "
        "unreadable, or present but unknown to the index.",
    )
    add_json(verify, "the result")

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

    pacs = sub.add_parser(
        "pacs",
        help="start, stop or check the project's own PACS (Orthanc)",
        description="The project's own Orthanc under $COHORTFLOW_HOME/orthanc: loopback "
        "only, HTTP with a generated password, DICOM open to cohortflow's AE only.",
    )
    pacs.add_argument("action", choices=("start", "stop", "status"))
    add_json(pacs, "the state")

    select = sub.add_parser(
        "select",
        help="find a protocol's studies and series in the PACS",
        description="C-FIND at study level (date range, modality, study description patterns) "
        "then series level; the protocol's series rules (protocols.yaml) decide. Without "
        "--dry-run the selection is stored for `cohortflow retrieve`.",
    )
    select.add_argument("protocol", help="protocol name, e.g. dementia, ms, open")
    select.add_argument("--from", dest="date_from", type=_date, metavar="DATE")
    select.add_argument("--to", dest="date_to", type=_date, metavar="DATE")
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
    select.add_argument("--protocols", type=Path, help="protocol file (default: settings)")
    add_json(select, "the selection")

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

    anonymize = sub.add_parser(
        "anonymize",
        help="de-identify a folder of DICOM files",
        description="PS3.15 Annex E Basic Profile with the profile's options (keyed pseudonyms, "
        "date shifting, UID remapping, safe private allow-list). Writes OUT_DIR/<pseudonym>/"
        "<study>/<series>/<instance>.dcm; instances that may carry burned-in text are excluded "
        "with a reason. The linkage is stored in the index (identified side), audited.",
    )
    anonymize.add_argument("source", type=Path, metavar="IN_DIR")
    anonymize.add_argument("out", type=Path, metavar="OUT_DIR")
    anonymize.add_argument("--profile", type=Path, help="profile file (default: the shipped one)")
    add_json(anonymize, "the outcome")

    deface = sub.add_parser(
        "deface",
        help="deface the series in a folder",
        description="Fit pydeface's head template (antspyx affine) to each study's 3D T1 and "
        "set the face to background in every series sharing its frame of reference, never "
        "touching the intracranial mask grown by a margin. Each series is checked on the pixels "
        "written; one that fails or cannot be placed is not written and is reported with a "
        "reason. OUT_DIR mirrors IN_DIR's paths.",
    )
    deface.add_argument("source", type=Path, metavar="IN_DIR")
    deface.add_argument("out", type=Path, metavar="OUT_DIR")
    deface.add_argument(
        "--previews",
        type=Path,
        metavar="DIR",
        help="write before / after mid-sagittal PNGs here (the 'before' one shows the face: "
        "keep it on the restricted side)",
    )
    add_json(deface, "the outcome")

    qc = sub.add_parser(
        "qc",
        help="header and image QC of the series in a folder",
        description="Check every series the protocol selects (its include rules): header QC "
        "(required attributes, slice geometry, protocol parameters, known scanners) and, for "
        "the 3D T1, image QC (SNR, CNR, CJV, EFC, FBER, WM2MAX, non-uniformity, artefacts, "
        "brain coverage), each metric also against the series of the same protocol and "
        "scanner seen so far. Every finding names its check, value and threshold. Results are "
        "recorded in the archive index (stage_results) unless --no-record.",
    )
    qc.add_argument("source", type=Path, metavar="SERIES_DIR", help="a series or studies folder")
    qc.add_argument(
        "--protocol",
        help="protocol whose rules and thresholds apply (default: the one whose study "
        "description patterns match each study)",
    )
    qc.add_argument("--protocols", type=Path, help="protocol file (default: settings)")
    qc.add_argument(
        "--no-record",
        action="store_true",
        help="do not record results in the index (outliers are still judged against it)",
    )
    add_json(qc, "the findings")

    convert = sub.add_parser(
        "convert",
        help="convert DICOM series to NIfTI with an anonymized sidecar (BIDS layout)",
        description="Convert the series the protocol selects (its include rules: 3D T1 as T1w, "
        "FLAIR, T2 as T2w) with dcm2niix, SimpleITK's series reader as the fallback; every "
        "image is checked against the DICOM geometry and pixels. Writes OUT_DIR/sub-*/ses-*/"
        "anat/*.nii.gz with a JSON sidecar of allowlisted acquisition keys only. Rerunning "
        "overwrites the same files. Results are recorded in the archive index (stage_results, "
        "stage 'convert') unless --no-record.",
    )
    convert.add_argument(
        "source", type=Path, metavar="SOURCE", help="a series or studies folder (pseudonymized)"
    )
    convert.add_argument("out", type=Path, metavar="OUT_DIR", help="the BIDS-style output folder")
    convert.add_argument(
        "--protocol",
        help="protocol whose rules select the series (default: the one whose study "
        "description patterns match each study)",
    )
    convert.add_argument("--protocols", type=Path, help="protocol file (default: settings)")
    convert.add_argument(
        "--all",
        dest="every_series",
        action="store_true",
        help="convert every MR image series, not only the protocol's (suffix guessed, acq-guessed)",
    )
    convert.add_argument(
        "--no-record", action="store_true", help="do not record results in the index"
    )
    add_json(convert, "the outcome")

    volumetry = sub.add_parser(
        "volumetry",
        help="intracranial, grey, white matter, CSF and brain volume of T1 images",
        description="Measure ICV, GM, WM, CSF, brain volume (GM + WM) and BPF of each T1: a "
        "NIfTI file, a folder of *_T1w.nii.gz (BIDS-style), or a folder of DICOM, whose 3D T1 "
        "series (the protocol's t1_3d rule) are converted first into OUT_DIR/nifti. The atlas "
        "(installed templates) is registered with antspyx, bias corrected by N4, tissue "
        "classified with template priors; every result gets its own QC verdict and an overlay "
        "PNG in OUT_DIR/overlays. Series converted here are recorded in the archive index "
        "(stage 'volumetry' and the biomarkers table) unless --no-record.",
    )
    volumetry.add_argument("source", type=Path, metavar="IMAGE", help="NIfTI file or folder")
    volumetry.add_argument(
        "--out",
        type=Path,
        metavar="OUT_DIR",
        help="where overlays (and converted images) go "
        "(default: $COHORTFLOW_HOME/outputs/volumetry)",
    )
    volumetry.add_argument("--protocol", help="protocol whose rules select DICOM series")
    volumetry.add_argument("--protocols", type=Path, help="protocol file (default: settings)")
    volumetry.add_argument(
        "--no-record", action="store_true", help="do not record results in the index"
    )
    add_json(volumetry, "the volumes")

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
        "--from", dest="date_from", type=_date, metavar="DATE", help="default: --to minus lookback"
    )
    run.add_argument("--to", dest="date_to", type=_date, metavar="DATE", help="default: today")
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

    status = sub.add_parser(
        "status",
        help="success rates per protocol, stage and scanner, and the reasons for the rest",
        description="What became of every series the latest selection of each protocol chose: "
        "per stage, per scanner, the share that yielded biomarkers and why the rest did not.",
    )
    status.add_argument("protocol", nargs="?", help="one protocol (default: every selected one)")
    add_json(status, "the outcomes")

    demo = sub.add_parser(
        "demo",
        help="run the demo flow on embedded defaults",
        description="Run the cohortflow demo flow (Prefect, no server needed): generate a "
        "synthetic cohort under $COHORTFLOW_HOME/demo and print what it holds.",
    )
    demo.add_argument("--studies", type=int, default=12, help="number of studies (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--protocol", default="dementia", help="protocol to run (default dementia)")
    add_json(demo, "the summary")
    add_data_commands(sub)
    add_cohort_commands(sub)
    add_audit_commands(sub)
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
    with json_only_on_stdout(bool(getattr(args, "json", False))):
        return _dispatch(args, parser, err)


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser, err: Console) -> int:
    # Paths as users type them: relative folders are made absolute once, here (os.path.abspath
    # keeps symbolic links as given, unlike Path.resolve)
    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, Path(os.path.abspath(value)))
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(args, name, [Path(os.path.abspath(v)) for v in value])
    try:
        settings = load_settings(args.config)
        configure_itk(settings.itk_threads)
        for note in protect_identified(settings):
            err.print(Text.assemble(("repaired: ", "yellow"), cell(note)))
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
        commands = {
            "pacs": _pacs,
            "select": _select,
            "retrieve": _retrieve,
            "listen": _listen,
            "anonymize": _anonymize,
            "deface": _deface,
            "qc": _qc,
            "convert": _convert,
            "volumetry": _volumetry,
            "run": _run,
            "status": _status,
        }
        if args.command in commands:
            return commands[args.command](args, settings, err)
        done = run_data_command(args, settings, err)
        if done is None:
            done = run_cohort_command(args, settings, err)
        if done is None:
            done = run_audit_command(args, settings, err)
        if done is not None:
            return done
    except ConfigurationError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        return EXIT_USAGE
    except RefusedError as exc:  # identified data others can read and this user cannot repair
        err.print(Text.assemble(("refused: ", "red"), cell(exc.reason)))
        return EXIT_USAGE
    except PacsError as exc:  # the PACS failed us: not the user's mistake
        err.print(f"[red]PACS error:[/red] {exc}")
        return EXIT_FAILURES
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
        write_json(payload)


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
        _emit(args, payload)
    else:
        print_summary(summary, Console(), f"synthetic cohort in {args.out}")
    return EXIT_FAILURES if loaded is not None and loaded.failed else EXIT_OK


def _load_into_pacs(settings: Settings, folder: Path, err: Console) -> StoreResult:
    from pipelines.pacs.dimse import store_files
    from pipelines.retrieve.config import pacs_node

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
    from flows.report import print_batch_report
    from models.scanners import load_known_scanners
    from pipelines.archive.store import ArchiveStore
    from pipelines.ingest.accounting import batch_report
    from pipelines.ingest.engine import choose_batch_name, ingest
    from pipelines.ingest.manifest import read_manifest
    from pipelines.walk import count_files

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
    with _open_index(settings) as index:
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
    from pipelines.archive.store import ArchiveStore
    from pipelines.ingest.verify import verify

    with _open_index(settings) as index, progress_bar(err, "verifying the archive") as bar:
        task = bar.add_task("verify", total=None)
        report = verify(index, ArchiveStore.of(settings), progress=lambda n: bar.advance(task, n))
    if args.json:
        _emit(args, report.model_dump(mode="json"))
    else:
        print_verify_report(report, Console())
    return EXIT_FAILURES if report.failed else EXIT_OK


def _audit_read(index: IndexDB, action: str, detail: dict[str, Any]) -> None:
    """A command's read of identified data, audited (the user running it is the actor)."""
    import json

    from models.linkage import audit

    with index.session() as session:
        audit(session, action, json.dumps(detail, default=str))


def _report(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_batch_report
    from pipelines.ingest.accounting import batch_report

    with _open_index(settings) as index:
        report = batch_report(index, args.name)
        _audit_read(index, "read.batch_report", {"batch": args.name})
    if args.json:
        _emit(args, report.model_dump(mode="json"))
    else:
        print_batch_report(report, Console())
    return EXIT_FAILURES if report.failed else EXIT_OK


def _demo(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.prefect_env import configure_prefect, prefect_api

    configure_prefect(settings.home)
    from flows.cli_data import print_comparison
    from flows.report import print_run_summary, print_summary, summary_json
    from flows.synth_flow import demo_flow

    out = settings.home / "demo" / "cohort"
    err.print(
        f"demo: generating {args.studies} studies into {out} (head model cached in "
        f"{settings.cache}; the first run builds it, about a minute), loading them into the "
        f"project's own Orthanc, then running the {args.protocol} flow end to end"
    )
    with prefect_api(settings.home) as started:
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
    comparison = _demo_comparison(settings, args.protocol, out / "ground_truth.json")
    if args.json:
        _emit(
            args,
            {
                "out": str(out),
                **summary_json(summary),
                "run": run_json(run),
                "groups": comparison.as_dict() if comparison else None,
            },
        )
    else:
        console = Console()
        print_summary(summary, console, f"cohortflow demo: synthetic cohort in {out}")
        print_run_summary(run, console)
        if comparison is not None:
            print_comparison(comparison, console)
        else:
            err.print("dementia vs control: fewer than two usable T1s in a group (more --studies)")
        err.print(
            f"outputs: {settings.outputs / args.protocol} (DICOM, NIfTI, volumetry overlays); "
            f"index: {settings.index}; `cohortflow status {args.protocol}` shows the rates "
            "again; the QC dashboard: `cohortflow users add NAME --role reviewer`, then "
            f"`cohortflow dashboard` (port {settings.dashboard.port}); "
            "the biomarker table: `cohortflow export biomarkers`; the Prefect UI: "
            "`prefect server start` (see the README)"
        )
    rates = run.rates
    return EXIT_OK if run.state == "completed" and rates.t1_with_biomarkers else EXIT_FAILURES


def _demo_comparison(settings: Settings, protocol: str, truth_file: Path) -> Comparison | None:
    """Dementia against controls, as a statistician would compare them: the generator's
    diagnosis given by accession number (as a radiology report would), joined on the
    identified side by the biomarker table."""
    from models.export import Labels, biomarker_table
    from models.synth import CohortTruth
    from pipelines.export.errors import StatsError
    from pipelines.export.stats import compare

    truth = CohortTruth.model_validate_json(truth_file.read_text())
    diagnosis: dict[str, dict[str, str]] = {}
    for patient in truth.patients:
        if patient.group in ("dementia", "control"):
            for study in patient.studies:
                diagnosis.setdefault(study.accession_number, {"diagnosis": patient.group})
    labels = Labels(str(truth_file), ("diagnosis",), diagnosis)
    with _open_index(settings) as index, index.session() as session:
        rows = biomarker_table(session, protocol, labels).records()
    try:
        return compare(rows, "diagnosis")
    except StatsError:
        return None


def _pacs(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from pipelines.pacs import orthanc
    from pipelines.retrieve.config import own_orthanc

    config = own_orthanc(settings)
    pid = orthanc.running_pid(config.folder)
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
        _emit(args, state)
    elif args.action == "status":
        Console().print(
            f"Orthanc {'running, pid ' + str(pid) if pid else 'not running'}: "
            f"{config.aet}@127.0.0.1:{config.dicom_port}, {state['http_url']}, {config.folder}"
        )
    return EXIT_OK


def _select(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_selection, selection_json
    from pipelines.retrieve.config import pacs_node, select_configured
    from pipelines.select.query import record_selection

    if args.manifest is not None:
        if args.date_from or args.date_to or args.protocols:
            err.print("[red]usage error:[/red] --manifest lists the studies: no --from, --to")
            return EXIT_USAGE
        from pipelines.cohort.configured import select_manifest

        with _open_index(settings) as index:
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
    with _open_index(settings) as index:
        if not args.dry_run:
            selection_id = record_selection(index, result, protocols_file)
        # the studies found (accession numbers, dates) are shown: an identified read
        detail = {"protocol": args.protocol, "studies": len(result.studies),
                  "selection": selection_id, "dry_run": args.dry_run}  # fmt: skip
        _audit_read(index, "read.select", detail)
    if args.json:
        _emit(args, selection_json(result, selection_id, dry_run=args.dry_run))
    else:
        print_selection(result, Console(), dry_run=args.dry_run)
        if selection_id is not None:
            err.print(f"stored as selection {selection_id}: `cohortflow retrieve` fetches it")
    return EXIT_OK


def _retrieve(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_retrieval
    from models import retrieval
    from pipelines.retrieve.config import retrieve_configured, retrieve_policy

    policy = retrieve_policy(
        settings,
        max_associations=args.max_associations,
        studies_per_hour=args.studies_per_hour,
        windows=args.windows,
        outside_window=args.outside_window,
        retries=args.retries,
    )
    with _open_index(settings) as index:
        with index.session() as session:
            chosen = retrieval.selection(session, args.selection)
        if chosen is None:
            which = f"selection {args.selection}" if args.selection else "a selection"
            err.print(f"[red]usage error:[/red] no {which}: run `cohortflow select` first")
            return EXIT_USAGE
        _audit_read(index, "retrieve", {"selection": chosen.id, "protocol": chosen.protocol})
        with progress_bar(err, f"retrieving selection {chosen.id} ({chosen.protocol})") as bar:
            task = bar.add_task("retrieve", total=chosen.studies)
            outcome = retrieve_configured(
                settings,
                index,
                chosen.id,
                method=args.method,
                policy=policy,
                progress=lambda _o: bar.advance(task, 1),
            )
    if args.json:
        _emit(args, asdict(outcome))
    else:
        print_retrieval(outcome, Console())
    return EXIT_OK if outcome.state == "complete" else EXIT_FAILURES


def _listen(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from models.scanners import load_known_scanners
    from pipelines.archive.store import ArchiveStore
    from pipelines.retrieve.config import scp_tls
    from pipelines.retrieve.listen import listen

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
    with _open_index(settings) as index:
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
        _emit(args, asdict(outcome))
    else:
        err.print(f"received {outcome.received} instances; {outcome.ingested} files ingested")
    return EXIT_OK


def _anonymize(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from pipelines.anonymize.files import anonymize_configured

    if not args.source.is_dir():
        err.print(f"[red]usage error:[/red] {args.source} is not a folder")
        return EXIT_USAGE
    if args.out.resolve().is_relative_to(args.source.resolve()):
        err.print("[red]usage error:[/red] OUT_DIR must not lie inside IN_DIR")
        return EXIT_USAGE
    with (
        _open_index(settings) as index,
        progress_bar(err, f"de-identifying {args.source}") as bar,
    ):
        task = bar.add_task("anonymize", total=None)
        run = anonymize_configured(
            settings,
            args.source,
            args.out,
            index,
            profile=args.profile,
            progress=lambda n: bar.advance(task, n),
        )
    report, deidentifier = run.report, run.deidentifier
    payload = {
        "written": report.written,
        "patients": len(report.linkage),
        "new_linkage": run.new_linkage,
        "profile": deidentifier.profile.name,
        "standard_edition": deidentifier.profile.table.edition,
        "profile_sha256": deidentifier.profile.sha256,
        "excluded": [asdict(o) for o in report.excluded],
        "skipped": [asdict(o) for o in report.skipped],
        "failed": [asdict(o) for o in report.failed],
    }
    if args.json:
        _emit(args, payload)
    else:
        console = Console()
        console.print(
            f"{report.written} files de-identified into {args.out} ({len(report.linkage)} "
            f"patients, profile {deidentifier.profile.name}, PS3.15 "
            f"{deidentifier.profile.table.edition})"
        )
        for kind in ("excluded", "skipped", "failed"):
            for outcome in getattr(report, kind):
                console.print(f"{kind}: {outcome.source}: {outcome.reason}")
    return EXIT_FAILURES if report.failed else EXIT_OK


def _deface(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from pipelines.deface.folder import deface_configured

    if not args.source.is_dir():
        err.print(f"[red]usage error:[/red] {args.source} is not a folder")
        return EXIT_USAGE
    if args.out.resolve().is_relative_to(args.source.resolve()):
        err.print("[red]usage error:[/red] OUT_DIR must not lie inside IN_DIR")
        return EXIT_USAGE
    with progress_bar(err, f"defacing {args.source}") as bar:
        task = bar.add_task("deface", total=None)
        report = deface_configured(
            settings,
            args.source,
            args.out,
            previews=args.previews,
            progress=lambda _: bar.advance(task, 1),
        )
    failed = report.with_status("failed")
    if args.json:
        _emit(
            args,
            {
                "defaced": len(report.with_status("defaced")),
                "excluded": len(report.with_status("excluded")),
                "failed": len(failed),
                "series": [asdict(o) for o in report.series],
                "skipped": [asdict(s) for s in report.skipped],
            },
        )
    else:
        console = Console()
        console.print(
            f"{len(report.with_status('defaced'))} series defaced into {args.out}, "
            f"{len(report.with_status('excluded'))} excluded, {len(failed)} failed"
        )
        for outcome in report.series:
            if outcome.status != "defaced":
                console.print(
                    f"{outcome.status}: {outcome.folder}: {outcome.reason_code}: {outcome.reason}"
                )
        for skipped in report.skipped:
            console.print(f"skipped: {skipped.source}: {skipped.reason}")
    return EXIT_FAILURES if failed else EXIT_OK


def _qc(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.report import print_qc_report, qc_json
    from pipelines.quality.folder import qc_configured
    from qc.findings import Verdict

    if not args.source.is_dir():
        err.print(f"[red]usage error:[/red] {args.source} is not a folder")
        return EXIT_USAGE
    with _open_index(settings) as index, progress_bar(err, f"checking {args.source}") as bar:
        task = bar.add_task("qc", total=None)
        report = qc_configured(
            settings,
            args.source,
            index,
            protocol=args.protocol,
            protocols_file=args.protocols,
            record=not args.no_record,
            progress=lambda _: bar.advance(task, 1),
        )
    if args.json:
        _emit(args, qc_json(report))
    else:
        print_qc_report(report, Console())
    return EXIT_FAILURES if report.with_verdict(Verdict.FAIL) else EXIT_OK


def _convert(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from contextlib import nullcontext

    from flows.output import SafeTable, cell
    from pipelines.convert.folder import convert_configured, report_json

    if not args.source.is_dir():
        err.print(f"[red]usage error:[/red] {args.source} is not a folder")
        return EXIT_USAGE
    if args.out.resolve().is_relative_to(args.source.resolve()):
        err.print("[red]usage error:[/red] OUT_DIR must not lie inside SOURCE")
        return EXIT_USAGE
    index_context = nullcontext(None) if args.no_record else _open_index(settings)
    with index_context as index, progress_bar(err, f"converting {args.source}") as bar:
        task = bar.add_task("convert", total=None)
        report = convert_configured(
            settings,
            args.source,
            args.out,
            index,
            protocol=args.protocol,
            protocols_file=args.protocols,
            every_series=args.every_series,
            record=not args.no_record,
            progress=lambda _: bar.advance(task, 1),
        )
    if args.json:
        _emit(args, report_json(report))
    else:
        console = Console()
        table = SafeTable(title=f"convert: {args.source} -> {args.out}")
        for column in ("series", "image", "converter", "verdict", "reason"):
            table.add_column(column)
        colour = {"pass": "green", "warn": "yellow", "fail": "red"}
        for s in report.series:
            deciding = s.reason
            table.add_row(
                f"{s.folder} ({s.description})" if s.description else s.folder,
                s.name if s.converted else "",
                s.converter or "",
                cell(s.verdict.value, colour[s.verdict.value]),
                f"{deciding.check}: {deciding.message}" if deciding else "",
            )
        console.print(table)
        for n in report.not_converted:
            console.print(f"not converted: {n.folder}: {n.reason_code}: {n.reason}")
        for skipped in report.skipped:
            console.print(f"skipped: {skipped.source}: {skipped.reason}")
        if report.dcm2niix_problem:
            err.print(f"[yellow]{report.dcm2niix_problem}[/yellow]")
    return EXIT_FAILURES if report.failed else EXIT_OK


def _volumetry(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from contextlib import nullcontext

    from flows.output import SafeTable
    from pipelines.volumetry.run import report_json, volumetry_configured
    from qc.findings import Verdict

    if not args.source.exists():
        err.print(f"[red]usage error:[/red] {args.source} does not exist")
        return EXIT_USAGE
    out = args.out or settings.outputs / "volumetry"
    index_context = nullcontext(None) if args.no_record else _open_index(settings)
    with index_context as index, progress_bar(err, f"measuring {args.source}") as bar:
        task = bar.add_task("volumetry", total=None)
        report = volumetry_configured(
            settings,
            args.source,
            out,
            index,
            protocol=args.protocol,
            protocols_file=args.protocols,
            record=not args.no_record,
            progress=lambda _: bar.advance(task, 1),
        )
    if args.json:
        _emit(args, report_json(report))
    else:
        table = SafeTable(title=f"volumetry: {args.source}")
        for column in ("image", "ICV ml", "GM ml", "WM ml", "CSF ml", "brain ml", "BPF", "QC"):
            table.add_column(column)
        colour = {"pass": "green", "warn": "yellow", "fail": "red"}
        for r in report.results:
            v = r.volumes
            deciding = r.reason
            qc = f"[{colour[r.verdict.value]}]{r.verdict.value}[/]"
            if deciding is not None:
                qc += f" {deciding.check}"
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
        console = Console()
        console.print(table)
        for name, code, message in report.not_measured:
            console.print(f"not measured: {name}: {code}: {message}")
        for skipped in report.skipped:
            console.print(f"skipped: {skipped.source}: {skipped.reason}", markup=False)
        if report.results:
            console.print(f"overlays in {out / 'overlays'}")
    failed = report.with_verdict(Verdict.FAIL) or report.not_measured
    if not report.results and not report.not_measured:
        err.print(f"[yellow]no 3D T1 to measure in {args.source}[/yellow]")
        for folder, description, why, _ in report.not_inputs:
            err.print(f"  {folder} {description!r}: {why}", markup=False, highlight=False)
        return EXIT_FAILURES
    return EXIT_FAILURES if failed else EXIT_OK


def _run(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from flows.prefect_env import configure_prefect, prefect_api

    configure_prefect(settings.home)
    from flows.report import print_run_summary

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
    from pipelines.dicom.protocols import load_protocols

    load_protocols(settings.protocols_file).get(args.protocol)  # unknown name: usage error
    if args.cohort is not None:
        if date_from or date_to:
            err.print("[red]usage error:[/red] --cohort names the studies: no --from / --to")
            return EXIT_USAGE
        from models.cohort import saved_cohort

        with _open_index(settings) as index, index.session() as session:
            saved_cohort(session, args.cohort)  # unknown name: usage error
    with prefect_api(settings.home) as started:
        if started:
            err.print(f"Prefect: a private server for this run at {started.removesuffix('/api')}")
        from flows.protocol_flow import protocol_flow

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
        _emit(args, run_json(summary))
    else:
        print_run_summary(summary, Console())
        err.print(f"outputs under {settings.outputs / args.protocol}")
    rates = summary.rates
    return EXIT_OK if rates.t1_with_biomarkers == rates.t1_series else EXIT_FAILURES


def run_json(summary: RunSummary) -> dict[str, Any]:
    return {
        "run_id": summary.run_id,
        "protocol": summary.protocol,
        "state": summary.state,
        **summary.outcome,
        "biomarkers": asdict(summary.biomarkers),
    }


def _status(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from sqlalchemy import select

    from flows.report import print_outcome
    from models.outcomes import protocol_outcome
    from models.schema import Selection

    with _open_index(settings) as index, index.session() as session:
        if args.protocol:
            names = [args.protocol]
        else:
            names = sorted(set(session.scalars(select(Selection.protocol))))
        outcomes = [protocol_outcome(session, name) for name in names]
    if args.protocol and outcomes[0].selection_id is None:
        err.print(f"[red]error:[/red] protocol {args.protocol} has no selection in the index")
        return EXIT_USAGE
    if args.json:
        _emit(args, {"protocols": [o.as_dict() for o in outcomes]})
    else:
        console = Console()
        if not outcomes:
            err.print("no protocol has been selected yet: `cohortflow run PROTOCOL` starts one")
        for outcome in outcomes:
            print_outcome(
                outcome, console, f"protocol {outcome.protocol} (selection {outcome.selection_id})"
            )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
