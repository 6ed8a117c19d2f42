"""Stored outputs and verdicts: ids, idempotent storage, UI-17/UI-18, agreement statistics, export, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinical import outputs as O
from data.db import open_store

ROOT = Path(__file__).resolve().parent.parent


def _forecast(oid: str, patient: str, code: str, at: str, value: float, unit: str) -> dict:
    r = O._record("forecast", patient, code, pd.Timestamp(at), "lt-case", None,
                  {"median": value, "unit": unit, "status": "ok"})
    return r | {"output_id": oid}


@pytest.fixture
def ui17(store, cases):
    queue = pd.read_csv(cases / "UI-17.csv", dtype={"loinc": str})
    recs = [_forecast(r.prediction_id, r.patient_id, r.loinc, r.forecast_for, r.predicted_value, r.unit)
            for r in queue.itertuples()]
    O.store_outputs(store, recs)
    return store


# --- ids and storage ----------------------------------------------------------------------------


def test_output_ids_are_deterministic():
    a = O.output_id("anomaly", "P1", "2823-3", "2024-01-01 08:00", "rules-1", "critical_value", key=7)
    assert a == O.output_id("anomaly", "P1", "2823-3", pd.Timestamp("2024-01-01 08:00"), "rules-1", "critical_value", 7)
    assert a == O.output_id("anomaly", "P1", "2823-3", pd.Timestamp("2024-01-01 09:00+01:00"), "rules-1",
                            "critical_value", 7)  # the same instant in UTC
    assert a.startswith("ano-") and len(a) == 28
    others = {O.output_id("anomaly", "P1", "2823-3", "2024-01-01 08:00", "rules-2", "critical_value", 7),
              O.output_id("anomaly", "P1", "2823-3", "2024-01-01 08:00", "rules-1", "delta_check", 7),
              O.output_id("anomaly", "P1", "2823-3", "2024-01-01 08:00:01", "rules-1", "critical_value", 7),
              O.output_id("anomaly", "P1", "2823-3", "2024-01-01 08:00", "rules-1", "critical_value", 8)}
    assert a not in others and len(others) == 4
    with pytest.raises(ValueError, match="kind"):
        O.output_id("guess", "P1", None, None, "v")


def test_storage_is_an_idempotent_upsert(store):
    rec = _forecast("for-x", "P1", "2823-3", "2024-01-01", 4.2, "mmol/L")
    assert O.store_outputs(store, [rec, rec]) == {"inserted": 1, "updated": 0, "unchanged": 0}
    assert O.store_outputs(store, [rec]) == {"inserted": 0, "updated": 0, "unchanged": 1}
    changed = rec | {"payload": rec["payload"] | {"median": 4.4}}
    assert O.store_outputs(store, [changed]) == {"inserted": 0, "updated": 1, "unchanged": 0}
    got = O.load_outputs(store, patient_id="P1")
    assert len(got) == 1 and got["payload"].iloc[0]["median"] == 4.4
    assert got["updated_at"].iloc[0] >= got["created_at"].iloc[0]


# --- verdicts -----------------------------------------------------------------------------------


def test_ui17_sequence_double_submit_gives_two_rows(ui17):
    """Open the review page, judge PR-0101 and PR-0102 (double-clicking the second): two rows, PR-0103 pending."""
    store, expert = ui17, "dr.who"
    session = {}

    def draw_form():  # the id shown is kept in session state before drawing, with a fresh submission id
        pending = O.pending_outputs(store, expert)
        session["output_id"] = pending["output_id"].iloc[0]
        session["submission_id"] = O.new_submission_id()
        return session["output_id"]

    def submit(verdict, comment=None):  # never looked up again at submit time
        return O.record_verdict(store, session["output_id"], expert, "expert", verdict, comment,
                                submission_id=session["submission_id"])

    assert draw_form() == "PR-0101"
    assert submit("invalid", "baseline wrong")
    assert draw_form() == "PR-0102"
    first, second = submit("valid"), submit("valid")  # double-click
    assert first.created and not second.created and first.annotation_id == second.annotation_id
    log = O.annotation_log(store)
    assert len(log) == 2
    rows = [[None if pd.isna(x) else x for x in r] for r in log[["output_id", "verdict", "comment", "annotator"]].values]
    assert rows == [["PR-0101", "invalid", "baseline wrong", expert], ["PR-0102", "valid", None, expert]]
    assert log["created_at"].notna().all()
    assert O.pending_outputs(store, expert)["output_id"].tolist() == ["PR-0103"]
    assert O.pending_outputs(store, "someone.else")["output_id"].tolist() == ["PR-0101", "PR-0102", "PR-0103"]


def test_verdicts_without_submission_id_dedupe_then_revise(ui17):
    store = ui17
    a = O.record_verdict(store, "PR-0101", "ann", "expert", "valid")
    b = O.record_verdict(store, "PR-0101", "ann", "expert", "valid")  # a repeat within the window
    assert a.created and not b.created
    c = O.record_verdict(store, "PR-0101", "ann", "expert", "invalid", "on reflection", corrected_value=1.2)
    assert c.created
    cur = O.current_verdicts(store)
    assert cur[["output_id", "annotator", "verdict", "n_verdicts"]].values.tolist() == [["PR-0101", "ann", "invalid", 2]]
    assert len(O.annotation_log(store, "PR-0101")) == 2  # append-only history kept


def test_verdict_errors(ui17):
    store = ui17
    with pytest.raises(ValueError, match="unknown output"):
        O.record_verdict(store, "PR-9999", "ann", "expert", "valid")
    with pytest.raises(ValueError, match="verdict must be one of"):
        O.record_verdict(store, "PR-0101", "ann", "expert", "maybe")
    sid = O.new_submission_id()
    O.record_verdict(store, "PR-0101", "ann", "expert", "valid", submission_id=sid)
    with pytest.raises(ValueError, match="already used"):
        O.record_verdict(store, "PR-0102", "ann", "expert", "valid", submission_id=sid)


_CHILD = """
import sys, time, pathlib
from clinical import outputs
from data.db import open_store
path, output_id, annotator, flag_dir = sys.argv[1:5]
store = open_store(path)
pathlib.Path(flag_dir, annotator + ".ready").touch()
while not pathlib.Path(flag_dir, "go").exists():  # start together
    time.sleep(0.005)
