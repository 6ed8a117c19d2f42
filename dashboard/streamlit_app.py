"""LabTrend dashboard entry point: ``streamlit run dashboard/streamlit_app.py``.

Signs the user in (:mod:`dashboard.auth`), builds ``st.navigation`` with every page of
:data:`dashboard.access.PAGES` (those the user's roles do not allow are hidden from the menu, and
refuse and audit an opening by URL), draws the shared sidebar and runs the chosen page. Served
by ``labtrend dashboard`` through :mod:`dashboard.server` (which adds the session cookie route).
The database and model come from ``$LABTREND_DB`` and ``$LABTREND_MODEL`` (``labtrend
dashboard --db FILE --model DIR`` sets both).
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # runs from a plain checkout too (no editable install)
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard import access, auth, state  # noqa: E402
from data.db import StoreBusyError  # noqa: E402
from data.identifiers import patient_key  # noqa: E402

st.set_page_config(page_title="LabTrend", page_icon=":material/biotech:", layout="wide",
                   initial_sidebar_state="expanded")

# less empty space above the page title: clinicians work on laptop screens
st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.5rem}</style>")

BUSY_ERROR = ("The database is busy (another process is writing) and did not free up in time: {}. "
              "Reload the page in a moment.")


def _clear_busy() -> None:
    try:
        state.clear_busy_slot()
    except Exception:  # the run is being stopped; the slot goes with it
        pass


busy = st.empty()  # "Database busy, retrying" while another process holds the store, sign-in included
state.set_busy_slot(busy)
try:
    user = auth.require_login()
except StoreBusyError as exc:
    _clear_busy()
    st.error(BUSY_ERROR.format(exc))
    st.stop()
except BaseException:  # the sign-in form (st.stop) or an error: the wait is over
    _clear_busy()
    raise
busy.empty()

allowed = {spec.key for spec in access.pages_for_roles(user.roles)}
default_key = next((s.key for s in access.PAGES if s.default and s.key in allowed),
                   next(s.key for s in access.PAGES if s.key in allowed))
sections: dict[str, list] = {}
for spec in access.PAGES:
    # a page the roles do not allow stays registered but hidden: opened by its URL it runs
    # auth.require_page, which refuses and audits, instead of a silent "page not found"
    visible = spec.key in allowed
    sections.setdefault(spec.section if visible else "", []).append(
        st.Page(spec.path, title=spec.title, icon=spec.icon, url_path=spec.key, default=spec.key == default_key,
                visibility="visible" if visible else "hidden")
    )
page = st.navigation(sections)

with st.sidebar:
    st.markdown(f"**{user.name}**  \n{user.role_label}")
    auth.logout_button()
    status = state.model_status()
    st.caption(f"Data: `{Path(state.db_path()).name}`  \n"
               + (f"Model: `{status.version}`" if status.available else "Model: none loaded"))
    st.caption("Decision support for clinicians. Not a diagnosis.")
    auth.browser_scripts()

link_patient = st.query_params.get("patient")
if link_patient and access.can_open(user.roles, "timeline") and page.url_path in ("", default_key):
    # ?patient=ID on the main page opens that timeline: a shared "/?patient=ID", or a timeline link whose page the
    # sign-in form dropped (after signing in the app runs its main page with the link's query kept)
    st.switch_page(access.page("timeline").path, query_params=st.query_params.to_dict())
if link_patient and not access.can_open(user.roles, "timeline"):  # a timeline link opened by a role without timelines
    if st.session_state.get("_lt_link_refused") != link_patient:  # audited once per link
        auth.record("denied", patient_id=patient_key(link_patient), detail={"page": "timeline", "via": "link",
                                                                             "reason": "role may not open timelines"})
        st.session_state["_lt_link_refused"] = link_patient
    st.error(f"This link opens a patient timeline. Your role ({user.role_label}) does not give access to patient "
             "timelines, so nothing about the patient is shown.")

if st.session_state.get("_lt_page") != page.url_path:  # a new visit: the next patient view is audited again
    st.session_state.pop("_lt_viewed", None)
st.session_state["_lt_page"] = page.url_path

try:
    page.run()
except StoreBusyError as exc:
    st.error(BUSY_ERROR.format(exc))
finally:
    _clear_busy()
