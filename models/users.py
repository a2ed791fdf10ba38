"""Dashboard accounts: a name, a role, an argon2id password hash, and the state of its logins.

Roles: ``reviewer`` (read, record reviews), ``researcher`` (read, export, statistics, save
cohorts), ``steward`` (read, save cohorts, the identified layer of cohort discovery, the audit
log), ``admin`` (review, export, the audit log). Making, changing, disabling and unlocking
accounts is audited, and so is every login, failed or not.

- **Hashes**: argon2id (``argon2-cffi``; RFC 9106's second recommended option: 3 passes over
  64 MiB, 4 lanes, about 0.2 s here). Hashes of an earlier scheme (scrypt at 2**15) and argon2
  hashes of weaker parameters are replaced at the next successful login.
- **Names** are unique without regard to case (``rita`` and ``RITA`` are one account; a login
  may type either).
- **Passwords**: at least ``MIN_PASSWORD`` characters, not one character repeated, not
  containing the user name.
- **Timing**: an unknown name costs the same hash computation as a wrong password, so the
  answer's time does not tell which names exist.
- **Throttling**: after ``LoginPolicy.free_failures`` failed logins in a row an account waits
  before the next attempt is even checked (1 s, doubling with each further failure, at most
  ``max_delay_seconds``); after ``lock_after`` it is locked until an admin unlocks it
  (``cohortflow users unlock NAME``). A success resets the count. (Throttling per client address
  is the dashboard's: ``qc.dashboard.throttle``.)
- **Sessions end together**: ``session_epoch`` changes when the user logs out, the password or
  role changes, or the account is disabled; a dashboard session opened under another epoch is
  over (``qc.dashboard.app``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import math
import re
import secrets
from dataclasses import dataclass
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.errors import AccountError
from cohortflow.models.linkage import audit
from cohortflow.models.repository import now
from cohortflow.models.schema import User

REVIEWER, RESEARCHER, STEWARD, ADMIN = "reviewer", "researcher", "steward", "admin"
ROLES = (REVIEWER, RESEARCHER, STEWARD, ADMIN)
_NAME = re.compile(r"^[A-Za-z0-9._@-]{2,80}$")
MIN_PASSWORD = 12
#: how much of a typed user name a failed login's audit entry keeps (user names are at most 80
#: characters; anything longer is not one, and a log-in form must not fill the audit log)
MAX_LOGGED_NAME = 100


@dataclass(frozen=True)
class Account:
    username: str
    role: str
    active: bool
    #: changes whenever every session of the account must end
    session_epoch: int = 0
    locked: bool = False


@dataclass(frozen=True)
class LoginPolicy:
    """How failed logins are answered (``dashboard`` settings)."""

    free_failures: int = 3
    max_delay_seconds: float = 300.0
    lock_after: int = 10


@dataclass(frozen=True)
class Login:
    """The answer to a login: the account, or why not (``wrong``, ``wait``, ``locked``)."""

    account: Account | None
    status: str
    retry_after: float = 0.0

    @property
    def ok(self) -> bool:
        return self.account is not None

    @property
    def reason(self) -> str:
        """Why the login was refused, as the user is told (the dashboard and the command line)."""
        if self.status == "wait":
            return f"Too many failed logins: try again in {self.wait_seconds} s."
        if self.status == "locked":
            return (
                "This account is locked after failed logins: ask an admin "
                "(cohortflow users unlock)."
            )
        return "Wrong user name or password."

    @property
    def wait_seconds(self) -> int:
        return max(1, math.ceil(self.retry_after))


@cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4 (RFC 9106, second option)


@cache
def _dummy_hash() -> str:
    """A hash to check unknown names against (the same work as a wrong password)."""
    return hash_password(secrets.token_urlsafe(16))


def name_key(username: str) -> str:
    """What makes two names the same account: case does not."""
    return username.casefold()


def check_policy(username: str, password: str) -> None:
    """Raise AccountError when ``password`` may not be ``username``'s."""
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password of {username} needs at least {MIN_PASSWORD} characters")
    if len(set(password)) == 1 or not password.strip():
        raise AccountError(f"the password of {username} is one character repeated")
    if name_key(username) in name_key(password):
        raise AccountError(f"the password of {username} contains the user name")


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def check_password(password: str, stored: str) -> tuple[bool, bool]:
    """Whether ``password`` matches ``stored``, and whether the hash should be made again
    (an earlier scheme or weaker parameters)."""
    if stored.startswith("scrypt$"):
        return _check_scrypt(password, stored), True
    hasher = _hasher()
    try:
        hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False, False
    return True, hasher.check_needs_rehash(stored)


