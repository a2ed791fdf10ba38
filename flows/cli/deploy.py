"""``cohortflow db``, ``backup``, ``restore``, ``services`` and ``prefect``: running
cohortflow as an installation (upgrades, backups, services, the Prefect server's set-up)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from cohortflow.flows.cli.common import emit
from cohortflow.flows.output import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, add_json, cell
from cohortflow.models.settings import Settings, config_file_path

#: what a backup holding the keys is, said wherever one is made
KEY_WARNING = (
    "{folder} now holds the project key: with it and an identifier anyone can compute a "
    "pseudonym, and the index beside it is identified. Store it as the re-identification key "
    "it is (encrypted, owner-only, apart from the de-identified data); --no-keys leaves the "
    "keys out."
)


def add_commands(sub: Any) -> None:
    """Register db (status, upgrade), backup, restore, services (install) and prefect (setup)."""
    db = sub.add_parser(
        "db",
        help="the index's schema: status, upgrade",
        description="The index's schema revision against this version's. A PostgreSQL index "
        "behind it is migrated only by `db upgrade` (other commands refuse it); a SQLite one "
        "is migrated by any command, `db upgrade` backs it up first.",
    )
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    status = db_sub.add_parser("status", help="the index's schema revision and the newest")
    add_json(status, "the revisions")
    status.set_defaults(handler=_db_status)
    upgrade = db_sub.add_parser(
        "upgrade",
        help="back the index up, then migrate it to the newest schema",
        description="Copy the index (online; keys left out: an upgrade does not touch them) "
        "into --backup, default $COHORTFLOW_HOME/backups/index-<revision>-<time>, then migrate "
        "it. Stop the dashboard, workers and runs using the index first.",
    )
    upgrade.add_argument("--backup", type=Path, metavar="DEST", help="new folder for the copy")
    upgrade.add_argument(
        "--no-backup", action="store_true", help="migrate without a copy (one made already)"
    )
    add_json(upgrade, "the outcome")
    upgrade.set_defaults(handler=_db_upgrade)

    backup = sub.add_parser(
        "backup",
        help="copy the index (online) and the keys into a new folder",
        description="An online copy of the SQLite index (consistent with its WAL) or a pg_dump "
        "of the PostgreSQL one, and the project key and archive key ring, into DEST "
        "(owner-only). The archive's blobs are not copied: see README, 'What to back up'.",
    )
    backup.add_argument("dest", type=Path, metavar="DEST", help="a new or empty folder")
    backup.add_argument(
        "--no-keys",
        action="store_true",
        help="leave the keys out (back them up apart: they re-identify)",
    )
    add_json(backup, "what was copied")
    backup.set_defaults(handler=_backup)

    restore = sub.add_parser(
        "restore",
        help="put a backup's index and missing keys back",
        description="Restore the index of a `cohortflow backup` folder where the settings "
        "say, and the keys the settings' files lack. A key file that differs from the "
        "backup's is refused. Stop everything using the index first.",
    )
    restore.add_argument("source", type=Path, metavar="SOURCE", help="the backup folder")
    restore.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing index (what it holds since the backup is lost)",
    )
    restore.add_argument("--no-keys", action="store_true", help="restore the index only")
    add_json(restore, "what was restored")
    restore.set_defaults(handler=_restore)

    services = sub.add_parser(
        "services",
        help="install systemd units: dashboard, listen, Orthanc, Prefect server and worker",
        description="Write systemd unit files that run this installation's cohortflow and "
        "prefect with these settings (COHORTFLOW_HOME, the config file; more environment in "
        "$COHORTFLOW_HOME/cohortflow.env). Then: systemctl daemon-reload, enable --now.",
    )
    services_sub = services.add_subparsers(dest="services_command", metavar="ACTION", required=True)
    install = services_sub.add_parser("install", help="write the unit files")
    install.add_argument(
        "--user",
        action="store_true",
        help="user units (systemctl --user; default folder ~/.config/systemd/user)",
    )
    install.add_argument(
        "--dir",
        type=Path,
        help="where to write them (default: /etc/systemd/system, or the user folder)",
    )
    install.add_argument(
        "--run-as", metavar="USER", help="the account system units run as (default: you)"
    )
    install.add_argument("--pool", help="the Prefect work pool (default: cohortflow-local)")
    install.add_argument("--prefect-api", metavar="URL", help="the Prefect API the worker uses")
    install.add_argument("--overwrite", action="store_true", help="replace units that differ")
    add_json(install, "the files written")
    install.set_defaults(handler=_services_install)

    prefect = sub.add_parser(
        "prefect",
        help="set up the Prefect server for prefect.yaml's deployments",
        description="On the server of PREFECT_API_URL: the work pool, the concurrency limit "
        "of tasks tagged pacs and the variable cohortflow_timezone (flow.timezone, else this "
        "machine's) that the deployments' schedules use. Idempotent.",
    )
    prefect_sub = prefect.add_subparsers(dest="prefect_command", metavar="ACTION", required=True)
    setup = prefect_sub.add_parser("setup", help="create the pool, the pacs limit, the time zone")
    setup.add_argument("--pool", help="work pool name (default: cohortflow-local)")
    setup.add_argument(
        "--pacs-limit",
        type=int,
        default=1,
        metavar="N",
        help="PACS tasks running at once across all runs (default 1)",
    )
    add_json(setup, "what was set up")
    setup.set_defaults(handler=_prefect_setup)


def _db_status(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.models.database import create_index_engine, needs_explicit_upgrade, schema_state

    engine = create_index_engine(settings.index)
    try:
        state = schema_state(engine)
    finally:
        engine.dispose()
    if args.json:
        emit(args, {**state.as_json(), "needs_db_upgrade": needs_explicit_upgrade(state)})
    else:
        if state.at_head:
            said = "at the newest schema"
        elif not state.known:
            said = "made by a newer cohortflow: upgrade cohortflow"
        elif state.current is None:
            said = "empty: the first command makes its tables"
        elif needs_explicit_upgrade(state):
            said = "behind: run `cohortflow db upgrade` (other commands refuse it)"
        else:
            said = (
                "behind: the next command migrates it (`cohortflow db upgrade` backs it up first)"
            )
        Console().print(
            Text.assemble(
                cell(state.shown),
                f": schema {state.current or 'none'}, newest {state.head}; ",
                said,
            )
        )
    return EXIT_OK if state.at_head else EXIT_FAILURES


def _db_upgrade(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.pipelines.backup.upgrade import upgrade

    report = upgrade(settings, backup_folder=args.backup, backup=not args.no_backup)
    if args.json:
        emit(args, report.as_json())
    elif not report.migrated:
        Console().print(f"the index is at the newest schema ({report.after.current}): no change")
    else:
        if report.backup is not None:
            err.print(Text.assemble("backed up to ", cell(report.backup.folder)))
        Console().print(
            f"the index {report.before.shown} migrated from schema "
            f"{report.before.current or 'empty'} to {report.after.current}"
        )
    return EXIT_OK


def _key_lines(keys: Any, err: Console) -> None:
    for key in keys:
        err.print(Text.assemble(f"{key.role} key ({key.source}): ", cell(key.outcome)))


def _backup(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.pipelines.backup.copy import back_up

    report = back_up(settings, args.dest, keys=not args.no_keys)
    warning = KEY_WARNING.format(folder=report.folder) if report.holds_keys else None
    if warning:
        err.print(Text.assemble(("warning: ", "yellow"), cell(warning)))
    env_keys = [k for k in report.keys if k.outcome == "not_a_file"]
    for key in env_keys:
        err.print(
            Text.assemble(
                ("note: ", "yellow"),
                cell(f"the {key.role} key comes from {key.source}: back it up where it is kept"),
            )
        )
    if args.json:
        emit(args, {**report.as_json(), "warning": warning})
    else:
        _key_lines(report.keys, err)
        Console().print(
            Text.assemble(
                f"the {report.dialect} index (schema {report.revision or 'empty'}, "
                f"{report.index_bytes} bytes) backed up to ",
                cell(report.folder),
            )
        )
    for key in report.keys:
        if key.outcome == "missing":  # made on first use: none yet, or lost
            err.print(
                Text.assemble(
                    ("note: ", "yellow"),
                    cell(f"no {key.role} key at {key.source}: none made yet, or lost"),
                )
            )
    return EXIT_OK


def _restore(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.pipelines.backup.copy import restore

    report = restore(settings, args.source, overwrite=args.overwrite, keys=not args.no_keys)
    if args.json:
        emit(args, report.as_json())
    else:
        _key_lines(report.keys, err)
        Console().print(
            Text.assemble(
                "the index ",
                cell(report.index),
                f" restored (schema {report.revision or 'empty'}, newest {report.head}) from ",
                cell(report.folder),
            )
        )
    if report.revision != report.head:
        err.print(
            "the restored index is behind this version: `cohortflow db upgrade` migrates it "
            "(a SQLite one is migrated by the next command too)"
        )
    return EXIT_OK


def _services_install(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.deploy import services

    folder = args.dir or (
        Path.home() / ".config" / "systemd" / "user" if args.user else Path("/etc/systemd/system")
    )
    options = services.options_for(
        settings,
        args.config or config_file_path(),
        user_unit=args.user,
        user=args.run_as,
        pool=args.pool or services.DEFAULT_POOL,
        prefect_api=args.prefect_api,
    )
    written = services.install(folder, options, overwrite=args.overwrite)
    settings.home.mkdir(parents=True, exist_ok=True)  # the units' working directory
    names = [p.name for p in written]
    control = "systemctl --user" if args.user else "systemctl"
    if args.json:
        emit(args, {"folder": str(folder), "units": names, "user": args.user})
    else:
        for path in written:
            Console().print(cell(path))
        err.print(
            f"then: {control} daemon-reload; {control} enable --now "
            + " ".join(n.removesuffix(".service") for n in names)
            + " (only those you use: cohortflow-orthanc is the project's own PACS)"
        )
    return EXIT_OK


def _prefect_setup(args: argparse.Namespace, settings: Settings, err: Console) -> int:
    from cohortflow.flows.deploy import prefect_setup, services

    if args.pacs_limit < 1:
        err.print("[red]usage error:[/red] --pacs-limit must be at least 1")
        return EXIT_USAGE
    report = prefect_setup.set_up(
        settings, pool=args.pool or services.DEFAULT_POOL, pacs_limit=args.pacs_limit
    )
    if args.json:
        emit(args, report.as_json())
    else:
        Console().print(
            Text.assemble(
                "Prefect at ",
                cell(report.api),
                f": work pool {report.pool} {report.pool_outcome}; limit of tasks tagged pacs "
                f"{report.pacs_limit} {report.limit_outcome}; schedules' time zone "
                f"{report.timezone} {report.timezone_outcome}",
            )
        )
        err.print("then, in the folder of prefect.yaml (the repository): prefect deploy --all")
    return EXIT_OK
