"""Patient timeline: the page clinicians live in.

Opens on the patient's latest episode (the admission holding the newest result, else the last
90 days; ``dashboard.period``), with "All" one click away. Panels of small multiples on one
time axis, an analyte picker, the cumulative table (or, for long series, one row per result),
then forecasts, anomaly flags, explanations and recommendations (each says plainly when it is
not available). Every number is written at the analyte's reporting precision
(``dashboard.precision``).

Deep links: ``timeline?patient=ID&analyte=CODE[,CODE]&period=episode|7d|30d|6mo|1y|all|
YYYY-MM-DD..YYYY-MM-DD`` opens that view (a bookmark, a shared address, a review card's link);
the page keeps the address in step with what is on screen. An id the store does not know is
said so, never replaced by another patient.
"""

import re

import pandas as pd
import streamlit as st

from dashboard import auth, figures, period as periods, services, state
from data.identifiers import patient_key
from data.export import csv_bytes

MAX_PICKER = 5000  # above this many patients the picker is a text box
MAX_FLAG_ROWS = 1000  # anomaly flags listed on the page (newest first); all of them in the download
LONG_SERIES = 20_000  # results of a patient above which the chart is drawn before its anomaly rings are computed

user = auth.require_page("timeline")
db = state.db_path()
version = state.data_version(db)
patients = state.patients(db, version)
st.title("Patient timeline")
if patients.empty:
    st.info("No patients in the database yet.")
    st.stop()

ids = patients["patient_id"].tolist()
id_set = set(ids)

# ---- deep link: applied once per address; afterwards the page writes its own choice into the address -------
link = {k: st.query_params.get(k) for k in ("patient", "analyte", "period")}
link_key = tuple(sorted((k, v) for k, v in link.items() if v))
pending = {}
if link.get("patient") and st.session_state.get("_timeline_link") != link_key:
    wanted = patient_key(link["patient"]) or ""
    if wanted not in id_set:
        if st.session_state.get("_timeline_link_refused") != link_key:  # audited once per address
            auth.record("denied", patient_id=wanted[:64] or None,
                        detail={"page": "timeline", "reason": "patient id in the link is not in this database"})
            st.session_state["_timeline_link_refused"] = link_key
        st.error(f"This link asks for patient **{wanted or '(empty)'}**, who is not in this database "
                 f"(`{state.db_path().rsplit('/', 1)[-1]}`). Nothing is shown rather than another patient. Check the "
                 "link, or find the patient on the Patients page.")
        st.page_link("app_pages/patients.py", label="Find a patient", icon=":material/groups:")
        st.stop()
    st.session_state["timeline_patient"] = wanted
    pending = {"analytes": periods.parse_analytes(link.get("analyte")), "period": periods.parse_period(link.get("period")),
               "bad_period": link.get("period") if link.get("period") and not periods.parse_period(link.get("period")) else None}
    # marked as applied only at the end of a run that drew it (below): a run cut short by a rerun (the sign-in
    # cookie's, a reconnecting browser's widget values) applies the link again instead of losing it

if st.session_state.get("timeline_patient") not in id_set:
    st.session_state["timeline_patient"] = ids[0]
top = st.columns([1.2, 3])
if len(ids) <= MAX_PICKER:
    pid = top[0].selectbox("Patient", ids, key="timeline_patient")
else:  # a large store: type the id (the Patients page searches)
    typed = top[0].text_input("Patient id", value=st.session_state["timeline_patient"], key="timeline_patient_id").strip()
    if typed not in id_set:
        st.error(f"No patient with id {typed!r}.")
        st.stop()
    pid = st.session_state["timeline_patient"] = typed

if st.session_state.get("_lt_viewed") != pid:  # one audit row each time a patient is opened
    auth.record("view_patient", patient_id=pid, detail={"page": "timeline", **({"via": "link"} if pending else {})})
    st.session_state["_lt_viewed"] = pid

info = state.patient_info(db, version, pid) or {}
raw = state.timeline(db, version, pid)
age = services.age_years(info, raw["collected_at"].max() if len(raw) else None)
results = state.results_with_limits(db, version, pid, info.get("sex"), age)
decimals = state.reporting_decimals(db, version, pid)
facts = [f"Sex {info.get('sex') or 'unknown'}"]
if age is not None:
    ref_date = info.get("ref_date")
    facts.append(f"age {age:.0f} y" + (f" (at {pd.Timestamp(ref_date).date()})" if ref_date is not None
                                          and not pd.isna(ref_date) and pd.isna(info.get("birth_date")) else ""))
