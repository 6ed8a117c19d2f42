"""LabTrend dashboard entry point: ``streamlit run dashboard/streamlit_app.py``.

Signs the user in, builds ``st.navigation`` from the pages the user's roles allow
(:data:`dashboard.access.PAGES`), draws the shared sidebar and runs the chosen page.
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

user = auth.require_login()

specs = access.pages_for_roles(user.roles)
has_default = any(s.default for s in specs)
sections: dict[str, list] = {}
for i, spec in enumerate(specs):
    sections.setdefault(spec.section, []).append(
        st.Page(spec.path, title=spec.title, icon=spec.icon, url_path=spec.key,
                default=spec.default or (not has_default and i == 0))
    )
page = st.navigation(sections)

with st.sidebar:
    st.markdown(f"**{user.name}**  \n{user.role_label}")
    auth.logout_button()
    status = state.model_status()
    st.caption(f"Data: `{Path(state.db_path()).name}`  \n"
               + (f"Model: `{status.version}`" if status.available else "Model: none loaded"))
    st.caption("Decision support for clinicians. Not a diagnosis.")

if not st.session_state.get("authentication_status"):  # just signed out
    # no rerun here: this run carries the component that deletes the re-login cookie
    st.info("You are signed out. Close the browser tab or sign in again.")
    st.button("Sign in again", key="lt_sign_in_again")
    st.stop()

link_patient = st.query_params.get("patient")
if link_patient and access.can_open(user.roles, "timeline") and page.url_path != "timeline":
    # ?patient=ID on any page opens that timeline: a shared "/?patient=ID", or a timeline link whose page the
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

busy = st.empty()
state.set_busy_slot(busy)
try:
    page.run()
except StoreBusyError as exc:
    st.error(f"The database is busy (another process is writing) and did not free up in time: {exc}. "
             "Reload the page in a moment.")
finally:
    try:
        state.clear_busy_slot()
    except Exception:  # the run is being stopped; the slot goes with it
        pass
