"""Running the Streamlit app under AppTest as a signed-in user (shared by the dashboard tests)."""

from __future__ import annotations

import os
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parent.parent / "dashboard" / "streamlit_app.py"
PASSWORD = "a long test password"
TESTS = ("tests", ("cli",), {})  # the actor recorded for accounts the tests create


def ensure_user(store, username: str, role: str):
    """The account ``username`` in ``store``, added with ``role`` and :data:`PASSWORD` when missing."""
    from data import users

    user = users.get_user(store, username)
    if user is None:
        user = users.add_user(store, username, f"Dr {username.title()}", role, PASSWORD, by=users.Actor(*TESTS))
    assert role in user.roles, f"{username} exists with roles {user.roles}, not {role}"
    return user


def start_session(store, username: str) -> str:
    """A live server-side session of ``username`` (as a password sign-in starts one); its id."""
    from data import sessions

    session, _ = sessions.start(store, username, policy=sessions.SessionPolicy.from_settings(),
                                now=sessions.utcnow())
    return session.session_id


def session_app(username: str, role: str, timeout: float = 600) -> AppTest:
    """The app, not yet run, with ``username`` signed in as ``role``: the account is in the store of
    ``$LABTREND_DB`` (added when missing) and the browser session holds a live session id, as
    after a password sign-in."""
    from data.db import open_store

    store = open_store(os.environ["LABTREND_DB"])
    ensure_user(store, username, role)
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.session_state["lt_session"] = start_session(store, username)
    return at


def signed_in(username: str, role: str, timeout: float = 600) -> AppTest:
    """:func:`session_app`, run once. ``timeout`` only stops a hung run: a run on a loaded machine takes as long
    as it takes."""
    return session_app(username, role, timeout).run()
