"""Sign-in, server-side sessions and the role guard every page calls first.

* **Sign-in** checks the password against the bcrypt hash in the store (:mod:`data.users`)
  and starts a session row (:mod:`data.sessions`). This browser tab's Streamlit session keeps
  only the session id, in server memory (``st.session_state``); the browser then receives an
  opaque random token in an HttpOnly, SameSite=Strict cookie (:mod:`dashboard.session_cookie`),
  so a reload or a new tab resumes the session without the password. Both kinds of sign-in
  are audited (``login`` with ``via`` 'password' or 'cookie'), and so are failed ones.
* **Every page run** checks the session row (:func:`data.sessions.check`): revoked (sign-out,
  account disabled, password reset), idle past the timeout (default 15 minutes) or past its
  absolute end, it is over, and the sign-in form says why. A cookie of an ended session is
  refused the same way (``login_failed``, once per browser session) and the browser is told to
  drop it. Roles are read from the store on every run, so a change applies at the next click.
  A page left open reloads itself once the idle timeout has passed, so an unattended screen
  falls back to the sign-in form.
* A reset password must be changed before anything else is shown.
* The entry point registers every page with ``st.navigation`` but shows in the menu only those
  the roles allow; a page asked for by its URL still runs :func:`require_page` first, which
  refuses (and audits) an opening the roles do not allow.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import streamlit as st

from dashboard import access, session_cookie, state
from data import audit, sessions, users

__all__ = ["CurrentUser", "require_login", "require_page", "current_user", "logout_button", "record",
           "browser_scripts"]

USER_KEY = "lt_user"
SESSION_KEY = "lt_session"  # this tab's session id (server memory only)
_ENDED_KEY = "_lt_ended"  # why the last session ended, for the sign-in form
_GRANT_KEY = "_lt_grant"  # one-time grant the page exchanges for the cookie
_CLEAR_KEY = "_lt_clear_cookie"  # the browser holds a cookie of an ended session: drop it
_REFUSED_KEY = "_lt_cookie_refused"  # digest of a cookie already refused (audited once)
_RUNS_KEY = "_lt_runs"
_local = threading.local()  # this script run's checked user (require_login -> require_page)


@dataclass(frozen=True)
class CurrentUser:
    username: str
    name: str
    roles: tuple[str, ...]
    session_id: str | None = None

    @property
    def role_label(self) -> str:
        return ", ".join(self.roles)


def _store():
    return state.get_store(state.db_path())


def _policy() -> sessions.SessionPolicy:
    return sessions.SessionPolicy.from_settings()


def _cookie_token() -> str | None:
    """The session cookie this browser sent when the page was loaded (read server side)."""
    try:
        value = st.context.cookies.get(session_cookie.COOKIE_NAME)
    except Exception:  # no browser connection (bare script run)
        return None
    return value if isinstance(value, str) and value else None


def _client() -> dict:
    """What identifies the browser in an audit row: its address and user agent, when known."""
    out = {}
    try:
        ip, agent = st.context.ip_address, st.context.headers.get("User-Agent")
    except Exception:  # no browser connection (bare script run)
        return out
    if isinstance(ip, str) and ip:
        out["ip"] = ip
    if isinstance(agent, str) and agent:
        out["user_agent"] = agent[:200]
    return out


def record(action: str, patient_id: str | None = None, detail: dict | None = None, user: CurrentUser | None = None):
    """Append to the audit log as the current user."""
    user = user or current_user()
    audit.record(_store(), user.username if user else "", list(user.roles) if user else [], action, patient_id,
                 detail)


def _end_tab_session(reason: str) -> None:
    """Forget this tab's session (already ended in the store) and remember why, for the sign-in form."""
    for key in (SESSION_KEY, USER_KEY, _GRANT_KEY):
        st.session_state.pop(key, None)
    st.session_state[_ENDED_KEY] = reason
    st.session_state[_CLEAR_KEY] = True
    token = _cookie_token()  # as sent when this tab was loaded: it belongs to an ended session now
    if token:
        st.session_state[_REFUSED_KEY] = sessions.digest(token)


