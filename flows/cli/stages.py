"""``cohortflow anonymize``, ``deface``, ``qc``, ``convert`` and ``volumetry``: one stage of the
run on a folder."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from cohortflow.flows.cli.common import add_no_record, add_protocol_options, emit, open_index
from cohortflow.flows.output import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    add_json,
    counting,
    stdout_console,
)
from cohortflow.models.settings import Settings


def add_commands(sub: Any) -> None:
    """Register anonymize, deface, qc, convert and volumetry, each with its handler."""
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
    anonymize.set_defaults(handler=_anonymize)

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
        help="write each defaced series' review sheet here: the sagittal plane through the "
        "left eye, the coronal and axial planes through the eyes and (for the T1 the template "
        "was fitted to) the skin surface from the front, three-quarter and the left, each "
        "before | after, at 1.25 px per mm, as DIR/study-<digest>/<pseudonym>_"
        "<SeriesDescription>_<SeriesNumber>_deface.png (not-deidentified_<SeriesNumber>_... "
        "for a header without PatientIdentityRemoved YES; no UID in any name), and beside it "
        "the after panels alone (*_deface-after.png). The sheet shows the face: keep DIR on "
        "the restricted side",
    )
    add_json(deface, "the outcome")
    deface.set_defaults(handler=_deface)

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
    add_protocol_options(qc, "rules and thresholds apply")
    add_no_record(qc, "outliers are still judged against it")
    add_json(qc, "the findings")
    qc.set_defaults(handler=_qc)

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
    add_protocol_options(convert, "rules select the series")
    convert.add_argument(
        "--all",
        dest="every_series",
        action="store_true",
        help="convert every MR image series, not only the protocol's (suffix guessed, acq-guessed)",
    )
    add_no_record(convert)
    add_json(convert, "the outcome")
    convert.set_defaults(handler=_convert)

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
    add_protocol_options(volumetry, "rules select the DICOM series")
    add_no_record(volumetry)
    add_json(volumetry, "the volumes")
    volumetry.set_defaults(handler=_volumetry)


def _folders_refused(args: argparse.Namespace, err: Console, source_name: str = "") -> int | None:
    """The checks every folder command makes before any work: SOURCE is a folder and, for a
    command that writes (``source_name`` names SOURCE in its usage), OUT_DIR does not lie
    inside it. EXIT_USAGE with the reason on stderr, or None."""
    if not args.source.is_dir():
        err.print(f"[red]usage error:[/red] {args.source} is not a folder")
        return EXIT_USAGE
    if source_name and args.out.resolve().is_relative_to(args.source.resolve()):
        err.print(f"[red]usage error:[/red] OUT_DIR must not lie inside {source_name}")
        return EXIT_USAGE
    return None


def _anonymize(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.pipelines.anonymize.files import anonymize_configured

    if (refused := _folders_refused(args, err, "IN_DIR")) is not None:
        return refused
    with open_index(settings) as index, counting(err, f"de-identifying {args.source}") as n:
        run = anonymize_configured(
            settings,
            args.source,
            args.out,
            index,
            profile=args.profile,
            progress=n.advance,
            expect=n.expect,
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
        emit(args, payload)
    else:
        console = stdout_console()
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
    from cohortflow.pipelines.deface.folder import deface_configured

    if (refused := _folders_refused(args, err, "IN_DIR")) is not None:
        return refused
    with counting(err, f"defacing {args.source}") as n:
        report = deface_configured(
            settings,
            args.source,
            args.out,
            previews=args.previews,
            progress=n.tick,
            expect=n.expect,
        )
    failed = report.with_status("failed")
    if args.json:
        emit(
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
        console = stdout_console()
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
    from cohortflow.flows.report import print_qc_report, qc_json
    from cohortflow.pipelines.quality.folder import qc_configured
    from cohortflow.qc.findings import Verdict

    if (refused := _folders_refused(args, err)) is not None:
        return refused
    with open_index(settings) as index, counting(err, f"checking {args.source}") as n:
        report = qc_configured(
            settings,
            args.source,
            index,
            protocol=args.protocol,
            protocols_file=args.protocols,
            record=not args.no_record,
            progress=n.tick,
            expect=n.expect,
        )
    if args.json:
        emit(args, qc_json(report))
    else:
        print_qc_report(report, stdout_console())
    return EXIT_FAILURES if report.with_verdict(Verdict.FAIL) else EXIT_OK


def _convert(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from contextlib import nullcontext

    from cohortflow.flows.report import print_convert_report
    from cohortflow.pipelines.convert.folder import convert_configured
    from cohortflow.pipelines.convert.results import report_json

    if (refused := _folders_refused(args, err, "SOURCE")) is not None:
        return refused
    index_context = nullcontext(None) if args.no_record else open_index(settings)
    with index_context as index, counting(err, f"converting {args.source}") as n:
        report = convert_configured(
            settings,
            args.source,
            args.out,
            index,
            protocol=args.protocol,
            protocols_file=args.protocols,
            every_series=args.every_series,
            record=not args.no_record,
            progress=n.tick,
            expect=n.expect,
        )
    if args.json:
        emit(args, report_json(report))
    else:
        print_convert_report(report, stdout_console(), f"convert: {args.source} -> {args.out}")
        if report.dcm2niix_problem:
            err.print(f"[yellow]{report.dcm2niix_problem}[/yellow]")
    return EXIT_FAILURES if report.failed else EXIT_OK


def _volumetry(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from contextlib import nullcontext

    from cohortflow.flows.report import print_volumetry_report
    from cohortflow.pipelines.volumetry.run import report_json, volumetry_configured
    from cohortflow.qc.findings import Verdict

    if not args.source.exists():
        err.print(f"[red]usage error:[/red] {args.source} does not exist")
        return EXIT_USAGE
    out = args.out or settings.outputs / "volumetry"
    if not args.no_record and not out.resolve().is_relative_to(settings.outputs.resolve()):
        # the dashboard serves pictures from under the outputs only (the pseudonymized side)
        err.print(
            f"note: the overlays go to {out / 'overlays'}, outside the outputs folder "
            f"{settings.outputs}: the dashboard will not show them (use --out under it)",
            style="yellow",
            markup=False,
            highlight=False,
        )
    index_context = nullcontext(None) if args.no_record else open_index(settings)
    with index_context as index, counting(err, f"measuring {args.source}") as n:
        report = volumetry_configured(
            settings,
            args.source,
            out,
            index,
            protocol=args.protocol,
            protocols_file=args.protocols,
            record=not args.no_record,
            progress=n.tick,
            expect=n.expect,
        )
    if args.json:
        emit(args, report_json(report))
    else:
        title = f"volumetry: {args.source}"
        print_volumetry_report(report, stdout_console(), title, out / "overlays")
    failed = report.with_verdict(Verdict.FAIL) or report.not_measured
    if not report.results and not report.not_measured:
        err.print(f"[yellow]no 3D T1 to measure in {args.source}[/yellow]")
        for folder, description, why, _ in report.not_inputs:
            err.print(f"  {folder} {description!r}: {why}", markup=False, highlight=False)
        return EXIT_FAILURES
    return EXIT_FAILURES if failed else EXIT_OK
