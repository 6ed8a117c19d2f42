"""What the timeline and the review card show, without Streamlit: reporting precision, the latest episode,
deep links, thinning of long series, the review card's evidence, the upload's row outcomes, admissions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard import figures, period, precision, review_card, services, uploads
from data import queries
from data.importers import run_import


# ---- one rounding rule: the analyte's reporting precision ---------------------------------------------------------
def test_decimals_are_read_from_the_reports():
    texts = pd.Series(["4.10", "136", "< 0.5", ">100", "13,4", "HEMOLYZED", "", None, "1e3"])
    assert text_decimals_list(texts) == [2, 0, 1, 0, 1, None, None, None, None]


def text_decimals_list(texts):
    return [None if pd.isna(v) else int(v) for v in precision.text_decimals(texts)]


def test_precision_per_analyte_follows_the_catalogue_then_the_reports_and_the_unit_conversion():
    """Catalogue analytes at their cited precision (sodium 0, potassium 1, creatinine 1 whatever this file wrote);
    analytes the catalogue lacks at the decimals as reported, moved by the unit conversion: a local analyte
    reported in mmol/L with 1 decimal and stored x18 gets none, one reported whole and stored x0.0113 gets two."""
    rows = pd.DataFrame([
        ("2951-2", "136", 136, 136), ("2951-2", "140", 140, 140), ("2823-3", "4.1", 4.1, 4.1), ("2823-3", "3.85", 3.85, 3.85),
        ("2823-3", "4.0", 4.0, 4.0), ("2160-0", "88", 88, 0.995), ("LOCAL-G", "5.6", 5.6, 100.9),
        ("LOCAL-C", "88", 88, 0.995), ("X", "NEG", None, None),
    ], columns=["analyte_code", "value_text", "value_num", "value_canonical"])
    assert precision.reporting_decimals(rows) == {"2951-2": 0, "2823-3": 1, "2160-0": 1, "LOCAL-G": 0, "LOCAL-C": 2}
    assert precision.fmt(136.4, 0) == "136" and precision.fmt(7.9123, 1) == "7.9" and precision.fmt(-0.01, 1) == "0.0"
    assert precision.fmt(0.0683) == "0.0683" and precision.fmt(None, 1) == "" and precision.fmt(float("nan")) == ""
    assert precision.fmt_signed(0.0683, 0) == "≈0" and precision.fmt_signed(1.26, 1) == "+1.3"
    assert precision.fmt_signed(-2.5, 0) == "-3"  # half away from zero, as laboratory systems round (clinical.format)


def test_every_number_of_one_analyte_is_written_at_one_precision(case_store):
    """The cumulative table, the hover, the reference band and the forecast at the same decimals."""
    r = services.with_reference_limits(queries.timeline(case_store, "P0020"))
    dec = precision.reporting_decimals(r)
    assert dec["2823-3"] == 1
    fc = pd.DataFrame([{"patient_id": "P0020", "analyte_code": "2823-3", "at": r["collected_at"].max() + pd.Timedelta(days=1),
                        **{q: 4.3456 + k / 10 for k, q in enumerate(("q05", "q10", "q25", "q50", "q75", "q90", "q95"))},
                        "unit": "mmol/L", "n_history": 5, "status": "ok", "model_version": "lt-x"}])
    fig = figures.make_timeline_figure(r, ["2823-3"], forecasts=fc, decimals=dec)
    median = next(t for t in fig.data if t.name.startswith("Forecast median"))
    assert "Median 4.6 mmol/L" in median.customdata[-1] and "4.6456" not in median.customdata[-1]
    points = next(t for t in fig.data if t.name == "Result outside reference (H/L label)")
    assert all(h.split("</b>: ")[1].split(" ")[0].count(".") <= 1 for h in points.customdata)
    table = figures.make_cumulative_table(r[r["analyte_code"] == "2823-3"], dec)
    assert table["Reference interval"].iloc[0] == "3.3–5.1"
    bar = figures.make_shap_bar({"features": [{"feature": "Potassium results", "value": 0.0412},
                                              {"feature": "age", "value": 0.3}],
                                 "base_value": 4.0, "output": 4.3412, "unit": "mmol/L"}, decimals=1)
    assert list(bar.data[0].text) == ["≈0", "+0.3"] and "4.0 → 4.3 mmol/L" in bar.layout.title.text


# ---- vectorised flags and thinning ------------------------------------------------------------------------------
def test_vectorised_flags_match_the_row_rule(case_store):
    for pid in ("P0001", "P0002", "P0003", "P0006", "P0012", "P0020"):
        r = services.with_reference_limits(queries.timeline(case_store, pid), "F", 50)
        assert list(figures.flag_labels(r)) == [figures.flag_label(row) for row in r.to_dict("records")], pid


def test_thinning_keeps_every_peak_and_trough_and_only_real_results():
    n = 105_120
    t = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(n) * 5, unit="min")
    y = 140 + 40 * np.sin(np.arange(n) / 288 * 2 * np.pi)
    y[[1_000, 50_000, 104_000]] = [612, 20, 700]
    frame = pd.DataFrame({"collected_at": t, "value_canonical": y, "result_id": np.arange(n)})
    kept = figures.thin(frame, 1500)
    assert len(kept) <= 1500 and kept["collected_at"].is_monotonic_increasing
    assert {612, 20, 700} <= set(kept["value_canonical"])
    assert (frame.loc[kept.index, "value_canonical"] == kept["value_canonical"]).all()  # no averaged points
    assert figures.thin(frame.head(10), 1500) is not None and len(figures.thin(frame.head(10), 1500)) == 10


def test_results_list_has_every_result_newest_first(case_store):
    r = services.with_reference_limits(queries.timeline(case_store, "P0003"))
    listing = figures.make_results_list(r)
    assert len(listing) == len(r) and listing["Collected"].is_monotonic_decreasing
    assert "HEMOLYZED" in set(listing["Result"]) and list(listing.columns) == figures.RESULTS_LIST_COLUMNS


# ---- the latest episode and deep links --------------------------------------------------------------------------
def test_latest_episode_is_the_admission_holding_the_newest_result_else_90_days():
    adm = pd.DataFrame({"admitted_at": pd.to_datetime(["2024-01-01 00:00", "2024-03-01 10:00"]),
                        "discharged_at": pd.to_datetime(["2024-01-05", "2024-03-09"]), "admission_type": ["URGENT", "EW EMER."]})
    ep = period.latest_episode(pd.Timestamp("2024-03-04"), adm)
    assert (ep.kind, ep.start, ep.end) == ("admission", pd.Timestamp("2024-03-01 10:00"), pd.Timestamp("2024-03-09"))
    assert ep.label == "admission 2024-03-01 → 2024-03-09 (EW EMER.)"
    after = period.latest_episode(pd.Timestamp("2024-05-01"), adm)  # newest result after the last discharge
    assert (after.kind, after.start) == ("recent", pd.Timestamp("2024-05-01") - pd.Timedelta(days=90))
    assert period.latest_episode(pd.Timestamp("2024-05-01"), None).label == "last 90 days"
    still_in = adm.assign(discharged_at=[pd.Timestamp("2024-01-05"), pd.NaT])
    assert period.latest_episode(pd.Timestamp("2024-04-01"), still_in).end == pd.Timestamp("2024-04-01")
    assert period.latest_episode(None, adm) is None


def test_deep_link_values_round_trip():
    assert period.parse_period("ALL") == ("All", None) and period.parse_period("episode") == ("Latest episode", None)
    label, dates = period.parse_period("2024-02-10..2024-01-01")
    assert label == "Custom" and dates == (pd.Timestamp("2024-01-01").date(), pd.Timestamp("2024-02-10").date())
    assert period.period_token("Custom", dates) == "2024-01-01..2024-02-10"
    assert period.parse_period("last tuesday") is None and period.parse_period("2024-02-30..2024-03-01") is None
    assert period.parse_analytes("2823-3, 2951-2,2823-3,<script>,mimic:50971") == ["2823-3", "2951-2", "mimic:50971"]
    link = period.timeline_link("10000032", ["2823-3"], around=pd.Timestamp("2180-07-23 06:39"))
    assert link == "timeline?patient=10000032&analyte=2823-3&period=2180-07-16..2180-07-30"
    assert period.timeline_link("P 1&x") == "timeline?patient=P+1%26x"


# ---- the review card -------------------------------------------------------------------------------------------
def test_review_card_says_the_rule_with_its_numbers_for_every_kind():
    delta = {"kind": "anomaly", "analyte_code": "2160-0", "output_time": pd.Timestamp("2180-05-06 22:25"), "payload": {
        "result_id": 7, "collected_at": "2180-05-06T22:25:00", "rule": "delta_check", "flag": "UP", "value": 2.1,
        "unit": "mg/dL", "source": "Fraser 2001",
        "evidence": {"previous_value": 1.0, "previous_at": "2180-04-27T08:00:00", "previous_result_id": 5,
                     "days_since_previous": 9.6, "change_pct": 110.0, "rcv_pct": 16.1, "cvi_pct": 5.2, "cva_pct": 2.6,
                     "log_normal": False, "brand_new_field": 3},
        "run": [{"result_id": 8, "collected_at": "2180-05-07T06:00:00", "value": 2.3}]}}
    lines = review_card.evidence_lines(delta, 2)
    assert "Rule: **Delta check: change beyond the reference change value** (flag UP)" in lines
    assert "Result: **2.10 mg/dL**" in lines
    assert "Previous result 1.00 mg/dL at 2180-04-27 08:00, 9.6 days earlier" in lines
    assert any(line.startswith("Change +110 % against a reference change value of +16 %") for line in lines)
    assert any("Run of 1 results" in line and "2.30 mg/dL" in line for line in lines)
    assert "brand new field: 3" in lines and lines[-1] == "Source: Fraser 2001"
    assert review_card.result_ids(delta) == [7, 8]
    assert review_card.when(delta) == ("Collected", pd.Timestamp("2180-05-06 22:25"))

    forecast = {"kind": "forecast", "patient_id": "P1", "analyte_code": "2823-3", "model_version": "lt-x",
                "output_time": pd.Timestamp("2024-10-07"), "payload": {
                    "quantiles": {q: 5.0 + k / 10 for k, q in enumerate(("q05", "q10", "q25", "q50", "q75", "q90", "q95"))},
                    "interval95": [4.81, 5.79], "unit": "mmol/L", "status": "ok", "at": "2024-10-07T00:00:00",
                    "based_on": {"prior_results": 6, "last_result_at": "2024-10-04T07:00:00", "calibrated": True}}}
    lines = review_card.evidence_lines(forecast, 1)
    assert lines[:3] == ["Median **5.3 mmol/L**", "80 % interval 5.1–5.5 mmol/L", "95 % interval (conformal) 4.8–5.8 mmol/L"]
    assert "Based on 6 prior results, the last collected 2024-10-04 07:00, interval calibrated" in lines
    frame = review_card.forecast_frame(forecast)
    assert frame.loc[0, "q50"] == pytest.approx(5.3) and frame.loc[0, "lo95"] == pytest.approx(4.81)
    assert review_card.when(forecast) == ("Forecast for", pd.Timestamp("2024-10-07"))


def test_review_card_charts_the_analytes_its_evidence_names(case_store):
    r = queries.timeline(case_store, "P0020")
    k = r[r["analyte_code"] == "2823-3"].iloc[0]
    other = r[r["analyte_code"] != "2823-3"]
    out = {"kind": "anomaly", "analyte_code": "2823-3",
           "payload": {"result_id": int(k["result_id"]),
                       "evidence": {"result_ids": [int(k["result_id"])] + ([int(other["result_id"].iloc[0])] if len(other) else [])}}}
    codes = review_card.chart_analytes(out, r)
    assert codes[0] == "2823-3" and (len(other) == 0 or other["analyte_code"].iloc[0] in codes)


# ---- upload: what happened to every row -------------------------------------------------------------------------
def test_row_outcomes_add_up_to_the_rows_read():
    summary = {"rows_read": 20, "rows_loaded": 12, "rows_quarantined": 5, "rows_skipped": 3, "rows_text": 2,
               "quarantine_reasons": {"unit unknown or not convertible": 4, "collection time cannot be read": 1},
               "skipped_reasons": '{"survey (not a lab result)": 2, "exact duplicate of a row already kept": 1}'}
    out = uploads.row_outcomes(summary)
    main = out[out["Outcome"].isin(["Loaded", "Quarantined", "Skipped"])]
    assert main["Rows"].sum() == 20
    assert ("Skipped", "survey (not a lab result)", 2) in set(map(tuple, out.to_numpy()))
    assert ("Loaded, of which", "text results (e.g. HEMOLYZED, NEG), stored as text", 2) in set(map(tuple, out.to_numpy()))
    lost = uploads.row_outcomes({"rows_read": 3, "rows_loaded": 1, "rows_quarantined": 2, "rows_skipped": 0})
    assert ("Quarantined", "(reason not recorded)", 2) in set(map(tuple, lost.to_numpy()))


# ---- admissions (migration 009) -----------------------------------------------------------------------------------
def test_mimic_admissions_are_imported_once_and_give_the_latest_episode(tmp_path, mimic_dir):
    from data.db import open_store

    store = open_store(tmp_path / "m.duckdb")
    run_import(store, mimic_dir)
    with store.read() as cur:
        n = cur.execute("SELECT count(*) FROM admissions").fetchone()[0]
    assert n == 275  # every admission of the demo's 100 patients (admissions.csv.gz: 275 rows)
    assert run_import(store, mimic_dir).already_imported
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM admissions").fetchone()[0] == n
        pid, newest = cur.execute(
            """SELECT r.patient_id, max(r.collected_at) FROM lab_results r GROUP BY 1
               HAVING EXISTS (SELECT 1 FROM admissions a WHERE a.patient_id = r.patient_id
                              AND max(r.collected_at) BETWEEN a.admitted_at AND a.discharged_at)
               ORDER BY 1 LIMIT 1""").fetchone()
    ep = period.latest_episode(newest, queries.admissions(store, pid))
    assert ep.kind == "admission" and ep.start <= newest <= ep.end


@pytest.fixture(scope="module")
def case_store(tmp_path_factory, cases):
    from data.db import open_store

    store = open_store(tmp_path_factory.mktemp("tv") / "cases.duckdb")
    for name in ("LAB-01", "LAB-02", "LAB-04", "LAB-05", "LAB-10", "XAI-15"):
        run_import(store, cases / f"{name}.csv")
    return store