def _base_url_path() -> str:
    return st.get_option("server.baseUrlPath") or ""


def _sign_in_form(store, policy: sessions.SessionPolicy) -> None:
    """Draw the sign-in form; on a good password start a session and rerun; otherwise stop the run."""
    left, mid, right = st.columns([1, 1.2, 1])
    with mid:
        st.title("LabTrend")
        st.caption("Laboratory result histories and forecasts. Decision support for clinicians, not a diagnosis.")
        ended = st.session_state.get(_ENDED_KEY)
        if ended:
            st.info(policy.message(ended), icon=":material/lock_clock:")
        with st.form("lt_login", clear_on_submit=False):
            st.subheader("Sign in")
            username = st.text_input("Username", key="lt_login_username")
            password = st.text_input("Password", type="password", key="lt_login_password")
            submitted = st.form_submit_button("Sign in", type="primary")
        if submitted:
            now = sessions.utcnow()
            user, reason = users.authenticate(store, username, password, now=now)
            if user is None:
                audit.record(store, (username or "").strip().lower()[:64], [], "login_failed",
                             detail={"via": "password", "reason": reason, **_client()})
                if reason == "disabled":
                    st.error("This account is disabled. Ask an administrator.")
                else:
                    st.error("Username or password is incorrect.")
            else:
                session, grant = sessions.start(store, user.username, policy=policy, now=now)
                audit.record(store, user.username, list(user.roles), "login",
                             detail={"via": "password", "session": session.session_id, **_client()})
                st.session_state.pop(_ENDED_KEY, None)
                st.session_state[SESSION_KEY] = session.session_id
                st.session_state[_GRANT_KEY] = grant
                st.rerun()  # draw the app from the top
    if st.session_state.pop(_CLEAR_KEY, False):
        st.html(session_cookie.clear_script(_base_url_path()), unsafe_allow_javascript=True)
    st.stop()


def _change_password_form(store, user: CurrentUser) -> None:
    """The forced password change after a reset: nothing else is shown until it is done."""
    left, mid, right = st.columns([1, 1.2, 1])
    with mid:
        st.title("Choose a new password")
        st.info(f"{user.name}, an administrator reset your password. Choose your own before you continue.")
        with st.form("lt_new_password", clear_on_submit=True):
            old = st.text_input("Temporary password", type="password")
            new1 = st.text_input("New password", type="password",
                                 help=f"At least {users.MIN_PASSWORD_LENGTH} characters")
            new2 = st.text_input("Repeat the new password", type="password")
            done = st.form_submit_button("Change password", type="primary")
        if done:
            if new1 != new2:
                st.error("The new passwords differ.")
            else:
                try:
                    users.change_password(store, user.username, old, new1, session_id=user.session_id,
                                          by=users.Actor(user.username, user.roles, _client()))
                except users.UserError as exc:
                    st.error(str(exc))
                else:
                    st.rerun()
        logout_button(location=st)
    browser_scripts()
    st.stop()


