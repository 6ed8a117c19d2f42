"""Stored clinical outputs and expert verdicts (DuckDB tables of ``data/migrations/002_outputs.sql``).

**Outputs.** Every forecast, anomaly, explanation and recommendation is one ``model_outputs``
row with a deterministic id (:func:`output_id`: a hash of kind, patient, analyte, time,
model version, rule and, for anomalies, the result id), so storing it again is an upsert:
an unchanged payload is left alone; a changed one (e.g. a late result changed the forecast)
replaces it and moves ``updated_at``. Each payload says what the output is based on.

**Verdicts.** ``annotations`` is append-only. :func:`record_verdict` is idempotent per
*submission*: the form generates a submission id (:func:`new_submission_id`) when it is
drawn and keeps it with the output id it shows (UI-17); submitting that form twice
(double-click, rerun) writes one row. Without a submission id, a repeat of the same verdict
by the same annotator on the same output within ``dedupe_window_s`` seconds is taken as the
same submission. A later, deliberate verdict is a new row: the **current** verdict of an
annotator on an output is their latest row (highest ``annotation_id``), and the history
stays. Writes go through :meth:`data.db.Store.write` (one writer per process, the DuckDB
file lock across processes), so two experts saving at the same moment both land (UI-18).
Each verdict keeps the payload hash it was given on, so the export shows verdicts given on
an older version of an output.

**Agreement** per output kind over current verdicts (valid / invalid / unsure): raw
agreement, Cohen's kappa (scikit-learn; exactly two annotators), Fleiss' kappa
(statsmodels; three or more, on outputs rated by all of them) and Gwet's AC1 (implemented
here: no maintained PyPI package installs with current scipy/pandas). Kappa is misleading
when nearly every output is valid (the "kappa paradox"); AC1 is not, which is why both are
reported.

**Export** of outputs with their verdicts: CSV with spreadsheet formulas neutralised
(:func:`data.export.write_safe_csv`) or Parquet (typed; text kept exactly as entered).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from data.db import Store
from model import history_basis  # plain Python (no torch): "based on 1 measurement"

__all__ = [
    "OUTPUT_KINDS",
    "VERDICTS",
    "OUTPUT_COLUMNS",
    "output_id",
    "new_submission_id",
    "forecast_outputs",
    "anomaly_outputs",
    "explanation_outputs",
    "recommendation_outputs",
    "store_outputs",
    "load_outputs",
    "VerdictResult",
    "record_verdict",
    "annotation_log",
    "current_verdicts",
    "PRIORITY_TIERS",
    "pending_outputs",
    "gwet_ac1",
    "agreement_stats",
    "agreement",
    "export_frame",
    "export_annotations",
]

OUTPUT_KINDS = ("forecast", "anomaly", "explanation", "recommendation")
VERDICTS = ("valid", "invalid", "unsure")
# what pending_outputs returns (the review page's columns first)
OUTPUT_COLUMNS = ["output_id", "patient_id", "analyte_code", "analyte_name", "kind", "forecast_for", "predicted_value",
                  "unit", "model_version", "status", "output_time", "rule", "summary", "priority", "priority_reason",
                  "payload"]
# Review priority tiers (1 is reviewed first); see pending_outputs for the order within a tier.
PRIORITY_TIERS = {
    1: "critical value, or a recommendation of high urgency",
    2: "pre-analytical pattern, model surprise, multivariate inconsistency, or a recommendation of medium urgency",
    3: "forecast or explanation to validate (and any other output)",
    4: "recommendation of low urgency",
    5: "delta check",
    6: "outside the reference interval",
}


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _time_key(at) -> str:
    if at is None or (not isinstance(at, str) and pd.isna(at)):
        return ""
    ts = pd.Timestamp(at)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%f")


def output_id(kind: str, patient_id, analyte_code, at, model_version, rule=None, key=None) -> str:
    """Deterministic id: ``<kind prefix>-`` + 24 hex digits of SHA-256 over the identifying fields.

    ``key`` separates outputs that share the rest (an anomaly's result id: two conflicting
    results at one time can both fire a rule). Times are compared to the microsecond.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind must be one of {list(OUTPUT_KINDS)}, got {kind!r}")
    parts = [kind, str(patient_id), "" if analyte_code is None else str(analyte_code), _time_key(at),
             "" if model_version is None else str(model_version), "" if rule is None else str(rule),
             "" if key is None else str(key)]
    return f"{kind[:3]}-" + hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:24]


