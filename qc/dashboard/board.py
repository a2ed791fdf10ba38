"""What every page of the dashboard shares: the ``Dashboard`` object (settings, the index, the
templates, the login policy and throttle, and what the command line handed over), the roles of
each right, and the steps every route takes (a time-limited database session, the logged-in
account, the role check, the form token, rendering a page).

``create_app`` builds one ``Dashboard`` and hands it to each group of routes (``auth``,
``review``, ``exports``, ``cohorts``, ``audit``).
"""

# No ``from __future__ import annotations``: the route modules pass ``Dashboard.role(...)`` to
# FastAPI, which reads the dependencies' signatures at definition time.
import datetime as dt
import hmac
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from cohortflow.models.database import IndexDB
from cohortflow.models.database_limits import time_limit
from cohortflow.models.disclosure import Disclosure
from cohortflow.models.linkage import audit
from cohortflow.models.settings import Settings
from cohortflow.models.users import (
    ADMIN,
    RESEARCHER,
    REVIEWER,
    STEWARD,
    Account,
    LoginPolicy,
    account,
)
from cohortflow.qc.dashboard.throttle import ClientThrottle
from cohortflow.qc.dashboard.viewer import VolumeCache
from cohortflow.qc.policy import QcPolicy

#: who may do what (the README's table of roles says the same; tests/test_dashboard.py checks
#: every route for every role against it)
READ = (REVIEWER, RESEARCHER, STEWARD, ADMIN)
REVIEW = (REVIEWER, ADMIN)
EXPORT = (RESEARCHER, ADMIN)
SAVE_COHORT = (RESEARCHER, STEWARD)
AUDIT = (STEWARD, ADMIN)
#: the identified layer of cohort discovery: the data steward only
IDENTIFIED_ROLES = (STEWARD,)

#: the largest page number and row offset a request may ask for (beyond any index; a larger
#: number overflowed the database's integer and answered 500)
MAX_PAGE = 1_000_000
MAX_OFFSET = 1_000_000_000


class NotLoggedInError(Exception):
    """No valid session: pages redirect to the login, the API answers 401."""


@dataclass(frozen=True)
class Dashboard:
    """The state the dashboard's routes share, built once by ``create_app``.

    ``opened`` holds the index while the app runs (``"index"``: set by the app's lifespan, the
    one mutable part). ``refresh``, ``protocols``, ``disclosure`` and ``release`` are
    ``create_app``'s arguments of the same names."""

    settings: Settings
    templates: Jinja2Templates
    policy: LoginPolicy
    throttle: ClientThrottle
    #: the outputs folder, resolved: the only pictures served are under it
    outputs: Path
    refresh: Callable[[IndexDB], object] | None
    protocols: Mapping[str, Sequence[str]] | None
    disclosure: Disclosure | None
    release: Callable[[Session, Path, set[str], str], bool] | None
    opened: dict[str, IndexDB] = field(default_factory=dict)
    #: the QC policy of a protocol (its metrics' acceptance ranges and its checks' severities);
    #: None: the ranges are not drawn
    qc_policy: Callable[[str | None], QcPolicy] | None = None
    #: the slice viewer's volumes last read
    volumes: VolumeCache = field(default_factory=VolumeCache)

    @property
    def index(self) -> IndexDB:
        return self.opened["index"]

    def picture(self, recorded: str) -> Path | None:
        """The picture file a stage recorded, when it is served: an existing file under the
        outputs folder (the pseudonymized side); None otherwise (written elsewhere, e.g. by
        ``cohortflow volumetry --out`` outside it, or since removed)."""
        return self.served(recorded)

    def served(self, recorded: str, *, under_outputs: bool = False) -> Path | None:
        """A file a stage recorded (a picture, an image, a label map), when the dashboard may
        read it: an existing regular file that, every link resolved, lies under the outputs
        folder (the pseudonymized side: never the archive, the index or ``restricted/``);
        None otherwise. ``under_outputs``: a relative path is relative to the outputs folder."""
        path = Path(recorded)
        if under_outputs and not path.is_absolute():
            path = self.outputs / path
        path = path.resolve()
        return path if path.is_relative_to(self.outputs) and path.is_file() else None

    @contextmanager
    def db(self) -> Iterator[Session]:
        """A session whose statements stop after ``dashboard.request_seconds`` (answered 503):
        no question holds the index, or a worker thread, for long."""
        with (
            self.index.session() as session,
            time_limit(session, self.settings.dashboard.request_seconds),
        ):
            yield session

    def user(self, request: Request) -> Account:
        """The session's account, while the session lasts: opened under the account's current
        epoch (no logout, password, role or disable since), within the absolute and the idle
        time limits."""
        name = request.session.get("user")
        if not name:
            raise NotLoggedInError
        with self.db() as session:
            found = account(session, str(name))
        moment = dt.datetime.now(dt.UTC)
        opened = moment_of(request.session.get("at"))
        seen = moment_of(request.session.get("seen")) or opened
        board = self.settings.dashboard
        if (
            found is None
            or not found.active
            or request.session.get("epoch") != found.session_epoch
            or opened is None
            or seen is None
            or moment - opened > dt.timedelta(hours=board.session_hours)
            or moment - seen > dt.timedelta(minutes=board.idle_minutes)
        ):
            request.session.clear()
            raise NotLoggedInError
        request.session["seen"] = moment.isoformat(timespec="seconds")
        return found

    def role(self, *allowed: str) -> Callable[[Request], Account]:
        """A route dependency: the logged-in account, when its role is one of ``allowed``."""

        def check(request: Request) -> Account:
            found = self.user(request)
            if found.role not in allowed:
                raise HTTPException(403, f"the {found.role} role cannot do this")
            return found

        return check

    def check_token(self, request: Request, token: str | None) -> None:
        """The form's (or the ``X-CSRF-Token`` header's) token is the session's."""
        expected = str(request.session.get("csrf", ""))
        if not token or not expected or not hmac.compare_digest(token, expected):
            raise HTTPException(403, "the form is stale or came from elsewhere: reload the page")

    def render(
        self, request: Request, name: str, who: Account | None, status: int = 200, **context: Any
    ) -> HTMLResponse:
        context.update(user=who, csrf=request.session.get("csrf", ""), path=request.url.path)
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def refused(self, request: Request, action: str, detail: dict[str, Any], actor: str) -> None:
        """A refusal is audited (who, what they asked, why)."""
        client = request.client.host if request.client else None
        payload = {"method": request.method, "path": request.url.path, "client": client, **detail}
        with self.db() as session:
            audit(session, action, json.dumps(payload, default=str), actor=actor or "anonymous")

    def fresh(self) -> None:
        """Cohort discovery's table brought up to date (when the command line said how)."""
        if self.refresh is not None:
            self.refresh(self.index)


def moment_of(text: object) -> dt.datetime | None:
    """A session's time stamp (ISO, with its time zone), or None."""
    try:
        found = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return found if found.tzinfo is not None else None


def local_target(target: str) -> str:
    """Only redirect within the dashboard (never to another site after login)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def parse_day(text: str | None, name: str) -> dt.date | None:
    """A ``YYYY-MM-DD`` query parameter (400 otherwise); empty is None."""
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise HTTPException(400, f"{name} must be a date (YYYY-MM-DD), not {text!r}") from exc
