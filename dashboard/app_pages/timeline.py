"""Patient timeline: the page clinicians live in.

Panels of small multiples on one time axis, a date-range selector, an analyte picker, the
cumulative table, then forecasts, anomaly flags, explanations and recommendations (each
says plainly when it is not available).
"""

import pandas as pd
import streamlit as st

from dashboard import auth, figures, services, state

MAX_PICKER = 5000  # above this many patients the picker is a text box

user = auth.require_page("timeline")
db = state.db_path()
version = state.data_version(db)
patients = state.patients(db, version)
st.title("Patient timeline")
if patients.empty:
    st.info("No patients in the database yet.")
    st.stop()

ids = patients["patient_id"].tolist()
if st.session_state.get("timeline_patient") not in ids:
    st.session_state["timeline_patient"] = ids[0]
top = st.columns([1.2, 3])
if len(ids) <= MAX_PICKER:
    pid = top[0].selectbox("Patient", ids, key="timeline_patient")
else:  # a large store: type the id (the Patients page searches)
    typed = top[0].text_input("Patient id", value=st.session_state["timeline_patient"], key="timeline_patient_id").strip()
    if typed not in set(ids):
        st.error(f"No patient with id {typed!r}.")
        st.stop()
    pid = st.session_state["timeline_patient"] = typed

if st.session_state.get("_lt_viewed") != pid:  # one audit row each time a patient is opened
    auth.record("view_patient", patient_id=pid, detail={"page": "timeline"})
    st.session_state["_lt_viewed"] = pid

info = state.patient_info(db, version, pid) or {}
raw = state.timeline(db, version, pid)


def _age(info: dict) -> float | None:
    """Age in years for choosing reference intervals: from the birth date, else as given by the source."""
    birth, age = info.get("birth_date"), info.get("age_at_ref")
    if birth is not None and not pd.isna(birth):
        return (raw["collected_at"].max() - pd.Timestamp(birth)).days / 365.25 if len(raw) else None
    return None if age is None or pd.isna(age) else float(age)


age = _age(info)
results = state.results_with_limits(db, version, pid, info.get("sex"), age)
facts = [f"Sex {info.get('sex') or 'unknown'}"]
if age is not None:
    ref_date = info.get("ref_date")
    facts.append(f"age {age:.0f} y" + (f" (at {pd.Timestamp(ref_date).date()})" if ref_date is not None
                                          and not pd.isna(ref_date) and pd.isna(info.get("birth_date")) else ""))
if len(raw):
    facts.append(f"{len(raw)} results, {raw['collected_at'].min():%Y-%m-%d} → {raw['collected_at'].max():%Y-%m-%d}")
top[1].markdown("<div style='padding-top:2.1rem'>" + " · ".join(facts) + "</div>", unsafe_allow_html=True)

if raw.empty:
    st.info("This patient has no stored results.")
    st.stop()

# ---- controls ---------------------------------------------------------------------------------
panels = figures.panels_of(results)
if not panels:
    st.info("This patient has only text results; see the cumulative table below.")
c1, c2, c3 = st.columns([1.2, 2.6, 2.4])
panel_keys = list(panels)
last_panel = st.session_state.get("timeline_last_panel")  # kept across patients
panel = c1.selectbox("Panel", panel_keys, key=f"timeline_panel_{pid}",
                     index=panel_keys.index(last_panel) if last_panel in panel_keys else 0,
                     format_func=lambda p: f"{figures.PANEL_LABELS.get(p, p)} ({len(panels[p])})") if panel_keys else None
st.session_state["timeline_last_panel"] = panel
codes = panels.get(panel, [])
labels = {c: figures.analyte_label(results, c) for c in codes}
chosen = c2.multiselect("Analytes", codes, default=codes[:8], format_func=labels.get,
                        key=f"timeline_analytes_{pid}_{panel}",
                        help="Up to 8 are preselected; each gets its own chart on the shared time axis.")

PERIODS = {"7 d": 7, "30 d": 30, "6 mo": 182, "1 y": 365, "All": None, "Custom": "custom"}
period = c3.segmented_control("Period before the last result", list(PERIODS), default="All", key="timeline_period",
                              help="Counted back from the newest result of the chosen analytes (of any analyte "
                                   "when none is chosen).")
chosen_rows = raw[raw["analyte_code"].isin(chosen)] if chosen else raw
last_t = (chosen_rows if len(chosen_rows) else raw)["collected_at"].max()
first_t = raw["collected_at"].min()
date_range = None
if period == "Custom":
    picked = st.date_input("From – to", value=(first_t.date(), last_t.date()), min_value=first_t.date(),
                           max_value=last_t.date(), key=f"timeline_dates_{pid}", format="YYYY-MM-DD")
    if isinstance(picked, tuple) and len(picked) == 2:
        date_range = picked
