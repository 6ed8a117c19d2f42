"""Plug-in points between the dashboard and the model and clinical modules.

Every function here is plain Python (no Streamlit) and returns a :class:`ServiceResult`:
a frame with fixed columns, whether the service is available, and the sentence the page
shows when it is not. A missing module or model gives an **empty frame and a message**,
never an invented result.

What each plug-in expects (change only the adapter function when the real API differs):

==========================  ===================================================================
forecasts                   a ``ForecastPipeline`` directory (``model/inference.py``:
                            ``vocab.json``, ``scaler.json``, ``config.json``, weights) in
                            ``$LABTREND_MODEL``, run in-process (CUDA when present), or, when
                            ``$LABTREND_MODEL_URL`` is set, the same pipeline served by
                            ``labtrend serve-model`` (:class:`labtrend.remote.RemoteForecastPipeline`,
                            same interface and outputs); :func:`load_forecasts` asks it for
                            :data:`FORECAST_HORIZONS_DAYS` after each analyte's last result.
anomalies                   ``clinical.anomalies.detect_anomalies(results, patient) ->
                            DataFrame[ANOMALY_COLUMNS]`` (results: TIMELINE_COLUMNS frame);
                            the rule-based rules run; the model rules (``model_surprise``,
                            ``multivariate_inconsistency``) need a forecaster passed in.
recommendations             ``clinical.recommendations.evaluate_rules(results, patient, forecasts=,
                            anomalies=) -> DataFrame[RECOMMENDATION_COLUMNS]``.
explanations (SHAP)         ``model.explain.explain_forecast(pipeline, history, patient_id,
                            analyte_code, at, forecast_median=) -> ForecastExplanation``
                            (``status``, ``message``, ``groups`` with ``label``/``value``,
                            ``median``, ``base_value``), drawn by
                            :func:`dashboard.figures.make_shap_bar` only when it adds up.
expert review (UI-17)       ``clinical.outputs.pending_outputs(store, annotator) ->
                            DataFrame[OUTPUT_COLUMNS]``, ``new_submission_id()`` (made when the
                            form is drawn) and ``record_verdict(store, output_id, annotator,
                            role, verdict, comment=, submission_id=)``, truthy when a row was
                            written; one row per submission however often it is sent.
==========================  ===================================================================
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from labtrend.remote import ModelServerError

__all__ = [
    "ServiceResult",
    "ModelStatus",
    "FORECAST_COLUMNS",
    "ANOMALY_COLUMNS",
    "RECOMMENDATION_COLUMNS",
    "OUTPUT_COLUMNS",
    "FORECAST_HORIZONS_DAYS",
    "NO_MODEL_MESSAGE",
    "age_years",
    "flag_rules",
    "model_status",
    "is_model_url",
    "remote_model_status",
    "load_pipeline",
    "load_model_card",
    "patient_history",
    "with_reference_limits",
    "load_forecasts",
    "prepare_results",
    "load_anomalies",
    "load_recommendations",
    "load_explanation",
    "review_backend",
    "pending_outputs",
    "scoring_status",
    "start_scoring",
    "warm_explainer",
]

FORECAST_COLUMNS = ["patient_id", "analyte_code", "at", "q05", "q10", "q25", "q50", "q75", "q90", "q95",
                    "unit", "n_history", "status", "model_version"]
# as clinical.anomalies.ANOMALY_COLUMNS (one row per anomaly; ``text`` is the decision-support wording)
ANOMALY_COLUMNS = ["result_id", "patient_id", "analyte_code", "analyte_name", "collected_at", "rule", "flag", "score",
                   "value", "unit", "evidence", "source", "text", "model_version"]
# as clinical.recommendations.RECOMMENDATION_COLUMNS
RECOMMENDATION_COLUMNS = ["rule_id", "rule_version", "patient_id", "analyte_code", "at", "title", "text", "urgency",
                          "source", "triggered_by", "result_ids"]
# the first columns of clinical.outputs.OUTPUT_COLUMNS (what the review page shows)
OUTPUT_COLUMNS = ["output_id", "patient_id", "analyte_code", "analyte_name", "kind", "forecast_for",
                  "predicted_value", "unit", "model_version", "status", "rule", "summary"]

# Forecast times asked for, in days after each analyte's last result. The model forecasts
# any time; these are what the timeline shows (next day, a few days, a week).
FORECAST_HORIZONS_DAYS = (1, 3, 7)
NO_MODEL_MESSAGE = "No trained model loaded: forecasts unavailable"


@dataclass
class ServiceResult:
    frame: pd.DataFrame
    available: bool
    message: str = ""
    extra: dict = field(default_factory=dict)


def _empty(columns) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _conform(frame: pd.DataFrame, columns) -> pd.DataFrame:
    out = frame.copy()
    for c in columns:
        if c not in out:
            out[c] = None
    return out[list(columns) + [c for c in out.columns if c not in columns]]


def _optional(module: str, *names: str):
    """The module if it imports and has all ``names``; else None (the feature is not installed yet)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return mod if all(hasattr(mod, n) for n in names) else None


