"""Login (streamlit-authenticator) and the role guard every page calls first.

* Login state lives only in the browser session's ``st.session_state``
  (``authentication_status``, ``username``, ``name``, ``roles``, as streamlit-authenticator
  writes them), plus a signed re-login cookie in that browser; nothing about a login is
  kept in a process-wide cache, so one user's login never shows in another session.
* Roles are read again from the users file on every run: a user removed from the file,
  or whose role changed, loses access on the next click.
* The entry point puts only the pages the roles allow into ``st.navigation``; each page
  also calls :func:`require_page`, which refuses (and audits) an opening it should not get.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from dashboard import access, audit, state

__all__ = ["CurrentUser", "require_login", "require_page", "current_user", "logout_button", "record"]

USER_KEY = "lt_user"
_SET_COOKIE = "_lt_set_cookie"
_local = threading.local()  # this run's Authenticate object (it holds the credentials: never in session_state)
_AUTH_KEYS = ("authentication_status", "username", "name", "roles", "email")


@dataclass(frozen=True)
class CurrentUser:
    username: str
    name: str
    roles: tuple[str, ...]

    @property
    def role_label(self) -> str:
        return ", ".join(self.roles)


@st.cache_data(ttl=30, max_entries=4, show_spinner=False)
def _users_config(path: str, mtime: float) -> dict:
    """The users file (a fresh copy for every caller: the authenticator mutates it)."""
    return access.read_users(Path(path))


def _config() -> tuple[dict, Path]:
    path = access.users_path()
    mtime = path.stat().st_mtime if path.is_file() else 0.0
    return _users_config(str(path), mtime), path


def record(action: str, patient_id: str | None = None, detail: dict | None = None, user: CurrentUser | None = None):
    """Append to the audit log as the current user."""
    user = user or current_user()
    audit.record(state.get_store(state.db_path()), user.username if user else st.session_state.get("username"),
                 list(user.roles) if user else [], action, patient_id, detail)


def _authenticator(config: dict, path: Path):
    import streamlit_authenticator as stauth

    cookie = config["cookie"]
    return stauth.Authenticate(
        config["credentials"], cookie.get("name", access.COOKIE_NAME), access.cookie_key(path),
        float(cookie.get("expiry_days", access.COOKIE_EXPIRY_DAYS)), auto_hash=False,
        login_sleep_time=0,  # the cookie is read server-side (st.context.cookies): no wait needed
    )


def _on_login(event: dict) -> None:
    config, _ = _config()
    username = event.get("username")
    user = CurrentUser(username, event.get("name") or username, tuple(access.user_roles(config, username)))
    record("login", user=user)


def require_login() -> CurrentUser:
    """The logged-in user; otherwise draw the login form and stop the run."""
    config, path = _config()
    if not config["credentials"]["usernames"]:
        st.title("LabTrend")
        st.warning("No user accounts exist yet. An administrator creates the first one on the server with "
                   "`labtrend users add --username NAME --name 'Full Name' --role admin`.")
        st.stop()
    authenticator = _authenticator(config, path)
    _local.authenticator = authenticator
    if not st.session_state.get("authentication_status"):
        # a valid re-login cookie signs in without drawing anything (and keeps the URL's page)
        try:
            authenticator.login(location="unrendered", key="lt_login")
        except Exception:  # an unknown user in an old cookie: fall through to the form
            pass
    if not st.session_state.get("authentication_status"):
        left, mid, right = st.columns([1, 1.2, 1])
        with mid:
            st.title("LabTrend")
            st.caption("Laboratory result histories and forecasts. Decision support for clinicians, not a diagnosis.")
            try:
                authenticator.login(location="main", key="lt_login", callback=_on_login,
                                    fields={"Form name": "Sign in", "Username": "Username", "Password": "Password",
                                            "Login": "Sign in"})
            except Exception as exc:  # LoginError and friends: a message, never a traceback
                st.error(f"Sign-in failed: {exc}")
            if st.session_state.get("authentication_status") is False:
                st.error("Username or password is incorrect.")
        if not st.session_state.get("authentication_status"):
            st.session_state.pop(USER_KEY, None)
            st.stop()
        # Signed in just now: draw the app from the top. The re-login cookie is written again
        # in that run, where its component stays mounted long enough to run in the browser.
        st.session_state[_SET_COOKIE] = True
        st.rerun()
    elif st.session_state.pop(_SET_COOKIE, False):
        authenticator.cookie_controller.set_cookie()

    username = st.session_state.get("username")
    roles = tuple(access.user_roles(config, username))
    if not roles:
        for k in _AUTH_KEYS:
            st.session_state[k] = None
        st.session_state.pop(USER_KEY, None)
        st.error("Your account is not known or has no role any more. Ask an administrator.")
        st.stop()
    user = CurrentUser(username, config["credentials"]["usernames"][username].get("name") or username, roles)
    st.session_state[USER_KEY] = user
    return user


def current_user() -> CurrentUser | None:
    return st.session_state.get(USER_KEY)


def require_page(page_key: str) -> CurrentUser:
    """The current user when their roles may open ``page_key``; otherwise refuse and stop."""
    user = current_user()
    if user is None or not st.session_state.get("authentication_status"):
        st.error("Please sign in first.")
        st.stop()
    if not access.can_open(user.roles, page_key):
        record("denied", detail={"page": page_key})
        st.error(f"Your role ({user.role_label}) does not give access to {access.page(page_key).title}.")
        st.stop()
    return user


def logout_button() -> None:
    authenticator = getattr(_local, "authenticator", None)
    if authenticator is None:
        return
    user = current_user()

    def on_logout(_event):
        if user:
            record("logout", user=user)
        st.session_state.pop(USER_KEY, None)

    authenticator.logout("Sign out", location="sidebar", key="lt_logout", callback=on_logout)
