"""Model monitoring: realised error vs last value, input drift, expert verdict rates (pure functions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from model.monitoring import analyte_drift, match_realised, realised_error_summary, verdict_rates

T0 = pd.Timestamp("2024-01-01 08:00")


def _results(rows):
    return pd.DataFrame(rows, columns=["patient_id", "analyte_code", "collected_at", "value", "censor"])


def _forecast(pid, code, at, q50, w=0.5, **extra):
    return {"patient_id": pid, "analyte_code": code, "at": at, "q10": q50 - w, "q50": q50, "q90": q50 + w, **extra}


def test_realised_value_is_the_nearest_result_within_tolerance_and_baseline_the_last_before():
    res = _results([
        ("A", "K", T0, 4.0, 0),
        ("A", "K", T0 + pd.Timedelta(days=1), 4.4, 0),
        ("A", "K", T0 + pd.Timedelta(days=2, hours=3), 5.0, 0),   # 3 h after the forecast time: its target
        ("A", "K", T0 + pd.Timedelta(days=2, hours=20), 9.9, 0),  # further away
        ("A", "NA", T0 + pd.Timedelta(days=2), 140.0, 0),          # other analyte: never a target for K
        ("B", "K", T0 + pd.Timedelta(days=2), 7.7, 0),             # other patient
    ])
    fc = pd.DataFrame([_forecast("A", "K", T0 + pd.Timedelta(days=2), 4.8)])
    m = match_realised(fc, res)
    assert len(m) == 1
    r = m.iloc[0]
    assert r["realised"] == 5.0 and r["realised_at"] == T0 + pd.Timedelta(days=2, hours=3)
    assert r["last_value"] == 4.4  # strictly before the forecast time
    assert r["abs_error"] == pytest.approx(0.2) and r["abs_error_last_value"] == pytest.approx(0.6)
    assert r["in80"] == 1.0 and np.isnan(r["in95"])


def test_forecasts_without_an_arrived_target_or_a_previous_result_are_not_scored():
    res = _results([
        ("A", "K", T0, 4.0, 0),
        ("A", "K", T0 + pd.Timedelta(days=3), 4.1, 0),   # 2 days after the first forecast: outside 12 h
        ("A", "K", T0 + pd.Timedelta(days=5), 3.0, -1),  # censored '<3': never a realised value
    ])
    fc = pd.DataFrame([
        _forecast("A", "K", T0 + pd.Timedelta(days=1), 4.0),
        _forecast("A", "K", T0 + pd.Timedelta(days=5), 4.0),
        _forecast("A", "K", T0 - pd.Timedelta(hours=1), 4.0),  # target T0 arrives, but nothing before it
    ])
    assert match_realised(fc, res).empty
    wide = match_realised(fc, res, tolerance=pd.Timedelta(days=2))
    # the day-5 forecast gets 4.1 (two days before), never the censored "<3" at its own time
    assert len(wide) == 2 and sorted(wide["realised"]) == [4.0, 4.1]


def test_summary_skill_and_coverage_per_analyte_and_period():
    res, fcs = [], []
    rng = np.random.default_rng(0)
    for p in range(40):
        t = T0 + pd.Timedelta(days=p)
        prev, now = 4.0 + rng.normal(0, 0.3), 4.0 + rng.normal(0, 0.3)
        res += [(f"P{p}", "K", t, prev, 0), (f"P{p}", "K", t + pd.Timedelta(days=1), now, 0)]
        # the model is closer than the last value by construction (half the last value's error)
        fcs.append(_forecast(f"P{p}", "K", t + pd.Timedelta(days=1), now + (prev - now) / 2, w=0.01,
                             lo95=now - 1, hi95=now + 1))
    m = match_realised(pd.DataFrame(fcs), _results(res))
    assert len(m) == 40
    s = realised_error_summary(m, "M")
    k = s[s["analyte_code"] == "K"]
    assert set(k["period"]) == {"2024-01", "2024-02"} and k["n"].sum() == 40
    assert np.allclose(k["skill"], 0.5)
    assert (k["coverage95"] == 1.0).all()
    overall = s[s["analyte_code"] == "all"]
    assert np.allclose(overall["skill"], 0.5) and overall["mae"].isna().all()
    assert (s["coverage80"] < 0.5).all()  # a 0.02-wide interval misses most values
    with pytest.raises(ValueError, match="period must be one of"):
        realised_error_summary(m, "W")


def test_drift_is_measured_against_the_training_statistics():
    rng = np.random.default_rng(1)
    times = [T0 + pd.Timedelta(days=int(d)) for d in rng.integers(0, 28, 200)] + \
            [T0 + pd.Timedelta(days=35 + int(d)) for d in rng.integers(0, 20, 200)]
    values = np.r_[rng.normal(4.0, 0.4, 200), rng.normal(4.6, 0.4, 200)]  # February moves up 1.5 SD
    res = pd.DataFrame({"analyte_code": "K", "collected_at": times, "value": values})
    crp = pd.DataFrame({"analyte_code": "CRP", "collected_at": times, "value": np.exp(rng.normal(1.0, 1.0, 400))})
    training = {"K": {"transform": "identity", "center": 4.0, "scale": 0.4, "lower": 0.0},
                "CRP": {"transform": "log", "center": 1.0, "scale": 1.0, "lower": 0.1}}
    d = analyte_drift(pd.concat([res, crp]), training, "M")
    k = d[d["analyte_code"] == "K"].set_index("period")
    assert abs(k.loc["2024-01", "median_shift_sd"]) < 0.3 and not k.loc["2024-01", "drifted"]
    assert k.loc["2024-02", "median_shift_sd"] == pytest.approx(1.5, abs=0.3) and k.loc["2024-02", "drifted"]
    assert k["spread_ratio"].between(0.7, 1.3).all()
    c = d[d["analyte_code"] == "CRP"]
    assert (c["median_shift_sd"].abs() < 0.3).all()  # on the log scale, as trained
    # an analyte the model has no statistics for, and a period with too few results, are left out
    few = pd.DataFrame({"analyte_code": ["K"] * 5 + ["X"] * 50, "collected_at": T0, "value": 4.0})
    assert analyte_drift(few, training, "M").empty
    # a period whose results all come from one patient describes that patient, not drift
    one = res.assign(patient_id="P1")
    assert analyte_drift(one, training, "M").empty
    many = res.assign(patient_id=[f"P{i % 7}" for i in range(len(res))])
    assert len(analyte_drift(many, training, "M")) == 2


def test_verdict_rates_per_kind_and_period():
    v = pd.DataFrame({
        "kind": ["forecast"] * 4 + ["anomaly"] * 2,
        "verdict": ["valid", "valid", "invalid", "unsure", "valid", "invalid"],
        "created_at": [T0] * 4 + [T0 + pd.Timedelta(days=40)] * 2,
    })
    r = verdict_rates(v, "M").set_index("kind")
    assert r.loc["forecast", "n"] == 4 and r.loc["forecast", "valid_rate"] == 0.5
    assert r.loc["forecast", "invalid_rate"] == 0.25 and r.loc["forecast", "unsure_rate"] == 0.25
    assert r.loc["anomaly", "period"] == "2024-02" and r.loc["anomaly", "valid_rate"] == 0.5


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="forecasts lacks column"):
        match_realised(pd.DataFrame({"patient_id": []}), _results([]))
    with pytest.raises(ValueError, match="verdicts lacks column.*created_at"):
        verdict_rates(pd.DataFrame({"kind": [], "verdict": []}))
