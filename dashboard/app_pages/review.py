"""Review (experts): a verdict on each model output, with the evidence beside it.

Each card shows the output, when the result was collected (or what time it forecasts), the
rule with its numbers, the analyte's chart around it (+-7 days, the result it is about ringed,
the reference band) and a link to the patient's timeline. A verdict takes one click or one
key (V valid, I invalid, U unsure); the comment is optional; the next output shows at once.

Saving (UI-17, issue 14 point 3): the output on screen and a fresh submission id are fixed in
``st.session_state`` *before* the card is drawn, and each verdict button carries exactly that
output id and submission id (keyed by the output id, so a click can never land on the next
card). The button's callback stores the verdict with ``only_if_pending``: a double click, a
click during a rerun or the same output open in two tabs stores one verdict, and the page says
which happened.
"""

import pandas as pd
import streamlit as st

from dashboard import auth, figures, period as periods, review_card, services, state
from data.catalogue import load_catalogue

CURRENT = "review_current"  # {"output": snapshot of the row on screen, "submission_id": ...}
SAVED = "review_saved"  # output ids this session has saved
FLASH = "review_flash"  # (kind, message) of the last save, shown on the next run
KEYS = {"valid": "V", "invalid": "I", "unsure": "U"}
ICONS = {"valid": ":material/check_circle:", "invalid": ":material/cancel:", "unsure": ":material/help:"}

user = auth.require_page("review")
st.title("Expert review")
st.caption("Judge each model output: is it clinically valid? Your verdict and comment are stored with your name "
           "and role, and every verdict is kept.")

db = state.db_path()
store = state.get_store(db)
backend = services.review_backend()


def _scoring_panel() -> None:
    """Where the batch job stands: the last run, the patients waiting, and a button to score them now."""
    status = services.scoring_status(store, state.model_dir())
    info = status.extra
    last = info.get("last_run")
    job = state.scoring_jobs().get(state.db_path())
    running = job is not None and job.poll() is None
    parts = ["it has not run on this database yet"]
    if last is not None:
        parts = []
        when = pd.Timestamp(last["started_at"]).strftime("%Y-%m-%d %H:%M")
        parts.append(f"last run {when} UTC: {int(last['scored'])} of {int(last['selected'])} patients scored"
                     + (f", {int(last['failed'])} failed" if int(last["failed"]) else "")
                     + (" (running)" if info.get("running") else ""))
    if status.available and info.get("waiting") is not None:
        parts.append(f"{info['waiting']} patient(s) with results newer than their stored outputs")
    st.caption("Outputs are computed for every patient by the batch job (labtrend score): " + "; ".join(parts) + ".")
    if not status.available:
        return
    if running:
        st.info("Computing outputs for the patients with new results; the queue fills as each batch is stored.")
        if st.button("Refresh", key="review_scoring_refresh"):
            st.rerun()
    elif info.get("waiting") and st.button(f"Compute outputs for the {info['waiting']} waiting patient(s)",
                                          key="review_scoring_start"):
        from labtrend import settings

        proc = services.start_scoring(state.db_path(), state.model_dir(), settings.VAR_DIR / "scoring.log")
        state.scoring_jobs()[state.db_path()] = proc
        auth.record("score", detail={"pid": proc.pid, "waiting": int(info["waiting"])})
        st.rerun()


_scoring_panel()
queue = services.pending_outputs(store, user.username)

if backend is None:
    if queue.frame.empty:
        st.info(queue.message or "No model outputs to review yet.")
    else:
        st.warning(queue.message)
        st.dataframe(queue.frame, hide_index=True, width="stretch", key="review_readonly")
    st.stop()

_NAMES = {a.code: a.name for a in load_catalogue()}


def _link(patient_id, analyte, t) -> str:
    return periods.timeline_link(patient_id, [analyte] if analyte else None, around=t)


def _said(row: dict) -> str:
    """The queue's one-line summary of an output; a forecast's median at the analyte's reporting precision."""
    if row.get("kind") == "forecast" and row.get("predicted_value") is not None and not pd.isna(row["predicted_value"]):
        d = state.reporting_decimals(db, state.data_version(db), str(row["patient_id"])).get(str(row.get("analyte_code")))
        return (f"forecast median {figures.fmt_value(row['predicted_value'], d)} "
                f"{figures.display_unit(row.get('unit'))}").rstrip()
    return figures.readable_units(row.get("summary") or "")


def _agreement() -> None:
    st.subheader("Agreement between experts")
    stats = state.agreement()
    table = figures.agreement_table(stats[stats["n_items_multi"] > 0] if len(stats) else stats)
    if table.empty:
        st.caption("No output has verdicts from two experts yet.")
        return
    st.dataframe(table, hide_index=True, width="stretch", key="review_agreement")
    st.caption("Per output kind, over each expert's current verdict; 95 % confidence intervals in brackets (Gwet 2014). "
               "Cohen's κ needs exactly two experts; Fleiss' κ and AC1 take any number (outputs judged by at least "
               "two count). When nearly every output is valid, κ can be near 0 despite high agreement (the kappa "
               "paradox); AC1 is not affected.")


