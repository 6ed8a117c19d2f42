"""Model: the model card (evaluation, methods side by side, baselines, subgroups, calibration) and monitoring."""

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import auth, figures, services, state
from model import monitoring

user = auth.require_page("model")
st.title("Forecasting model")

status = state.model_status()
if status.available:
    st.success(status.message)
else:
    st.info(status.message)

# with a model server the card is read from the local model folder ($LABTREND_MODEL), when there is one
card = services.load_model_card(status.path if status.path and Path(status.path).is_dir() else state.model_dir())
st.header("Model card")
if card is None:
    st.info("No model card yet: `model_card.json` is written into the model folder by the evaluation "
            "(model.evaluation.write_model_card). It will show the evaluation table, full fine-tuning against the "
            "baselines, subgroups and calibration.")
else:
    st.markdown(f"**{card.get('statement', '')}**")
    methods = card.get("methods") or {}
    ranking = card.get("ranking") or list(methods)
    meta = card.get("meta") or {}
    facts = [f"{k.capitalize()}: {meta[k]}" for k in ("dataset", "split", "date", "note") if meta.get(k)]
    if facts:
        st.caption(" · ".join(facts))

    st.subheader("Overall (count-weighted over analytes)")
    cols = ["n_targets", "nmae", "nmae_trimmed", "mdape", "npinball", "coverage80", "coverage90", "nwidth80",
            "wins_vs_last_value", "failed_forecasts"]
    overall = pd.DataFrame([{"method": n, **{c: (methods[n].get("overall") or {}).get(c) for c in cols}}
                            for n in ranking if n in methods])
    st.dataframe(overall, hide_index=True, width="stretch", key="model_overall", column_config={
        "method": st.column_config.TextColumn("Method", pinned=True),
        "nmae": st.column_config.NumberColumn("NMAE", format="%.4f", help="MAE / (p99 - p1) of the analyte"),
        "nmae_trimmed": st.column_config.NumberColumn("NMAE trimmed", format="%.4f"),
        "mdape": st.column_config.NumberColumn("MdAPE %", format="%.2f"),
        "npinball": st.column_config.NumberColumn("Pinball (norm.)", format="%.4f"),
        "coverage80": st.column_config.NumberColumn("80% coverage", format="%.3f"),
        "coverage90": st.column_config.NumberColumn("90% coverage", format="%.3f"),
        "nwidth80": st.column_config.NumberColumn("80% width (norm.)", format="%.4f"),
        "wins_vs_last_value": st.column_config.NumberColumn("Analytes better than last value"),
    })
    ref = card.get("reference_figures") or {}
    if ref.get("count_weighted_nmae"):
        st.caption(f"Reference figures ({ref.get('source', '')}, {ref.get('dataset', '')}): "
                   + ", ".join(f"{k} {v:.4f}" for k, v in ref["count_weighted_nmae"].items()))

    st.subheader("NMAE per analyte, methods side by side")
    names = meta.get("analyte_names") or {}
    per = {}
    for n in ranking:
        recs = pd.DataFrame((methods.get(n) or {}).get("per_analyte") or [])
        if not recs.empty:
            per[n] = recs.set_index("analyte_code")["nmae"]
    if per:
        side = pd.DataFrame(per)
        side.insert(0, "analyte", [f"{c} {names.get(c, '')}".strip() for c in side.index])
        side["best"] = side[list(per)].idxmin(axis=1)
        st.dataframe(side.reset_index(drop=True), hide_index=True, width="stretch", key="model_per_analyte",
                     column_config={n: st.column_config.NumberColumn(n, format="%.4f") for n in per})

    st.subheader("Subgroups")
    groups = sorted({g for n in ranking for g in ((methods.get(n) or {}).get("subgroups") or {})})
    st.caption("Count-weighted NMAE of each method within each subgroup (lower is better); n = targets.")
    for g in groups:
        table = None
        for n in ranking:
            recs = pd.DataFrame(((methods.get(n) or {}).get("subgroups") or {}).get(g) or [])
            if recs.empty:
                continue
            recs = recs.set_index(g)
            if table is None:
                table = recs[["n"]].copy()
            table[n] = recs["nmae"]
        if table is not None:
            st.markdown(f"By **{g.replace('_', ' ')}**")
            st.dataframe(table.reset_index(), hide_index=True, width="stretch", key=f"model_sub_{g}",
                         column_config={n: st.column_config.NumberColumn(n, format="%.4f") for n in ranking})

    st.subheader("Calibration")
    st.plotly_chart(figures.make_calibration_plot(card), width="content", key="model_calibration")