# =============================================================================================
# Model
# =============================================================================================
@dataclass(frozen=True)
class ModelStatus:
    available: bool
    path: str
    version: str | None
    message: str
    stamp: float = 0.0  # mtime of the files (a number from the version when served), so caches reload a new model
    calibrated: bool = False  # the folder has conformal interval adjustments (calibration.json)
    remote: bool = False  # ``path`` is the URL of a ``labtrend serve-model`` server


def model_status(model_dir: str | Path | None) -> ModelStatus:
    """Whether ``model_dir`` holds a saved ForecastPipeline (read without loading torch)."""
    if model_dir is None:
        return ModelStatus(False, "", None, NO_MODEL_MESSAGE + " (no model folder configured).")
    p = Path(model_dir)
    needed = ("vocab.json", "scaler.json", "config.json")
    missing = [n for n in needed if not (p / n).is_file()]
    if not p.is_dir() or missing:
        why = "folder not found" if not p.is_dir() else f"missing {', '.join(missing)}"
        return ModelStatus(False, str(p), None, f"{NO_MODEL_MESSAGE} ({p.name}: {why}).")
    version_file = p / "model_version"
    version = version_file.read_text().strip() if version_file.is_file() else None
    stamp = max((p / n).stat().st_mtime for n in needed)
    calibrated = (p / "calibration.json").is_file()
    return ModelStatus(True, str(p), version, f"Model {version or '(version unknown)'} loaded from {p.name}"
                       + (" (intervals conformal-calibrated)." if calibrated else " (intervals not calibrated)."),
                       stamp, calibrated)


def is_model_url(path: str | Path | None) -> bool:
    """Whether ``path`` is a model server URL (http:// or https://) rather than a model folder."""
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def _version_stamp(version: str) -> float:
    """A float that changes with ``version`` (48 bits of its SHA-256: exact in a float)."""
    import hashlib

    return float(int.from_bytes(hashlib.sha256(version.encode()).digest()[:6], "big"))


def remote_model_status(url: str, transport=None) -> ModelStatus:
    """Whether the model server at ``url`` answers ``GET /health``; the message names the URL either way.

    ``transport``: an ``httpx`` transport (tests). Never raises for an unreachable server.
    """
    from labtrend.remote import RemoteForecastPipeline

    try:
        with RemoteForecastPipeline(url, transport=transport) as client:
            health = client.health()
    except (ModelServerError, ValueError) as exc:
        return ModelStatus(False, url, None, f"{NO_MODEL_MESSAGE}: {exc}.", remote=True)
    version, calibrated = str(health["model_version"]), bool(health["calibrated"])
    return ModelStatus(True, url, version,
                       f"Model {version} served by {url} on {health['device']} ({health['dtype']})"
                       + (" (intervals conformal-calibrated)." if calibrated else " (intervals not calibrated)."),
                       _version_stamp(version), calibrated, remote=True)