elif PERIODS.get(period):
    date_range = (last_t - pd.Timedelta(days=PERIODS[period]), last_t)

in_range = results
if date_range is not None:
    start, end = figures.date_bounds(date_range)
    in_range = results[(results["collected_at"] >= start) & (results["collected_at"] <= end)]

# ---- forecasts and anomalies (plug-ins) -------------------------------------------------------------
mstatus = state.model_status()
if mstatus.available and chosen:
    fc = state.forecasts(db, version, mstatus.path, mstatus.stamp, pid, tuple(chosen))
else:
    fc = services.load_forecasts(None, results, info, chosen, mstatus)
anomalies = state.anomalies(db, version, pid)

# ---- the chart --------------------------------------------------------------------------------------
if not mstatus.available:
    st.info(services.NO_MODEL_MESSAGE, icon=":material/info:")
elif fc.message:
    st.warning(fc.message)
if chosen:
    fig = state.timeline_figure(db, version, pid, info.get("sex"), age, tuple(chosen),
                                tuple(date_range) if date_range is not None else None, results, fc, anomalies)
    st.plotly_chart(fig, width="stretch", key="timeline_chart",
                    config={"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"],
                            "toImageButtonOptions": {"filename": f"labtrend_{pid}_{panel}"}})
    sel = in_range[in_range["analyte_code"].isin(chosen)]
    notes = []
    for label, mask in (
        ("censored (< or >, drawn at the limit)", sel["result_kind"] == "censored"),
        ("text or empty (gaps)", sel["result_kind"].isin(["text", "empty"])),
        ("implausible, possible entry errors (off scale)", sel["implausible"]),
        ("without a unit (greyed, not to scale)", sel["unit_missing"]),
        ("conflicting at the same time (all shown)", sel["conflicting"]),
        ("with a date but no time (drawn at noon)", sel["time_unknown"].fillna(False).astype(bool)),
        ("in an hour skipped or repeated by a clock change (time uncertain)", sel["time_flag"].notna()),
        ("collected after their import (check the date)", sel["after_import"].fillna(False).astype(bool)),
    ):
        if int(mask.sum()):
            notes.append(f"{int(mask.sum())} {label}")
    hidden = (fig.layout.meta or {}).get("hidden_flag_labels", 0)
    if hidden:
        notes.append(f"{hidden} H/L label{'s' if hidden > 1 else ''} left off where labels would overlap "
                     "(those points stay red)")
    if sel["utc_offset_min"].notna().any():  # times with a known zone: stored in UTC
        notes.append("the time axis is UTC; hover and table show the local time at collection")
    if notes:
        st.caption("In this view: " + "; ".join(notes) + ". Hover a point for value, unit, time, flag and the "
                   "result as reported.")
elif panel_keys:
    st.info("Choose at least one analyte.")

# ---- cumulative table ------------------------------------------------------------------------------
st.subheader("Cumulative results")
scope = st.radio("Show", ["Chosen analytes", "All analytes"], horizontal=True, key="timeline_table_scope",
                 label_visibility="collapsed")
table_rows = in_range if scope == "All analytes" else in_range[in_range["analyte_code"].isin(chosen)]
table = figures.make_cumulative_table(table_rows)
if table.empty:
    st.caption("No results in this period.")
else:
    st.dataframe(figures.style_cumulative_table(table), hide_index=True, width="stretch", key="timeline_table",
                 column_config={"Analyte": st.column_config.TextColumn(pinned=True)},
                 height=min(38 + 35 * len(table), 600))
    st.caption("Values in the canonical unit with the laboratory's flag (H/L; HH/LL beyond critical limits); "
               "the value as reported is in brackets when the unit was converted.")

# ---- model and clinical outputs ---------------------------------------------------------------------
st.subheader("Forecasts")
if not fc.available or fc.frame.empty:
    st.info(fc.message or services.NO_MODEL_MESSAGE)
else:
    f = fc.frame.copy()
    f["Analyte"] = f["analyte_code"].map(lambda c: figures.analyte_label(results, c))
    def _rng(r, lo, hi):
        return "" if r["status"] != "ok" or any(pd.isna(r[x]) for x in (lo, hi)) else f"{figures.fmt_value(r[lo])}–{figures.fmt_value(r[hi])}"
    f["Median"] = [figures.fmt_value(v) if s == "ok" else "" for v, s in zip(f["q50"], f["status"])]
    f["80% interval"] = [_rng(r, "q10", "q90") for _, r in f.iterrows()]
    f["90% interval"] = [_rng(r, "q05", "q95") for _, r in f.iterrows()]
    has95 = {"lo95", "hi95"} <= set(f.columns) and f.loc[f["status"] == "ok", ["lo95", "hi95"]].notna().all().all()
    if has95:
        f["95% interval"] = [_rng(r, "lo95", "hi95") for _, r in f.iterrows()]
    f["For"] = pd.to_datetime(f["at"]).dt.strftime("%Y-%m-%d %H:%M")
    shown = ["Analyte", "For", "Median", "80% interval", "90% interval"] + (["95% interval"] if has95 else [])
    st.dataframe(f[shown + ["status", "model_version"]],
                 hide_index=True, width="stretch", key="timeline_forecasts",
                 column_config={"status": "Status", "model_version": "Model"})
    st.caption("Forecasts are decision support, not results. Intervals are the model's quantiles"
               + (", conformal-calibrated on held-out patients." if mstatus.calibrated else " (not calibrated).")
               + ("" if has95 else " No 95% interval: this model version was not calibrated at 95%, so the chart "
                                   "shows the 90% interval (q05–q95) as its outer band."))

