"""The dashboard's server: ``streamlit run dashboard/server.py`` (``labtrend dashboard`` does it).

``st.App`` serves :mod:`dashboard.streamlit_app` with Streamlit's own routes plus the session
cookie route of :mod:`dashboard.session_cookie`, the one place where the browser's session
cookie can be set HttpOnly. Run through ``streamlit run dashboard/streamlit_app.py`` instead,
the app still works, but a sign-in then lasts only as long as the browser tab (no cookie).
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # runs from a plain checkout too (no editable install)
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402
from streamlit import config as _config  # noqa: E402

from dashboard import session_cookie  # noqa: E402

app = st.App(Path(__file__).resolve().parent / "streamlit_app.py",
             routes=session_cookie.routes(_config.get_option("server.baseUrlPath") or ""))
