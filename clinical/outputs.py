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
agreement, Cohen's kappa (statsmodels; exactly two annotators), Fleiss' kappa and Gwet's
AC1 (ratings with gaps), each with its 95 % confidence interval: :mod:`clinical.agreement`.
Kappa is misleading when nearly every output is valid (the "kappa paradox"); AC1 is not,
which is why both are reported.

**Export** of outputs with their verdicts: CSV with spreadsheet formulas neutralised
(:func:`data.export.write_safe_csv`) or Parquet (typed; text kept exactly as entered).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
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
    "prune_superseded",
    "prune_superseded_in",
    "upsert_outputs",
    "load_outputs",
    "VerdictResult",
    "record_verdict",
    "annotation_log",
    "current_verdicts",
    "PRIORITY_TIERS",
    "review_priority",
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
# Review priority tiers (1 is reviewed first): clinical priority, the same numbers as a recommendation's
# ``priority`` (clinical.recommendations.BASES); see pending_outputs for the order within a tier.
PRIORITY_TIERS = {
    1: "actual critical value (or a recommendation resting on one)",
    2: "pre-analytical error (or a recommendation to recollect)",
    3: "delta check, model surprise, multivariate inconsistency (or a recommendation resting on an observed change)",
    4: "forecast-based warning (a recommendation resting on a forecast)",
    5: "forecast or explanation to validate (and any other output)",
    6: "outside the reference interval (stored by versions before it became a flag on the result)",
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
    try:  # a record's payload is already JSON-native (_record converts it): one pass, not two
        return json.dumps(payload, sort_keys=True, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):  # timestamps, numpy scalars, NaN: converted first
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
    """One record per anomaly (a run of consecutive flags is one record: :func:`clinical.anomalies.group_runs`);
    rule-based ones carry ``reference_version`` as their version.

    The id is keyed on the run's first result, so a result joining the run later updates the
    payload (``based_on.result_ids`` lists the run) instead of adding an output.
    """
    recs = []
    for r in anomalies.to_dict("records"):
        mv = r.get("model_version")
        version = mv if isinstance(mv, str) and mv else reference_version  # None / NaN: a rule-based anomaly
        payload = {k: r.get(k) for k in ("result_id", "analyte_name", "collected_at", "rule", "flag", "score", "value",
                                         "unit", "evidence", "source", "text")}
        ev = r.get("evidence") if isinstance(r.get("evidence"), dict) else {}
        run = ev.get("run") or {}
        payload["based_on"] = {"result_id": r.get("result_id"), "rule": r.get("rule"), "version": version,
                               "result_ids": run.get("result_ids") or [r.get("result_id")]}
        recs.append(_record("anomaly", r["patient_id"], r["analyte_code"], r["collected_at"], version, r["rule"],
                            payload, key=r.get("result_id")))
    return recs


def explanation_outputs(explanations: list, forecast_ids: list[str]) -> list[dict]:
    """One record per :class:`model.explain.ForecastExplanation`, linked to its forecast's output id."""
    recs = []
    for e, fid in zip(explanations, forecast_ids):
        # the time the explainer took is not part of what it says: storing it would make an
        # unchanged explanation look changed on every run (labtrend score is idempotent)
        payload = {k: v for k, v in e.to_payload().items() if k != "elapsed_s"} | {"forecast_output_id": fid,
                                    "based_on": {"forecast_output_id": fid, "explainer": f"shap {e.method}",
                                                 "groups": "each analyte's past results, time since last result, age, sex"}}
        recs.append(_record("explanation", e.patient_id, e.analyte_code, e.at, e.model_version, e.method, payload))
    return recs


def recommendation_outputs(recommendations: pd.DataFrame) -> list[dict]:
    """One record per recommendation (version = the rule file's version)."""
    recs = []
    for r in recommendations.to_dict("records"):
        payload = {k: r.get(k) for k in ("rule_id", "title", "text", "urgency", "source", "triggered_by", "result_ids",
                                         "priority", "basis")}
        payload["based_on"] = {"triggered_by": r.get("triggered_by"), "result_ids": r.get("result_ids"),
                               "rule_version": r.get("rule_version")}
        recs.append(_record("recommendation", r["patient_id"], r.get("analyte_code"), r["at"],
                            f"recommendations-{r['rule_version']}", r["rule_id"], payload))
    return recs


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def _output_rows(records: list[dict]):
    """``records`` (the last of duplicate ids wins) as an Arrow table of ``model_outputs`` columns, less the times."""
    import pyarrow as pa

    by_id = {}
    for r in records:
        by_id[r["output_id"]] = r
    cols = {k: [] for k in ("output_id", "kind", "patient_id", "analyte_code", "output_time", "rule", "model_version",
                            "payload", "payload_sha256")}
    for r in by_id.values():
        text = _payload_json(r["payload"])
        t = r["output_time"]
        cols["output_id"].append(r["output_id"])
        cols["kind"].append(r["kind"])
        cols["patient_id"].append(r["patient_id"])
        cols["analyte_code"].append(r["analyte_code"])
        cols["output_time"].append(None if t is None or pd.isna(t) else pd.Timestamp(t).to_pydatetime())
        cols["rule"].append(r["rule"])
        cols["model_version"].append(r["model_version"])
        cols["payload"].append(text)
        cols["payload_sha256"].append(hashlib.sha256(text.encode("utf-8")).hexdigest())
    types = {"output_time": pa.timestamp("us")}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})


