"""The alert budget on real data.

`labtrend predict` for the issue's ICU patient (9,709 results, the busiest of the demo's review patients)
stores at most 2 review-worthy anomaly outputs per 100 results, keeps every critical value, and the review
queue opens on them. The model here is tiny and untrained (calibrated on other patients, so model surprise
is evaluated): its surprises are noise, which is why the busiest patient overall (10,129 results) is held to
the budget on the rule-based items only; ``benchmarks/clinical.py`` measures every patient with a trained
model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from clinical import outputs as O
from clinical.flags import CRITICAL_FLAGS, result_flags
from data import queries
from data.db import open_store
from data.importers import run_import

BUDGET_PER_100 = 2.0


@pytest.fixture(scope="module")
def busiest(tmp_path_factory, mimic_dir):
    """A writable MIMIC-IV demo store, its two busiest patients, and a tiny calibrated model trained on others."""
    import torch

    from clinical.anomalies import history_from_timeline
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    root = tmp_path_factory.mktemp("budget")
    store = open_store(root / "mimic.duckdb")
    run_import(store, mimic_dir)
    pats = queries.patients(store).sort_values("n_results", ascending=False)
    top = dict(zip(pats["patient_id"].iloc[:2], pats["n_results"].iloc[:2].astype(int)))
    others = pats["patient_id"].iloc[2:10].tolist()
    h = pd.concat([history_from_timeline(queries.timeline(store, p), queries.patient_info(store, p)) for p in others])
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(h, min_count=20)
    h = h[h["analyte_code"].isin(vocab.codes)]
    pipe = ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab,
                            AnalyteScaler.fit(h))
    # split-conformal calibration on held-out patients' results (never the patient under test)
    calib = h.groupby(["patient_id", "analyte_code"]).tail(3).rename(columns={"collected_at": "at"})
    pipe.calibrate(h, calib).save_pretrained(root / "model")
    return store, root, top


def test_busiest_patient_rule_based_items_stay_within_the_budget(busiest):
    from clinical.anomalies import detect_anomalies

    store, _, top = busiest
    pid, n = next(iter(top.items()))
    assert n == 10129
    a = detect_anomalies(queries.timeline(store, pid), queries.patient_info(store, pid))
    assert 0 < 100 * len(a) / n <= BUDGET_PER_100, len(a)


def test_issue_patient_predict_stays_within_the_alert_budget(busiest, capsys):
    from labtrend.cli import main

    store, root, top = busiest
    pid, n = list(top.items())[1]
    assert n == 9709  # the issue's ICU patient
    args = ["predict", "--model", str(root / "model"), "--db", str(root / "mimic.duckdb"), "--patient", pid,
            "--no-explain", "--json", "--threads", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert not any("not calibrated" in note for note in out["notes"])  # model surprise was evaluated
    stored = O.load_outputs(store, patient_id=pid, kind="anomaly")
    assert len(stored) == len(out["anomalies"]) > 0
    per_100 = 100 * len(stored) / n
    assert per_100 <= BUDGET_PER_100, f"{len(stored)} anomaly outputs for {n} results ({per_100:.2f} per 100)"
    assert "reference_interval" not in set(stored["rule"])

    # every critical value before the forecast time is kept, inside a critical-value output's run
    t = queries.timeline(store, pid)
    t = t[t["collected_at"] < pd.Timestamp(out["at"])]
    f = result_flags(t, queries.patient_info(store, pid))
    critical = set(t.loc[f["flag"].isin(CRITICAL_FLAGS).to_numpy(), "result_id"])
    crit = stored[stored["rule"] == "critical_value"]
    kept = {r for p in crit["payload"] for r in p["based_on"]["result_ids"]}
    assert critical and critical == kept
    assert all(len(p["based_on"]["result_ids"]) == (p["evidence"].get("run") or {}).get("n", 1) for p in crit["payload"])

    # the review queue opens on the critical values
    queue = O.pending_outputs(store, "budget-reviewer", patient_id=pid, limit=None)
    n_crit = len(crit)
    assert (queue["priority"].iloc[:n_crit] == 1).all() and queue["rule"].iloc[0] == "critical_value"
