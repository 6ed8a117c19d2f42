"""Dashboard accounts (table ``users``, migration 006): add, sign-in check, administration.

No Streamlit here: the ``labtrend users`` command, the dashboard's Users page and plain tests
use the same functions, and every change is written together with its audit row (one
transaction) by an :class:`Actor` (a signed-in admin, or the OS account on the command line).

* **Passwords** are stored only as bcrypt hashes (cost 12, ``bcrypt`` package; the hashes of
  the former ``users.yaml`` are the same format and import unchanged). A password has at least
  :data:`MIN_PASSWORD_LENGTH` characters and at most 72 bytes in UTF-8 (bcrypt reads no more).
* **Roles**: :data:`ROLES`. The dashboard reads them from the store on every page run, so a
  change applies at the user's next click.
* **Administration**: :func:`disable_user` (the account's sessions end at once, in the same
  transaction), :func:`enable_user`, :func:`set_role`, :func:`reset_password` (a temporary
  password; the user must choose a new one at the next sign-in, and open sessions end). The last
  enabled admin can be neither disabled nor demoted, and an admin cannot disable themselves.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from data import audit, sessions
from data.db import Store

__all__ = [
    "ROLES", "MIN_PASSWORD_LENGTH", "UserError", "Actor", "User", "normalise_username", "check_new_password",
    "hash_password", "add_user", "get_user", "list_users", "has_users", "authenticate", "disable_user",
    "enable_user", "set_role", "reset_password", "change_password", "import_users_file",
]

ROLES = ("clinician", "expert", "analyst", "admin")
MIN_PASSWORD_LENGTH = 10
_MAX_PASSWORD_BYTES = 72  # bcrypt ignores (bcrypt >= 5 refuses) what is longer
_BCRYPT_ROUNDS = 12


class UserError(ValueError):
    """A change that cannot be made (bad name, role or password, unknown user, last admin); the message says why."""


@dataclass(frozen=True)
class Actor:
    """Who makes a change: ``username`` and ``roles`` as the audit log records them, plus ``detail``
    merged into the audit row (``{"via": "cli", "host": ...}`` on the command line)."""

    username: str
    roles: tuple[str, ...]
    detail: dict = field(default_factory=dict)

    @classmethod
    def cli(cls) -> "Actor":
        """The operating-system account running the command (:func:`data.audit.cli_actor`)."""
        user, detail = audit.cli_actor()
        return cls(user, (audit.CLI_ROLE,), detail)


@dataclass(frozen=True)
class User:
    username: str
    name: str
    roles: tuple[str, ...]
    must_change_password: bool
    disabled_at: datetime | None
    created_at: datetime
    last_login_at: datetime | None

    @property
    def enabled(self) -> bool:
        return self.disabled_at is None


def normalise_username(username: str) -> str:
    """The stored form of a login name (stripped, lower case). Raises :class:`UserError` when it is not
    1-64 letters, digits, '.', '_' or '-'."""
    u = (username or "").strip().lower()
    if not u or len(u) > 64 or not all(c.isalnum() or c in "._-" for c in u):
        raise UserError(f"username {u!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return u


def check_new_password(password: str) -> None:
    """Raise :class:`UserError` when ``password`` is shorter than :data:`MIN_PASSWORD_LENGTH` characters
    or longer than 72 bytes in UTF-8."""
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise UserError(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    if len(password.encode("utf-8")) > _MAX_PASSWORD_BYTES:
        raise UserError(f"password: at most {_MAX_PASSWORD_BYTES} bytes (bcrypt reads no more)")


def hash_password(password: str) -> str:
    """The bcrypt hash of a password that passes :func:`check_new_password` (UserError otherwise)."""
    import bcrypt

    check_new_password(password)
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(_BCRYPT_ROUNDS)).decode("ascii")


def _password_matches(password: str, hashed: str | None) -> bool:
    import bcrypt

    data = (password or "").encode("utf-8")
    if hashed is None or len(data) > _MAX_PASSWORD_BYTES:
        # same bcrypt cost for an unknown user, so the answer time does not tell who exists
        bcrypt.checkpw(b"x", _dummy_hash())
        return False
    try:
        return bcrypt.checkpw(data, hashed.encode("ascii"))
    except ValueError:  # not a bcrypt hash
        return False


@functools.cache
def _dummy_hash() -> bytes:
    import bcrypt

    return bcrypt.hashpw(b"no such user", bcrypt.gensalt(_BCRYPT_ROUNDS))


def _roles(role_or_roles) -> list[str]:
    roles = [role_or_roles] if isinstance(role_or_roles, str) else list(role_or_roles or ())
    bad = [r for r in roles if r not in ROLES]
    if not roles or bad:
        raise UserError(f"role {', '.join(map(repr, bad)) or 'none'}: choose one of {', '.join(ROLES)}")
    return roles


_USER_COLUMNS = "username, name, roles, must_change_password, disabled_at, created_at, last_login_at"


def _user(row) -> User | None:
    if row is None:
        return None
    username, name, roles, must_change, disabled_at, created_at, last_login = row
    return User(username, name, tuple(r for r in (roles or ()) if r in ROLES), bool(must_change), disabled_at,
                created_at, last_login)


def get_user(store: Store, username: str) -> User | None:
    """The account ``username`` (any case), or None."""
    with store.read() as cur:
        return _user(cur.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE username = ?",
                                 [(username or "").strip().lower()]).fetchone())


def has_users(store: Store) -> bool:
    with store.read() as cur:
        return cur.execute("SELECT count(*) FROM users").fetchone()[0] > 0


def list_users(store: Store) -> list[dict]:
    """Every account, by username: ``username, name, roles, status ('active' / 'disabled'),
    must_change_password, created_at, last_login_at`` (never the hashes)."""
    with store.read() as cur:
        rows = cur.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY username").fetchall()
    return [{"username": u.username, "name": u.name, "roles": list(u.roles),
             "status": "active" if u.enabled else "disabled", "must_change_password": u.must_change_password,
             "created_at": u.created_at, "last_login_at": u.last_login_at} for u in map(_user, rows)]


def _audit(cur, by: Actor, action: str, detail: dict) -> None:
    audit.record_in(cur, by.username, list(by.roles), action, detail={**detail, **by.detail})


def add_user(store: Store, username: str, name: str, role, password: str, *, by: Actor) -> User:
    """Add an account; the password is stored as a bcrypt hash. Audited as ``user_add``.

    Raises :class:`UserError` for an unusable username, name, role or password, or an existing user."""
    username = normalise_username(username)
    roles = _roles(role)
    if not name or not name.strip():
        raise UserError("name: give the person's name as it should appear in the audit log")
    hashed = hash_password(password)
    now = sessions.utcnow()
    with store.write() as cur:
        if cur.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchone():
            raise UserError(f"user {username!r} already exists")
        cur.execute("INSERT INTO users (username, name, roles, password_hash, created_at, created_by, updated_at, "
                    "password_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [username, name.strip(), roles, hashed, now, by.username, now, now])
        _audit(cur, by, "user_add", {"username": username, "roles": roles})
    return get_user(store, username)


def authenticate(store: Store, username: str, password: str, *, now: datetime) -> tuple[User | None, str | None]:
    """Check a sign-in. Returns ``(user, None)`` when the password matches an enabled account (its
    ``last_login_at`` is set to ``now``), else ``(None, reason)`` with reason 'unknown user', 'wrong
    password' or 'disabled' (only said once the password matched)."""
    key = (username or "").strip().lower()
    with store.read() as cur:
        row = cur.execute(f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE username = ?", [key]).fetchone()
    if not _password_matches(password, row[-1] if row else None):
        return None, "unknown user" if row is None else "wrong password"
    user = _user(row[:-1])
    if not user.enabled:
        return None, "disabled"
    with store.write() as cur:
        cur.execute("UPDATE users SET last_login_at = ? WHERE username = ?", [now, key])
    return user, None


def _require(cur, username: str) -> User:
    user = _user(cur.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE username = ?",
                             [(username or "").strip().lower()]).fetchone())
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