def upsert_outputs(cur, records: list[dict]) -> dict:
    """Upsert ``records`` with the cursor of an open write transaction (:meth:`data.db.Store.write`).

    One set-based statement per step (new rows inserted, changed payloads replaced), so a
    patient's thousands of outputs cost milliseconds, not a prepared statement per row.
    Returns ``{'inserted', 'updated', 'unchanged'}`` counts.
    """
    if not records:
        return {"inserted": 0, "updated": 0, "unchanged": 0}
    rows = _output_rows(records)
    now = _utcnow()
    view = f"_outputs_in_{uuid.uuid4().hex}"
    cur.register(view, rows)
    try:
        cur.execute(f"""CREATE TEMP TABLE {view}_t AS
                        SELECT i.*, CASE WHEN o.output_id IS NULL THEN 'inserted'
                                         WHEN o.payload_sha256 <> i.payload_sha256 THEN 'updated'
                                         ELSE 'unchanged' END AS change
                        FROM {view} i LEFT JOIN model_outputs o USING (output_id)""")
        counts = {"inserted": 0, "updated": 0, "unchanged": 0}
        counts.update(dict(cur.execute(f"SELECT change, count(*) FROM {view}_t GROUP BY change").fetchall()))
        if counts["inserted"]:
            cur.execute(f"""INSERT INTO model_outputs
                            SELECT output_id, kind, patient_id, analyte_code, output_time, rule, model_version,
                                   payload::JSON, payload_sha256, ?::TIMESTAMP, ?::TIMESTAMP
                            FROM {view}_t WHERE change = 'inserted' ON CONFLICT (output_id) DO NOTHING""", [now, now])
        if counts["updated"]:
            cur.execute(f"""UPDATE model_outputs SET payload = t.payload::JSON, payload_sha256 = t.payload_sha256,
                                                     updated_at = ?::TIMESTAMP
                            FROM {view}_t t WHERE t.change = 'updated' AND model_outputs.output_id = t.output_id""",
                        [now])
        cur.execute(f"DROP TABLE {view}_t")
    finally:
        cur.unregister(view)
    return {k: int(v) for k, v in counts.items()}


def store_outputs(store: Store, records: list[dict]) -> dict:
    """Upsert ``records`` in one transaction (:func:`upsert_outputs`); returns ``{'inserted', 'updated', 'unchanged'}``.

    An unchanged payload is left alone; a changed one replaces the stored one and moves ``updated_at``.
    """
    if not records:
        return {"inserted": 0, "updated": 0, "unchanged": 0}
    with store.write() as cur:
        return upsert_outputs(cur, records)