if len(raw):
    facts.append(f"{len(raw):,} results, {raw['collected_at'].min():%Y-%m-%d} → {raw['collected_at'].max():%Y-%m-%d}")
top[1].markdown("<div style='padding-top:2.1rem'>" + " · ".join(facts) + "</div>", unsafe_allow_html=True)

if raw.empty:
    st.info("This patient has no stored results.")
    st.stop()

# ---- controls ---------------------------------------------------------------------------------
panels = figures.panels_of(results)
if not panels:
    st.info("This patient has only text results; see the results table below.")
panel_keys = list(panels)
panel_key, link_codes = f"timeline_panel_{pid}", [c for c in pending.get("analytes", []) if c in set(results["analyte_code"])]
if link_codes and any(link_codes[0] in codes for codes in panels.values()):
    st.session_state[panel_key] = next(p for p, codes in panels.items() if link_codes[0] in codes)
elif st.session_state.get(panel_key) not in panel_keys and panel_keys:
    last_panel = st.session_state.get("timeline_last_panel")  # kept across patients
    st.session_state[panel_key] = last_panel if last_panel in panel_keys else panel_keys[0]
c1, c2 = st.columns([1.2, 3])
panel = c1.selectbox("Panel", panel_keys, key=panel_key,
                     format_func=lambda p: f"{figures.PANEL_LABELS.get(p, p)} ({len(panels[p])})") if panel_keys else None
st.session_state["timeline_last_panel"] = panel
codes = panels.get(panel, [])
labels = {c: figures.analyte_label(results, c) for c in codes}
analytes_key = f"timeline_analytes_{pid}_{panel}"
if link_codes:
    st.session_state[analytes_key] = [c for c in link_codes if c in codes]
elif analytes_key not in st.session_state:
    st.session_state[analytes_key] = codes[:8]
else:  # analytes no longer among this patient's plottable ones (new data) are dropped, not an error
    st.session_state[analytes_key] = [c for c in st.session_state[analytes_key] if c in codes]
chosen = c2.multiselect("Analytes", codes, format_func=labels.get, key=analytes_key,
                        help="Up to 8 are preselected; each gets its own chart on the shared time axis.")
if pending.get("analytes") and len(link_codes) < len(pending["analytes"]):
    missing = [c for c in pending["analytes"] if c not in set(link_codes)]
    st.warning(f"The link asks for analyte(s) {', '.join(missing)}: no results of this patient carry that code.")
if link_codes and len(st.session_state[analytes_key]) < len(link_codes):
    st.caption("The link's other analytes are in other panels; pick the panel to see them.")

first_t, newest = raw["collected_at"].min(), raw["collected_at"].max()
episode = periods.latest_episode(newest, state.admissions(db, version, pid))
if pending.get("period"):
    label, dates = pending["period"]
    st.session_state["timeline_period"] = label
    if dates:
        st.session_state[f"timeline_dates_{pid}"] = dates
elif pending.get("bad_period"):
    st.warning(f"The link's period {pending['bad_period']!r} is not one of "
               f"{', '.join(periods.PERIOD_TOKENS)} or YYYY-MM-DD..YYYY-MM-DD; showing the latest episode.")
if st.session_state.get("timeline_period") not in periods.PERIODS:
    st.session_state["timeline_period"] = "Latest episode"
c3, c4 = st.columns([2.3, 3], vertical_alignment="bottom")
period = c3.segmented_control(
    "Period", list(periods.PERIODS), key="timeline_period",
    help="Latest episode: the admission that holds the newest result when admissions are known, else the last "
         f"{periods.EPISODE_DAYS} days. 7 d … 1 y: counted back from the newest result of the chosen analytes.")
period = period or "All"
chosen_rows = raw[raw["analyte_code"].isin(chosen)] if chosen else raw
last_t = (chosen_rows if len(chosen_rows) else raw)["collected_at"].max()
date_range, custom_dates = None, None
if period == "Custom":
    dkey = f"timeline_dates_{pid}"
    if dkey not in st.session_state:
        st.session_state[dkey] = (max(first_t, last_t - pd.Timedelta(days=30)).date(), last_t.date())
    picked = st.date_input("From – to", key=dkey, format="YYYY-MM-DD")
    if isinstance(picked, tuple) and len(picked) == 2:
        date_range = custom_dates = picked