def _other_enabled_admins(cur, username: str) -> int:
    return cur.execute("SELECT count(*) FROM users WHERE list_contains(roles, 'admin') AND disabled_at IS NULL "
                       "AND username <> ?", [username]).fetchone()[0]


def disable_user(store: Store, username: str, *, by: Actor) -> int:
    """Disable an account: it can no longer sign in and its open sessions end now (same transaction).
    Audited as ``user_disable``. Returns the number of sessions ended.

    Raises :class:`UserError` for an unknown or already disabled user, for ``by`` disabling their
    own account, and for the last enabled admin."""
    now = sessions.utcnow()
    with store.write() as cur:
        user = _require(cur, username)
        if not user.enabled:
            raise UserError(f"user {user.username!r} is already disabled")
        if user.username == by.username and audit.CLI_ROLE not in by.roles:
            raise UserError("you cannot disable your own account")
        if "admin" in user.roles and not _other_enabled_admins(cur, user.username):
            raise UserError(f"{user.username!r} is the last enabled admin; make another admin first")
        cur.execute("UPDATE users SET disabled_at = ?, disabled_by = ?, updated_at = ? WHERE username = ?",
                    [now, by.username, now, user.username])
        ended = sessions.revoke_user_in(cur, user.username, "account disabled", now=now)
        _audit(cur, by, "user_disable", {"username": user.username, "sessions_ended": ended})
    return ended