def load_pipeline(status: ModelStatus):
    """The pipeline for an available :class:`ModelStatus`.

    A served model (``status.remote``): a :class:`labtrend.remote.RemoteForecastPipeline` on
    ``status.path``. Otherwise the ForecastPipeline in the folder, on CUDA when present
    (bf16 autocast) else CPU; this imports torch.
    """
    if status.remote:
        from labtrend.remote import RemoteForecastPipeline

        return RemoteForecastPipeline(status.path)
    from model.inference import ForecastPipeline

    return ForecastPipeline.from_pretrained(status.path, device="auto")


def load_model_card(model_dir: str | Path | None) -> dict | None:
    """``model_card.json`` of the model folder (written by ``model.evaluation.write_model_card``), or None."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "model_card.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# =============================================================================================
# Reference and critical limits for display
# =============================================================================================
@functools.lru_cache(maxsize=1)
def _reference_tables():
    from data.catalogue import reference_file

    ri = pd.read_csv(reference_file("reference_intervals.csv"), dtype={"code": str})
    cv = pd.read_csv(reference_file("critical_values.csv"), dtype={"code": str})
    return ri, cv


def _to_canonical(value, unit: str, code: str) -> float | None:
    """A catalogue limit in the analyte's canonical unit (None when it cannot be converted)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return _converted(float(value), str(unit), code)