def _check_scrypt(password: str, stored: str) -> bool:
    """The scheme before argon2id (``scrypt$N$r$p$salt$digest``): still read, then replaced."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        found = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=128 * 2**20,
            dklen=len(base64.b64decode(digest)),
        )
    except (ValueError, TypeError):
        return False
    return scheme == "scrypt" and hmac.compare_digest(found, base64.b64decode(digest))


def _row(session: Session, username: str) -> User | None:
    return session.scalars(select(User).where(User.name_key == name_key(username))).first()


def _account(row: User) -> Account:
    return Account(row.username, row.role, row.active, row.session_epoch or 0, bool(row.locked))


def set_account(
    session: Session, username: str, role: str, password: str, actor: str | None = None
) -> Account:
    """Make an account, or change the role and password of an existing one (and enable it;
    its open sessions end)."""
    if not _NAME.match(username):
        raise AccountError(
            f"user name {username!r}: use 2 to 80 letters, digits or . _ @ - characters"
        )
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    check_policy(username, password)
    row = _row(session, username)
    if row is not None and row.username != username:
        raise AccountError(
            f"an account named {row.username!r} exists (names do not differ by case): "
            f"use that name to change it"
        )
    if row is None:
        row = User(username=username, name_key=name_key(username), created_at=now())
        row.session_epoch, row.failed_logins, row.locked = 0, 0, False
        session.add(row)
        action = "user.add"
    else:
        action = "user.change"
        row.session_epoch = (row.session_epoch or 0) + 1
    row.role, row.password_hash, row.active = role, hash_password(password), True
    audit(session, action, json.dumps({"user": username, "role": role}), actor=actor)
    session.flush()
    return _account(row)


def disable_account(session: Session, username: str, actor: str | None = None) -> None:
    row = _row(session, username)
    if row is None:
        raise AccountError(f"no account named {username!r}")
    row.active = False
    row.session_epoch = (row.session_epoch or 0) + 1
    audit(session, "user.disable", json.dumps({"user": row.username}), actor=actor)


def unlock_account(session: Session, username: str, actor: str | None = None) -> Account:
    """Lift a lockout (and any waiting time) after failed logins."""
    row = _row(session, username)
    if row is None:
        raise AccountError(f"no account named {username!r}")
    row.locked, row.failed_logins, row.blocked_until = False, 0, None
    audit(session, "user.unlock", json.dumps({"user": row.username}), actor=actor)
    return _account(row)


def end_sessions(session: Session, username: str, actor: str | None = None) -> None:
    """End every open session of the account (its logout)."""
    row = _row(session, username)
    if row is not None:
        row.session_epoch = (row.session_epoch or 0) + 1
        audit(session, "logout", json.dumps({"user": row.username}), actor=actor or row.username)


def authenticate(
    session: Session, username: str, password: str, policy: LoginPolicy | None = None
) -> Login:
    """Check a login (audited, whatever the answer). A locked account, or one still waiting
    after failed logins, is refused without checking the password; the hash is computed all
    the same, so the answer takes as long whatever the name."""
    policy = policy or LoginPolicy()
    row = _row(session, username)
    stored = row.password_hash if row is not None else _dummy_hash()
    matches, rehash = check_password(password, stored)
    logged = json.dumps({"user": username[:MAX_LOGGED_NAME]})
    moment = now()
    if row is not None and row.locked:
        audit(session, "login.locked", logged, actor="anonymous")
        return Login(None, "locked")
    blocked = _aware(row.blocked_until) if row is not None else None
    if blocked is not None and blocked > moment:
        audit(session, "login.throttled", logged, actor="anonymous")
        return Login(None, "wait", (blocked - moment).total_seconds())
    if row is None or not row.active or not matches:
        audit(session, "login.failed", logged, actor="anonymous")
        if row is not None:
            _failed(session, row, policy, moment)
        return Login(None, "wrong")
    row.failed_logins, row.blocked_until = 0, None
    if rehash:
        row.password_hash = hash_password(password)
    audit(session, "login", json.dumps({"user": row.username}), actor=row.username)
    return Login(_account(row), "ok")


def _failed(session: Session, row: User, policy: LoginPolicy, moment: dt.datetime) -> None:
    row.failed_logins = (row.failed_logins or 0) + 1
    beyond = row.failed_logins - policy.free_failures
    if row.failed_logins >= policy.lock_after:
        row.locked = True
        detail = {"user": row.username, "failed_logins": row.failed_logins}
        audit(session, "user.locked", json.dumps(detail), actor="anonymous")
    elif beyond > 0:
        delay = min(2.0 ** (beyond - 1), policy.max_delay_seconds)
        row.blocked_until = moment + dt.timedelta(seconds=delay)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite gives back naive datetimes (stored in UTC)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def account(session: Session, username: str) -> Account | None:
    row = _row(session, username)
    return _account(row) if row is not None else None


def accounts(session: Session) -> list[Account]:
    return [_account(r) for r in session.scalars(select(User).order_by(User.username))]
