"""Review (experts): a verdict on each model output, one at a time (UI-17).

The output on screen and a fresh submission id are fixed in ``st.session_state`` *before*
the form is drawn; the submit handler stores exactly that output id with that submission
id (never a fresh "next pending" lookup), so a double click or a rerun writes one row
(``clinical.outputs.record_verdict`` is idempotent per submission). The form's widgets are
keyed by the output id, so after a save the next output shows with an empty form.
"""

import pandas as pd
import streamlit as st

from dashboard import auth, figures, services, state
from data.catalogue import load_catalogue

CURRENT = "review_current"  # {"output": snapshot of the row on screen, "submission_id": ...}
SAVED = "review_saved"  # output ids this session has saved

user = auth.require_page("review")
st.title("Expert review")
st.caption("Judge each model output: is it clinically valid? Your verdict and comment are stored with your name "
           "and role, and every verdict is kept.")

store = state.get_store(state.db_path())
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
    names = {a.code: a.name for a in load_catalogue()}
    mine = mine.assign(analyte=[names.get(c, c) if isinstance(c, str) else "" for c in mine["analyte_code"]])
    st.caption(f"{len(mine)} output(s) judged: your latest verdict on each (earlier ones are kept). Times in UTC.")
    box = st.container(key="review_mine_box")  # keyed: a stable hook for the browser test
    box.dataframe(mine[["created_at", "patient_id", "kind", "analyte", "verdict", "comment", "n_verdicts", "output_id"]],
                  hide_index=True, width="stretch", key="review_mine", column_config={
                      "created_at": st.column_config.DatetimeColumn("When (UTC)", format="YYYY-MM-DD HH:mm"),
                      "patient_id": "Patient", "kind": "Output", "analyte": "Analyte", "verdict": "Verdict",
                      "comment": st.column_config.TextColumn("Comment", width="large"),
                      "n_verdicts": st.column_config.NumberColumn("Verdicts given", help="Including earlier ones"),
                      "output_id": "Output id"})


saved: set = st.session_state.setdefault(SAVED, set())
pending = queue.frame[~queue.frame["output_id"].astype(str).isin(saved)]
current = st.session_state.get(CURRENT)
if current is None or str(current["output"]["output_id"]) in saved:
    current = None
    if len(pending):
        new_id = getattr(backend, "new_submission_id", None)
        current = {"output": pending.iloc[0].to_dict(), "submission_id": new_id() if new_id else None}
    st.session_state[CURRENT] = current

flash = st.session_state.pop("review_flash", None)
if flash:
    st.success(flash)

if current is None:
    st.info("Nothing left to review. Thank you.")
    _my_verdicts()
    st.stop()

out = current["output"]
oid = str(out["output_id"])
st.caption((f"{len(pending)} or more outputs waiting for your verdict; the {len(pending)} most important are listed"
            if len(pending) >= 500 else f"{len(pending)} output(s) waiting for your verdict")
           + ", most important first.")
queue_cols = [c for c in ("priority", "priority_reason", "patient_id", "analyte_name", "kind", "rule", "output_time",
                          "summary") if c in pending]
with st.expander("Review queue (priority 1 first: critical values and urgent recommendations)"):
    queue_view = pending[queue_cols].copy()
    if "rule" in queue_view:  # anomaly rules by name, not code
        queue_view["rule"] = [figures.rule_label(r) if k == "anomaly" else r
                              for k, r in zip(pending["kind"], pending["rule"])]
    if "summary" in queue_view:
        queue_view["summary"] = queue_view["summary"].map(figures.readable_units)
    st.dataframe(queue_view, hide_index=True, width="stretch", key="review_queue")  # the service's order
with st.container(border=True):
    kind = out.get("kind") or "output"
    st.markdown(f"**{str(kind).capitalize()}** `{oid}`")
    what = out.get("analyte_name") or out.get("analyte_code") or ""
    line = f"Patient **{out.get('patient_id')}**" + (f" · {what}" if what else "")
    value = out.get("predicted_value")
    if value is not None and not pd.isna(value):
        line += f": **{figures.fmt_value(value)} {figures.display_unit(out.get('unit'))}".rstrip() + "**"
    when = out.get("forecast_for")
    if when is not None and not pd.isna(when):
        line += f" for {pd.Timestamp(when):%Y-%m-%d %H:%M}"
    st.markdown(line)
    if out.get("summary"):
        st.markdown(figures.readable_units(out["summary"]))
    rule = out.get("rule")
    version = str(out.get("model_version") or "")
    facts = [f"priority {out['priority']}: {out['priority_reason']}" if out.get("priority_reason") else "",
             (f"rule: {figures.rule_label(rule)}" if kind == "anomaly" else f"rule {rule}") if rule else "",
             (f"rule set {version}" if version.startswith("rules-") else f"model {version}") if version else ""]
    if any(facts):
        st.caption(" · ".join(f for f in facts if f))

verdicts = list(getattr(backend, "VERDICTS", ("valid", "invalid")))
with st.form("review_form", clear_on_submit=True):
    verdict = st.radio("Verdict", verdicts, index=None, horizontal=True, key=f"review_verdict_{oid}")
    comment = st.text_area("Comment (optional)", key=f"review_comment_{oid}", max_chars=2000)
    submitted = st.form_submit_button("Save verdict", type="primary")

if submitted:
    if verdict is None:
        st.warning("Choose a verdict first.")
    elif oid not in saved:
        try:
            result = backend.record_verdict(store, oid, user.username, user.role_label, verdict,
                                            comment=comment.strip() or None, submission_id=current["submission_id"])
        except ValueError as exc:
            st.error(f"Not saved: {exc}")
            _my_verdicts()
            st.stop()
        saved.add(oid)
        if result:
            auth.record("verdict", patient_id=str(out.get("patient_id")),
                        detail={"output_id": oid, "verdict": verdict, "submission_id": current["submission_id"]})
        st.session_state[CURRENT] = None
        st.session_state["review_flash"] = (f"Saved: {oid} is {verdict}." if result
                                            else f"{oid}: this submission was already saved; nothing added.")
        st.rerun()

_my_verdicts()