@functools.lru_cache(maxsize=4096)
def _converted(value: float, unit: str, code: str) -> float | None:
    from data.catalogue import load_catalogue
    from data.units import UnitError, conversion_factor

    cat = load_catalogue()
    a = cat.get(code) if code in cat else None
    if a is None:
        return None
    if unit == a.canonical_unit:
        return value
    try:
        return value * conversion_factor(unit, a)
    except (UnitError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _reference_by_code() -> tuple[dict, dict]:
    """The reference files as ``{code: rows}`` (intervals) and ``{code: first row}`` (critical limits)."""
    ri, cv = _reference_tables()
    return ({code: rows.reset_index(drop=True) for code, rows in ri.groupby("code")},
            {code: rows.iloc[0] for code, rows in cv.groupby("code")})


@functools.lru_cache(maxsize=8192)
def _catalogue_limits(code: str, sex: str | None, age_years: float | None) -> tuple[float, float, float, float]:
    """(reference low, reference high, critical low, critical high) of one analyte in its canonical unit; NaN: none."""
    nan = float("nan")
    intervals, critical = _reference_by_code()
    lo = hi = clo = chi = nan
    r = intervals.get(code)
    if r is not None and age_years is not None and not math.isnan(age_years):
        r = r[(r["age_low_years"].isna() | (r["age_low_years"] <= age_years))
              & (r["age_high_years"].isna() | (age_years < r["age_high_years"]))]
    if r is not None and len(r):
        own = r[(r["sex"] == "any") | (r["sex"] == sex)] if sex else r[r["sex"] == "any"]
        # sex unknown and only sex-specific intervals: the union of both (as clinical.anomalies does)
        use = own if len(own) else r
        lows = [_to_canonical(v, u, code) for v, u in zip(use["low"], use["unit"])]
        highs = [_to_canonical(v, u, code) for v, u in zip(use["high"], use["unit"])]
        lows, highs = [v for v in lows if v is not None], [v for v in highs if v is not None]
        lo, hi = (min(lows) if lows else nan), (max(highs) if highs else nan)
    row = critical.get(code)
    if row is not None:
        clo, chi = _to_canonical(row["low"], row["unit"], code), _to_canonical(row["high"], row["unit"], code)
        clo, chi = (nan if clo is None else clo), (nan if chi is None else chi)
    return lo, hi, clo, chi


def with_reference_limits(results: pd.DataFrame, sex: str | None = None, age_years: float | None = None) -> pd.DataFrame:
    """``results`` plus ``ref_low_catalogue, ref_high_catalogue`` (the catalogue interval for
    this sex and age) and ``critical_low, critical_high`` (site critical limits), all in the
    canonical unit; NaN where the reference files have nothing for the analyte.

    The figures use a result's own reported interval first and fall back to these. The
    limits are worked out once per (analyte, sex, age) and then looked up. The result shares
    ``results``' columns (pandas copy-on-write: neither frame sees the other's changes), so a
    patient's cached timeline and its frame with limits are not two full copies in memory.
    """
    out = results.copy(deep=False)
    columns = ("ref_low_catalogue", "ref_high_catalogue", "critical_low", "critical_high")
    if out.empty:
        for c in columns:
            out[c] = float("nan")
        return out
    sex = sex if sex in ("F", "M") else None
    age = None if age_years is None or (isinstance(age_years, float) and math.isnan(age_years)) else float(age_years)
    codes = out["analyte_code"].astype(object)
    limits = {code: _catalogue_limits(str(code), sex, age) for code in codes.unique()}
    for k, c in enumerate(columns):
        out[c] = codes.map({code: lim[k] for code, lim in limits.items()}).astype(float)
    return out


# =============================================================================================
# Forecasts
# =============================================================================================
def age_years(patient: dict | None, at) -> float | None:
    """Age in years at ``at`` for choosing reference intervals: from the birth date when known, else the
    age the source gave (at its reference date); None when neither is known."""
    patient = patient or {}
    birth, age = patient.get("birth_date"), patient.get("age_at_ref")
    if birth is not None and not pd.isna(birth):
        return None if at is None or pd.isna(at) else (pd.Timestamp(at) - pd.Timestamp(birth)).days / 365.25
    return None if age is None or pd.isna(age) else float(age)


def patient_history(results: pd.DataFrame, patient: dict | None) -> pd.DataFrame:
    """The model's history frame (``model.HISTORY_COLUMNS``) from one patient's timeline.

    Same rule as :func:`data.queries.cohort`: numeric and censored results in canonical
    units; text, empty, implausible and unit-missing results left out; conflicting results
    at one time keep the one reported last (then the later import row). Uses
    ``clinical.anomalies.history_from_timeline`` (one implementation of the rule) when it
    is installed.
    """
    mod = _optional("clinical.anomalies", "history_from_timeline")
    if mod is not None:
        return mod.history_from_timeline(results, patient).reset_index(drop=True)
    cols = ["patient_id", "collected_at", "analyte_code", "value", "censor", "unit_canonical", "sex", "age_years"]
    r = results[
        results["value_canonical"].notna() & ~results["implausible"].astype(bool) & ~results["unit_missing"].astype(bool)
    ].copy()
    r = r[r["value_canonical"].map(lambda v: math.isfinite(float(v)))]
    if r.empty:
        return _empty(cols)
    r["_rep"] = r["reported_at"].fillna(pd.Timestamp.min)
    r = r.sort_values(["analyte_code", "collected_at", "_rep", "result_id"])
    r = r.drop_duplicates(["analyte_code", "collected_at"], keep="last")
    comp = r["comparator"].astype(str)
    r["censor"] = comp.map(lambda c: -1 if c.startswith("<") else 1 if c.startswith(">") else 0).astype("int8")
    r["value"] = r["value_canonical"].astype(float)
    patient = patient or {}
    sex = patient.get("sex") if patient.get("sex") in ("F", "M") else None
    r["sex"] = sex
    birth, age_ref, ref_date = patient.get("birth_date"), patient.get("age_at_ref"), patient.get("ref_date")
    if birth is not None and not pd.isna(birth):
        r["age_years"] = (r["collected_at"] - pd.Timestamp(birth)).dt.days / 365.25
    elif age_ref is not None and not pd.isna(age_ref) and ref_date is not None and not pd.isna(ref_date):
        r["age_years"] = float(age_ref) + (r["collected_at"] - pd.Timestamp(ref_date)).dt.days / 365.25
    else:
        r["age_years"] = float("nan")
    return r[cols].sort_values(["collected_at", "analyte_code"]).reset_index(drop=True)


def forecast_queries(history: pd.DataFrame, analytes, horizons_days=FORECAST_HORIZONS_DAYS) -> pd.DataFrame:
    """Queries ``(patient_id, analyte_code, at)``: each horizon (days) after the patient's latest result.

    The forecast times are the same for every analyte - the days after the newest result of
    any analyte, the timeline's "now" - so an analyte last measured weeks earlier is forecast
    for those days (a longer horizon), never for a date the timeline has already passed.
    """
    rows = []
    if history.empty:
        return pd.DataFrame(rows, columns=["patient_id", "analyte_code", "at"])
    now = pd.Timestamp(history["collected_at"].max())
    for code in analytes:
        h = history[history["analyte_code"] == code]
        if h.empty:
            continue
        rows += [{"patient_id": h["patient_id"].iloc[0], "analyte_code": code, "at": now + pd.Timedelta(days=d)}
                 for d in horizons_days]
    return pd.DataFrame(rows, columns=["patient_id", "analyte_code", "at"])


def load_forecasts(pipeline, results: pd.DataFrame, patient: dict | None, analytes, status: ModelStatus | None = None
                   ) -> ServiceResult:
    """Forecasts for ``analytes`` of one patient, or an empty frame and why there are none.

    ``pipeline`` is a loaded ForecastPipeline (in-process or served) or None (then the
    message is :data:`NO_MODEL_MESSAGE`). Analytes with too little history come back with
    their ``status`` ('Not enough measurements to forecast (1; minimum 2)') and no numbers.
    When the model server cannot be reached the frame is empty, the message names the URL
    and ``extra['retry']`` is True (a cache should not keep that answer).
    """
    if pipeline is None:
        return ServiceResult(_empty(FORECAST_COLUMNS), False, status.message if status else NO_MODEL_MESSAGE)
    history = patient_history(results, patient)
    queries = forecast_queries(history, analytes)
    if queries.empty:
        return ServiceResult(_empty(FORECAST_COLUMNS), True, "No numeric results to forecast from.")
    try:
        frame = pipeline.forecast(history, queries)
    except ValueError as exc:  # the model's input checks name what is wrong
        return ServiceResult(_empty(FORECAST_COLUMNS), False, f"Forecast not available: {exc}")
    except ModelServerError as exc:
        return ServiceResult(_empty(FORECAST_COLUMNS), False, f"Forecast not available: {exc}", extra={"retry": True})
    return ServiceResult(_conform(frame, FORECAST_COLUMNS), True, "")


# =============================================================================================
# Clinical outputs (colleague's clinical/ package)
# =============================================================================================
def flag_rules() -> tuple[str, ...] | None:
    """The anomaly rules the timeline runs: every rule but ``reference_interval`` (an H/L outside the reference
    interval is already the flag on the result: its chart label, its table cell, the counts), so a long series
    does not compute, keep and list one anomaly per abnormal result. None: every rule (the module is older)."""
    mod = _optional("clinical.anomalies", "RULES", "PATTERN_PREFIX")
    if mod is None:
        return None
    return tuple(r for r in mod.RULES if r != "reference_interval") + ("preanalytical",)


def prepare_results(results: pd.DataFrame, patient: dict | None) -> pd.DataFrame:
    """One patient's timeline rows prepared once for :func:`load_anomalies` and :func:`load_recommendations`
    (``clinical.anomalies.prepare_timeline``); ``results`` itself when that module is older."""
    mod = _optional("clinical.anomalies", "prepare_timeline")
    return mod.prepare_timeline(results, patient) if mod is not None else results


def load_anomalies(results: pd.DataFrame, patient: dict | None, forecaster=None,
                   model_rules_since=None, rules=None) -> ServiceResult:
    """Anomaly flags (reference interval, critical value, delta check/RCV, pre-analytical
    patterns; model surprise when ``forecaster`` is given, on results collected at or after
    ``model_rules_since`` when that is given) for one patient's results.

    ``rules``: the rule names to run (``clinical.anomalies.detect_anomalies``; None: all).
    ``extra['notes']`` carries the detector's notes (rules that could not run, and why).
    When the forecaster is a model server that cannot be reached, the other rules still
    run, a note names the URL and ``extra['retry']`` is True.
    """
    mod = _optional("clinical.anomalies", "detect_anomalies")
    if mod is None:
        return ServiceResult(_empty(ANOMALY_COLUMNS), False,
                             "Anomaly detection is not installed yet: no anomaly flags are shown.")
    extra: dict = {}
    try:
        frame = mod.detect_anomalies(results, patient, forecaster=forecaster, model_rules_since=model_rules_since,
                                     **({"rules": list(rules)} if rules else {}))
    except ModelServerError as exc:
        frame = mod.detect_anomalies(results, patient, **({"rules": list(rules)} if rules else {}))
        frame.attrs["notes"] = [*frame.attrs.get("notes", []), f"model_surprise not evaluated: {exc}"]
        extra["retry"] = True
    return ServiceResult(_conform(frame, ANOMALY_COLUMNS), True, "",
                         extra={"notes": list(frame.attrs.get("notes", [])), **extra})


def load_recommendations(results: pd.DataFrame, forecasts: pd.DataFrame, anomalies: pd.DataFrame,
                         patient: dict | None) -> ServiceResult:
    """Follow-up suggestions for one patient from the versioned rule file (decision support)."""
    mod = _optional("clinical.recommendations", "evaluate_rules")
    if mod is None:
        return ServiceResult(_empty(RECOMMENDATION_COLUMNS), False, "Recommendations are not available yet.")
    if results.empty:
        return ServiceResult(_empty(RECOMMENDATION_COLUMNS), True, "")
    ok = forecasts[forecasts["status"] == "ok"] if len(forecasts) else None
    frame = mod.evaluate_rules(results, patient, forecasts=ok, anomalies=anomalies if len(anomalies) else None)
    return ServiceResult(_conform(frame, RECOMMENDATION_COLUMNS), True, "")


def load_explanation(pipeline, results: pd.DataFrame, patient: dict | None, query: dict,
                     forecast_median: float | None = None) -> ServiceResult:
    """The attribution of one forecast (``query``: patient_id, analyte_code, at), or why there is none.

    ``extra['explanation']`` holds the dict for :func:`dashboard.figures.make_shap_bar`
    (``features``, ``base_value``, ``output``, ``unit``, ``model_version``). An explanation
    whose attributions do not add up is not returned (XAI-15): the message says so.
    A served pipeline (one with an ``explain`` method) computes the explanation on the
    server; when it cannot be reached the message names the URL and ``extra['retry']`` is True.
    """
    empty = _empty(["feature", "value"])
    if pipeline is None:
        return ServiceResult(empty, False, NO_MODEL_MESSAGE)
    mod = _optional("model.explain", "explain_forecast")
    if mod is None:
        return ServiceResult(empty, False, "Explanations are not available for this model yet.")
    from dashboard.figures import explanation_difference

    args = (patient_history(results, patient), str(query["patient_id"]), str(query["analyte_code"]), query["at"])
    if hasattr(pipeline, "explain"):  # served: the server runs explain_forecast
        try:
            ex = pipeline.explain(*args, forecast_median=forecast_median)
        except ValueError as exc:
            return ServiceResult(empty, False, f"Explanation not available: {exc}")
        except ModelServerError as exc:
            return ServiceResult(empty, False, f"Explanation not available: {exc}", extra={"retry": True})
    else:
        ex = mod.explain_forecast(pipeline, *args, forecast_median=forecast_median)
    if not ex.ok:
        return ServiceResult(empty, False, ex.message or f"Explanation not available ({ex.status}).")
    expl = {"features": [{"feature": g["label"], "value": g["value"]} for g in ex.groups],
            "base_value": ex.base_value, "output": ex.median, "unit": ex.unit, "model_version": ex.model_version,
            "method": ex.method}
    diff = explanation_difference(expl)
    if diff > 0.01 * max(1.0, abs(float(expl["output"]))):
        return ServiceResult(empty, False, "Explanation not available for this model version "
                                           f"(attributions do not add up; difference = {diff:.4g})",
                             extra={"difference": diff})
    return ServiceResult(pd.DataFrame(expl["features"]), True, "", extra={"explanation": expl})


def review_backend():
    """``clinical.outputs`` when it provides ``pending_outputs`` and ``record_verdict``, else None."""
    return _optional("clinical.outputs", "pending_outputs", "record_verdict")


def pending_outputs(store, expert: str) -> ServiceResult:
    """Model outputs waiting for this expert's verdict.

    With ``clinical.outputs`` installed its ``pending_outputs`` decides; without it, the
    ``model_outputs`` table (if it exists) is listed read-only and review is unavailable.
    """
    backend = review_backend()
    if backend is not None:
        return ServiceResult(_conform(backend.pending_outputs(store, expert), OUTPUT_COLUMNS), True, "")
    with store.read() as cur:
        exists = cur.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'model_outputs'"
        ).fetchone()[0]
        frame = cur.execute("SELECT * FROM model_outputs LIMIT 500").df() if exists else None
    if frame is None:
        return ServiceResult(_empty(OUTPUT_COLUMNS), False, "No model outputs to review yet.")
    return ServiceResult(frame, False, "Review is unavailable: the verdict service (clinical/outputs.py) is not "
                                       "installed yet. Outputs are listed read-only.")


