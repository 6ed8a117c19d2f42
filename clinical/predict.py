"""``labtrend predict``: forecasts, anomalies, SHAP explanations and recommendations for one patient, stored.

:func:`predict_patient` is the whole pipeline, as plain Python for the CLI and the dashboard:

1. the patient's timeline and demographics from the store; ``at`` defaults to **one day
   after the patient's last result** (exports are retrospective - MIMIC-IV dates are shifted
   into the 2100s - so the wall clock would be meaningless; pass ``at`` for "now");
2. forecasts at ``at`` for the patient's ``top_n`` analytes with the most valid results
   before ``at`` that the model knows (from results collected strictly before ``at``);
3. anomalies over the whole history before ``at``; the model rules (model surprise, and
   multivariate inconsistency when a pretraining model is given) only over the last
   ``model_window_days`` days, since they cost one model row per result time;
4. a SHAP explanation of each forecast that has one (:func:`model.explain.explain_forecast`);
5. recommendations from the rule file;
6. every item stored in ``model_outputs`` (idempotent upsert) with its deterministic id; the
   patient's unreviewed rule-based anomalies before ``at`` that this evaluation no longer
   produces (an earlier rule version's) are removed (``stored['superseded']``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clinical import outputs as out_mod
from clinical.anomalies import ClinicalReference, default_reference, detect_anomalies, history_from_timeline
from clinical.recommendations import RuleSet, evaluate_rules, load_rules
from data import queries
from data.db import Store
from model import MIN_HISTORY

__all__ = ["default_at", "top_analytes_for", "predict_patient", "patient_outputs", "replay_forecasts", "PatientNotFound"]


class PatientNotFound(LookupError):
    """The patient id is not in the store."""


def default_at(timeline: pd.DataFrame) -> pd.Timestamp:
    """One day after the patient's last result (see the module docstring)."""
    if timeline.empty:
        raise ValueError("the patient has no results: give the forecast time explicitly")
    return pd.Timestamp(timeline["collected_at"].max()) + pd.Timedelta(days=1)


def top_analytes_for(history: pd.DataFrame, vocab, n: int) -> list[str]:
    """Analytes with the most results in ``history`` that ``vocab`` knows and that have enough history.

    Analyser serum indices (``data/reference/serum_indices.csv``, e.g. the haemolysis index
    reported with every chemistry specimen) describe the specimen, not the patient, and are
    never chosen, however often they were reported.
    """
    from data.catalogue import load_serum_indices

    indices = {code for code, _ in load_serum_indices()}
    counts = history["analyte_code"].value_counts()
    known = np.array([c in vocab and c not in indices for c in counts.index], dtype=bool)
    counts = counts[known & (counts.to_numpy() >= MIN_HISTORY)]
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [c for c, _ in ranked[:n]]


def _items(records: list[dict]) -> list[dict]:
    return [{"output_id": r["output_id"], "kind": r["kind"], "patient_id": r["patient_id"],
             "analyte_code": r["analyte_code"], "time": out_mod._jsonable(r["output_time"]),
             "model_version": r["model_version"], **r["payload"]} for r in records]


def predict_patient(
    store: Store,
    pipeline,
    patient_id: str,
    at=None,
    *,
    top_n: int = 5,
    explain: bool = True,
    masked_predictor=None,
    reference: ClinicalReference | None = None,
    rules: RuleSet | None = None,
    model_window_days: float | None = 30.0,
    save: bool = True,
) -> dict:
    """Everything ``labtrend predict --json`` prints (and stores) for one patient.

    Returns ``{"patient_id", "model_version", "at", "forecasts", "anomalies",
    "explanations", "recommendations", "notes", "stored"}``; each item carries its
    ``output_id``. Raises :class:`PatientNotFound` for an unknown patient.
    """
    info = queries.patient_info(store, patient_id)
    if info is None:
        raise PatientNotFound(f"no patient {patient_id!r} in the store")
    timeline = queries.timeline(store, info["patient_id"])
    result = patient_outputs(pipeline, info, timeline, at, top_n=top_n, explain=explain,
                             masked_predictor=masked_predictor, reference=reference, rules=rules,
                             model_window_days=model_window_days)
    records, supersede = result.pop("records"), result.pop("supersede")
    if save:
        with store.write() as cur:  # the outputs and the removal of what they supersede: one transaction
            stored = out_mod.upsert_outputs(cur, records) if records else {"inserted": 0, "updated": 0, "unchanged": 0}
            stored["superseded"] = prune_patient(cur, info["patient_id"], supersede)
        result["stored"] = stored
    else:
        result["stored"] = None
    return result


def prune_patient(cur, patient_id: str, supersede: dict) -> int:
    """Remove the patient's unreviewed outputs that :func:`patient_outputs`'s ``supersede`` says are stale
    (:func:`clinical.outputs.prune_superseded_in`, on the caller's write cursor); returns how many."""
    return out_mod.prune_superseded_in(cur, patient_id, supersede["kind"], supersede["keep"],
                                       before=supersede["before"], version_prefix=supersede["version_prefix"])