def _my_verdicts() -> None:
    """This expert's current verdict on each output they judged, newest first (read from the store on every run)."""
    current_verdicts = getattr(backend, "current_verdicts", None)
    if current_verdicts is None:
        return
    st.subheader("Your verdicts")
    mine = current_verdicts(store)
    mine = mine[mine["annotator"] == user.username].sort_values("created_at", ascending=False)
    if mine.empty:
        st.caption("You have not given a verdict yet.")
        return
    mine = mine.assign(comment=mine["comment"].fillna(""), analyte=[_NAMES.get(c, c) if isinstance(c, str) else "" for c in mine["analyte_code"]],
                       timeline=[periods.timeline_link(p, [c] if isinstance(c, str) else None)
                                 for p, c in zip(mine["patient_id"], mine["analyte_code"])])
    st.caption(f"{len(mine)} output(s) judged: your latest verdict on each (earlier ones are kept). Times in UTC.")
    box = st.container(key="review_mine_box")  # keyed: a stable hook for the browser test
    box.dataframe(mine[["created_at", "patient_id", "kind", "analyte", "verdict", "comment", "n_verdicts", "timeline",
                        "output_id"]],
                  hide_index=True, width="stretch", key="review_mine", row_height=56, column_config={
                      "created_at": st.column_config.DatetimeColumn("When (UTC)", format="YYYY-MM-DD HH:mm"),
                      "patient_id": st.column_config.TextColumn("Patient"),
                      "kind": st.column_config.TextColumn("Output"), "analyte": st.column_config.TextColumn("Analyte"),
                      "verdict": st.column_config.TextColumn("Verdict"),
                      "comment": st.column_config.TextColumn("Comment", width="medium"),
                      "n_verdicts": st.column_config.NumberColumn("Verdicts", help="Verdicts you gave on this output, "
                                                                                   "including earlier ones"),
                      "timeline": st.column_config.LinkColumn("Timeline", display_text="open"),
                      "output_id": st.column_config.TextColumn("Output id", width="medium")})


saved: set = st.session_state.setdefault(SAVED, set())
pending = queue.frame[~queue.frame["output_id"].astype(str).isin(saved)]
current = st.session_state.get(CURRENT)
if current is None or str(current["output"]["output_id"]) in saved:
    current = None
    if len(pending):
        new_id = getattr(backend, "new_submission_id", None)
        current = {"output": pending.iloc[0].to_dict(), "submission_id": new_id() if new_id else None}
    st.session_state[CURRENT] = current

flash = st.session_state.pop(FLASH, None)
if flash:
    getattr(st, flash[0])(flash[1])

if current is None:
    st.info("Nothing left to review. Thank you.")
    _agreement()
    _my_verdicts()
    st.stop()


def _judge(output_id: str, submission_id: str | None, verdict: str, comment_key: str, patient_id: str) -> None:
    """Button callback: store this verdict on the output the button was drawn for (runs before the page)."""
    comment = (st.session_state.get(comment_key) or "").strip() or None
    try:
        result = backend.record_verdict(store, output_id, user.username, user.role_label, verdict, comment=comment,
                                        submission_id=submission_id, only_if_pending=True)
    except ValueError as exc:
        st.session_state[FLASH] = ("error", f"Not saved: {exc}")
        return
    st.session_state[SAVED].add(output_id)
    st.session_state[CURRENT] = None  # the next output, at once
    if result.created:
        auth.record("verdict", patient_id=str(patient_id),
                    detail={"output_id": output_id, "verdict": verdict, "submission_id": submission_id})
        st.session_state[FLASH] = ("success", f"Saved: {output_id} is {verdict}.")
    elif result.submission_id == submission_id:  # the same click again: a double click, a click during a rerun
        st.session_state[FLASH] = ("success", f"Saved once: {output_id} is {result.verdict}; the repeated click "
                                              "added nothing.")
    else:
        st.session_state[FLASH] = ("info", f"{output_id} was already judged **{result.verdict}** by you (in another "
                                           "tab or window); nothing added.")


out = current["output"]
oid = str(out["output_id"])
st.caption((f"{len(pending)} or more outputs waiting for your verdict; the {len(pending)} most important are listed"
            if len(pending) >= 500 else f"{len(pending)} output(s) waiting for your verdict")
           + ", most important first.")

pid = str(out.get("patient_id"))
version = state.data_version(db)
info = state.patient_info(db, version, pid) or {}
raw = state.timeline(db, version, pid)
results = state.results_with_limits(db, version, pid, info.get("sex"),
                                    services.age_years(info, raw["collected_at"].max() if len(raw) else None))
decimals = state.reporting_decimals(db, version, pid)
dec = decimals.get(str(out.get("analyte_code")))
label, at = review_card.when(out)
kind = str(out.get("kind") or "output")

