"""``cohortflow prefect setup``: what prefect.yaml's deployments expect of the Prefect server,
made once and idempotently: the work pool, the ``pacs`` concurrency limit (tasks tagged
``pacs`` across every run: PACS traffic one task at a time by default) and the variable
``cohortflow_timezone`` their schedules are templated with (``flow.timezone`` of the settings,
else this machine's zone)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohortflow.models.settings import Settings

#: the Prefect variable prefect.yaml's schedules read their time zone from
TIMEZONE_VARIABLE = "cohortflow_timezone"
#: Prefect 3 keeps a tag's concurrency limit as the global limit of this name
PACS_LIMIT = "tag:pacs"


@dataclass(frozen=True)
class SetupReport:
    api: str
    pool: str
    #: created / present
    pool_outcome: str
    pacs_limit: int
    #: created / updated / present
    limit_outcome: str
    timezone: str
    #: created / updated / present
    timezone_outcome: str

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def local_timezone(environ: dict[str, str] | None = None) -> str:
    """This machine's IANA time zone: ``TZ``, else /etc/timezone, else the target of
    /etc/localtime; UTC when none says."""
    env = os.environ if environ is None else environ
    if env.get("TZ", "").lstrip(":"):
        return env["TZ"].lstrip(":")
    try:
        named = Path("/etc/timezone").read_text(encoding="ascii").strip()
        if named:
            return named
    except OSError:
        pass
    try:
        target = os.readlink("/etc/localtime")
    except OSError:
        return "UTC"
    _, found, zone = target.partition("zoneinfo/")
    return zone if found and zone else "UTC"


def schedule_timezone(settings: Settings) -> str:
    return settings.flow.timezone or local_timezone()


def set_up(settings: Settings, *, pool: str, pacs_limit: int) -> SetupReport:
    """Make the work pool (process type), the ``pacs`` limit and the time zone variable on
    the Prefect server of ``PREFECT_API_URL``; what is there already is kept (a limit or time
    zone that differs is updated)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate, WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    timezone = schedule_timezone(settings)
    with get_client(sync_client=True) as client:
        api = str(client.api_url)
        try:
            client.read_work_pool(pool)
            pool_outcome = "present"
        except ObjectNotFound:
            template = asyncio.run(get_default_base_job_template_for_infrastructure_type("process"))
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=template or {})
            )
            pool_outcome = "created"
        try:
            limit = client.read_global_concurrency_limit_by_name(PACS_LIMIT)
            limit_outcome = "present" if limit.limit == pacs_limit else "updated"
        except ObjectNotFound:
            limit_outcome = "created"
        if limit_outcome != "present":
            client.upsert_global_concurrency_limit_by_name(PACS_LIMIT, pacs_limit)
        variable = client.read_variable_by_name(TIMEZONE_VARIABLE)
        if variable is None:
            client.create_variable(VariableCreate(name=TIMEZONE_VARIABLE, value=timezone))
            timezone_outcome = "created"
        elif variable.value != timezone:
            client.update_variable(VariableUpdate(name=TIMEZONE_VARIABLE, value=timezone))
            timezone_outcome = "updated"
        else:
            timezone_outcome = "present"
    return SetupReport(
        api=api,
        pool=pool,
        pool_outcome=pool_outcome,
        pacs_limit=pacs_limit,
        limit_outcome=limit_outcome,
        timezone=timezone,
        timezone_outcome=timezone_outcome,
    )
