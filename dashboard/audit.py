"""The append-only audit log (table ``audit_log``, migration 003).

:func:`record` is the only writer and it only inserts; there is no update or delete. The
dashboard records every patient view (once per patient each time it is opened), every
write (upload, expert verdict, user added), logins and refused page openings.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd

from data.db import Store

__all__ = ["ACTIONS", "AUDIT_COLUMNS", "record", "read_log"]

ACTIONS = (
    "view_patient", "upload", "verdict", "login", "login_failed", "logout", "download_quarantine",
    "export_audit", "user_add", "denied",
    "score",  # a labtrend score run started from the review page
)
AUDIT_COLUMNS = ["audit_id", "logged_at", "username", "role", "action", "patient_id", "detail"]


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def record(store: Store, username: str | None, roles, action: str, patient_id: str | None = None,
           detail: dict | None = None) -> None:
    """Append one row. ``action`` must be one of :data:`ACTIONS` (ValueError otherwise)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}; expected one of {', '.join(ACTIONS)}")
    role = ",".join(roles) if isinstance(roles, (list, tuple, set)) else roles
    with store.write() as cur:
        cur.execute(
            "INSERT INTO audit_log (logged_at, username, role, action, patient_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
            [_now(), username or "", role, action, patient_id,
             json.dumps(detail or {}, default=str, ensure_ascii=False)],
        )


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
