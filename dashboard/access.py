"""Who may open what: roles, the page registry, the users file and the cookie key.

No Streamlit here, so the ``labtrend users`` command and plain tests can use it.

**Users file.** YAML in streamlit-authenticator's layout, outside git:
``$LABTREND_USERS``, else ``var/users.yaml``. Passwords are stored only as bcrypt hashes
(streamlit-authenticator's ``Hasher``). The file is written with mode 0600::

    credentials:
      usernames:
        jdoe:
          name: Dr J. Doe
          password: $2b$12$...        # bcrypt hash, never the password
          roles: [clinician]
    cookie:
      name: labtrend_auth
      expiry_days: 1

**Cookie key.** The key that signs the re-login cookie is ``$LABTREND_COOKIE_KEY``, else a
random secret generated once into ``cookie.key`` beside the users file (mode 0600).

**Roles.** Each role opens the pages listed in :data:`PAGES`; a user with several roles
gets the union. ``clinician``: patients and timelines; ``expert``: those plus expert
review; ``analyst``: upload, model and local test codes; ``admin``: everything, plus audit log and users.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from labtrend import settings

__all__ = [
    "ROLES",
    "PAGES",
    "PageSpec",
    "UserError",
    "users_path",
    "cookie_key",
    "read_users",
    "add_user",
    "list_users",
    "user_roles",
    "pages_for_roles",
    "can_open",
]

ROLES = ("clinician", "expert", "analyst", "admin")

COOKIE_NAME = "labtrend_auth"
# Days a browser stays logged in without a password (a shared ward computer: keep it short).
COOKIE_EXPIRY_DAYS = 1.0
MIN_PASSWORD_LENGTH = 10


@dataclass(frozen=True)
class PageSpec:
    key: str  # stable id, also the URL path
    path: str  # file, relative to dashboard/
    title: str
    icon: str
    section: str
    roles: frozenset[str]
    default: bool = False


_CLINICAL = frozenset({"clinician", "expert", "admin"})
PAGES: tuple[PageSpec, ...] = (
    PageSpec("patients", "app_pages/patients.py", "Patients", ":material/groups:", "Patients", _CLINICAL, default=True),
    PageSpec("timeline", "app_pages/timeline.py", "Patient timeline", ":material/monitoring:", "Patients", _CLINICAL),
    PageSpec("review", "app_pages/review.py", "Review", ":material/fact_check:", "Expert", frozenset({"expert", "admin"})),
    PageSpec("upload", "app_pages/upload.py", "Upload", ":material/upload_file:", "Data and model",
             frozenset({"analyst", "admin"})),
    PageSpec("model", "app_pages/model.py", "Model", ":material/model_training:", "Data and model",
             frozenset({"analyst", "admin"})),
    PageSpec("codes", "app_pages/codes.py", "Local codes", ":material/link:", "Data and model",
             frozenset({"analyst", "admin"})),
    PageSpec("audit", "app_pages/audit.py", "Audit", ":material/policy:", "Admin", frozenset({"admin"})),
    PageSpec("users", "app_pages/users.py", "Users", ":material/manage_accounts:", "Admin", frozenset({"admin"})),
)
_BY_KEY = {p.key: p for p in PAGES}


class UserError(ValueError):
    """A user that cannot be added (bad name, role or password); the message says why."""


# -- paths and secrets -----------------------------------------------------------------------
def users_path() -> Path:
    """The users file: ``$LABTREND_USERS``, else ``var/users.yaml``."""
    env = os.environ.get("LABTREND_USERS")
    return Path(env) if env else settings.VAR_DIR / "users.yaml"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (owner read/write only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cookie_key(users_file: Path | None = None) -> str:
    """The cookie-signing secret: ``$LABTREND_COOKIE_KEY``, else ``cookie.key`` beside the users file.

    The file is created once with a random 256-bit secret and mode 0600.
    """
    env = os.environ.get("LABTREND_COOKIE_KEY")
    if env:
        return env
    path = (users_file or users_path()).parent / "cookie.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    return path.read_text().strip()


# -- users file --------------------------------------------------------------------------------
def _empty_config() -> dict:
    return {
        "credentials": {"usernames": {}},
        "cookie": {"name": COOKIE_NAME, "expiry_days": COOKIE_EXPIRY_DAYS},
    }


def read_users(path: Path | None = None) -> dict:
    """The users file as a dict (an empty configuration when the file does not exist)."""
    path = path or users_path()
    if not path.is_file():
        return _empty_config()
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    base = _empty_config()
    base["credentials"]["usernames"] = dict((config.get("credentials") or {}).get("usernames") or {})
    base["cookie"].update(config.get("cookie") or {})
    return base


def _valid_username(username: str) -> bool:
    return bool(username) and len(username) <= 64 and all(c.isalnum() or c in "._-" for c in username)


def add_user(username: str, name: str, role: str, password: str, path: Path | None = None,
             replace: bool = False) -> Path:
    """Add (or with ``replace`` update) a user; the password is stored as a bcrypt hash.

    Returns the users file. Raises :class:`UserError` for an unusable username, role or
    password, or an existing user without ``replace``.
    """
    path = path or users_path()
    username = (username or "").strip().lower()  # the authenticator lower-cases logins
    if not _valid_username(username):
        raise UserError(f"username {username!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise UserError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if not name or not name.strip():
        raise UserError("name: give the person's name as it should appear in the audit log")
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise UserError(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    config = read_users(path)
    users = config["credentials"]["usernames"]
    Hasher = _hasher()
    if username in users and not replace:
        raise UserError(f"user {username!r} already exists in {path.name}")
    users[username] = {"name": name.strip(), "password": Hasher.hash(password), "roles": [role]}
    _write_private(path, yaml.safe_dump(config, sort_keys=True, allow_unicode=True))
    return path


def _hasher():
    """streamlit-authenticator's Hasher (bcrypt, as its login form checks passwords).

    Importing the package outside a Streamlit run logs "missing ScriptRunContext" warnings
    that mean nothing on the command line; they are muted for the import only.
    """
    import logging

    logging.disable(logging.WARNING)
    try:
        from streamlit_authenticator import Hasher
    finally:
        logging.disable(logging.NOTSET)
    return Hasher


def list_users(path: Path | None = None) -> list[dict]:
    """``[{username, name, roles}]`` (never the hashes)."""
    users = read_users(path)["credentials"]["usernames"]
    return [{"username": u, "name": d.get("name", ""), "roles": list(d.get("roles") or [])}
            for u, d in sorted(users.items())]


def user_roles(config: dict, username: str | None) -> list[str]:
    """The known roles of ``username`` in a users configuration ([] for an unknown user)."""
    if not username:
        return []
    user = config["credentials"]["usernames"].get(username)
    if not user:
        return []
    return [r for r in (user.get("roles") or []) if r in ROLES]


# -- pages -------------------------------------------------------------------------------------
def pages_for_roles(roles) -> list[PageSpec]:
    """The pages the roles may open, in menu order."""
    roles = set(roles or ())
    return [p for p in PAGES if p.roles & roles]


def can_open(roles, page_key: str) -> bool:
    """True when any of ``roles`` may open the page ``page_key``."""
    page = _BY_KEY.get(page_key)
    return page is not None and bool(page.roles & set(roles or ()))


def page(page_key: str) -> PageSpec:
    return _BY_KEY[page_key]
