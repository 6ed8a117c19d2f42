"""LabTrend's Streamlit dashboard.

Layout (Streamlit team's multipage pattern):

* ``streamlit_app.py`` - the entry point: login, ``st.navigation`` with the pages the
  user's role may open, shared chrome, then ``page.run()``.
* ``app_pages/`` - one file per page; pages only render.
* ``access.py`` - roles, the page registry and the users file (no Streamlit).
* ``auth.py`` - login with streamlit-authenticator and the per-page role guard.
* ``state.py`` - the cached store, cached queries and the "database busy" notice.
* ``figures.py`` - pure Plotly figure builders (no Streamlit; tested with plain pytest).
* ``services.py`` - the plug-in points for model and clinical outputs (forecasts,
  anomalies, explanations, recommendations, expert review).
* ``audit.py`` - the append-only audit log.

Run it with ``labtrend dashboard --db FILE --model DIR``.
"""
