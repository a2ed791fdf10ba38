"""The PACS side of the settings, turned into the objects the steps take."""

from __future__ import annotations

import datetime as dt
import importlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from cohortflow.models.database import IndexDB
from cohortflow.models.scanners import load_known_scanners
from cohortflow.models.settings import Settings
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.pacs import orthanc
from cohortflow.pipelines.pacs.dicomweb import DicomWebNode
from cohortflow.pipelines.pacs.dimse import PacsNode
from cohortflow.pipelines.pacs.scp import Received, ScpTls
from cohortflow.pipelines.retrieve.engine import (
    RetrieveOutcome,
    RetrieveTarget,
    StudyOutcome,
    retrieve,
)
from cohortflow.pipelines.retrieve.errors import RetrieveConfigError
from cohortflow.pipelines.retrieve.throttle import RetrievePolicy, Throttle, Window
from cohortflow.pipelines.select.query import SelectionResult, select_studies


def own_orthanc(settings: Settings) -> orthanc.OrthancConfig:
    """The project's own Orthanc: under $COHORTFLOW_HOME/orthanc, knowing cohortflow's AE."""
    o = settings.orthanc
    me = orthanc.Modality("cohortflow", settings.local_aet, "127.0.0.1", settings.retrieve.scp_port)
    config = orthanc.OrthancConfig(
        folder=settings.home / "orthanc",
        http_port=o.http_port,
        dicom_port=o.dicom_port,
        aet=o.aet,
        username=o.username,
        modalities=(me,),
    )
    if o.password is not None:
        config = replace(config, password=o.password.get_secret_value())
    return config


def pacs_node(settings: Settings) -> PacsNode:
    if settings.pacs is not None:
        return PacsNode(settings.pacs.aet, settings.pacs.host, settings.pacs.port)
    return PacsNode(settings.orthanc.aet, settings.orthanc.host, settings.orthanc.dicom_port)


def _own_password(folder: Path) -> str | None:
    """The password the running own Orthanc was started with (its configuration file)."""
    try:
        data: dict[str, Any] = json.loads((folder / "orthanc.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    users = data.get("RegisteredUsers") or {}
    return next(iter(users.values()), None)


def dicomweb_node(settings: Settings) -> DicomWebNode | None:
    """The PACS's DICOMweb service (``pacs.dicomweb_*``), else the own Orthanc's."""
    p = settings.pacs
    if p is not None:
        if not p.dicomweb_url:
            return None
        secret = p.dicomweb_password.get_secret_value() if p.dicomweb_password else None
        return DicomWebNode(
            p.dicomweb_url,
            p.dicomweb_username,
            secret,
            token_source=p.dicomweb_token_source,
            ca_bundle=p.dicomweb_ca_bundle,
            client_certificate=p.dicomweb_client_certificate,
            client_key=p.dicomweb_client_key,
            session_hook=session_hook(p.dicomweb_session_hook),
        )
    o = settings.orthanc
    password = (
        o.password.get_secret_value() if o.password else _own_password(settings.home / "orthanc")
    )
    return DicomWebNode(f"http://{o.host}:{o.http_port}/dicom-web", o.username, password)


def session_hook(spec: str | None) -> Callable[[Any], object] | None:
    """The function ``package.module:function`` names (``pacs.dicomweb_session_hook``)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    try:
        hook = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RetrieveConfigError(
            f"pacs.dicomweb_session_hook {spec!r} cannot be loaded: {exc}"
        ) from exc
    if not callable(hook):
        raise RetrieveConfigError(f"pacs.dicomweb_session_hook {spec!r} is not a function")
    return cast("Callable[[Any], object]", hook)


def scp_tls(settings: Settings) -> ScpTls | None:
    """The storage SCP's DICOM TLS files from settings (None: plain DICOM)."""
    r = settings.retrieve
    if r.scp_tls_certificate is None or r.scp_tls_key is None:
        return None
    return ScpTls(r.scp_tls_certificate, r.scp_tls_key, r.scp_tls_client_ca)


def retrieve_target(settings: Settings, method: str | None = None) -> RetrieveTarget:
    r = settings.retrieve
    method = method or r.method
    return RetrieveTarget(
        node=pacs_node(settings),
        local_aet=settings.local_aet,
        method=method,
        scp_host=r.scp_host,
        scp_port=r.scp_port,
        calling_aets=settings.storage_callers(),
        scp_tls=scp_tls(settings),
        dicomweb=dicomweb_node(settings) if method == "dicomweb" else None,
        timeout=r.timeout_seconds,
    )


def retrieve_policy(settings: Settings, **overrides: Any) -> RetrievePolicy:
    r = settings.retrieve
    values: dict[str, Any] = {
        "max_associations": r.max_associations,
        "studies_per_hour": r.studies_per_hour,
        "windows": r.windows,
        "outside_window": r.outside_window,
        "retries": r.retries,
        "backoff_seconds": r.backoff_seconds,
        "backoff_max_seconds": r.backoff_max_seconds,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["windows"] = tuple(Window.parse(w) for w in values["windows"])
    return RetrievePolicy(**values)


def select_configured(
    settings: Settings,
    protocol: str,
    date_from: dt.date,
    date_to: dt.date,
    protocols_file: Path | None = None,
) -> tuple[SelectionResult, Path]:
    """``select_studies`` as the settings configure it; also returns the protocol file used."""
    protocols = load_protocols(protocols_file or settings.protocols_file)
    result = select_studies(
        pacs_node(settings),
        settings.local_aet,
        protocols.get(protocol),
        date_from,
        date_to,
        association=Throttle(retrieve_policy(settings)).association,
    )
    return result, Path(protocols.source)


def retrieve_configured(
    settings: Settings,
    index: IndexDB,
    selection_id: int,
    *,
    method: str | None = None,
    policy: RetrievePolicy | None = None,
    progress: Callable[[StudyOutcome], None] | None = None,
    on_instance: Callable[[Received], None] | None = None,
) -> RetrieveOutcome:
    """``retrieve`` as the settings configure it (archive, scanners, PACS, throttle, spool);
    ``progress`` hears of every study done, ``on_instance`` of every instance received."""
    return retrieve(
        index,
        ArchiveStore.of(settings),
        load_known_scanners(settings.known_scanners_file),
        selection_id,
        retrieve_target(settings, method),
        Throttle(policy or retrieve_policy(settings)),
        settings.home / "spool" / f"selection-{selection_id}",
        progress=progress,
        on_instance=on_instance,
    )