def enable_user(store: Store, username: str, *, by: Actor) -> None:
    """Re-enable a disabled account (its old sessions stay ended). Audited as ``user_enable``.

    Raises :class:`UserError` for an unknown or enabled user."""
    now = sessions.utcnow()
    with store.write() as cur:
        user = _require(cur, username)
        if user.enabled:
            raise UserError(f"user {user.username!r} is not disabled")
        cur.execute("UPDATE users SET disabled_at = NULL, disabled_by = NULL, updated_at = ? WHERE username = ?",
                    [now, user.username])
        _audit(cur, by, "user_enable", {"username": user.username})


def set_role(store: Store, username: str, role, *, by: Actor) -> None:
    """Give the account ``role`` (a role name, or a list) in place of its roles; applies at the user's next
    page run. Audited as ``user_role`` with the old and new roles.

    Raises :class:`UserError` for an unknown user or role, and for taking admin from the last enabled admin."""
    roles = _roles(role)
    now = sessions.utcnow()
    with store.write() as cur:
        user = _require(cur, username)
        if "admin" in user.roles and "admin" not in roles and user.enabled \
                and not _other_enabled_admins(cur, user.username):
            raise UserError(f"{user.username!r} is the last enabled admin; make another admin first")
        cur.execute("UPDATE users SET roles = ?, updated_at = ? WHERE username = ?", [roles, now, user.username])
        _audit(cur, by, "user_role", {"username": user.username, "from": list(user.roles), "to": roles})


def reset_password(store: Store, username: str, *, by: Actor, password: str | None = None) -> str:
    """Set a temporary password (``password``, else a random one) that must be changed at the next sign-in;
    the account's open sessions end. Audited as ``user_password_reset`` (never the password).

    Returns the temporary password. Raises :class:`UserError` for an unknown user or an unusable password."""
    temporary = password if password is not None else secrets.token_urlsafe(12)
    hashed = hash_password(temporary)
    now = sessions.utcnow()
    with store.write() as cur:
        user = _require(cur, username)
        cur.execute("UPDATE users SET password_hash = ?, must_change_password = true, updated_at = ?, "
                    "password_changed_at = ? WHERE username = ?", [hashed, now, now, user.username])
        ended = sessions.revoke_user_in(cur, user.username, "password reset", now=now)
        _audit(cur, by, "user_password_reset", {"username": user.username, "sessions_ended": ended})
    return temporary


def change_password(store: Store, username: str, old_password: str, new_password: str, *, session_id: str | None,
                    by: Actor) -> None:
    """The user's own change (forced after a reset, or chosen): checks the old password, stores the new one,
    clears the forced change and ends the user's other sessions (``session_id`` is kept). Audited as
    ``password_change``.

    Raises :class:`UserError` when the old password is wrong, or the new one is unusable or the same."""
    check_new_password(new_password)
    if new_password == old_password:
        raise UserError("the new password must differ from the old one")
    key = (username or "").strip().lower()
    with store.read() as cur:
        row = cur.execute("SELECT password_hash FROM users WHERE username = ?", [key]).fetchone()
    if not _password_matches(old_password, row[0] if row else None):
        raise UserError("the current password is not correct")
    hashed = hash_password(new_password)
    now = sessions.utcnow()
    with store.write() as cur:
        cur.execute("UPDATE users SET password_hash = ?, must_change_password = false, updated_at = ?, "
                    "password_changed_at = ? WHERE username = ?", [hashed, now, now, key])
        ended = sessions.revoke_user_in(cur, key, "password changed", now=now, keep=session_id)
        _audit(cur, by, "password_change", {"username": key, "other_sessions_ended": ended})


def import_users_file(store: Store, path: Path, *, by: Actor) -> list[str]:
    """Copy the accounts of a former users file (``var/users.yaml``: streamlit-authenticator's layout,
    bcrypt hashes) into the store, hashes unchanged; accounts already in the store are left alone.
    Audited as ``user_import``. Returns the usernames added.

    Raises :class:`UserError` when the file cannot be read or holds an entry without a bcrypt hash
    or known role (nothing is added then)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: {exc}") from None
    entries = ((config.get("credentials") or {}).get("usernames") or {})
    now = sessions.utcnow()
    added = []
    with store.write() as cur:
        for raw_name, entry in sorted(entries.items()):
            username = normalise_username(str(raw_name))
            entry = entry or {}
            hashed = str(entry.get("password") or "")
            if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise UserError(f"{path}: user {username!r} has no bcrypt hash")
            roles = [r for r in (entry.get("roles") or []) if r in ROLES]
            if not roles:
                raise UserError(f"{path}: user {username!r} has no known role")
            if cur.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchone():
                continue
            cur.execute("INSERT INTO users (username, name, roles, password_hash, created_at, created_by, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [username, str(entry.get("name") or username), roles, hashed, now, by.username, now])
            added.append(username)
        _audit(cur, by, "user_import", {"file": str(path), "usernames": added})
    return added