st.subheader("Anomaly flags")
if not anomalies.available:
    st.info(anomalies.message)
else:
    a = anomalies.frame
    a = a[a["analyte_code"].isin(chosen)] if st.toggle("Only the chosen analytes", value=True,
                                                       key="timeline_anomalies_chosen") else a
    if date_range is not None:
        a = a[(a["collected_at"] >= start) & (a["collected_at"] <= end)]
    if a.empty:
        st.caption("No anomaly flags in this view.")
    else:
        shown = a.assign(rule=a["rule"].map(figures.rule_label), unit=a["unit"].map(figures.display_unit),
                         text=a["text"].map(figures.readable_units),
                         collected_at=figures.local_times(a, results))  # local time at collection
        st.dataframe(shown[["collected_at", "analyte_name", "rule", "flag", "value", "unit", "text", "source"]]
                     .sort_values("collected_at", ascending=False), hide_index=True, width="stretch",
                     key="timeline_anomalies", row_height=72, column_config={  # 72 px: the text wraps over 3 lines
                         "collected_at": st.column_config.DatetimeColumn("Collected", format="YYYY-MM-DD HH:mm"),
                         "analyte_name": "Analyte", "rule": st.column_config.TextColumn("Rule", width="medium"),
                         "flag": "Flag", "value": "Value", "unit": "Unit",
                         "text": st.column_config.TextColumn("What it means", width="large"), "source": "Source"})
    for note in anomalies.extra.get("notes", []):
        st.caption(note)
    st.caption("Rings on the chart mark every rule except the reference interval (that one is the H/L label).")

st.subheader("Explanation")
if not mstatus.available:
    st.info(services.NO_MODEL_MESSAGE)
else:
    ok = fc.frame[fc.frame["status"] == "ok"] if fc.available else fc.frame.iloc[0:0]
    if ok.empty:
        st.caption("No forecast to explain.")
    else:
        labels_fc = {f"{figures.analyte_label(results, r['analyte_code'])} for {pd.Timestamp(r['at']):%Y-%m-%d %H:%M}": i
                     for i, r in ok.iterrows()}
        pick = st.selectbox("Forecast", list(labels_fc), key=f"timeline_explain_pick_{pid}")
        if st.toggle("Explain this forecast", key=f"timeline_explain_on_{pid}"):
            row = ok.loc[labels_fc[pick]]
            q = row[["patient_id", "analyte_code", "at"]].to_dict()
            try:
                with st.spinner("Computing the explanation…"):
                    ex = state.explanation(db, version, mstatus.path, mstatus.stamp, pid, str(q["analyte_code"]),
                                           pd.Timestamp(q["at"]).isoformat(), float(row["q50"]))
            except Exception as exc:  # an explainer failure must not take the page down (XAI-15)
                ex = services.ServiceResult(pd.DataFrame(), False, f"Explanation not available: {exc}")
            if ex.available:
                expl = dict(ex.extra["explanation"], analyte_name=figures.analyte_label(results, q["analyte_code"]))
                st.plotly_chart(figures.make_shap_bar(expl), width="stretch", key="timeline_shap")
            else:
                st.info(ex.message)

st.subheader("Recommendations")
recs = state.recommendations(db, version, pid, info.get("sex"), age, tuple(chosen), results, fc, anomalies, info)
if not recs.available:
    st.info(recs.message)
elif recs.frame.empty:
    st.caption("No recommendations.")
else:
    order = {"high": 0, "medium": 1, "low": 2}
    for _, rec in recs.frame.sort_values("urgency", key=lambda u: u.map(order).fillna(3), kind="stable").iterrows():
        with st.container(border=True):  # in full: a clipped table cell would hide what to consider
            st.markdown(f"**{rec['title']}** · urgency {rec['urgency']}")
            st.markdown(figures.readable_units(rec["text"]).replace("$", "\\$"))  # "$" is text here, not LaTeX
            st.caption(f"Source: {rec['source']}")
    st.caption("Suggestions from the site's rule file for the clinician to consider; not orders.")
