"""The append-only audit log (table ``audit_log``, migration 003).

:func:`record` (its own transaction) and :func:`record_in` (inside a caller's transaction, so
that a change and its audit row commit together) are the only writers, and they only insert;
there is no update or delete.

What is recorded, with the acting user:

* the dashboard: every patient view (once per patient each time it is opened), every write
  (upload, expert verdict), sign-ins by password and by the session cookie, failed sign-ins,
  sign-outs and sessions ended by the server (idle, lifetime, account disabled), refused page
  openings (a page the role may not open, asked for by its URL), user administration;
* the command line (``labtrend ...`` and ``train.py``): imports, patient listings and
  timelines, exports, ``predict``, ``forecast``, ``evaluate``, ``train`` and user changes. The
  acting user is the operating-system account that ran the command (:func:`cli_actor`); its
  role is recorded as ``cli``.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import datetime, timezone

import pandas as pd

from data.db import Store

__all__ = ["ACTIONS", "AUDIT_COLUMNS", "CLI_ROLE", "record", "record_in", "read_log", "cli_actor"]

ACTIONS = (
    # dashboard
    "view_patient", "upload", "verdict", "download_quarantine", "export_audit",
    # sign-in and sessions
    "login", "login_failed", "logout", "session_ended", "password_change", "denied",
    # user administration (dashboard and command line)
    "user_add", "user_disable", "user_enable", "user_role", "user_password_reset", "user_import",
    # command line
    "import", "list_patients", "export", "predict", "forecast", "evaluate", "train",
    # local test codes mapped to LOINC (analyst page and command line)
    "code_map",
    # batch scoring started from the Review page
    "score",
)
AUDIT_COLUMNS = ["audit_id", "logged_at", "username", "role", "action", "patient_id", "detail"]
#: The role recorded for an action taken on the command line (the username is the OS account).
CLI_ROLE = "cli"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _row(username, roles, action, patient_id, detail) -> list:
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}; expected one of {', '.join(ACTIONS)}")
    role = ",".join(roles) if isinstance(roles, (list, tuple, set)) else roles
    return [_now(), username or "", role, action, patient_id, json.dumps(detail or {}, default=str, ensure_ascii=False)]


_INSERT = "INSERT INTO audit_log (logged_at, username, role, action, patient_id, detail) VALUES (?, ?, ?, ?, ?, ?)"


def record_in(cur, username: str | None, roles, action: str, patient_id: str | None = None,
              detail: dict | None = None) -> None:
    """Append one row with the cursor of an open transaction (it commits or rolls back with it).

    ``roles``: a list of role names or one string. Raises ValueError for an ``action`` not in
    :data:`ACTIONS`."""
    cur.execute(_INSERT, _row(username, roles, action, patient_id, detail))


def record(store: Store, username: str | None, roles, action: str, patient_id: str | None = None,
           detail: dict | None = None) -> None:
    """Append one row in its own transaction. ``action`` must be one of :data:`ACTIONS` (ValueError
    otherwise, before anything is written)."""
    row = _row(username, roles, action, patient_id, detail)
    with store.write() as cur:
        cur.execute(_INSERT, row)


def cli_actor() -> tuple[str, dict]:
    """``(os_user, detail)`` for an action taken on the command line: the account that ran the
    command (``getpass.getuser()``: ``$LOGNAME``, ``$USER``, ... else the password database) and
    ``{"via": "cli", "host": ..., "pid": ...}`` to merge into the audit detail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return user, {"via": "cli", "host": socket.gethostname(), "pid": os.getpid()}


def read_log(store: Store, username: str | None = None, action: str | None = None, patient_id: str | None = None,
             start: datetime | None = None, end: datetime | None = None, limit: int = 5000) -> pd.DataFrame:
    """Audit rows, newest first, filtered by exact user, action and patient and by time (inclusive)."""
    sql = f"""
        SELECT {', '.join(AUDIT_COLUMNS[:-1])}, detail::VARCHAR AS detail FROM audit_log
        WHERE (?::VARCHAR IS NULL OR username = ?) AND (?::VARCHAR IS NULL OR action = ?)
          AND (?::VARCHAR IS NULL OR patient_id = ?)
          AND (?::TIMESTAMP IS NULL OR logged_at >= ?) AND (?::TIMESTAMP IS NULL OR logged_at <= ?)
        ORDER BY logged_at DESC, audit_id DESC LIMIT ?
    """
    with store.read() as cur:
        return cur.execute(
            sql, [username, username, action, action, patient_id, patient_id, start, start, end, end, limit]
        ).df()
