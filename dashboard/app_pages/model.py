"""Model: the model card (evaluation, methods side by side, baselines, subgroups, calibration) and monitoring."""

import pandas as pd
import streamlit as st

from dashboard import auth, figures, services, state

user = auth.require_page("model")
st.title("Forecasting model")

status = state.model_status()
if status.available:
    st.success(status.message)
else:
    st.info(status.message)

card = services.load_model_card(status.path or state.model_dir())
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
    facts = [f"{k.capitalize()}: {meta[k]}" for k in ("dataset", "split", "date") if meta.get(k)]
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
st.info("Monitoring appears here once forecasts are stored as model outputs: per analyte and month, the error of "
        "forecasts against the results that arrived later (with the last-value baseline), drift of each input "
        "analyte against the training data, and the experts' 'valid' rate with its agreement statistic.")