with st.container(border=True, key="review_card"):
    left, right = st.columns([1, 1.5], gap="medium")
    with left:
        st.markdown(f"**{kind.capitalize()}** · priority {out.get('priority', '?')}: {out.get('priority_reason') or ''}")
        what = out.get("analyte_name") or _NAMES.get(out.get("analyte_code"), out.get("analyte_code")) or ""
        st.markdown(f"Patient **{pid}**" + (f" · {what}" if what else ""))
        if at is not None:
            st.markdown(f"{label} **{at:%Y-%m-%d %H:%M}**")
        if out.get("summary") and kind != "forecast":  # a forecast's numbers are in the lines below, rounded
            st.markdown("> " + figures.readable_units(out["summary"]).replace("$", "\\$"))
        for line in review_card.evidence_lines(out, dec):
            text = figures.readable_units(line).replace("$", "\\$")
            (st.caption if line.startswith("Source:") else st.markdown)(text)
        model = str(out.get("model_version") or "")
        st.caption(f"Output `{oid}` · " + (f"rule set {model}" if model.startswith("rules-") else f"model {model}"))
        st.page_link("app_pages/timeline.py", label="Open the timeline around this output", icon=":material/monitoring:",
                     query_params={k: v for k, v in [("patient", pid), ("analyte", out.get("analyte_code") or None),
                                                     ("period", periods.around_period(at) if at is not None else None)]
                                   if v})
    with right:
        codes = review_card.chart_analytes(out, results)
        window = (at - pd.Timedelta(days=7), at + pd.Timedelta(days=7)) if at is not None else None
        near = results[results["analyte_code"].isin(codes) & results["collected_at"].between(*window)] \
            if codes and window is not None else results.iloc[0:0]
        if len(near):
            fig = figures.make_timeline_figure(results, codes, forecasts=review_card.forecast_frame(out),
                                               date_range=window, decimals=decimals,
                                               highlight=review_card.result_ids(out), marker_at=at, row_height=190)
            fig.update_layout(margin=dict(l=10, r=20, t=60, b=30))
            st.plotly_chart(fig, width="stretch", key=f"review_chart_{oid}",
                            config={"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]})
            st.caption("± 7 days around the output (dashed line); the result it is about is ringed in black; "
                       "shaded: reference interval.")
        else:
            st.caption(f"No stored result of {out.get('analyte_name') or 'this analyte'} for patient {pid} within "
                       "± 7 days of this output: nothing to chart beside it.")
        expl = review_card.explanation_dict(out)
        if expl is not None:
            try:
                st.plotly_chart(figures.make_shap_bar(dict(expl, analyte_name=out.get("analyte_name") or ""),
                                                      decimals=dec), width="stretch", key=f"review_shap_{oid}")
            except ValueError as exc:  # attributions that do not add up are not drawn (XAI-15)
                st.caption(str(exc))

    comment_key = f"review_comment_{oid}"
    st.text_area("Comment (optional): type it first, then choose the verdict", key=comment_key, max_chars=2000,
                 height=68)
    verdicts = [v for v in getattr(backend, "VERDICTS", ("valid", "invalid", "unsure")) if v in KEYS]
    cols = st.columns(len(verdicts) + 2)
    for col, v in zip(cols, verdicts):
        col.button(f"{v.capitalize()}", key=f"review_{v}_{oid}", shortcut=KEYS[v], icon=ICONS[v],
                   type="primary" if v == "valid" else "secondary", width="stretch",
                   on_click=_judge, args=(oid, current["submission_id"], v, comment_key, pid),
                   help=f"Save '{v}' for this output and show the next one (key {KEYS[v]})")
    st.caption("One click or one key saves and shows the next output: **V** valid, **I** invalid, **U** unsure "
               "(keys work when the cursor is not in the comment box).")

with st.expander(f"Review queue: {len(pending)} waiting, most important first"):
    view = pd.DataFrame({
        "Priority": pending["priority"] if "priority" in pending else None,
        "Why it is here": pending.get("priority_reason"),
        "Patient": pending["patient_id"],
        "Analyte": pending.get("analyte_name"),
        "Output": pending["kind"],
        "Rule": [figures.rule_label(r) if k == "anomaly" else r for k, r in zip(pending["kind"], pending["rule"])],
        "Time": pending["output_time"],
        "What it says": [_said(r) for r in pending.to_dict("records")],
        "Timeline": [_link(p, c if isinstance(c, str) else None, t)
                     for p, c, t in zip(pending["patient_id"], pending["analyte_code"], pending["output_time"])],
    })
    st.dataframe(view, hide_index=True, width="stretch", key="review_queue", row_height=56, column_config={
        "Priority": st.column_config.NumberColumn("Priority", help="1 first: critical values and urgent recommendations"),
        "Why it is here": st.column_config.TextColumn("Why it is here", width="medium"),
        "Time": st.column_config.DatetimeColumn("Time", format="YYYY-MM-DD HH:mm",
                                                help="Collection time; for a forecast, the time it forecasts"),
        "What it says": st.column_config.TextColumn("What it says", width="large"),
        "Timeline": st.column_config.LinkColumn("Timeline", display_text="open", help="± 7 days around the output"),
    })

_agreement()
_my_verdicts()