elif period == "Latest episode" and episode is not None:
    date_range = (episode.start, episode.end)
elif periods.PERIODS.get(period):
    date_range = (last_t - pd.Timedelta(days=periods.PERIODS[period]), last_t)

# ---- the address follows the view: it can be bookmarked or shared as it is ------------------------
want = {"patient": pid}
if chosen:
    want["analyte"] = ",".join(chosen)
token = periods.period_token(period, custom_dates)
if token:
    want["period"] = token
if {k: st.query_params.get(k) for k in ("patient", "analyte", "period") if st.query_params.get(k)} != want:
    st.query_params.from_dict(want)
st.session_state["_timeline_link"] = tuple(sorted(want.items()))

in_range = results
start = end = None
if date_range is not None:
    start, end = figures.date_bounds(date_range)
    in_range = results[(results["collected_at"] >= start) & (results["collected_at"] <= end)]
if period == "Latest episode" and episode is not None:
    c4.caption(f"Showing the latest episode: **{episode.label}** ({len(in_range):,} of {len(results):,} results). "
               "Choose **All** for the whole history.")

# ---- forecasts and anomalies (plug-ins) -------------------------------------------------------------
mstatus = state.model_status()
if mstatus.available and chosen:
    fc = state.forecasts(db, version, mstatus.path, mstatus.stamp, pid, tuple(chosen))
else:
    fc = services.load_forecasts(None, results, info, chosen, mstatus)

# ---- the chart --------------------------------------------------------------------------------------
if not mstatus.available:
    st.info(services.NO_MODEL_MESSAGE, icon=":material/info:")
elif fc.message:
    st.warning(fc.message)
fig = None
chart = st.container(key="timeline_chart").empty()  # keyed: a stable hook for the browser test and benchmarks


def _draw(flags: services.ServiceResult, key: str = "timeline_figure"):
    figure = state.timeline_figure(db, version, pid, info.get("sex"), age, tuple(chosen),
                                   tuple(date_range) if date_range is not None else None, results, fc, flags, decimals)
    chart.plotly_chart(figure, width="stretch", key=key,
                       config={"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"],
                               "toImageButtonOptions": {"filename": f"labtrend_{pid}_{panel}"}})
    return figure


# a long series: the values first, the anomaly rings when they are computed (once per patient; a rerun that
# finds them computed, e.g. the switch to All, draws the chart once, with its rings)
rings_of = (db, version, pid, mstatus.path, mstatus.stamp)
if chosen and len(results) > LONG_SERIES and st.session_state.get("_timeline_rings_of") != rings_of:
    fig = _draw(services.ServiceResult(pd.DataFrame(columns=services.ANOMALY_COLUMNS), True, "",
                                       extra={"pending": True}), "timeline_values")
anomalies = state.anomalies(db, version, pid)
st.session_state["_timeline_rings_of"] = rings_of
if chosen:
    rings = anomalies.frame
    rings = rings[rings["analyte_code"].isin(chosen) & (rings["rule"].astype(str) != "reference_interval")]
    if date_range is not None:
        rings = rings[(rings["collected_at"] >= start) & (rings["collected_at"] <= end)]
    if fig is None or len(rings):
        fig = _draw(anomalies)
    meta = fig.layout.meta or {}
    sel = in_range[in_range["analyte_code"].isin(chosen)]
    notes = []
    for label, mask in (
        ("censored (< or >, drawn at the limit)", sel["result_kind"] == "censored"),
        ("text or empty (✕ on the time axis)", sel["result_kind"].isin(["text", "empty"])),
        ("implausible, possible entry errors (off scale)", sel["implausible"]),
        ("without a unit (greyed, not to scale)", sel["unit_missing"]),
        ("conflicting at the same time (all shown)", sel["conflicting"]),
        ("with a date but no time (drawn at noon)", sel["time_unknown"].fillna(False).astype(bool)),
        ("in an hour skipped or repeated by a clock change (time uncertain)", sel["time_flag"].notna()),
        ("collected after their import (check the date)", sel["after_import"].fillna(False).astype(bool)),
    ):
        if int(mask.sum()):
            notes.append(f"{int(mask.sum())} {label}")
    hidden = meta.get("hidden_flag_labels", 0)
    if hidden:
        notes.append(f"{hidden} H/L label{'s' if hidden > 1 else ''} left off where labels would overlap "
                     "(those points stay red)")
    for code, (drawn, total) in (meta.get("thinned") or {}).items():
        notes.append(f"{labels.get(code, code)}: {drawn:,} of {total:,} results drawn (the highest and lowest of "
                     "every stretch of the axis kept); every result is in the table below")
    if sel["utc_offset_min"].notna().any():  # times with a known zone: stored in UTC
        notes.append("the time axis is UTC; hover and table show the local time at collection")
    if notes:
        st.caption("In this view: " + "; ".join(notes) + ". Hover a point for value, unit, time, flag and the "
                   "result as reported.")
    fc_notes, fc_status = meta.get("forecast_notes") or {}, meta.get("forecast_status") or {}
    if fc_notes:
        spans = [re.search(r"up to ([\d.]+ [hd])", note) for note in fc_notes.values()]
        hours = {m.group(1): float(m.group(1).split()[0]) * (24 if m.group(1).endswith("d") else 1) for m in spans if m}
        model = fc.frame["model_version"].dropna().iloc[0] if len(fc.frame) and fc.frame["model_version"].notna().any() else ""
        days = ", ".join(str(d) for d in services.FORECAST_HORIZONS_DAYS)
        st.caption(f"Forecasts (dashed line, 80 % and outer interval bands) for {days} days after the patient's newest "
                   "result" + (f", at most {max(hours, key=hours.get)} after an analyte's own last result" if hours else "")
                   + (f"; model {model}" if model else "") + ". Decision support, not results.")
    for code, why in fc_status.items():
        st.caption(f"No forecast for {labels.get(code, code)}: {why}.")
