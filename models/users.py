"""Dashboard accounts: a name, a role, a scrypt password hash (``hashlib.scrypt``, RFC 7914).

Roles: ``reviewer`` (read, record reviews), ``researcher`` (read, export, statistics),
``steward`` (read, the identified layer of cohort discovery, the audit log), ``admin``
(everything but the identified layer, and the audit log). Making, changing and disabling
accounts is audited.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import AccountError
from models.linkage import audit
from models.repository import now
from models.schema import User

REVIEWER, RESEARCHER, STEWARD, ADMIN = "reviewer", "researcher", "steward", "admin"
ROLES = (REVIEWER, RESEARCHER, STEWARD, ADMIN)
#: scrypt cost: 2**15 x 8 x 1 takes about 0.1 s and 32 MiB (OWASP's minimum is 2**17 x 8 x 1
#: with 128 MiB; a login is rare, a stolen index should cost an attacker more)
_N, _R, _P = 2**15, 8, 1
_NAME = re.compile(r"^[A-Za-z0-9._@-]{2,80}$")
MIN_PASSWORD = 10


@dataclass(frozen=True)
class Account:
    username: str
    role: str
    active: bool


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=128 * 2**20, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
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
    return hmac.compare_digest(found, base64.b64decode(digest))


def set_account(
    session: Session, username: str, role: str, password: str, actor: str | None = None
) -> Account:
    """Make an account, or change the role and password of an existing one (and enable it)."""
    if not _NAME.match(username):
        raise AccountError(
            f"user name {username!r}: use 2 to 80 letters, digits or . _ @ - characters"
        )
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password of {username} needs at least {MIN_PASSWORD} characters")
    row = session.scalars(select(User).where(User.username == username)).first()
    if row is None:
        row = User(username=username, created_at=now())
        session.add(row)
        action = "user.add"
    else:
        action = "user.change"
    row.role, row.password_hash, row.active = role, hash_password(password), True
    audit(session, action, json.dumps({"user": username, "role": role}), actor=actor)
    session.flush()
    return Account(username, role, True)


def disable_account(session: Session, username: str, actor: str | None = None) -> None:
    row = session.scalars(select(User).where(User.username == username)).first()
    if row is None:
        raise AccountError(f"no account named {username!r}")
    row.active = False
    audit(session, "user.disable", json.dumps({"user": username}), actor=actor)


#: how much of a typed user name a failed login's audit entry keeps (user names are at most 80
#: characters; anything longer is not one, and a log-in form must not fill the audit log)
MAX_LOGGED_NAME = 100


def authenticate(session: Session, username: str, password: str) -> Account | None:
    """The account if the name and password match an active one (the attempt is audited)."""
    row = session.scalars(select(User).where(User.username == username)).first()
    ok = row is not None and row.active and check_password(password, row.password_hash)
    audit(
        session,
        "login" if ok else "login.failed",
        json.dumps({"user": username[:MAX_LOGGED_NAME]}),  # a name is at most 80 characters
        actor=username if ok else "anonymous",
    )
    if not ok or row is None:
        return None
    return Account(row.username, row.role, row.active)


def account(session: Session, username: str) -> Account | None:
    row = session.scalars(select(User).where(User.username == username)).first()
    return Account(row.username, row.role, row.active) if row is not None else None


def accounts(session: Session) -> list[Account]:
    return [
        Account(r.username, r.role, r.active)
        for r in session.scalars(select(User).order_by(User.username))
    ]