def patient_outputs(
    pipeline,
    info: dict,
    timeline: pd.DataFrame,
    at=None,
    *,
    top_n: int = 5,
    explain: bool = True,
    masked_predictor=None,
    reference: ClinicalReference | None = None,
    rules: RuleSet | None = None,
    model_window_days: float | None = 30.0,
) -> dict:
    """The outputs of one patient from what the store holds, without touching the store (pure).

    ``info``: :func:`data.queries.patient_info`; ``timeline``: :func:`data.queries.timeline`
    of that patient. Returns what :func:`predict_patient` returns, less ``stored``, plus
    ``records``: the ``model_outputs`` records (:mod:`clinical.outputs`) to store, and ``supersede``: which
    stored outputs those records replace (:func:`prune_patient` removes them in the same transaction). The batch
    job (``labtrend score``) computes this in its workers and stores the records in one
    writer. Raises ``ValueError`` when the patient has no result and ``at`` is not given.
    """
    patient_id = info["patient_id"]  # the id as stored (typed with a stray space or invisible character)
    ref = reference or default_reference()
    rs = rules or load_rules()
    at = pd.Timestamp(at) if at is not None else default_at(timeline)
    before = timeline[timeline["collected_at"] < at]
    history = history_from_timeline(before, info)
    notes: list[str] = []

    # forecasts
    codes = top_analytes_for(history, pipeline.vocab, top_n)
    if not codes:
        notes.append(f"no analyte with at least {MIN_HISTORY} results known to model {pipeline.model_version}")
    q = pd.DataFrame({"patient_id": [str(patient_id)] * len(codes), "analyte_code": codes, "at": [at] * len(codes)})
    forecasts = pipeline.forecast(history, q) if codes else pd.DataFrame(columns=["patient_id", "analyte_code", "at"])
    f_recs = out_mod.forecast_outputs(forecasts, history, calibrated=pipeline.conformal is not None) if codes else []
    if codes:
        forecasts = forecasts.assign(output_id=[r["output_id"] for r in f_recs])

    # anomalies
    since = at - pd.Timedelta(days=model_window_days) if model_window_days is not None else None
    anomalies = detect_anomalies(before, info, forecaster=pipeline, masked_predictor=masked_predictor, reference=ref,
                                 model_rules_since=since)
    notes += list(anomalies.attrs.get("notes", []))
    a_recs = out_mod.anomaly_outputs(anomalies, ref.version)
    anomalies = anomalies.assign(output_id=[r["output_id"] for r in a_recs])

    # explanations: the history is prepared once for all of the patient's forecasts
    e_recs = []
    if explain and codes:
        from model.explain import explain_forecasts

        ok = [i for i, s in enumerate(forecasts["status"]) if s == "ok"]
        if ok:
            sel = forecasts.iloc[ok]
            expl = explain_forecasts(pipeline, history, sel[["patient_id", "analyte_code", "at"]],
                                     forecast_medians=[float(v) for v in sel["q50"]])
            e_recs = out_mod.explanation_outputs(expl, [f_recs[i]["output_id"] for i in ok])

    # recommendations
    recs = evaluate_rules(before, info, at=at, forecasts=forecasts if codes else None, anomalies=anomalies,
                          rules=rs, reference=ref)
    r_recs = out_mod.recommendation_outputs(recs)

    records = f_recs + a_recs + e_recs + r_recs
    # rule-based anomalies are recomputed from the whole history before `at`: unreviewed ones an earlier rule
    # version stored and this evaluation no longer produces leave the review queue when these records are stored
    supersede = {"kind": "anomaly", "version_prefix": "rules-", "before": at,
                 "keep": [r["output_id"] for r in a_recs if str(r["model_version"]).startswith("rules-")]}
    return {
        "patient_id": str(patient_id),
        "model_version": pipeline.model_version,
        "at": at.isoformat(),
        "forecasts": _items(f_recs),
        "anomalies": _items(a_recs),
        "explanations": _items(e_recs),
        "recommendations": _items(r_recs),
        "notes": notes,
        "records": records,
        "supersede": supersede,
    }


def replay_forecasts(
    store: Store,
    pipeline,
    patient_id: str,
    *,
    n_times: int = 10,
    top_n: int = 5,
    save: bool = True,
) -> list[dict]:
    """Forecasts the model would have made at the patient's last ``n_times`` collection times.

    Each forecast time is the collection time of one of the patient's specimens; the forecast
    for each of the ``top_n`` analytes uses only the results collected strictly before it,
    exactly as :func:`predict_patient` does, so the result collected at that time is its
    realised target. Used to give model monitoring forecasts whose targets have arrived from a
    retrospective export (and to let experts review forecasts against what happened). The
    payload carries ``"retrospective": true``.

    Returns the stored forecast records. Raises :class:`PatientNotFound` for an unknown patient.
    """
    info = queries.patient_info(store, patient_id)
    if info is None:
        raise PatientNotFound(f"no patient {patient_id!r} in the store")
    patient_id = info["patient_id"]  # the id as stored (typed with a stray space or invisible character)
    timeline = queries.timeline(store, patient_id)
    history = history_from_timeline(timeline, info)
    codes = top_analytes_for(history, pipeline.vocab, top_n)
    if not codes:
        return []
    # times at which at least one of these analytes was measured, after enough history
    h = history[history["analyte_code"].isin(codes)]
    rank = h.groupby("analyte_code").cumcount()
    times = sorted(set(h.loc[rank >= MIN_HISTORY, "collected_at"]))[-n_times:]
    rows = [(str(patient_id), c, t) for t in times for c in codes]
    if not rows:
        return []
    q = pd.DataFrame(rows, columns=["patient_id", "analyte_code", "at"])
    forecasts = pipeline.forecast(history, q)
    recs = out_mod.forecast_outputs(forecasts, history, calibrated=pipeline.conformal is not None)
    for r in recs:
        r["payload"]["retrospective"] = True  # the output id does not depend on the payload
    if save:
        out_mod.store_outputs(store, recs)
    return recs