def require_login() -> CurrentUser:
    """The signed-in user of this run; otherwise draw the sign-in form (saying why a session ended) and stop."""
    _local.user = None
    store = _store()
    policy = _policy()
    now = sessions.utcnow()
    check = None
    sid = st.session_state.get(SESSION_KEY)
    if sid:
        check = sessions.check(store, sid, policy=policy, now=now)
        if not check.ok:
            if check.ended != "signed out":  # a sign-out is audited by the button
                user = st.session_state.get(USER_KEY)
                audit.record(store, user.username if user else "", list(user.roles) if user else [],
                             "session_ended", detail={"session": sid, "reason": check.ended, **_client()})
            _end_tab_session(check.ended)
    else:
        token = _cookie_token()
        if token and sessions.digest(token) != st.session_state.get(_REFUSED_KEY):
            check = sessions.resume(store, token, policy=policy, now=now)
            if check.ok:
                st.session_state[SESSION_KEY] = check.session_id
                audit.record(store, check.session.username, list(check.roles), "login",
                             detail={"via": "cookie", "session": check.session_id, **_client()})
            else:
                st.session_state[_REFUSED_KEY] = sessions.digest(token)
                audit.record(store, "", [], "login_failed",
                             detail={"via": "cookie", "reason": check.ended, "session": check.session_id,
                                     **_client()})
                _end_tab_session(check.ended if check.ended != "unknown" else "")
    if check is None or not check.ok:
        if not users.has_users(store):
            st.title("LabTrend")
            st.warning("No user accounts exist yet. An administrator creates the first one on the server with "
                       f"`labtrend users add --username NAME --name 'Full Name' --role admin --db {state.db_path()}`.")
            st.stop()
        _sign_in_form(store, policy)
    user = CurrentUser(check.session.username, check.name or check.session.username, check.roles, check.session_id)
    if not user.roles:
        sessions.revoke(store, user.session_id, "account disabled", now=now)
        _end_tab_session("account disabled")
        st.error("Your account has no role any more. Ask an administrator.")
        st.stop()
    st.session_state[USER_KEY] = user
    if check.must_change_password:
        _change_password_form(store, user)
    _local.user = user
    return user


def current_user() -> CurrentUser | None:
    return st.session_state.get(USER_KEY)


def _checked_user() -> CurrentUser | None:
    """The user whose session was checked in this run: by the entry point's :func:`require_login`, or
    here when a page file runs alone (a test, a page opened outside the navigation)."""
    user = getattr(_local, "user", None)
    current = current_user()
    if user is not None and current is not None and user.session_id == current.session_id:
        return user
    sid = st.session_state.get(SESSION_KEY)
    if not sid or current is None:
        return None
    check = sessions.check(_store(), sid, policy=_policy(), now=sessions.utcnow())
    if not check.ok or check.must_change_password:
        return None
    return CurrentUser(check.session.username, check.name or check.session.username, check.roles, sid)


def require_page(page_key: str) -> CurrentUser:
    """The current user when their roles may open ``page_key``; otherwise refuse, audit and stop."""
    user = _checked_user()
    if user is None:
        st.error("Please sign in first.")
        st.stop()
    if not access.can_open(user.roles, page_key):
        record("denied", detail={"page": page_key, "url_path": page_key, **_client()}, user=user)
        st.error(f"Your role ({user.role_label}) does not give access to {access.page(page_key).title}.")
        st.stop()
    return user


def browser_scripts() -> None:
    """This run's page scripts: hand the one-time grant to the browser (once, after a password sign-in),
    and push back the idle reload. Drawn by the entry point at the bottom of the sidebar."""
    grant = st.session_state.pop(_GRANT_KEY, None)
    if grant:
        st.html(session_cookie.grant_script(grant, _base_url_path()), unsafe_allow_javascript=True)
    runs = st.session_state.get(_RUNS_KEY, 0) + 1
    st.session_state[_RUNS_KEY] = runs
    st.html(session_cookie.idle_reload_script(_policy().idle.total_seconds(), runs), unsafe_allow_javascript=True)


def _sign_out(user: CurrentUser | None) -> None:
    sid = st.session_state.get(SESSION_KEY)
    if sid:
        sessions.revoke(_store(), sid, "signed out", now=sessions.utcnow())
    if user:
        record("logout", detail={"session": sid, **_client()}, user=user)
    _end_tab_session("signed out")


def logout_button(location=None) -> None:
    """The sign-out button (sidebar by default): ends the session in the store, so its cookie is worthless."""
    user = current_user()
    (location or st.sidebar).button("Sign out", key="lt_logout", icon=":material/logout:", on_click=_sign_out,
                                    args=(user,))