outputs.record_verdict(store, output_id, annotator, "expert", "valid", submission_id=annotator + "-1")
"""


def test_two_experts_at_the_same_moment_both_land(tmp_path):
    path = tmp_path / "lab.duckdb"
    store = open_store(path)
    O.store_outputs(store, [_forecast("PR-1", "P1", "2823-3", "2024-01-01", 4.2, "mmol/L")])
    # two threads of one process (one writer lock)
    barrier = threading.Barrier(2)
    errors = []

    def go(name):
        try:
            barrier.wait(timeout=600)  # a hang guard; the threads start on the barrier's event
            O.record_verdict(store, "PR-1", name, "expert", "valid" if name == "t1" else "invalid")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # two processes (the DuckDB file lock; Store retries while the other holds it). Plain subprocesses:
    # multiprocessing's spawn would re-run whatever __main__ an earlier test left behind.
    flags = tmp_path / "flags"
    flags.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "PR-1", n, str(flags)], cwd=str(ROOT),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ("p1", "p2")]
    deadline = time.monotonic() + 600  # a hang guard; the wait is on the children's ready files
    while not all((flags / f"{n}.ready").exists() for n in ("p1", "p2")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (flags / "go").touch()
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(O.current_verdicts(store)["annotator"]) == ["p1", "p2", "t1", "t2"]


# --- agreement ----------------------------------------------------------------------------------

# Gwet, Handbook of Inter-Rater Reliability, 4th ed. (2014), p. 120: 4 raters, 12 subjects, 5 categories,
# with missing ratings; published results: p_a = 0.818, p_e = 0.190, AC1 = 0.775 (Fleiss' kappa 0.761).
RAW_4RATERS = {
    "r1": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "r2": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, None],
    "r3": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, 3],
    "r4": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}
# Same handbook, 4 raters x 15 subjects, 3 categories, complete: AC1 = 0.208, Fleiss' kappa = 0.129.
RAW_GENDER = {
    "r1": "a a a a a b b b c a a a a a b".split(),
    "r2": "a a a a b a b c c a a a a b a".split(),
    "r3": "a b b c a a b b c a b b c a a".split(),
    "r4": "c c c c a a b b c c c c c a a".split(),
}


def _long(wide: dict) -> pd.DataFrame:
    rows = [(i, r, v) for r, vals in wide.items() for i, v in enumerate(vals) if v is not None]
    return pd.DataFrame(rows, columns=["item", "rater", "category"])


def test_gwet_ac1_against_published_examples():
    r = _long(RAW_4RATERS)
    table = pd.crosstab(r["item"], r["category"]).reindex(columns=[1, 2, 3, 4, 5], fill_value=0).to_numpy()
    g = O.gwet_ac1(table)
    assert (round(g["pa"], 3), round(g["pe"], 3), round(g["ac1"], 3)) == (0.818, 0.190, 0.775)
    s = O.agreement_stats(_long(RAW_GENDER), categories=("a", "b", "c"))
    assert round(s["gwet_ac1"], 3) == 0.208 and round(s["fleiss_kappa"], 3) == 0.129


def test_two_rater_kappa_and_ac1_against_published_table():
    # Gwet 2014: 100 pregnancies classified by 2 abstractors; Cohen's kappa 0.796, AC1 0.849.
    cont = np.array([[13, 0, 0], [0, 20, 7], [0, 4, 56]])  # rows: abstractor A, cols: abstractor B
    cats = ("ectopic", "aiu", "niu")
    rows = []
    for i in range(3):
        for j in range(3):
            rows += [(cats[i], cats[j])] * cont[i, j]
    ratings = pd.DataFrame([(n, "A", a) for n, (a, _) in enumerate(rows)] + [(n, "B", b) for n, (_, b) in enumerate(rows)],
                           columns=["item", "rater", "category"])
    s = O.agreement_stats(ratings, categories=cats)
    assert round(s["cohen_kappa"], 3) == 0.796 and round(s["gwet_ac1"], 3) == 0.849
    assert s["raw_agreement"] == pytest.approx(0.89)


def test_kappa_paradox_when_most_outputs_are_valid():
    # 2 experts, 100 outputs: 94 both valid, 3 + 3 disagreements -> 94 % agreement, kappa ~ -0.03, AC1 ~ 0.94
    a = ["valid"] * 97 + ["invalid"] * 3
    b = ["valid"] * 94 + ["invalid"] * 3 + ["valid"] * 3
    ratings = pd.DataFrame([(i, "A", x) for i, x in enumerate(a)] + [(i, "B", x) for i, x in enumerate(b)],
                           columns=["item", "rater", "category"])
    s = O.agreement_stats(ratings)
    assert s["raw_agreement"] == pytest.approx(0.94) and s["cohen_kappa"] < 0.1 and s["gwet_ac1"] > 0.9


def test_agreement_per_output_kind(ui17):
    store = ui17
    for oid, v1, v2, v3 in (("PR-0101", "valid", "valid", "invalid"), ("PR-0102", "valid", "valid", "valid"),
                            ("PR-0103", "invalid", "invalid", "invalid")):
        O.record_verdict(store, oid, "a1", "expert", v1)
        O.record_verdict(store, oid, "a2", "expert", v2)
        O.record_verdict(store, oid, "a3", "expert", v3)
    ag = O.agreement(store)
    row = ag[ag["kind"] == "forecast"].iloc[0]
    assert row["n_raters"] == 3 and row["n_items_multi"] == 3
    assert row["raw_agreement"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert np.isfinite(row["fleiss_kappa"]) and np.isfinite(row["gwet_ac1"]) and np.isnan(row["cohen_kappa"])


# --- export -------------------------------------------------------------------------------------


def test_export_neutralises_formulas_and_round_trips_parquet(ui17, tmp_path):
    store = ui17
    O.record_verdict(store, "PR-0101", "dr.who", "expert", "invalid", "=1+1")
    O.record_verdict(store, "PR-0102", "@evil", "expert", "valid", "+cmd|' /C calc'!A0")
    csv_path, pq_path = tmp_path / "v.csv", tmp_path / "v.parquet"
    assert O.export_annotations(store, csv_path) == 3  # PR-0103 has no verdict: one row, empty verdict
    text = csv_path.read_text(encoding="utf-8")
    assert "'=1+1" in text and ",=1+1" not in text and "'@evil" in text and "'+cmd" in text
    O.export_annotations(store, pq_path)
    back = pd.read_parquet(pq_path)
    expected = O.export_frame(store)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)
    assert back.loc[back["output_id"] == "PR-0101", "comment"].iloc[0] == "=1+1"
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        O.export_annotations(store, tmp_path / "v.xlsx")


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_predict_and_export(tmp_path, cases, capsys):
    """`labtrend predict --json` on the XAI-15 patient with a tiny model; then `labtrend annotations export`."""
    import torch

    from clinical.anomalies import history_from_timeline
    from data import queries
    from data.importers import run_import
    from labtrend.cli import main
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    db = tmp_path / "lab.duckdb"
    store = open_store(db)
    for name in ("XAI-15", "LAB-02", "UI-18"):
        run_import(store, cases / f"{name}.csv")
    h = pd.concat([history_from_timeline(queries.timeline(store, p)) for p in ("P0020", "P0003", "P0025")])
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(h)
    ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab,
                     AnalyteScaler.fit(h)).save_pretrained(tmp_path / "model")
    args = ["predict", "--model", str(tmp_path / "model"), "--db", str(db), "--patient", "P0020", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"patient_id", "model_version", "forecasts", "anomalies", "explanations", "recommendations"}
    assert out["at"] == "2024-04-09T06:00:00"  # one day after the last result
    assert len(out["forecasts"]) == 1 and out["forecasts"][0]["status"] == "ok"
    assert out["explanations"][0]["status"] == "ok" and out["explanations"][0]["forecast_output_id"] == out["forecasts"][0]["output_id"]
    items = out["forecasts"] + out["anomalies"] + out["explanations"] + out["recommendations"]
    assert all(i["output_id"] for i in items)
    stored = O.load_outputs(store, patient_id="P0020")
    assert set(stored["output_id"]) == {i["output_id"] for i in items}
    assert main(args) == 0  # idempotent
    assert json.loads(capsys.readouterr().out)["stored"]["inserted"] == 0
    # the id typed with a zero-width space and a trailing space is the same patient, same outputs
    assert main(args[:-2] + ["\u200bP0020 ", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["patient_id"] == "P0020" and again["stored"]["inserted"] == 0
    assert [f["output_id"] for f in again["forecasts"]] == [f["output_id"] for f in out["forecasts"]]
    assert main(["predict", "--model", str(tmp_path / "model"), "--db", str(db), "--patient", "NOPE"]) == 2

    O.record_verdict(store, out["forecasts"][0]["output_id"], "dr.who", "expert", "valid")
    assert main(["annotations", "export", "--db", str(db), "--out", str(tmp_path / "e.parquet")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(items)
    assert main(["annotations", "agreement", "--db", str(db)]) == 0


# --- review priority ------------------------------------------------------------------------------


def _anomaly(patient: str, code: str, at: str, rule: str, flag: str, score: float | None, key: int) -> dict:
    return O._record("anomaly", patient, code, pd.Timestamp(at), "rules-t", rule,
                     {"rule": rule, "flag": flag, "score": score, "text": f"{rule} {flag}", "value": 1.0}, key=key)


def _recommendation(patient: str, rule_id: str, at: str, urgency: str, priority: int | None = None,
                    basis: str | None = None) -> dict:
    payload = {"rule_id": rule_id, "urgency": urgency, "text": f"{rule_id} text", "title": rule_id}
    if priority is not None:
        payload |= {"priority": priority, "basis": basis}
    return O._record("recommendation", patient, None, pd.Timestamp(at), "recommendations-t", rule_id, payload)


def test_pending_outputs_most_important_first(store):
    """Clinical priority: actual critical values (and recommendations resting on them) first, then
    pre-analytical errors, then delta checks / model surprises, then forecast-based warnings, then
    forecasts to validate (soonest first), then legacy reference-interval anomalies; within a tier
    higher urgency, then newest first, then the larger |score|."""
    recs = [
        _anomaly("P1", "2951-2", "2024-01-05 08:00", "reference_interval", "H", 0.3, 1),
        _anomaly("P1", "2951-2", "2024-01-07 08:00", "reference_interval", "H", 0.1, 2),
        _anomaly("P1", "2823-3", "2024-01-07 08:00", "reference_interval", "H", 0.9, 3),
        _anomaly("P1", "2160-0", "2024-01-07 08:00", "delta_check", "UP", 2.0, 4),
        _forecast("F-late", "P1", "2160-0", "2024-01-09", 1.1, "mg/dL"),
        _forecast("F-soon", "P1", "2823-3", "2024-01-08", 4.1, "mmol/L"),
        _recommendation("P1", "REC-HB", "2024-01-08 08:00", "medium", 3, "observed change"),
        _anomaly("P1", "2823-3", "2024-01-02 08:00", "preanalytical:haemolysis", "SUSPECT", None, 5),
        _anomaly("P1", "2823-3", "2024-01-06 08:00", "model_surprise", "ABOVE", 0.99, 6),
        _recommendation("P1", "REC-RECOLLECT", "2024-01-08 08:00", "medium", 2, "pre-analytical error"),
        _anomaly("P1", "2823-3", "2024-01-01 08:00", "critical_value", "HH", 0.5, 7),
        # "Forecast potassium may reach the critical limit" (high urgency) ranks below the actual critical potassium
        _recommendation("P1", "REC-K-FORECAST", "2024-01-08 08:00", "high", 4, "forecast"),
        _recommendation("P1", "REC-CRITICAL", "2024-01-08 08:00", "high", 1, "observed critical value"),
        _recommendation("P1", "REC-OLD", "2024-01-08 08:00", "low"),  # stored before priorities: tier 3
    ]
    O.store_outputs(store, recs)
    got = O.pending_outputs(store, "ann")
    assert list(got.columns) == O.OUTPUT_COLUMNS
    assert got["priority_reason"].tolist() == [
        "recommendation (observed critical value, high urgency)", "critical value (HH)",  # tier 1
        "recommendation (pre-analytical error, medium urgency)", "pre-analytical pattern: haemolysis",  # tier 2
        "recommendation (observed change, medium urgency)", "delta check", "model surprise",  # tier 3, newest first
        "recommendation (earlier version, low urgency)",
        "recommendation (forecast, high urgency)",  # tier 4
        "forecast to validate", "forecast to validate",  # tier 5
        "outside the reference interval", "outside the reference interval", "outside the reference interval",
    ]
    assert got["priority"].tolist() == [1, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 6, 6]
    assert got["output_id"].iloc[9:11].tolist() == ["F-soon", "F-late"]  # soonest forecast first
    ri = got[got["rule"] == "reference_interval"]
    assert [p["score"] for p in ri["payload"]] == [0.9, 0.1, 0.3]  # newest first, then the larger |score|
    # the limit keeps the most important outputs, not the oldest ones
    assert O.pending_outputs(store, "ann", limit=2)["priority"].tolist() == [1, 1]
    # the Python twin (timeline lists) ranks every output as the queue's SQL does
    assert [O.review_priority(k, r, p) for k, r, p in zip(got["kind"], got["rule"], got["payload"])] \
        == got["priority"].tolist()
    O.record_verdict(store, got["output_id"].iloc[0], "ann", "expert", "valid")
    assert O.pending_outputs(store, "ann")["priority_reason"].iloc[0] == "critical value (HH)"
    assert len(O.pending_outputs(store, "ann", limit=None)) == len(recs) - 1


def test_migration_008_removes_unreviewed_reference_interval_outputs(tmp_path):
    """Stores written before the alert budget: unreviewed reference-interval outputs go, reviewed ones
    (and every verdict) stay, other outputs are untouched."""
    from store_helpers import store_at_version

    path = tmp_path / "old.duckdb"
    con = store_at_version(path, 5)
    recs = [_anomaly("P1", "2951-2", "2024-01-05 08:00", "reference_interval", "H", 0.3, 1),
            _anomaly("P1", "2951-2", "2024-01-06 08:00", "reference_interval", "H", 0.2, 2),
            _anomaly("P1", "2823-3", "2024-01-07 08:00", "critical_value", "HH", 0.5, 3)]
    for r in recs:
        con.execute("INSERT INTO model_outputs VALUES (?, 'anomaly', 'P1', ?, ?, ?, 'rules-old', ?, 'x', now(), now())",
                    [r["output_id"], r["analyte_code"], r["output_time"], r["rule"], json.dumps(O._jsonable(r["payload"]))])
    con.execute("INSERT INTO annotations (submission_id, output_id, annotator, role, verdict, comment, created_at) "
                "VALUES ('s1', ?, 'ann', 'expert', 'invalid', 'only slightly high', now())", [recs[1]["output_id"]])
    con.close()
    store = open_store(path)
    assert O.load_outputs(store)["output_id"].tolist() == [recs[1]["output_id"], recs[2]["output_id"]]
    assert O.annotation_log(store)["comment"].tolist() == ["only slightly high"]


def test_superseded_rule_based_outputs_leave_the_queue_reviewed_ones_stay(store):
    recs = [_anomaly("P1", "2160-0", f"2024-01-0{d} 08:00", "delta_check", "UP", 1.0, d) for d in (1, 2, 3, 4)]
    recs.append(_anomaly("P2", "2160-0", "2024-01-01 08:00", "delta_check", "UP", 1.0, 9))
    O.store_outputs(store, recs)  # version 'rules-t'
    O.record_verdict(store, recs[1]["output_id"], "ann", "expert", "valid")
    n = O.prune_superseded(store, "P1", "anomaly", [recs[0]["output_id"]], before=pd.Timestamp("2024-01-04"),
                           version_prefix="rules-")
    assert n == 1  # day 3: unreviewed, not produced again, inside the evaluated period
    left = set(O.load_outputs(store)["output_id"])
    assert left == {recs[0]["output_id"], recs[1]["output_id"], recs[3]["output_id"], recs[4]["output_id"]}
    assert O.prune_superseded(store, "P1", "anomaly", [], before=pd.Timestamp("2025-01-01"), version_prefix="model-") == 0


def test_rule_based_anomaly_runs_are_stored_under_the_rule_set_version():
    """A run (group_runs) beside a model-surprise row: the rule-based rows keep the reference version, never 'nan'."""
    from clinical.anomalies import detect_anomalies, load_reference
    from test_anomalies import ADULT_F, K, NA, StubForecaster, tl

    rows = [("2024-01-01 06:00", K, 6.8), ("2024-01-01 12:00", K, 7.1)] + \
        [(f"2024-01-0{d}", NA, 140) for d in range(1, 4)] + [("2024-01-04", NA, 155)]
    a = detect_anomalies(tl(rows), ADULT_F, forecaster=StubForecaster(140, 2))
    assert {"critical_value", "model_surprise"} <= set(a["rule"])  # (and the sodium delta check)
    version = load_reference().version
    recs = {r["rule"]: r["model_version"] for r in O.anomaly_outputs(a, version)}
    assert recs["critical_value"] == version and recs["model_surprise"] == "stub-1"
    assert all(v == version for rule, v in recs.items() if rule != "model_surprise")