elif panel_keys:
    st.info("Choose at least one analyte.")

# ---- cumulative table, or one row per result for a long series ----------------------------------------
st.subheader("Results")
scope = st.radio("Show", ["Chosen analytes", "All analytes"], horizontal=True, key="timeline_table_scope",
                 label_visibility="collapsed")
table_rows = in_range if scope == "All analytes" else in_range[in_range["analyte_code"].isin(chosen)]
n_times = table_rows["collected_at"].nunique()
if table_rows.empty:
    st.caption("No results in this period.")
elif n_times <= figures.MAX_TABLE_TIMES:
    table = figures.make_cumulative_table(table_rows, decimals)
    st.dataframe(figures.style_cumulative_table(table), hide_index=True, width="stretch", key="timeline_table",
                 column_config={"Analyte": st.column_config.TextColumn(pinned=True)},
                 height=min(38 + 35 * len(table), 600))
    st.caption("Values in the canonical unit at the laboratory's reporting precision, with the flag (H/L; HH/LL "
               "beyond critical limits); the value as reported is in brackets when the unit was converted.")
else:
    listing = figures.make_results_list(table_rows, decimals)
    st.caption(f"{len(listing):,} results at {n_times:,} collection times, newest first (one row per result: too many "
               "times for one column each).")
    st.dataframe(listing, hide_index=True, width="stretch", key="timeline_results_list", column_config={
        "Collected": st.column_config.DatetimeColumn("Collected", format="YYYY-MM-DD HH:mm"),
        "Result": st.column_config.TextColumn("Result", help="Canonical unit, reporting precision"),
        "As reported": st.column_config.TextColumn("As reported", width="medium"),
        "Comment": st.column_config.TextColumn("Comment", width="large")})
    st.download_button("Download these results (CSV)", lambda: csv_bytes(listing), file_name=f"labtrend_{pid}_results.csv",
                       mime="text/csv", key="timeline_results_csv", icon=":material/download:",
                       on_click=auth.record, args=("view_patient",),
                       kwargs={"patient_id": pid, "detail": {"page": "timeline", "download": "results csv",
                                                             "rows": len(listing)}})

# ---- model and clinical outputs ---------------------------------------------------------------------
st.subheader("Forecasts")
if not fc.available or fc.frame.empty:
    st.info(fc.message or services.NO_MODEL_MESSAGE)