def prune_superseded(store: Store, patient_id: str, kind: str, keep_ids, *, before, version_prefix: str) -> int:
    """Remove a patient's outputs of ``kind`` that an evaluation no longer produces; returns how many.

    Only outputs whose ``model_version`` starts with ``version_prefix`` (e.g. ``'rules-'``: the
    rule-based anomalies, recomputed from the whole history on every evaluation), collected
    before ``before`` (the evaluated period), not in ``keep_ids`` and **without any verdict**:
    what an expert judged is history and stays. Stale items of an earlier rule version (a delta
    check the cited minimum change no longer admits, a run now one output) would otherwise stay
    in the review queue for ever.
    """
    with store.write() as cur:
        return prune_superseded_in(cur, patient_id, kind, keep_ids, before=before, version_prefix=version_prefix)


def prune_superseded_in(cur, patient_id: str, kind: str, keep_ids, *, before, version_prefix: str) -> int:
    """:func:`prune_superseded` on an open write cursor (inside the caller's transaction: the batch writer)."""
    ids = [r[0] for r in cur.execute(
        """SELECT output_id FROM model_outputs o
           WHERE patient_id = ? AND kind = ? AND starts_with(model_version, ?) AND output_time < ?
             AND NOT list_contains(?::VARCHAR[], output_id)
             AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.output_id = o.output_id)""",
        [str(patient_id), kind, version_prefix, pd.Timestamp(before).to_pydatetime(), list(keep_ids)]).fetchall()]
    if ids:
        cur.execute("DELETE FROM model_outputs WHERE list_contains(?::VARCHAR[], output_id)", [ids])
    return len(ids)


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
    verdict: str | None = None  # the verdict stored (this one, or the one already there)

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
    only_if_pending: bool = False,
) -> VerdictResult:
    """Append one expert verdict on an output; idempotent per submission (see the module docstring).

    ``only_if_pending``: store the verdict only if ``annotator`` has none on the output yet
    (checked inside the write transaction). The review queue saves this way, so that a
    double click, a click during a rerun and the same output open in two tabs store exactly
    one verdict; the result is then the verdict already there (``created`` False; its
    ``submission_id`` tells a repeat of the same click from another tab's).

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
        if only_if_pending:
            have = cur.execute("""SELECT annotation_id, submission_id, verdict FROM annotations
                                  WHERE output_id = ? AND annotator = ? ORDER BY annotation_id DESC LIMIT 1""",
                               [output_id, annotator]).fetchone()
            if have is not None:
                return VerdictResult(int(have[0]), have[1], output_id, False, have[2])
        if submission_id is None:
            last = cur.execute(
                """SELECT annotation_id, submission_id, role, verdict, comment, corrected_value, created_at
                   FROM annotations WHERE output_id = ? AND annotator = ? ORDER BY annotation_id DESC LIMIT 1""",
                [output_id, annotator]).fetchone()
            if last is not None and (last[2], last[3], last[4], last[5]) == (role, verdict, comment, corrected_value) \
                    and (_utcnow() - last[6]).total_seconds() <= dedupe_window_s:
                return VerdictResult(int(last[0]), last[1], output_id, False, last[3])
            submission_id = "auto-" + new_submission_id()
        inserted = cur.execute(
            """INSERT INTO annotations (submission_id, output_id, annotator, role, verdict, comment, corrected_value,
                                        output_payload_sha256, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (submission_id) DO NOTHING RETURNING annotation_id""",
            [submission_id, output_id, annotator, role, verdict, comment, corrected_value, row[0], _utcnow()],
        ).fetchall()
        if inserted:
            return VerdictResult(int(inserted[0][0]), submission_id, output_id, True, verdict)
        prior = cur.execute("SELECT annotation_id, output_id, annotator, verdict FROM annotations WHERE submission_id = ?",
                            [submission_id]).fetchone()
    if (prior[1], prior[2]) != (output_id, annotator):
        raise ValueError(f"submission {submission_id!r} was already used for output {prior[1]!r} by {prior[2]!r}")
    return VerdictResult(int(prior[0]), submission_id, output_id, False, prior[3])


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


def _summary(kind: str, p: dict, code: str | None = None) -> tuple[str | None, float | None, str | None, str]:
    """(summary text, predicted value, unit, status) of one payload for review lists (numbers with the
    analyte's reporting precision, :mod:`clinical.format`)."""
    from clinical.format import format_quantity

    if kind == "forecast":
        return (f"forecast median {format_quantity(code, p.get('median'), p.get('unit'))}".strip(), p.get("median"),
                p.get("unit"), "pending" if p.get("status") == "ok" else str(p.get("status")))
    if kind == "anomaly":
        return p.get("text"), p.get("value"), p.get("unit"), "pending"
    if kind == "explanation":
        return (p.get("message") or f"SHAP ({p.get('method')}) of forecast {p.get('forecast_output_id')}",
                p.get("median"), p.get("unit"), "pending" if p.get("status") == "ok" else str(p.get("status")))
    return p.get("text"), None, None, "pending"


_PRIORITY_SQL = """
    CASE
        WHEN o.kind = 'anomaly' AND o.rule = 'critical_value' THEN 1
        WHEN o.kind = 'anomaly' AND o.rule LIKE 'preanalytical:%' THEN 2
        WHEN o.kind = 'anomaly' AND o.rule IN ('delta_check', 'model_surprise', 'multivariate_inconsistency') THEN 3
        WHEN o.kind = 'anomaly' AND o.rule = 'reference_interval' THEN 6
        WHEN o.kind = 'recommendation'
            THEN coalesce(TRY_CAST(json_extract_string(o.payload, '$.priority') AS INTEGER), 3)
        ELSE 5
    END"""
_REASON_SQL = """
    CASE
        WHEN o.kind = 'anomaly' AND o.rule = 'critical_value'
            THEN 'critical value (' || coalesce(json_extract_string(o.payload, '$.flag'), '?') || ')'
        WHEN o.kind = 'recommendation'
            THEN 'recommendation (' || coalesce(json_extract_string(o.payload, '$.basis'), 'earlier version') || ', '
                 || coalesce(json_extract_string(o.payload, '$.urgency'), 'unknown') || ' urgency)'
        WHEN o.kind = 'anomaly' AND o.rule LIKE 'preanalytical:%'
            THEN 'pre-analytical pattern: ' || replace(substr(o.rule, 15), '_', ' ')
        WHEN o.kind = 'anomaly' AND o.rule = 'model_surprise' THEN 'model surprise'
        WHEN o.kind = 'anomaly' AND o.rule = 'multivariate_inconsistency' THEN 'multivariate inconsistency'
        WHEN o.kind = 'anomaly' AND o.rule = 'delta_check' THEN 'delta check'
        WHEN o.kind = 'anomaly' AND o.rule = 'reference_interval' THEN 'outside the reference interval'
        WHEN o.kind IN ('forecast', 'explanation') THEN o.kind || ' to validate'
        ELSE coalesce(o.kind, 'output') || coalesce(' ' || o.rule, '')
    END"""
def review_priority(kind: str, rule: str | None = None, payload: dict | None = None) -> int:
    """The clinical priority tier (:data:`PRIORITY_TIERS`, 1 first) of an output: the Python twin of
    the review queue's SQL (tested equal), for lists built outside the store (the timeline's
    anomaly table). ``payload``: a recommendation's (its ``priority``)."""
    rule = rule or ""
    if kind == "anomaly":
        if rule == "critical_value":
            return 1
        if rule.startswith("preanalytical:"):
            return 2
        if rule in ("delta_check", "model_surprise", "multivariate_inconsistency"):
            return 3
        if rule == "reference_interval":
            return 6
        return 5
    if kind == "recommendation":
        try:
            return int((payload or {}).get("priority"))
        except (TypeError, ValueError):
            return 3
    return 5


# within a tier: a recommendation of higher urgency first
_URGENCY_SQL = """
    CASE json_extract_string(payload, '$.urgency') WHEN 'high' THEN 0 WHEN 'medium' THEN 1 WHEN 'low' THEN 2 ELSE 1 END"""


def pending_outputs(store: Store, annotator: str, kind: str | None = None, patient_id: str | None = None,
                    limit: int | None = 500) -> pd.DataFrame:
    """Outputs on which ``annotator`` has no verdict yet (:data:`OUTPUT_COLUMNS`), most important first.

    ``priority`` (int, 1 first; :data:`PRIORITY_TIERS`) and ``priority_reason`` (text, e.g.
    ``'critical value (HH)'``, ``'pre-analytical pattern: haemolysis'``) are computed in the
    query, so ``limit`` (None: no limit) keeps the most important outputs, not the oldest:

    1. actual critical values (and recommendations resting on one)
    2. pre-analytical errors (and recommendations to recollect)
    3. delta checks, model surprises, multivariate inconsistencies (and recommendations resting
       on an observed change)
    4. forecast-based warnings (recommendations resting on a forecast): "forecast potassium may
       reach the critical limit" always after an actual critical potassium
    5. forecasts and their explanations to validate (and any output kind or rule not listed here)
    6. reference-interval anomalies stored by earlier versions (a result outside its interval is
       a flag on the result now, not a review item)

    A recommendation's tier is its stored ``priority`` (:data:`clinical.recommendations.BASES`;
    3 for payloads stored before it existed). Within a tier: recommendations of higher urgency
    first, then newest first (``output_time``: the collection time of the run's first result, the
    recommendation's evaluation time), then the larger ``|score|``; forecasts and explanations
    soonest forecast time first (the forecast that can be checked against a result first; a
    forecast comes before its explanation). Ties: ``output_id``.

    Consecutive flags of one analyte within one episode are already one output with its run of
    results (:func:`clinical.anomalies.group_runs`), keyed on the run's first result.
    """
    sql = f"""
        WITH p AS (
            SELECT o.*, {_PRIORITY_SQL} AS priority, {_REASON_SQL} AS priority_reason
            FROM model_outputs o
            WHERE NOT EXISTS (SELECT 1 FROM annotations a WHERE a.output_id = o.output_id AND a.annotator = ?)
              AND (?::VARCHAR IS NULL OR o.kind = ?) AND (?::VARCHAR IS NULL OR o.patient_id = ?)
        )
        SELECT * FROM p
        ORDER BY priority, {_URGENCY_SQL},
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
    info = [_summary(k, p, c) for k, p, c in zip(df["kind"], payloads, df["analyte_code"])]
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

    :func:`clinical.agreement.gwet_ac1` (formulas, variance and sources there). Returns
    ``{'ac1', 'pa', 'pe', 'n_items', 'low', 'high'}`` (NaN where undefined; ``low``/``high``:
    the 95 % confidence interval).
    """
    from clinical.agreement import gwet_ac1 as _ac1

    e = _ac1(counts, n_categories)
    return {"ac1": e.value, "pa": e.pa, "pe": e.pe, "n_items": e.n_items, "low": e.low, "high": e.high}


def agreement_stats(ratings: pd.DataFrame, categories=VERDICTS) -> dict:
    """Agreement of a long frame ``item, rater, category``: :func:`clinical.agreement.agreement_stats`
    (raw agreement, Cohen's kappa, Fleiss' kappa, Gwet's AC1, each with its 95 % interval)."""
    from clinical.agreement import agreement_stats as _stats

    return _stats(ratings, categories)


def agreement(store: Store) -> pd.DataFrame:
    """Agreement statistics per output kind over the current verdicts (one row per kind with verdicts)."""
    cur = current_verdicts(store)
    rows = []
    for kind, g in cur.groupby("kind", sort=True):
        stats = agreement_stats(g.rename(columns={"output_id": "item", "annotator": "rater", "verdict": "category"}))
        rows.append({"kind": kind, **stats})
    cols = ["kind", "n_items", "n_items_multi", "n_raters", "share_valid"] + [
        f"{m}{part}" for m in ("raw_agreement", "cohen_kappa", "fleiss_kappa", "gwet_ac1") for part in ("", "_low", "_high")]
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
    df["summary"] = [_summary(k, json.loads(p), c)[0] for k, p, c in zip(df["kind"], df["payload"], df["analyte_code"])]
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
