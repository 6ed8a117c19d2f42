"""Continuous monitoring of the deployed forecaster (pure pandas / numpy; no I/O).

Three views, each computed from frames the caller reads from the store:

* **Realised error** (:func:`match_realised`, :func:`realised_error_summary`): every stored
  forecast whose target has arrived - a result of the same patient and analyte collected
  within ``tolerance`` of the forecast time - is scored against that result, next to the
  last-value-carried-forward baseline (the last result collected strictly before the
  forecast time: the same information the model had). Reported per analyte and period:
  MAE of both, the model's skill ``1 - MAE_model / MAE_last_value`` and the 80 % / 95 %
  interval coverage.
* **Input drift** (:func:`analyte_drift`): each analyte's results per period against the
  distribution the model was trained on, as saved in its scaler (median ``center`` and
  robust SD ``scale`` = IQR / 1.349, on the log scale for skewed analytes). The shift is the
  period median minus the training median in training robust-SD units; the spread ratio is
  the period's robust SD over the training one.
* **Expert verdicts** (:func:`verdict_rates`): the current verdicts per output kind and
  period: how many were reviewed and the share judged valid, invalid and unsure.

The drift threshold :data:`DRIFT_SHIFT_SD` is a monitoring convention of this product (a
half-SD move of the median is worth a look), not a clinical number.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = [
    "PERIODS",
    "DRIFT_SHIFT_SD",
    "match_realised",
    "realised_error_summary",
    "analyte_drift",
    "verdict_rates",
]

#: Period codes accepted by the summaries (pandas period aliases) and how the UI names them.
PERIODS = {"M": "month", "Q": "quarter", "Y": "year"}
#: |median shift| (training robust SDs) from which an analyte-period is marked as drifted.
DRIFT_SHIFT_SD = 0.5

_FORECAST_NEEDED = ("patient_id", "analyte_code", "at", "q10", "q50", "q90")
_RESULT_NEEDED = ("patient_id", "analyte_code", "collected_at", "value")


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}")


def _period(times: pd.Series, period: str) -> pd.Series:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    return pd.to_datetime(times).dt.to_period(period).astype(str)


def match_realised(forecasts: pd.DataFrame, results: pd.DataFrame, tolerance: pd.Timedelta = pd.Timedelta(hours=12)
                   ) -> pd.DataFrame:
    """Each forecast with the result that arrived for it, and the last-value baseline.

    Args:
        forecasts: one row per forecast, ``(n_forecasts,)``: ``patient_id, analyte_code, at``
            (forecast time), quantiles ``q10, q50, q90`` and optionally ``lo95, hi95``, in
            the analyte's canonical unit.
        results: the store's cohort in canonical units (``data.queries.cohort``):
            ``patient_id, analyte_code, collected_at, value`` and optionally ``censor``;
            censored results (``censor != 0``) are never used as a realised value.
        tolerance: the longest gap between the forecast time and the result that counts
            as its target (the nearest one is taken; ties go to the earlier result).

    Returns:
        ``forecasts`` plus ``realised_at, realised, last_value, abs_error,
        abs_error_last_value, in80, in95`` (units of the analyte; ``in95`` NaN when the
        forecast has no 95 % interval). Only forecasts whose target has arrived and that
        have a previous result are kept.

    Raises:
        ValueError: a frame lacks a needed column.
    """
    _require(forecasts, _FORECAST_NEEDED, "forecasts")
    _require(results, _RESULT_NEEDED, "results")
    out_cols = list(forecasts.columns) + ["realised_at", "realised", "last_value", "abs_error",
                                          "abs_error_last_value", "in80", "in95"]
    f = forecasts.copy()
    f["at"] = pd.to_datetime(f["at"])
    f = f[f["q50"].notna()]
    r = results[list(_RESULT_NEEDED) + (["censor"] if "censor" in results else [])].copy()
    r["collected_at"] = pd.to_datetime(r["collected_at"])
    r = r[np.isfinite(r["value"].astype(float))]
    if f.empty or r.empty:
        return pd.DataFrame(columns=out_cols)
    f["_key"] = f["patient_id"].astype(str) + "\x1f" + f["analyte_code"].astype(str)
    r["_key"] = r["patient_id"].astype(str) + "\x1f" + r["analyte_code"].astype(str)
    r = r[r["_key"].isin(set(f["_key"]))]
    f = f.sort_values("at", kind="stable").reset_index(drop=True)
    exact = r[r["censor"] == 0] if "censor" in r else r
    target = exact[["_key", "collected_at", "value"]].rename(columns={"collected_at": "realised_at", "value": "realised"})
    target = target.sort_values("realised_at", kind="stable")
    target["_t"] = target["realised_at"]
    m = pd.merge_asof(f, target, left_on="at", right_on="_t", by="_key", direction="nearest", tolerance=tolerance)
    prev = r[["_key", "collected_at", "value"]].rename(columns={"value": "last_value"}).sort_values("collected_at")
    prev["_t"] = prev["collected_at"]
    m = pd.merge_asof(m.drop(columns="_t"), prev[["_key", "_t", "last_value"]], left_on="at", right_on="_t",
                      by="_key", direction="backward", allow_exact_matches=False)
    m = m[m["realised"].notna() & m["last_value"].notna()].copy()
    y = m["realised"].astype(float)
    m["abs_error"] = (y - m["q50"].astype(float)).abs()
    m["abs_error_last_value"] = (y - m["last_value"].astype(float)).abs()
    m["in80"] = ((m["q10"].astype(float) <= y) & (y <= m["q90"].astype(float))).astype(float)
    if {"lo95", "hi95"} <= set(m.columns):
        lo, hi = m["lo95"].astype(float), m["hi95"].astype(float)
        m["in95"] = np.where(lo.notna() & hi.notna(), ((lo <= y) & (y <= hi)).astype(float), np.nan)
    else:
        m["in95"] = np.nan
    return m.reindex(columns=out_cols).reset_index(drop=True)


def realised_error_summary(matched: pd.DataFrame, period: str = "M") -> pd.DataFrame:
    """Per analyte and period (of the forecast time), the realised accuracy of the model.

    ``matched`` is :func:`match_realised`'s output. Returns ``analyte_code, period, n,
    mae, mae_last_value, skill, coverage80, coverage95`` (MAE in the analyte's canonical
    unit; ``skill`` = 1 - mae / mae_last_value, positive when the model beats carrying the
    last value forward, NaN when the baseline is exact), plus one ``analyte_code = 'all'``
    row per period: its MAEs are NaN (units differ between analytes), its skill and
    coverages are the analytes' values weighted by their ``n``.
    """
    cols = ["analyte_code", "period", "n", "mae", "mae_last_value", "skill", "coverage80", "coverage95"]
    if matched.empty:
        return pd.DataFrame(columns=cols)
    d = matched.assign(period=_period(matched["at"], period))
    g = d.groupby(["analyte_code", "period"], sort=True)
    s = g.agg(n=("abs_error", "size"), mae=("abs_error", "mean"), mae_last_value=("abs_error_last_value", "mean"),
              coverage80=("in80", "mean"), coverage95=("in95", "mean")).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        s["skill"] = np.where(s["mae_last_value"] > 0, 1 - s["mae"] / s["mae_last_value"], np.nan)
    overall = []
    for p, grp in s.groupby("period", sort=True):
        w = grp["n"].to_numpy(dtype=float)
        ok = np.isfinite(grp["skill"].to_numpy(dtype=float))
        overall.append({
            "analyte_code": "all", "period": p, "n": int(w.sum()), "mae": np.nan, "mae_last_value": np.nan,
            "skill": float(np.average(grp["skill"][ok], weights=w[ok])) if ok.any() else np.nan,
            "coverage80": float(np.average(grp["coverage80"], weights=w)),
            "coverage95": (float(np.average(grp["coverage95"].dropna(), weights=w[grp["coverage95"].notna()]))
                           if grp["coverage95"].notna().any() else np.nan),
        })
    return pd.concat([s[cols], pd.DataFrame(overall, columns=cols)], ignore_index=True)


def analyte_drift(results: pd.DataFrame, training: Mapping[str, object], period: str = "M", min_n: int = 30,
                  min_patients: int = 5) -> pd.DataFrame:
    """Each analyte's distribution per period against the one the model was trained on.

    Args:
        results: ``analyte_code, collected_at, value`` (canonical unit), e.g. the cohort;
            censored values are included at their limit.
        training: per analyte code, the training statistics (``model.features.AnalyteStats``
            or a dict with ``transform`` 'log'|'identity', ``center``, ``scale``, ``lower``),
            from the model's ``scaler.json``.
        period: 'M', 'Q' or 'Y'.
        min_n: periods with fewer results of the analyte are left out (too few to judge).
        min_patients: with a ``patient_id`` column, periods whose results come from fewer
            patients are left out too: they describe those patients, not the population
            (in an export whose dates are shifted per patient, as MIMIC-IV's, a month is
            mostly one patient).

    Returns:
        ``analyte_code, period, n, median, median_shift_sd, spread_ratio, drifted``: the
        period's median (canonical unit), its distance from the training median in training
        robust SDs (on the log scale for log-transformed analytes), the ratio of robust SDs,
        and whether ``|median_shift_sd| >= DRIFT_SHIFT_SD``. Analytes the model has no
        statistics for are left out.

    Raises:
        ValueError: ``results`` lacks a needed column, or ``period`` is unknown.
    """
    _require(results, ("analyte_code", "collected_at", "value"), "results")
    cols = ["analyte_code", "period", "n", "median", "median_shift_sd", "spread_ratio", "drifted"]
    if results.empty:
        return pd.DataFrame(columns=cols)
    d = results[["analyte_code", "collected_at", "value"] + (["patient_id"] if "patient_id" in results else [])].copy()
    d["period"] = _period(d["collected_at"], period)
    d = d[np.isfinite(d["value"].astype(float))]
    rows = []
    for code, grp in d.groupby("analyte_code", sort=True):
        st = training.get(code)
        if st is None:
            continue
        get = (lambda k: st[k]) if isinstance(st, Mapping) else (lambda k: getattr(st, k))
        center, scale = float(get("center")), float(get("scale"))
        if not np.isfinite(scale) or scale <= 0:
            continue
        is_log = get("transform") == "log"
        lower = float(get("lower")) if is_log else 0.0
        for p, g in grp.groupby("period", sort=True):
            if len(g) < min_n or ("patient_id" in g and g["patient_id"].nunique() < min_patients):
                continue
            x = g["value"].to_numpy(dtype=float)
            t = np.log(np.maximum(x, lower)) if is_log else x
            q25, med_t, q75 = np.percentile(t, [25, 50, 75])
            shift = (med_t - center) / scale
            rows.append({"analyte_code": code, "period": p, "n": int(len(g)), "median": float(np.median(x)),
                         "median_shift_sd": float(shift), "spread_ratio": float((q75 - q25) / 1.349 / scale),
                         "drifted": bool(abs(shift) >= DRIFT_SHIFT_SD)})
    return pd.DataFrame(rows, columns=cols)


def verdict_rates(verdicts: pd.DataFrame, period: str = "M") -> pd.DataFrame:
    """Experts' current verdicts per output kind and period of the verdict.

    ``verdicts``: one row per (output, annotator) current verdict with ``kind, verdict,
    created_at`` (``clinical.outputs.current_verdicts``). Returns ``kind, period, n,
    valid_rate, invalid_rate, unsure_rate`` (shares of ``n``).

    Raises:
        ValueError: a needed column is missing, or ``period`` is unknown.
    """
    _require(verdicts, ("kind", "verdict", "created_at"), "verdicts")
    cols = ["kind", "period", "n", "valid_rate", "invalid_rate", "unsure_rate"]
    if verdicts.empty:
        return pd.DataFrame(columns=cols)
    d = verdicts.assign(period=_period(verdicts["created_at"], period))
    for v in ("valid", "invalid", "unsure"):
        d[f"{v}_rate"] = (d["verdict"] == v).astype(float)
    s = d.groupby(["kind", "period"], sort=True).agg(
        n=("verdict", "size"), valid_rate=("valid_rate", "mean"), invalid_rate=("invalid_rate", "mean"),
        unsure_rate=("unsure_rate", "mean")).reset_index()
    return s[cols]