st.header("Monitoring")
st.caption("How the deployed model does on the results that arrived after its forecasts, whether the data it "
           "sees has moved away from what it was trained on, and what the experts say about its outputs.")
period = st.selectbox("Period", list(monitoring.PERIODS), format_func=lambda p: monitoring.PERIODS[p].capitalize(),
                      key="monitor_period")
mon = state.monitoring_data(period)
for note in mon.notes:
    st.info(note)
names = mon.names

st.subheader("Realised error of forecasts whose targets have arrived")
if mon.matched.empty:
    st.caption(f"{len(mon.forecasts)} forecast(s) stored; none scored yet.")
else:
    per = mon.errors[mon.errors["analyte_code"] != "all"]
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Forecasts scored", f"{len(mon.matched)} of {len(mon.forecasts)}")
    c4.metric("Skill vs last value", f"{mon.skill:+.2f}", help="1 − Σ|error model| / Σ|error last value|; "
              "above 0 the model beats carrying the last result forward")
    c2.metric("80% interval coverage", f"{mon.matched['in80'].mean():.2f}", help="Target 0.80")
    sums = mon.matched.groupby("analyte_code")[["abs_error", "abs_error_last_value"]].sum()
    wins = sums["abs_error"] < sums["abs_error_last_value"]
    c3.metric("Analytes where the model beats last value", f"{int(wins.sum())} of {len(wins)}")
    st.plotly_chart(figures.make_monitoring_skill_chart(mon.errors, names), width="stretch", key="monitor_skill")
    table = per.copy()
    table.insert(1, "analyte", [names.get(c, c) for c in table["analyte_code"]])
    st.dataframe(table, hide_index=True, width="stretch", key="monitor_errors", column_config={
        "analyte_code": "Code", "analyte": "Analyte", "period": "Period", "n": "Forecasts",
        "mae": st.column_config.NumberColumn("MAE model", format="%.3g", help="canonical unit of the analyte"),
        "mae_last_value": st.column_config.NumberColumn("MAE last value", format="%.3g"),
        "skill": st.column_config.NumberColumn("Skill", format="%.2f", help="1 − MAE model / MAE last value"),
        "coverage80": st.column_config.NumberColumn("80% coverage", format="%.2f"),
        "coverage95": st.column_config.NumberColumn("95% coverage", format="%.2f"),
    })

st.subheader("Input drift")
if mon.drift.empty:
    st.caption("No analyte has enough results in a period to compare with the training data (at least 30 results "
               "from at least 5 patients; in an export whose dates are shifted per patient, such as MIMIC-IV, a "
               "period mostly holds one patient and says nothing about drift).")
else:
    st.plotly_chart(figures.make_drift_heatmap(mon.drift, names, monitoring.DRIFT_SHIFT_SD), width="stretch",
                    key="monitor_drift")
    drifted = mon.drift[mon.drift["drifted"]]
    st.caption(f"{len(drifted)} analyte-period(s) with the median shifted by at least {monitoring.DRIFT_SHIFT_SD} "
               "training SDs. Consider re-checking the analyser calibration, the unit mapping of new imports, or "
               "a change in case mix before trusting the forecasts for those analytes.")

st.subheader("Experts' verdicts")
if mon.verdicts.empty:
    st.caption("No verdicts yet: experts review outputs on the Review page.")
else:
    st.dataframe(mon.verdicts, hide_index=True, width="stretch", key="monitor_verdicts", column_config={
        "kind": "Output kind", "period": "Period", "n": "Verdicts",
        "valid_rate": st.column_config.NumberColumn("Valid", format="%.2f"),
        "invalid_rate": st.column_config.NumberColumn("Invalid", format="%.2f"),
        "unsure_rate": st.column_config.NumberColumn("Unsure", format="%.2f"),
    })

st.subheader("Agreement between experts")
stats = state.agreement()
agreement = figures.agreement_table(stats[stats["n_items_multi"] > 0] if len(stats) else stats)
if agreement.empty:
    st.caption("No output has verdicts from two experts yet: agreement needs at least two experts judging the same "
               "outputs on the Review page.")
else:
    st.dataframe(agreement, hide_index=True, width="stretch", key="model_agreement")
    st.caption("Per output kind, over each expert's current verdict; 95 % confidence intervals in brackets (Gwet 2014). "
               "Low agreement on a kind of output means its verdicts are a weak signal for monitoring. Cohen's κ needs "
               "exactly two experts; when nearly every output is valid, κ can be near 0 despite high agreement (the "
               "kappa paradox); AC1 is not affected.")
