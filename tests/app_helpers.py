"""Running the Streamlit app under AppTest as a signed-in user (shared by the dashboard tests)."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parent.parent / "dashboard" / "streamlit_app.py"


def signed_in(username: str, role: str, timeout: float = 600) -> AppTest:
    """The app run once with ``username`` signed in as ``role``, the way streamlit-authenticator
    records a login in the session (``authentication_status``, ``username``, ``name``, ``roles``).

    ``timeout`` only stops a hung run: a run on a loaded machine takes as long as it takes."""
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.session_state["authentication_status"] = True
    at.session_state["username"] = username
    at.session_state["name"] = f"Dr {username.title()}"
    at.session_state["roles"] = [role]
    return at.run()