else:
    f = fc.frame.copy()
    f["Analyte"] = f["analyte_code"].map(lambda c: figures.analyte_label(results, c))
    dec = [decimals.get(str(c)) for c in f["analyte_code"]]

    def _rng(r, d, lo, hi):
        return "" if r["status"] != "ok" or any(pd.isna(r[x]) for x in (lo, hi)) else \
            f"{figures.fmt_value(r[lo], d)}–{figures.fmt_value(r[hi], d)}"
    f["Median"] = [figures.fmt_value(v, d) if s == "ok" else "" for v, s, d in zip(f["q50"], f["status"], dec)]
    f["80% interval"] = [_rng(r, d, "q10", "q90") for (_, r), d in zip(f.iterrows(), dec)]
    f["90% interval"] = [_rng(r, d, "q05", "q95") for (_, r), d in zip(f.iterrows(), dec)]
    has95 = {"lo95", "hi95"} <= set(f.columns) and f.loc[f["status"] == "ok", ["lo95", "hi95"]].notna().all().all()
    if has95:
        f["95% interval"] = [_rng(r, d, "lo95", "hi95") for (_, r), d in zip(f.iterrows(), dec)]
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
        from clinical.outputs import review_priority

        def _readable(flags: pd.DataFrame) -> pd.DataFrame:
            """The flags as the table shows them (rule by name, units as written, values at reporting precision)."""
            return flags.assign(
                rule=flags["rule"].map(figures.rule_label), unit=flags["unit"].map(figures.display_unit),
                text=flags["text"].map(figures.readable_units),
                value=[figures.fmt_value(v, decimals.get(str(c))) for v, c in zip(flags["value"], flags["analyte_code"])],
                collected_at=figures.local_times(flags, results),  # local time at collection
            )[["collected_at", "analyte_name", "rule", "flag", "value", "unit", "text", "source"]]

        # clinical priority first (critical values, pre-analytical errors, then changes), newest first within it
        newest = a.assign(_p=[review_priority("anomaly", r) for r in a["rule"]])
        newest = newest.sort_values(["_p", "collected_at"], ascending=[True, False], kind="stable").drop(columns="_p")
        if len(newest) > MAX_FLAG_ROWS:
            st.caption(f"The {MAX_FLAG_ROWS:,} most urgent of {len(newest):,} flags in this view; all of them in the download.")
        st.dataframe(_readable(newest.head(MAX_FLAG_ROWS)), hide_index=True, width="stretch",
                     key="timeline_anomalies", row_height=72, column_config={  # 72 px: the text wraps over 3 lines
                         "collected_at": st.column_config.DatetimeColumn("Collected", format="YYYY-MM-DD HH:mm"),
                         "analyte_name": "Analyte", "rule": st.column_config.TextColumn("Rule", width="medium"),
                         "flag": "Flag", "value": "Value", "unit": "Unit",
                         "text": st.column_config.TextColumn("What it means", width="large"), "source": "Source"})
        if len(newest) > MAX_FLAG_ROWS:  # written when clicked, not on every run
            st.download_button("Download all flags in this view (CSV)", lambda: csv_bytes(_readable(newest)),
                               file_name=f"labtrend_{pid}_flags.csv", mime="text/csv", key="timeline_flags_csv",
                               icon=":material/download:", on_click=auth.record, args=("view_patient",),
                               kwargs={"patient_id": pid, "detail": {"page": "timeline", "download": "flags csv",
                                                                     "rows": len(newest)}})
    for note in anomalies.extra.get("notes", []):
        st.caption(note)
    st.caption("Review-worthy flags, most urgent first: critical values, pre-analytical patterns, delta checks and "
               "model surprises. Rings on the chart mark each result of a flag (a run of consecutive flags is one "
               "row); a result outside its reference interval carries its H/L flag on the chart and in the results "
               "table, not a row here.")

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
                st.plotly_chart(figures.make_shap_bar(expl, decimals=decimals.get(str(q["analyte_code"]))),
                                width="stretch", key="timeline_shap")
            else:
                st.info(ex.message)

st.subheader("Recommendations")
recs = state.recommendations(db, version, pid, info.get("sex"), age, tuple(chosen), results, fc, anomalies, info)
if not recs.available:
    st.info(recs.message)
elif recs.frame.empty:
    st.caption("No recommendations.")
else:
    # clinical priority (an actual critical value before a forecast warning), then urgency: the order
    # clinical.recommendations.evaluate_rules returns them in
    for _, rec in recs.frame.iterrows():
        with st.container(border=True):  # in full: a clipped table cell would hide what to consider
            st.markdown(f"**{rec['title']}** · urgency {rec['urgency']}")
            st.markdown(figures.readable_units(rec["text"]).replace("$", "\\$"))  # "$" is text here, not LaTeX
            st.caption(f"Source: {rec['source']}")
    st.caption("Suggestions from the site's rule file for the clinician to consider; not orders.")
