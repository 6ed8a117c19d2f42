"""Patients: find a patient by id, filter by abnormal / implausible counts and last result date."""

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import auth, state

user = auth.require_page("patients")
if st.session_state.pop("_patients_open", False):  # "Open timeline" was clicked: go straight there
    st.switch_page("app_pages/timeline.py")
st.title("Patients")

db = state.db_path()
df = state.patients(db, state.data_version(db))
if df.empty:
    st.info("No patients in the database yet. An analyst adds lab results on the Upload page.")
    st.stop()

ABNORMAL_HELP = ("Results flagged H, L, HH, LL or A: the laboratory's flag, else its reference limits, else the "
                 "catalogue's reference interval for the patient's sex and age")
CRITICAL_HELP = "Results beyond a critical limit (site critical value list) or flagged critical by the laboratory"
c1, c2, c3, c4, c5 = st.columns([2, 1, 1, 1, 2])
search = c1.text_input("Patient id contains", key="patients_search", placeholder="e.g. 10000032")
min_abnormal = c2.number_input("Min. abnormal", min_value=0, step=1, key="patients_min_abnormal", help=ABNORMAL_HELP)
min_critical = c3.number_input("Min. critical", min_value=0, step=1, key="patients_min_critical", help=CRITICAL_HELP)
min_implausible = c4.number_input("Min. implausible", min_value=0, step=1, key="patients_min_implausible",
                                  help="Values outside physiological limits: possible entry errors (LAB-10)")
last = pd.to_datetime(df["last_result"]).dropna()
lo, hi = (last.min().date(), last.max().date()) if len(last) else (None, None)
period = c5.date_input("Last result between", value=(lo, hi) if lo else (), min_value=lo, max_value=hi,
                       key="patients_last_range", format="YYYY-MM-DD") if lo else ()

view = df
if search:
    view = view[view["patient_id"].str.contains(search.strip(), case=False, regex=False)]
view = view[(view["n_abnormal"] >= min_abnormal) & (view["n_critical"] >= min_critical)
            & (view["n_implausible"] >= min_implausible)]
if isinstance(period, tuple) and len(period) == 2:
    last_day = pd.to_datetime(view["last_result"]).dt.date
    view = view[(last_day >= period[0]) & (last_day <= period[1])]

st.caption(f"{len(view)} of {len(df)} patients. Select a row to open the timeline.")
table = view[["patient_id", "sex", "age_years", "n_results", "n_abnormal", "n_critical", "n_implausible",
              "first_result", "last_result"]].reset_index(drop=True)
table["age_years"] = np.floor(table["age_years"].astype(float)).astype("Int64")  # completed years
event = st.dataframe(
    table, key="patients_table", on_select="rerun", selection_mode="single-row", hide_index=True, width="stretch",
    column_config={
        "patient_id": st.column_config.TextColumn("Patient"),  # not pinned: pinned columns are drawn faded grey
        "sex": st.column_config.TextColumn("Sex"),
        "age_years": st.column_config.NumberColumn(
            "Age (y)", format="%d", help="At the last result: from the birth date, else from the age the source gave"),
        "n_results": st.column_config.NumberColumn("Results"),
        "n_abnormal": st.column_config.NumberColumn("Abnormal", help=ABNORMAL_HELP),
        "n_critical": st.column_config.NumberColumn("Critical", help=CRITICAL_HELP),
        "n_implausible": st.column_config.NumberColumn("Implausible"),
        "first_result": st.column_config.DatetimeColumn("First result", format="YYYY-MM-DD"),
        "last_result": st.column_config.DatetimeColumn("Last result", format="YYYY-MM-DD HH:mm"),
    },
)
rows = event.selection.rows if event is not None and hasattr(event, "selection") else []
chosen = table.iloc[rows[0]]["patient_id"] if rows else (table.iloc[0]["patient_id"] if len(table) == 1 else None)


def _open_timeline(patient_id: str) -> None:
    st.session_state["timeline_patient"] = patient_id
    st.session_state["_patients_open"] = True


if chosen is not None:  # the click's rerun switches page before querying and drawing this page again
    st.button(f"Open timeline of {chosen}", type="primary", icon=":material/monitoring:", key="patients_open",
              on_click=_open_timeline, args=(chosen,))
