"""LabTrend's Streamlit dashboard.

Layout (Streamlit team's multipage pattern):

* ``streamlit_app.py`` - the entry point: sign-in, ``st.navigation`` (the pages the
  user's role may open in the menu; the others hidden, refusing and auditing an opening
  by URL), shared chrome, then ``page.run()``.
* ``app_pages/`` - one file per page; pages only render.
* ``access.py`` - roles and the page registry (no Streamlit).
* ``auth.py`` - sign-in, server-side sessions (accounts and sessions live in the store:
  ``data/users.py``, ``data/sessions.py``) and the per-page role guard.
* ``session_cookie.py`` and ``server.py`` - the HttpOnly session cookie: a route served
  beside Streamlit's own by ``st.App`` (``labtrend dashboard`` runs ``server.py``).
* ``state.py`` - the cached store, cached queries and the "database busy" notice.
* ``figures.py`` - pure Plotly figure builders (no Streamlit; tested with plain pytest).
* ``services.py`` - the plug-in points for model and clinical outputs (forecasts,
  anomalies, explanations, recommendations, expert review).
* ``audit.py`` - the same module as ``data/audit.py``, the append-only audit log.

Run it with ``labtrend dashboard --db FILE --model DIR``.
"""
