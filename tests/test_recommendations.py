"""Recommendation rules: each shipped rule fires and does not fire; the rule file is checked, never eval'd."""

from __future__ import annotations

import pandas as pd
import pytest

from clinical.anomalies import detect_anomalies
from clinical.outputs import anomaly_outputs, forecast_outputs
from clinical.recommendations import evaluate_rules, load_rules
from test_anomalies import ADULT_F, CA, CREA, HB, K, NA, tl



def recommend(rows, forecasts=None, at=None):
    t = tl(rows)
    a = detect_anomalies(t, ADULT_F)
    a = a.assign(output_id=[r["output_id"] for r in anomaly_outputs(a, "rules-test")])
    return evaluate_rules(t, ADULT_F, at=at, forecasts=forecasts, anomalies=a), a


def fired(recs, rule_id) -> pd.DataFrame:
    return recs[recs["rule_id"] == rule_id]


def forecast_frame(q95: float, status: str = "ok") -> pd.DataFrame:
    f = pd.DataFrame([{"patient_id": "P", "analyte_code": K, "at": pd.Timestamp("2024-01-05"), "q05": 3.9, "q10": 4.0,
                       "q25": 4.2, "q50": 4.6, "q75": 5.0, "q90": q95 - 0.3, "q95": q95, "unit": "mmol/L",
                       "n_history": 4, "status": status, "model_version": "lt-test"}])
    return f.assign(output_id=[r["output_id"] for r in forecast_outputs(f)])


def test_rule_file_is_versioned_sourced_and_decision_support():
    rs = load_rules()
    assert rs.version and len(rs.rules) >= 4
    for r in rs.rules:
        assert r.source and r.text.startswith("Consider") and r.urgency in ("high", "medium", "low")


def test_forecast_potassium_above_critical():
    rows = [("2024-01-01", K, 4.5), ("2024-01-02", K, 4.9), ("2024-01-03", K, 5.3)]
    f = forecast_frame(6.5)
    recs, _ = recommend(rows, f, at="2024-01-05")
    hit = fired(recs, "REC-K-FORECAST-CRITICAL")
    assert hit["triggered_by"].tolist() == [[f["output_id"].iloc[0]]] and hit["urgency"].tolist() == ["high"]
    assert "6.5 mmol/L, above the critical limit 6.2 mmol/L" in hit["text"].iloc[0]
    assert fired(recommend(rows, forecast_frame(6.0), at="2024-01-05")[0], "REC-K-FORECAST-CRITICAL").empty
    assert fired(recommend(rows, forecast_frame(6.5, status="Not enough"), at="2024-01-05")[0],
                 "REC-K-FORECAST-CRITICAL").empty


def test_creatinine_rise_beyond_rcv():
    recs, a = recommend([("2024-01-01", CREA, 1.0), ("2024-01-03", CREA, 1.4)])
    hit = fired(recs, "REC-CREA-RISE-RCV")
    delta = a[a["rule"] == "delta_check"]
    assert hit["triggered_by"].tolist() == [delta["output_id"].tolist()] and "+40 %" in hit["text"].iloc[0]
    assert fired(recommend([("2024-01-01", CREA, 1.0), ("2024-01-03", CREA, 1.05)])[0], "REC-CREA-RISE-RCV").empty
    # an old rise followed by a steady result is history, not the current state
    later = [("2024-01-01", CREA, 1.0), ("2024-01-03", CREA, 1.4), ("2024-01-05", CREA, 1.38)]
    assert fired(recommend(later)[0], "REC-CREA-RISE-RCV").empty


