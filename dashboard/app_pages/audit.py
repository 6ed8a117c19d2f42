"""Audit (admin): the append-only audit log with filters."""

from datetime import datetime, time

import streamlit as st

from dashboard import auth, state
from data import audit
from data.export import csv_bytes

user = auth.require_page("audit")
st.title("Audit log")
st.caption("Every patient view, upload, expert verdict, sign-in (password or session cookie), failed sign-in, sign-out "
           "and ended session, refused page opening and user change in the dashboard; every import, export, "
           "prediction, training run and user change on the command line (user: the operating-system account, "
           "role 'cli'). Rows are only ever added.")

store = state.get_store(state.db_path())
c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
who = c1.text_input("User", key="audit_user").strip().lower() or None
action = c2.selectbox("Action", ["all", *audit.ACTIONS], key="audit_action")
patient = c3.text_input("Patient", key="audit_patient").strip() or None
days = c4.date_input("Between", value=(), key="audit_days", format="YYYY-MM-DD")
start = datetime.combine(days[0], time.min) if len(days) >= 1 else None
end = datetime.combine(days[1], time.max) if len(days) == 2 else None

log = audit.read_log(store, username=who, action=None if action == "all" else action, patient_id=patient,
                     start=start, end=end)
st.caption(f"{len(log)} rows (newest first, at most 5000); times in UTC.")
st.dataframe(log, hide_index=True, width="stretch", key="audit_table", column_config={
    "logged_at": st.column_config.DatetimeColumn("When (UTC)", format="YYYY-MM-DD HH:mm:ss"),
    "username": "User", "role": "Role", "action": "Action", "patient_id": "Patient", "detail": "Detail",
})
st.download_button("Download (CSV)", csv_bytes(log),
                   file_name="labtrend_audit.csv", mime="text/csv", key="audit_csv", icon=":material/download:",
                   on_click=lambda: auth.record("export_audit", detail={"rows": len(log)}))