def scoring_status(store, model_dir: str | Path | None) -> ServiceResult:
    """Where the batch job (``labtrend score``) stands for the model in ``model_dir``.

    ``extra``: ``waiting`` (patients with results newer than their stored outputs, or never
    scored with this model and settings; None without a local model), ``scored``,
    ``last_run`` (the latest ``scoring_runs`` row as a dict, or None) and ``running`` (True
    while that run has not finished). ``available`` is False without a local model folder.
    """
    from labtrend.scoring import ScoreConfig, scoring_key
    from labtrend.scoring import scoring_status as _status

    status = model_status(model_dir) if model_dir and not is_model_url(model_dir) else None
    key = None
    if status is not None and status.available and status.version:
        key = scoring_key(status.version, ScoreConfig(db_path=str(store.settings.path), model_dir=str(model_dir)))
    st = _status(store, key)
    last = st["last_run"]
    st["running"] = bool(last is not None and (last.get("finished_at") is None or pd.isna(last.get("finished_at"))))
    if key is None:
        return ServiceResult(_empty([]), False, "Outputs are computed by `labtrend score` with a local model folder.",
                             extra=st)
    return ServiceResult(_empty([]), True, "", extra=st)


def start_scoring(db_path: str | Path, model_dir: str | Path, log_path: str | Path):
    """Start ``labtrend score`` for the patients with new results, in its own process; returns the ``Popen``.

    The run writes its outputs in short batches (the dashboard keeps reading between them)
    and its progress into ``scoring_runs``; its output goes to ``log_path``.
    """
    import subprocess
    import sys

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "labtrend.cli", "score", "--db", str(db_path), "--model",
                                 str(model_dir), "--no-progress"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def warm_explainer(pipeline):
    """Import shap and run one small explanation in a background thread; returns the thread (None when served).

    shap takes seconds to import and compiles its numba kernels on its first explanation in a
    process (:func:`model.explain.warm_up`: about 8 s of CPU on a busy 2-core machine), which the
    first explanation a clinician asks for would otherwise wait for. Called when the page loads the
    model, so by the time "Explain this forecast" is switched on the explainer is ready. A
    failure here only means the first explanation pays that cost; it is logged, never raised.
    """
    import logging
    import threading

    if pipeline is None or hasattr(pipeline, "explain"):  # a served model explains on its server
        return None

    def run():
        try:
            from model.explain import warm_up

            warm_up(pipeline)
        except Exception:  # noqa: BLE001 - a warm-up only
            logging.getLogger(__name__).warning("explainer warm-up failed", exc_info=True)

    thread = threading.Thread(target=run, name="labtrend-explainer-warm-up", daemon=True)
    thread.start()
    return thread