def test_preanalytical_pattern_recommends_recollection():
    rows = [("2024-01-01", K, 7.9), ("2024-01-01", CA, 6.1), ("2024-01-01", NA, 140)]
    recs, a = recommend(rows)
    hit = fired(recs, "REC-PREANALYTICAL-RECOLLECT")
    pattern = a[a["rule"] == "preanalytical:edta_contamination"]
    assert hit["triggered_by"].tolist() == [pattern["output_id"].tolist()]
    assert "recollecting the specimen before acting on Potassium 7.9 mmol/L" in hit["text"].iloc[0]
    assert "edta contamination" in hit["text"].iloc[0]
    fine = [("2024-01-01", K, 4.9), ("2024-01-01", CA, 9.4)]
    assert fired(recommend(fine)[0], "REC-PREANALYTICAL-RECOLLECT").empty
    # a recollected specimen afterwards: the pattern is no longer the latest result
    redo = rows + [("2024-01-01 12:00", K, 4.4), ("2024-01-01 12:00", CA, 9.3)]
    assert fired(recommend(redo)[0], "REC-PREANALYTICAL-RECOLLECT").empty


def test_falling_haemoglobin():
    recs, _ = recommend([("2024-01-01", HB, 13.5), ("2024-01-08", HB, 12.8), ("2024-01-15", HB, 11.9)])
    hit = fired(recs, "REC-HB-FALLING")
    assert hit["result_ids"].tolist() == [[1, 2, 3]] and "from 13.5 to 11.9 g/dL (-12 %)" in hit["text"].iloc[0]
    small = [("2024-01-01", HB, 13.5), ("2024-01-08", HB, 13.3), ("2024-01-15", HB, 13.2)]
    assert fired(recommend(small)[0], "REC-HB-FALLING").empty  # -2 %: within the RCV (8.7 %)
    bumpy = [("2024-01-01", HB, 13.5), ("2024-01-08", HB, 12.0), ("2024-01-15", HB, 12.5)]
    assert fired(recommend(bumpy)[0], "REC-HB-FALLING").empty


def test_critical_value_needs_review():
    recs, a = recommend([("2024-01-01", K, 4.4), ("2024-01-02", K, 6.8)])
    hit = fired(recs, "REC-CRITICAL-VALUE")
    crit = a[a["rule"] == "critical_value"]
    assert hit["triggered_by"].tolist() == [crit["output_id"].tolist()] and "critical limit 6.2" in hit["text"].iloc[0]
    assert fired(recommend([("2024-01-01", K, 6.8), ("2024-01-02", K, 4.5)])[0], "REC-CRITICAL-VALUE").empty


def test_conditions_are_structured_not_code(tmp_path):
    def write(text: str):
        p = tmp_path / "r.yaml"
        p.write_text("version: t\nrules:\n" + text)
        return p

    base = ("  - id: X\n    title: t\n    urgency: low\n    source: s\n")
    with pytest.raises(ValueError, match="placeholder"):
        load_rules(write(base + "    condition: {anomaly: {rule: critical_value}}\n    text: 'Consider {analyte.__class__}'\n"))
    with pytest.raises(ValueError, match="starting with 'Consider'"):
        load_rules(write(base + "    condition: {anomaly: {rule: critical_value}}\n    text: 'Give 10 mmol K'\n"))
    with pytest.raises(ValueError, match="unknown condition 'python'"):
        load_rules(write(base + "    condition: {python: '__import__(\"os\")'}\n    text: 'Consider it'\n"))
    with pytest.raises(ValueError, match="limit in"):
        load_rules(write(base + "    condition: {forecast: {analyte: '2823-3', quantile: q95, above: 6.2}}\n"
                                "    text: 'Consider it'\n"))
    ok = load_rules(write(base + "    condition: {not: {anomaly: {rule: critical_value}}}\n    text: 'Consider it'\n"))
    recs = evaluate_rules(tl([("2024-01-01", K, 4.4)]), ADULT_F, rules=ok, anomalies=pd.DataFrame())
    assert recs["rule_id"].tolist() == ["X"]


def test_every_shipped_rule_was_tested_both_ways():
    """Every shipped rule is checked by name in this file at least twice (fires / does not fire).

    Read from the source, not from which tests ran before: the suite runs in parallel workers.
    """
    import re
    from collections import Counter  # noqa: I001
    from pathlib import Path

    names = Counter(re.findall(r"['\"](REC-[A-Z0-9-]+)['\"]", Path(__file__).read_text()))
    for rule in load_rules().rules:
        assert names[rule.id] >= 2, f"rule {rule.id} is checked {names[rule.id]} time(s)"
