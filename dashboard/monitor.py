"""Reads what the Model page's monitoring section needs from the store and the model folder.

Plain Python (no Streamlit): the stored forecast outputs, the results that arrived for
them, the model's training statistics (``scaler.json``, read as JSON without torch) and the
experts' current verdicts, handed to the pure functions of :mod:`model.monitoring`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from clinical import outputs
from data import queries
from model import monitoring

__all__ = ["MonitoringData", "stored_forecasts", "training_statistics", "load_monitoring"]


@dataclass
class MonitoringData:
    forecasts: pd.DataFrame  # stored forecast outputs, one row each
    matched: pd.DataFrame  # model.monitoring.match_realised
    errors: pd.DataFrame  # model.monitoring.realised_error_summary
    drift: pd.DataFrame  # model.monitoring.analyte_drift
    verdicts: pd.DataFrame  # model.monitoring.verdict_rates
    notes: list[str]
    names: dict[str, str]  # analyte code -> 'Potassium (mmol/L)'

    @property
    def skill(self) -> float:
        """Overall realised skill 1 - sum|e_model| / sum|e_last value| over every scored forecast (NaN if none)."""
        if self.matched.empty:
            return float("nan")
        base = float(self.matched["abs_error_last_value"].sum())
        return 1 - float(self.matched["abs_error"].sum()) / base if base > 0 else float("nan")


def stored_forecasts(store, model_version: str | None = None) -> pd.DataFrame:
    """Forecast outputs with a number, as a frame: ``output_id, patient_id, analyte_code, at,
    q05..q95, lo95, hi95, unit, model_version, created_at`` (canonical units)."""
    df = outputs.load_outputs(store, kind="forecast")
    cols = ["output_id", "patient_id", "analyte_code", "at", "q05", "q10", "q25", "q50", "q75", "q90", "q95",
            "lo95", "hi95", "unit", "model_version", "created_at"]
    rows = []
    for r in df.to_dict("records"):
        p = r["payload"]
        if p.get("status") != "ok" or (model_version and r["model_version"] != model_version):
            continue
        q = p.get("quantiles") or {}
        lo95, hi95 = (p.get("interval95") or [None, None])[:2]
        rows.append({"output_id": r["output_id"], "patient_id": r["patient_id"], "analyte_code": r["analyte_code"],
                     "at": pd.Timestamp(r["output_time"]), **{k: q.get(k) for k in cols[4:11]},
                     "lo95": lo95, "hi95": hi95, "unit": p.get("unit"), "model_version": r["model_version"],
                     "created_at": r["created_at"]})
    out = pd.DataFrame(rows, columns=cols)
    for c in cols[4:13]:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    return out


def training_statistics(model_dir: str | Path | None) -> dict[str, dict]:
    """Per analyte, the training distribution the model normalises with (``scaler.json``), or {}."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "scaler.json"
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")).get("analytes", {}))


def load_monitoring(store, model_dir: str | Path | None, period: str = "M",
                    tolerance: pd.Timedelta = pd.Timedelta(hours=12)) -> MonitoringData:
    """Everything the monitoring section draws, for the forecasts stored so far.

    Raises ValueError for an unknown ``period`` ('M', 'Q' or 'Y').
    """
    notes: list[str] = []
    fc = stored_forecasts(store)
    if fc.empty:
        notes.append("No forecasts are stored yet (they are stored when a patient's outputs are computed).")
        results = pd.DataFrame(columns=["patient_id", "analyte_code", "collected_at", "value", "censor"])
    else:
        c = queries.cohort(store, analytes=sorted(set(fc["analyte_code"])), patients=sorted(set(fc["patient_id"])))
        results = c
    matched = monitoring.match_realised(fc, results, tolerance=tolerance)
    if len(fc) and matched.empty:
        notes.append(f"None of the {len(fc)} stored forecasts has its target yet (a result of the analyte within "
                     f"{tolerance.total_seconds() / 3600:g} h of the forecast time).")
    errors = monitoring.realised_error_summary(matched, period)
    stats = training_statistics(model_dir)
    if stats:
        top = queries.top_analytes(store, n=20)["analyte_code"].tolist()
        drift = monitoring.analyte_drift(queries.cohort(store, analytes=top), stats, period)
    else:
        drift = monitoring.analyte_drift(pd.DataFrame(columns=["analyte_code", "collected_at", "value"]), {}, period)
        notes.append("No model statistics (scaler.json) to measure drift against.")
    verdicts = monitoring.verdict_rates(outputs.current_verdicts(store), period)
    return MonitoringData(fc, matched, errors, drift, verdicts, notes, analyte_names(store))


def analyte_names(store) -> dict[str, str]:
    """Display names 'Name (canonical unit)' of every analyte in the store, by code."""
    from dashboard.figures import display_unit

    t = queries.top_analytes(store, n=100_000, numeric_only=False)
    return {c: (f"{n} ({display_unit(u)})" if u and display_unit(u) else str(n or c))
            for c, n, u in zip(t["analyte_code"], t["analyte_name"], t["unit_canonical"])}
