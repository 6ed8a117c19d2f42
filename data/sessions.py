"""Server-side dashboard sessions (table ``sessions``, migration 006).

A password sign-in :func:`start`\\ s a session: a row with a random ``session_id`` (held in the
signed-in Streamlit session's server memory) and a one-time *grant*. The page exchanges the
grant, once and within :attr:`SessionPolicy.grant_ttl` (2 minutes), for the browser's cookie
(:func:`redeem_grant`): a fresh random token of which only the SHA-256 is stored. A later page
load presents the cookie and :func:`resume`\\ s the same session.

Every page run :func:`check`\\ s the row. A session ends, and its cookie then shows the sign-in
form, when:

* it was revoked: sign-out (:func:`revoke`), account disabled or password reset
  (:func:`revoke_user_in`);
* it saw no page run for :attr:`SessionPolicy.idle` (default 15 minutes);
* it reached its absolute end, :attr:`SessionPolicy.lifetime` after the sign-in (default 12 h);
* its account was disabled or removed meanwhile.

An ended session is marked revoked with its reason, so replaying its cookie later says why.
``last_seen_at`` is written at most every :attr:`SessionPolicy.touch_every` (one minute), so the
idle timeout is exact to within that. Every function takes ``now`` (naive UTC) so that tests
drive the clock; :func:`utcnow` is the real one.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from data.db import Store

__all__ = [
    "SessionPolicy", "Session", "Check", "utcnow", "digest", "start", "check", "resume", "redeem_grant",
    "revoke", "revoke_user_in", "open_sessions", "ENDED_MESSAGES",
]

#: What the sign-in form says about a session that ended, by ``revoked_reason``.
ENDED_MESSAGES = {
    "signed out": "You signed out.",
    "idle": "Your session ended after {idle} without activity. Sign in again.",
    "lifetime": "Your session reached its limit of {lifetime} after the sign-in. Sign in again.",
    "account disabled": "Your account was disabled. Ask an administrator.",
    "password reset": "Your password was reset by an administrator. Sign in with the new password.",
    "password changed": "Your password was changed in another session. Sign in again.",
    "unknown": "Your session is no longer valid. Sign in again.",
}


def utcnow() -> datetime:
    """The current time, naive UTC (the store's time base)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def digest(secret: str) -> str:
    """SHA-256 (hex) of a cookie token or grant: what the store keeps instead of the secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _human(td: timedelta) -> str:
    minutes = td.total_seconds() / 60
    if minutes < 120:
        return f"{minutes:g} minutes"
    return f"{minutes / 60:g} hours"


@dataclass(frozen=True)
class SessionPolicy:
    """When sessions end. ``idle``: no page run for that long; ``lifetime``: since the sign-in."""

    idle: timedelta = timedelta(minutes=15)
    lifetime: timedelta = timedelta(hours=12)
    touch_every: timedelta = timedelta(minutes=1)
    grant_ttl: timedelta = timedelta(minutes=2)  # from the sign-in to the page's fetch, on a busy server

    @classmethod
    def from_settings(cls) -> "SessionPolicy":
        """The site's policy (:func:`data.settings.session_idle_minutes`, :func:`~data.settings.session_max_hours`).

        Raises ValueError for an unusable environment setting."""
        from data import settings

        idle = timedelta(minutes=settings.session_idle_minutes())
        return cls(idle=idle, lifetime=timedelta(hours=settings.session_max_hours()),
                   touch_every=min(timedelta(minutes=1), idle / 4))

    def message(self, reason: str) -> str:
        """The sentence the sign-in form shows for a session ended for ``reason``."""
        text = ENDED_MESSAGES.get(reason, ENDED_MESSAGES["unknown"])
        return text.format(idle=_human(self.idle), lifetime=_human(self.lifetime))


@dataclass(frozen=True)
class Session:
    session_id: str
    username: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Check:
    """The answer of :func:`check` / :func:`resume`: a live ``session`` with its account, or ``ended``
    (the reason, a key of :data:`ENDED_MESSAGES`) and the ``session_id`` it concerned (None when
    no session was found)."""

    session: Session | None = None
    ended: str | None = None
    session_id: str | None = None
    name: str | None = None
    roles: tuple[str, ...] = ()
    must_change_password: bool = False

    @property
    def ok(self) -> bool:
        return self.session is not None


_SELECT = """
    SELECT s.session_id, s.username, s.created_at, s.last_seen_at, s.expires_at, s.revoked_at, s.revoked_reason,
           u.username IS NOT NULL AS known, u.disabled_at, u.name, u.roles, u.must_change_password
    FROM sessions s LEFT JOIN users u ON u.username = s.username
"""


def start(store: Store, username: str, *, policy: SessionPolicy, now: datetime) -> tuple[Session, str]:
    """A new session for ``username`` (whose password was just checked) and its one-time cookie grant.

    Returns ``(session, grant)``; the grant is to be exchanged by the browser with
    :func:`redeem_grant` before ``now + policy.grant_ttl``."""
    session = Session(secrets.token_urlsafe(18), username, now, now, now + policy.lifetime)
    grant = secrets.token_urlsafe(32)
    with store.write() as cur:
        cur.execute(
            "INSERT INTO sessions (session_id, username, created_at, last_seen_at, expires_at, grant_hash, "
            "grant_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [session.session_id, username, now, now, session.expires_at, digest(grant), now + policy.grant_ttl])
    return session, grant


def _evaluate(store: Store, row, *, policy: SessionPolicy, now: datetime) -> Check:
    """Decide on one joined row (:data:`_SELECT`); end the session in the store when it ran out."""
    (sid, username, created, last_seen, expires, revoked_at, revoked_reason, known, disabled_at, name, roles,
     must_change) = row
    if revoked_at is not None:
        return Check(ended=revoked_reason or "unknown", session_id=sid)
    reason = None
    if not known or disabled_at is not None:
        reason = "account disabled"
    elif now >= expires:
        reason = "lifetime"
    elif now - last_seen >= policy.idle:
        reason = "idle"
    if reason is not None:
        with store.write() as cur:
            cur.execute("UPDATE sessions SET revoked_at = ?, revoked_reason = ? WHERE session_id = ? "
                        "AND revoked_at IS NULL", [now, reason, sid])
        return Check(ended=reason, session_id=sid)
    if now - last_seen >= policy.touch_every:
        with store.write() as cur:
            cur.execute("UPDATE sessions SET last_seen_at = ? WHERE session_id = ? AND revoked_at IS NULL",
                        [now, sid])
        last_seen = now
    return Check(session=Session(sid, username, created, last_seen, expires), session_id=sid, name=name,
                 roles=tuple(roles or ()), must_change_password=bool(must_change))


def check(store: Store, session_id: str, *, policy: SessionPolicy, now: datetime) -> Check:
    """Whether the session ``session_id`` is still live at ``now``; a page run counts as activity."""
    with store.read() as cur:
        row = cur.execute(_SELECT + " WHERE s.session_id = ?", [session_id]).fetchone()
    if row is None:
        return Check(ended="unknown")
    return _evaluate(store, row, policy=policy, now=now)


def resume(store: Store, token: str, *, policy: SessionPolicy, now: datetime) -> Check:
    """The session whose cookie token is ``token`` (a new page load of a signed-in browser)."""
    if not token:
        return Check(ended="unknown")
    with store.read() as cur:
        row = cur.execute(_SELECT + " WHERE s.token_hash = ?", [digest(token)]).fetchone()
    if row is None:
        return Check(ended="unknown")
    return _evaluate(store, row, policy=policy, now=now)


def redeem_grant(store: Store, grant: str, *, now: datetime) -> tuple[str, Session] | None:
    """Exchange a one-time grant for the session's cookie token (a new random value; its hash is stored).

    Returns ``(token, session)``, or None for an unknown, used, expired or revoked grant (a grant
    works once)."""
    if not grant or len(grant) > 200:
        return None
    token = secrets.token_urlsafe(32)
    with store.write() as cur:
        row = cur.execute(
            "UPDATE sessions SET token_hash = ?, grant_hash = NULL, grant_expires_at = NULL "
            "WHERE grant_hash = ? AND grant_expires_at > ? AND revoked_at IS NULL AND expires_at > ? "
            "RETURNING session_id, username, created_at, last_seen_at, expires_at",
            [digest(token), digest(grant), now, now]).fetchone()
    return (token, Session(*row)) if row else None


def revoke(store: Store, session_id: str, reason: str, *, now: datetime) -> bool:
    """End one session (``reason``: 'signed out', ...). True when it was live until now."""
    with store.write() as cur:
        row = cur.execute("UPDATE sessions SET revoked_at = ?, revoked_reason = ?, grant_hash = NULL "
                          "WHERE session_id = ? AND revoked_at IS NULL RETURNING session_id",
                          [now, reason, session_id]).fetchone()
    return row is not None


def revoke_user_in(cur, username: str, reason: str, *, now: datetime, keep: str | None = None) -> int:
    """End every live session of ``username`` inside the caller's transaction (``keep``: one session
    to spare, the one changing its own password). Returns how many were ended."""
    rows = cur.execute("UPDATE sessions SET revoked_at = ?, revoked_reason = ?, grant_hash = NULL "
                       "WHERE username = ? AND revoked_at IS NULL AND session_id IS DISTINCT FROM ? "
                       "RETURNING session_id", [now, reason, username, keep]).fetchall()
    return len(rows)


def open_sessions(store: Store, *, policy: SessionPolicy, now: datetime) -> dict[str, int]:
    """``{username: sessions live at now}`` (not revoked, not idle, not past their end)."""
    with store.read() as cur:
        rows = cur.execute(
            "SELECT username, count(*) FROM sessions WHERE revoked_at IS NULL AND expires_at > ? "
            "AND last_seen_at > ? GROUP BY 1", [now, now - policy.idle]).fetchall()
    return {u: int(n) for u, n in rows}