def new_submission_id() -> str:
    """A fresh id for one drawn verdict form (keep it in session state with the output id)."""
    return uuid.uuid4().hex


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if v is None or v is pd.NaT:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, (pd.Timestamp, datetime, np.datetime64)):
        ts = pd.Timestamp(v)
        return None if pd.isna(ts) else ts.isoformat()
    if isinstance(v, (str,)):
        return v
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


def _payload_json(payload: dict) -> str:
    return json.dumps(_jsonable(payload), sort_keys=True, allow_nan=False, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Building output records
# ---------------------------------------------------------------------------------------------


def _record(kind, patient_id, analyte_code, at, model_version, rule, payload, key=None) -> dict:
    oid = output_id(kind, patient_id, analyte_code, at, model_version, rule, key)
    return dict(output_id=oid, kind=kind, patient_id=str(patient_id), analyte_code=analyte_code,
                output_time=None if at is None else pd.Timestamp(at), rule=rule, model_version=str(model_version),
                payload=_jsonable(payload))


def forecast_outputs(forecasts: pd.DataFrame, history: pd.DataFrame | None = None, calibrated: bool | None = None) -> list[dict]:
    """One record per forecast row (the forecasts contract), whatever its status.

    The payload holds the quantiles, unit, status and what the forecast is based on: the
    number of prior results of the analyte, the time of the last one (from ``history``)
    and whether the interval is calibrated.
    """
    recs = []
    times: dict = {}
    if history is not None and len(history):
        h = history.assign(patient_id=history["patient_id"].astype(str), analyte_code=history["analyte_code"].astype(str))
        times = {k: np.sort(g.to_numpy(dtype="datetime64[ns]"))
                 for k, g in h.groupby(["patient_id", "analyte_code"])["collected_at"]}
    for r in forecasts.to_dict("records"):
        at = pd.Timestamp(r["at"])
        t = times.get((str(r["patient_id"]), str(r["analyte_code"])))
        i = int(np.searchsorted(t, at.to_datetime64(), side="left")) if t is not None else 0
        prev_at = pd.Timestamp(t[i - 1]) if i > 0 else None  # the last result strictly before the forecast time
        payload = {
            "quantiles": {c: r.get(c) for c in ("q05", "q10", "q25", "q50", "q75", "q90", "q95")},
            "interval95": ([r.get("lo95"), r.get("hi95")]
                           if r.get("lo95") is not None and not pd.isna(r.get("lo95")) else None),
            "median": r.get("q50"), "unit": r.get("unit"), "status": r.get("status"), "at": at,
            "based_on": {"prior_results": r.get("n_history"), "last_result_at": prev_at, "calibrated": calibrated,
                         "text": history_basis(r["n_history"]) if not pd.isna(r.get("n_history", np.nan)) else None,
                         "model_version": r.get("model_version"),
                         "rule": "results collected strictly before the forecast time"},
        }
        recs.append(_record("forecast", r["patient_id"], r["analyte_code"], at, r.get("model_version"), None, payload))
    return recs


def anomaly_outputs(anomalies: pd.DataFrame, reference_version: str) -> list[dict]:
    """One record per anomaly; rule-based ones carry ``reference_version`` as their version."""
    recs = []
    for r in anomalies.to_dict("records"):
        version = r.get("model_version") or reference_version
        payload = {k: r.get(k) for k in ("result_id", "analyte_name", "collected_at", "rule", "flag", "score", "value",
                                         "unit", "evidence", "source", "text")}
        payload["based_on"] = {"result_id": r.get("result_id"), "rule": r.get("rule"), "version": version}
        recs.append(_record("anomaly", r["patient_id"], r["analyte_code"], r["collected_at"], version, r["rule"],
                            payload, key=r.get("result_id")))
    return recs


def explanation_outputs(explanations: list, forecast_ids: list[str]) -> list[dict]:
    """One record per :class:`model.explain.ForecastExplanation`, linked to its forecast's output id."""
    recs = []
    for e, fid in zip(explanations, forecast_ids):
        payload = e.to_payload() | {"forecast_output_id": fid,
                                    "based_on": {"forecast_output_id": fid, "explainer": f"shap {e.method}",
                                                 "groups": "each analyte's past results, time since last result, age, sex"}}
        recs.append(_record("explanation", e.patient_id, e.analyte_code, e.at, e.model_version, e.method, payload))
    return recs


def recommendation_outputs(recommendations: pd.DataFrame) -> list[dict]:
    """One record per recommendation (version = the rule file's version)."""
    recs = []
    for r in recommendations.to_dict("records"):
        payload = {k: r.get(k) for k in ("rule_id", "title", "text", "urgency", "source", "triggered_by", "result_ids")}
        payload["based_on"] = {"triggered_by": r.get("triggered_by"), "result_ids": r.get("result_ids"),
                               "rule_version": r.get("rule_version")}
        recs.append(_record("recommendation", r["patient_id"], r.get("analyte_code"), r["at"],
                            f"recommendations-{r['rule_version']}", r["rule_id"], payload))
    return recs


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def store_outputs(store: Store, records: list[dict]) -> dict:
    """Upsert ``records`` in one transaction; returns ``{'inserted', 'updated', 'unchanged'}`` counts."""
    if not records:
        return {"inserted": 0, "updated": 0, "unchanged": 0}
    by_id = {}
    for r in records:
        by_id[r["output_id"]] = r  # the last of duplicates wins
    now = _utcnow()
    rows = []
    for r in by_id.values():
        text = _payload_json(r["payload"])
        rows.append((r["output_id"], r["kind"], r["patient_id"], r["analyte_code"],
                     None if r["output_time"] is None else pd.Timestamp(r["output_time"]).to_pydatetime(),
                     r["rule"], r["model_version"], text, hashlib.sha256(text.encode("utf-8")).hexdigest()))
    counts = {"inserted": 0, "updated": 0, "unchanged": 0}
    with store.write() as cur:
        have = dict(cur.execute("SELECT output_id, payload_sha256 FROM model_outputs WHERE list_contains(?, output_id)",
                                [list(by_id)]).fetchall())
        new = [r for r in rows if r[0] not in have]
        changed = [r for r in rows if r[0] in have and have[r[0]] != r[8]]
        counts = {"inserted": len(new), "updated": len(changed), "unchanged": len(rows) - len(new) - len(changed)}
        if new:
            cur.executemany(
                "INSERT INTO model_outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (output_id) DO NOTHING",
                [r + (now, now) for r in new])
        for r in changed:
            cur.execute("UPDATE model_outputs SET payload = ?, payload_sha256 = ?, updated_at = ? WHERE output_id = ?",
                        [r[7], r[8], now, r[0]])
    return counts


def load_outputs(store: Store, *, patient_id: str | None = None, kind: str | None = None,
                 output_ids: list[str] | None = None) -> pd.DataFrame:
    """Stored outputs (``payload`` parsed to dicts), oldest output time first."""
    sql = """SELECT * FROM model_outputs WHERE (?::VARCHAR IS NULL OR patient_id = ?)
             AND (?::VARCHAR IS NULL OR kind = ?) AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], output_id))
             ORDER BY output_time NULLS LAST, kind, output_id"""
    with store.read() as cur:
        df = cur.execute(sql, [patient_id, patient_id, kind, kind, output_ids, output_ids]).df()
    df["payload"] = [json.loads(p) for p in df["payload"]]
    return df


# ---------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerdictResult:
    """What :func:`record_verdict` did. Truthy when a new row was written."""

    annotation_id: int
    submission_id: str
    output_id: str
    created: bool

    def __bool__(self) -> bool:
        return self.created


def record_verdict(
    store: Store,
    output_id: str,
    annotator: str,
    role: str,
    verdict: str,
    comment: str | None = None,
    corrected_value: float | None = None,
    submission_id: str | None = None,
    *,
    dedupe_window_s: float = 10.0,
) -> VerdictResult:
    """Append one expert verdict on an output; idempotent per submission (see the module docstring).

    Raises ``ValueError`` for an unknown output, a verdict outside :data:`VERDICTS`, an empty
    annotator or role, a non-finite corrected value, or a submission id already used for a
    different output or annotator.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {list(VERDICTS)}, got {verdict!r}")
    if not str(annotator or "").strip() or not str(role or "").strip():
        raise ValueError("annotator and role are required")
    if corrected_value is not None:
        corrected_value = float(corrected_value)
        if not math.isfinite(corrected_value):
            raise ValueError(f"corrected value must be a finite number, got {corrected_value!r}")
    comment = comment if comment is None or str(comment).strip() else None
    with store.write() as cur:
        row = cur.execute("SELECT payload_sha256 FROM model_outputs WHERE output_id = ?", [output_id]).fetchone()
        if row is None:
            raise ValueError(f"unknown output {output_id!r}: store the output before recording a verdict on it")
        if submission_id is None:
            last = cur.execute(
                """SELECT annotation_id, submission_id, role, verdict, comment, corrected_value, created_at
                   FROM annotations WHERE output_id = ? AND annotator = ? ORDER BY annotation_id DESC LIMIT 1""",
                [output_id, annotator]).fetchone()
            if last is not None and (last[2], last[3], last[4], last[5]) == (role, verdict, comment, corrected_value) \
                    and (_utcnow() - last[6]).total_seconds() <= dedupe_window_s:
                return VerdictResult(int(last[0]), last[1], output_id, False)
            submission_id = "auto-" + new_submission_id()
        inserted = cur.execute(
            """INSERT INTO annotations (submission_id, output_id, annotator, role, verdict, comment, corrected_value,
                                        output_payload_sha256, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (submission_id) DO NOTHING RETURNING annotation_id""",
            [submission_id, output_id, annotator, role, verdict, comment, corrected_value, row[0], _utcnow()],
        ).fetchall()
        if inserted:
            return VerdictResult(int(inserted[0][0]), submission_id, output_id, True)
        prior = cur.execute("SELECT annotation_id, output_id, annotator FROM annotations WHERE submission_id = ?",
                            [submission_id]).fetchone()
    if (prior[1], prior[2]) != (output_id, annotator):
        raise ValueError(f"submission {submission_id!r} was already used for output {prior[1]!r} by {prior[2]!r}")
    return VerdictResult(int(prior[0]), submission_id, output_id, False)


def annotation_log(store: Store, output_id: str | None = None) -> pd.DataFrame:
    """Every verdict row (append-only history), oldest first."""
    with store.read() as cur:
        return cur.execute(
            "SELECT * FROM annotations WHERE (?::VARCHAR IS NULL OR output_id = ?) ORDER BY annotation_id",
            [output_id, output_id]).df()


_CURRENT_SQL = """
    WITH ranked AS (
        SELECT a.*, row_number() OVER (PARTITION BY a.output_id, a.annotator ORDER BY a.annotation_id DESC) AS rn,
               count(*) OVER (PARTITION BY a.output_id, a.annotator) AS n_verdicts
        FROM annotations a
    )
    SELECT r.annotation_id, r.output_id, o.kind, o.patient_id, o.analyte_code, r.annotator, r.role, r.verdict,
           r.comment, r.corrected_value, r.created_at, r.n_verdicts,
           r.output_payload_sha256 IS DISTINCT FROM o.payload_sha256 AS output_changed_since
    FROM ranked r LEFT JOIN model_outputs o USING (output_id)
    WHERE r.rn = 1 AND (?::VARCHAR IS NULL OR o.kind = ?)
    ORDER BY r.output_id, r.annotator
"""


def current_verdicts(store: Store, kind: str | None = None) -> pd.DataFrame:
    """The current verdict of each annotator on each output (their latest row)."""
    with store.read() as cur:
        return cur.execute(_CURRENT_SQL, [kind, kind]).df()


def _summary(kind: str, p: dict) -> tuple[str | None, float | None, str | None, str]:
    """(summary text, predicted value, unit, status) of one payload for review lists."""
    if kind == "forecast":
        return (f"forecast median {p.get('median')} {p.get('unit') or ''}".strip(), p.get("median"), p.get("unit"),
                "pending" if p.get("status") == "ok" else str(p.get("status")))
    if kind == "anomaly":
        return p.get("text"), p.get("value"), p.get("unit"), "pending"
    if kind == "explanation":
        return (p.get("message") or f"SHAP ({p.get('method')}) of forecast {p.get('forecast_output_id')}",
                p.get("median"), p.get("unit"), "pending" if p.get("status") == "ok" else str(p.get("status")))
    return p.get("text"), None, None, "pending"


_PRIORITY_SQL = """
    CASE
        WHEN o.kind = 'anomaly' AND o.rule = 'critical_value' THEN 1
        WHEN o.kind = 'recommendation' AND json_extract_string(o.payload, '$.urgency') = 'high' THEN 1
        WHEN o.kind = 'anomaly' AND (o.rule LIKE 'preanalytical:%'
                                     OR o.rule IN ('model_surprise', 'multivariate_inconsistency')) THEN 2
        WHEN o.kind = 'recommendation' AND json_extract_string(o.payload, '$.urgency') = 'medium' THEN 2
        WHEN o.kind = 'recommendation' AND json_extract_string(o.payload, '$.urgency') = 'low' THEN 4
        WHEN o.kind = 'anomaly' AND o.rule = 'delta_check' THEN 5
        WHEN o.kind = 'anomaly' AND o.rule = 'reference_interval' THEN 6
        ELSE 3
    END"""
_REASON_SQL = """
    CASE
        WHEN o.kind = 'anomaly' AND o.rule = 'critical_value'
            THEN 'critical value (' || coalesce(json_extract_string(o.payload, '$.flag'), '?') || ')'
        WHEN o.kind = 'recommendation'
            THEN 'recommendation, ' || coalesce(json_extract_string(o.payload, '$.urgency'), 'unknown') || ' urgency'
        WHEN o.kind = 'anomaly' AND o.rule LIKE 'preanalytical:%'
            THEN 'pre-analytical pattern: ' || replace(substr(o.rule, 15), '_', ' ')
        WHEN o.kind = 'anomaly' AND o.rule = 'model_surprise' THEN 'model surprise'
        WHEN o.kind = 'anomaly' AND o.rule = 'multivariate_inconsistency' THEN 'multivariate inconsistency'
        WHEN o.kind = 'anomaly' AND o.rule = 'delta_check' THEN 'delta check'
        WHEN o.kind = 'anomaly' AND o.rule = 'reference_interval' THEN 'outside the reference interval'
        WHEN o.kind IN ('forecast', 'explanation') THEN o.kind || ' to validate'
        ELSE coalesce(o.kind, 'output') || coalesce(' ' || o.rule, '')
    END"""


def pending_outputs(store: Store, annotator: str, kind: str | None = None, patient_id: str | None = None,
                    limit: int | None = 500) -> pd.DataFrame:
    """Outputs on which ``annotator`` has no verdict yet (:data:`OUTPUT_COLUMNS`), most important first.

    ``priority`` (int, 1 first; :data:`PRIORITY_TIERS`) and ``priority_reason`` (text, e.g.
    ``'critical value (HH)'``, ``'pre-analytical pattern: haemolysis'``) are computed in the
    query, so ``limit`` (None: no limit) keeps the most important outputs, not the oldest:

    1. critical values; recommendations of high urgency
    2. pre-analytical patterns, model surprise, multivariate inconsistency; recommendations of
       medium urgency
    3. forecasts and their explanations (and any output kind or rule not listed here)
    4. recommendations of low urgency
    5. delta checks
    6. results outside the reference interval

    Within a tier: newest first (``output_time``: the result's collection time, the
    recommendation's evaluation time), then the larger ``|score|``; forecasts and explanations
    soonest forecast time first (the forecast that can be checked against a result first; a
    forecast comes before its explanation). Ties: ``output_id``.

    Repeated reference-interval flags of one analyte are not collapsed into one output per
    analyte and day: an anomaly's id is keyed on its result (:func:`output_id`), verdicts and
    the timeline's markers refer to that id, and a group output would either orphan the
    verdicts already given or need one verdict row per member for one submission (UI-17 keeps
    one row per submission). On MIMIC-IV demo the collapse would remove about a quarter of the
    flags (mean 376 -> 290 per patient, ``benchmarks/results/clinical.json``,
    ``collapse_reference_interval_per_analyte_day``); ranking them last does more for the reviewer.
    """
    sql = f"""
        WITH p AS (
            SELECT o.*, {_PRIORITY_SQL} AS priority, {_REASON_SQL} AS priority_reason
            FROM model_outputs o
            WHERE NOT EXISTS (SELECT 1 FROM annotations a WHERE a.output_id = o.output_id AND a.annotator = ?)
              AND (?::VARCHAR IS NULL OR o.kind = ?) AND (?::VARCHAR IS NULL OR o.patient_id = ?)
        )
        SELECT * FROM p
        ORDER BY priority,
                 CASE WHEN kind IN ('forecast', 'explanation') THEN epoch_us(output_time)
                      ELSE -epoch_us(output_time) END NULLS LAST,
                 CASE kind WHEN 'forecast' THEN 0 WHEN 'explanation' THEN 1 ELSE 2 END,
                 abs(TRY_CAST(json_extract_string(payload, '$.score') AS DOUBLE)) DESC NULLS LAST,
                 output_id
        LIMIT ?"""
    with store.read() as cur:
        df = cur.execute(sql, [annotator, kind, kind, patient_id, patient_id, limit]).df()
    from data.catalogue import load_catalogue

    cat = load_catalogue()
    payloads = [json.loads(p) for p in df["payload"]]
    info = [_summary(k, p) for k, p in zip(df["kind"], payloads)]
    out = pd.DataFrame({
        "output_id": df["output_id"], "patient_id": df["patient_id"], "analyte_code": df["analyte_code"],
        "analyte_name": [getattr(cat.get(c), "name", None) if c else None for c in df["analyte_code"]],
        "kind": df["kind"],
        "forecast_for": [t if k == "forecast" else pd.NaT for k, t in zip(df["kind"], df["output_time"])],
        "predicted_value": [i[1] for i in info], "unit": [i[2] for i in info], "model_version": df["model_version"],
        "status": [i[3] for i in info], "output_time": df["output_time"], "rule": df["rule"],
        "summary": [i[0] for i in info], "priority": df["priority"].astype("int64"),
        "priority_reason": df["priority_reason"], "payload": payloads,
    })
    return out[OUTPUT_COLUMNS]


# ---------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------


def gwet_ac1(counts: np.ndarray, n_categories: int | None = None) -> dict:
    """Gwet's AC1 from an items x categories table of rating counts (raters may vary per item).

    Gwet KL, Computing inter-rater reliability and its variance in the presence of high
    agreement, Br J Math Stat Psychol 2008;61(1):29-48, doi:10.1348/000711006X126600 (and
    Handbook of Inter-Rater Reliability, 4th ed., 2014, ch. 4, for missing ratings):

    * ``p_a`` = mean over items rated by >= 2 raters of ``sum_k r_ik (r_ik - 1) / (r_i (r_i - 1))``
    * ``pi_k`` = mean over items rated at least once of ``r_ik / r_i``
    * ``p_e`` = ``sum_k pi_k (1 - pi_k) / (q - 1)``, ``q`` = number of categories
    * ``AC1 = (p_a - p_e) / (1 - p_e)``

    Returns ``{'ac1', 'pa', 'pe', 'n_items'}`` (AC1 NaN when it is undefined).
    """
    r = np.asarray(counts, dtype=float)
    q = int(n_categories or r.shape[1])
    ri = r.sum(axis=1)
    rated, multi = ri >= 1, ri >= 2
    if not multi.any() or q < 2:
        return {"ac1": math.nan, "pa": math.nan, "pe": math.nan, "n_items": int(multi.sum())}
    pa = float(np.mean((r[multi] * (r[multi] - 1)).sum(axis=1) / (ri[multi] * (ri[multi] - 1))))
    pi = (r[rated] / ri[rated, None]).mean(axis=0)
    pe = float((pi * (1 - pi)).sum() / (q - 1))
    ac1 = (pa - pe) / (1 - pe) if pe < 1 else math.nan
    return {"ac1": float(ac1), "pa": pa, "pe": pe, "n_items": int(multi.sum())}


def agreement_stats(ratings: pd.DataFrame, categories=VERDICTS) -> dict:
    """Agreement of a long frame ``item, rater, category`` (one current rating per item and rater).

    ``raw_agreement``: mean over items with >= 2 ratings of the share of agreeing rater
    pairs. ``cohen_kappa``: only with exactly 2 raters, on items both rated
    (``sklearn.metrics.cohen_kappa_score``). ``fleiss_kappa``: with >= 3 raters, on items
    rated by all of them (``statsmodels.stats.inter_rater.fleiss_kappa``). ``gwet_ac1``: all
    items (:func:`gwet_ac1`). A statistic that is undefined (e.g. every rating 'valid') is NaN.
    """
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import fleiss_kappa

    cats = list(categories)
    r = ratings[ratings["category"].isin(cats)]
    raters = sorted(r["rater"].unique())
    table = pd.crosstab(r["item"], pd.Categorical(r["category"], categories=cats), dropna=False).reindex(columns=cats, fill_value=0)
    counts = table.to_numpy(float)
    ri = counts.sum(axis=1)
    multi = ri >= 2
    out = {"n_items": int(len(table)), "n_items_multi": int(multi.sum()), "n_raters": len(raters),
           "share_valid": float((r["category"] == cats[0]).mean()) if len(r) else math.nan}
    if multi.any():
        out["raw_agreement"] = float(np.mean((counts[multi] * (counts[multi] - 1)).sum(axis=1) / (ri[multi] * (ri[multi] - 1))))
    else:
        out["raw_agreement"] = math.nan
    out["cohen_kappa"] = math.nan
    out["fleiss_kappa"] = math.nan
    wide = r.pivot_table(index="item", columns="rater", values="category", aggfunc="last")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined kappa (all one category) -> NaN, reported as such
        if len(raters) == 2:
            both = wide.dropna()
            if len(both):
                k = cohen_kappa_score(both[raters[0]], both[raters[1]], labels=cats)
                out["cohen_kappa"] = float(k) if np.isfinite(k) else math.nan
        elif len(raters) >= 3:
            full = table[(ri == len(raters))]
            if len(full):
                k = fleiss_kappa(full.to_numpy(), method="fleiss")
                out["fleiss_kappa"] = float(k) if np.isfinite(k) else math.nan
    g = gwet_ac1(counts, len(cats))
    out["gwet_ac1"] = g["ac1"]
    return out


def agreement(store: Store) -> pd.DataFrame:
    """Agreement statistics per output kind over the current verdicts (one row per kind with verdicts)."""
    cur = current_verdicts(store)
    rows = []
    for kind, g in cur.groupby("kind", sort=True):
        stats = agreement_stats(g.rename(columns={"output_id": "item", "annotator": "rater", "verdict": "category"}))
        rows.append({"kind": kind, **stats})
    cols = ["kind", "n_items", "n_items_multi", "n_raters", "share_valid", "raw_agreement", "cohen_kappa",
            "fleiss_kappa", "gwet_ac1"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

EXPORT_COLUMNS = [
    "output_id", "kind", "patient_id", "analyte_code", "output_time", "rule", "model_version", "summary", "payload",
    "output_created_at", "output_updated_at", "annotation_id", "annotator", "role", "verdict", "comment",
    "corrected_value", "verdict_at", "n_verdicts", "output_changed_since",
]


def export_frame(store: Store, all_verdicts: bool = False, kind: str | None = None) -> pd.DataFrame:
    """Outputs with their verdicts: one row per (output, annotator) current verdict, or every
    verdict row with ``all_verdicts``; outputs without a verdict appear once with empty verdict columns."""
    rank = "" if all_verdicts else "QUALIFY row_number() OVER (PARTITION BY output_id, annotator ORDER BY annotation_id DESC) = 1"
    sql = f"""
        WITH a AS (
            SELECT *, count(*) OVER (PARTITION BY output_id, annotator) AS n_verdicts FROM annotations {rank}
        )
        SELECT o.output_id, o.kind, o.patient_id, o.analyte_code, o.output_time, o.rule, o.model_version,
               o.payload::VARCHAR AS payload, o.created_at AS output_created_at, o.updated_at AS output_updated_at,
               a.annotation_id, a.annotator, a.role, a.verdict, a.comment, a.corrected_value, a.created_at AS verdict_at,
               a.n_verdicts, CASE WHEN a.annotation_id IS NULL THEN NULL
                                  ELSE a.output_payload_sha256 IS DISTINCT FROM o.payload_sha256 END AS output_changed_since
        FROM model_outputs o LEFT JOIN a USING (output_id)
        WHERE (?::VARCHAR IS NULL OR o.kind = ?)
        ORDER BY o.patient_id, o.output_time NULLS LAST, o.output_id, a.annotation_id
    """
    with store.read() as cur:
        df = cur.execute(sql, [kind, kind]).df()
    df["summary"] = [_summary(k, json.loads(p))[0] for k, p in zip(df["kind"], df["payload"])]
    df["n_verdicts"] = df["n_verdicts"].astype("Int64")
    df["annotation_id"] = df["annotation_id"].astype("Int64")
    return df[EXPORT_COLUMNS]


def export_annotations(store: Store, path: str | Path, all_verdicts: bool = False, kind: str | None = None) -> int:
    """Write :func:`export_frame` to ``path``: ``.csv`` (formulas neutralised) or ``.parquet``; returns rows."""
    from data.export import write_safe_csv

    path = Path(path)
    df = export_frame(store, all_verdicts=all_verdicts, kind=kind)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        write_safe_csv(df, path)
    elif suffix == ".parquet":
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
    else:
        raise ValueError(f"export file must end in .csv or .parquet, got {path.name!r}")
    return len(df)
