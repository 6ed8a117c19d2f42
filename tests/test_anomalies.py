"""Anomalies: each rule both ways, the LAB cases, pre-analytical patterns on a labelled synthetic cohort."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from clinical.anomalies import (
    MaskedValuePredictor,
    detect_anomalies,
    evaluate_patterns,
    history_from_timeline,
    load_reference,
    rcv_limits,
    short_citation,
)
from clinical.flags import result_flags
from data import queries
from data.importers import run_import
from model import QUANTILE_COLUMNS

K, CA, NA, CREA, GLU, LDH, HB, TSH = "2823-3", "17861-6", "2951-2", "2160-0", "2345-7", "2532-0", "718-7", "3016-3"
AST, HI = "1920-8", "4635-9"  # HI: the haemolysis index (free haemoglobin, mg/dL)
UNITS = {K: "mmol/L", CA: "mg/dL", NA: "mmol/L", CREA: "mg/dL", GLU: "mg/dL", LDH: "U/L", HB: "g/dL", TSH: "m[IU]/L",
         AST: "U/L", HI: "mg/dL"}
ADULT_F = {"patient_id": "P", "sex": "F", "birth_date": pd.NaT, "age_at_ref": 50.0, "ref_date": pd.Timestamp("2024-01-01")}


def tl(rows, patient="P") -> pd.DataFrame:
    """Timeline rows from (time, code, value[, extras]) tuples; value may be '<10'-style or text."""
    out = []
    for i, r in enumerate(rows, start=1):
        t, code, value = r[:3]
        extra = r[3] if len(r) > 3 else {}
        comp, num, kind = "=", None, "numeric"
        if isinstance(value, str) and value[:1] in "<>":
            comp, num, kind = value[0], float(value[1:]), "censored"
        elif isinstance(value, str) or value is None:
            comp, kind = None, "text" if value else "empty"
        else:
            num = float(value)
        out.append(dict(
            result_id=i, patient_id=patient, specimen_id=extra.get("specimen_id"), collected_at=pd.Timestamp(t),
            reported_at=pd.Timestamp(extra.get("reported_at", t)), analyte_code=code, loinc=code, analyte_name=None,
            value_text=str(value) if value is not None else None, comparator=comp, value_num=num,
            unit=UNITS.get(code), value_canonical=num, unit_canonical=UNITS.get(code),
            ref_low=None, ref_high=None, ref_low_canonical=extra.get("ref_low"), ref_high_canonical=extra.get("ref_high"),
            flag=None, comment=extra.get("comment"), result_kind=kind, implausible=extra.get("implausible", False),
            unit_missing=extra.get("unit_missing", False), conflicting=False, batch_id=1, source_row=i,
        ))
    return pd.DataFrame(out, columns=queries.TIMELINE_COLUMNS)


def rules_of(a: pd.DataFrame, rule: str) -> pd.DataFrame:
    return a[a["rule"] == rule]


# --- reference data and formulas --------------------------------------------------------------


def test_rcv_formula_normal_and_log_normal():
    crea = rcv_limits(CREA, 1.96)  # CVI 5.2, CVA 2.6 (biological_variation.csv)
    assert crea == pytest.approx((-0.16111, 0.16111), abs=1e-4)  # 2^0.5 * 1.96 * (2.6^2 + 5.2^2)^0.5 %
    down, up = rcv_limits(GLU, 1.96)  # skewed: asymmetric (Fraser 2011)
    sigma = math.sqrt(math.log1p(0.025**2) + math.log1p(0.05**2))
    assert up == pytest.approx(math.exp(math.sqrt(2) * 1.96 * sigma) - 1)
    assert down == pytest.approx(math.exp(-math.sqrt(2) * 1.96 * sigma) - 1)
    assert up > -down
    assert rcv_limits(K, 1.96) is None  # no CVI point estimate in the cited table


def test_short_citation():
    ref = load_reference()
    assert short_citation(ref.critical[K][2]) == "Kost 1990"
    assert short_citation("Main Line Health Laboratories, Critical values, https://x") == "Main Line Health Laboratories"


# --- rule 1: reference interval -----------------------------------------------------------------


def test_reference_interval_flags_are_not_review_items():
    """A result outside its reference interval is a flag on the result (clinical.flags), never an anomaly."""
    rows = [("2024-01-01", K, 5.6), ("2024-01-02", K, 4.2), ("2024-01-03", K, 3.0)]
    assert detect_anomalies(tl(rows), ADULT_F).empty
    with pytest.raises(ValueError, match="flag on the result"):
        detect_anomalies(tl(rows), ADULT_F, rules=["reference_interval"])


def test_censored_critical_limits_flag_only_when_the_limit_itself_is_beyond():
    rows = [("2024-01-01", K, ">7"), ("2024-01-02", K, "<2"), ("2024-01-03", K, "<3"), ("2024-01-04", K, ">6")]
    a = detect_anomalies(tl(rows), ADULT_F, rules=["critical_value"])
    assert a["result_id"].tolist() == [1, 2] and a["flag"].tolist() == ["HH", "LL"]
    assert "censored: the true value is above 7.0" in a["text"].iloc[0]
    assert a["evidence"].iloc[0]["censored"] is True and a["evidence"].iloc[0]["comparator"] == ">"
    assert a["text"].iloc[0].startswith("Potassium >7.0 mmol/L")


# --- rule 2: critical values --------------------------------------------------------------------


def test_critical_value_text_and_both_ways():
    a = detect_anomalies(tl([("2024-01-01", K, 6.8), ("2024-01-02", K, 6.0), ("2024-01-03", K, 2.5)]), ADULT_F,
                         rules=["critical_value"])
    assert a["result_id"].tolist() == [1, 3] and a["flag"].tolist() == ["HH", "LL"]
    assert a["text"].iloc[0] == ("Potassium 6.8 mmol/L is above the critical limit 6.2 mmol/L \u2014 consider urgent "
                                 "clinical review (critical value list: Kost 1990)")
    assert a["source"].iloc[0].startswith("Kost GJ")


def test_site_critical_list(tmp_path):
    site = tmp_path / "site_critical.csv"
    site.write_text("code,low,high,unit,source\n2823-3,2.9,6.0,mmol/L,Site policy 2025 (lab director)\n")
    ref = load_reference(site)
    a = detect_anomalies(tl([("2024-01-01", K, 6.1)]), ADULT_F, rules=["critical_value"], reference=ref)
    assert a["flag"].tolist() == ["HH"] and "site critical value list" in a["text"].iloc[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("code,low,high,unit,source\n2823-3,2.9,6.0,mmol/L,\n")
    with pytest.raises(ValueError, match="no source"):
        load_reference(bad)


# --- rule 3: delta check ------------------------------------------------------------------------


def test_delta_check_both_ways():
    a = detect_anomalies(tl([("2024-01-01", CREA, 1.0), ("2024-01-03", CREA, 1.3), ("2024-01-05", CREA, 1.35)]),
                         ADULT_F, rules=["delta_check"])
    assert a["result_id"].tolist() == [2] and a["flag"].tolist() == ["UP"]  # +30 % > 21.2 %; then +3.8 %: no
    ev = a["evidence"].iloc[0]
    # review Z = 2.58 (screened on every result): 2^0.5 x 2.58 x (5.2^2 + 2.6^2)^0.5 = 21.2 %
    assert ev["previous_value"] == 1.0 and ev["previous_result_id"] == 1 and ev["rcv_pct"] == pytest.approx(21.21, abs=0.01)
    assert ev["z"] == 2.58
    assert ev["min_abs_change"] == pytest.approx(0.3) and "KDIGO" in ev["min_abs_change_source"]
    assert ("Creatinine 1.3 mg/dL rose +0.3 mg/dL (+30 %) from 1.0 mg/dL 2 days earlier (the previous result)"
            in a["text"].iloc[0])
    # no CVI for potassium in biological_variation.csv: no RCV, no delta check
    assert detect_anomalies(tl([("2024-01-01", K, 4.0), ("2024-01-02", K, 5.5)]), ADULT_F, rules=["delta_check"]).empty


def test_delta_check_needs_the_cited_minimum_change_and_a_recent_previous_result():
    """Creatinine 0.6 -> 0.8 mg/dL is +33 % (beyond the 16 % RCV) but 0.2 mg/dL, below KDIGO's 0.3: no review item."""
    small = [("2024-01-01", CREA, 0.6), ("2024-01-02", CREA, 0.8)]
    assert detect_anomalies(tl(small), ADULT_F, rules=["delta_check"]).empty
    big = [("2024-01-01", CREA, 0.6), ("2024-01-02", CREA, 0.9)]
    assert detect_anomalies(tl(big), ADULT_F, rules=["delta_check"])["flag"].tolist() == ["UP"]
    # a change against a result 8 days older is a trend, not a delta check (window 7 days)
    old = [("2024-01-01", CREA, 0.6), ("2024-01-09", CREA, 1.2)]
    assert detect_anomalies(tl(old), ADULT_F, rules=["delta_check"]).empty


def test_delta_check_log_normal_is_asymmetric():
    down = detect_anomalies(tl([("2024-01-01", GLU, 100), ("2024-01-02", GLU, 80)]), ADULT_F, rules=["delta_check"])
    up = detect_anomalies(tl([("2024-01-01", GLU, 100), ("2024-01-02", GLU, 120)]), ADULT_F, rules=["delta_check"])
    assert down["flag"].tolist() == ["DOWN"] and up.empty  # -20 % beyond -18.5 %, +20 % within +22.7 %
    assert down["evidence"].iloc[0]["rcv_pct"] == pytest.approx(-18.5, abs=0.1)
    assert down["evidence"].iloc[0]["log_normal"] is True


def test_delta_check_skips_text_rows_and_compares_with_last_valid():
    """LAB-02 kind: a flag on 1.5 is computed against 1.0, never against the text or empty rows."""
    rows = [("2024-05-02", CREA, 1.0), ("2024-05-03", CREA, "HEMOLYZED", {"comment": "specimen hemolyzed - recollect"}),
            ("2024-05-04", CREA, None, {"comment": "see note"}), ("2024-05-05", CREA, 1.5)]
    a = detect_anomalies(tl(rows), ADULT_F)
    d = rules_of(a, "delta_check")
    assert d["result_id"].tolist() == [4] and d["evidence"].iloc[0]["previous_result_id"] == 1
    on_text = a[a["result_id"].isin([2, 3])]
    assert on_text["rule"].tolist() == ["preanalytical:haemolysis_reported"] and on_text["score"].isna().all()


# --- the LAB cases through the importer -----------------------------------------------------------


def _case(store, cases, name, patient):
    run_import(store, cases / f"{name}.csv")
    return queries.timeline(store, patient), queries.patient_info(store, patient)


def test_lab01_censored_never_scored_as_numbers(store, cases):
    t1, p1 = _case(store, cases, "LAB-01", "P0001")
    a1 = detect_anomalies(t1, p1)
    assert a1.empty  # no 'dropped to 0 then rose to 14'
    t2, p2 = queries.timeline(store, "P0002"), queries.patient_info(store, "P0002")
    a2 = detect_anomalies(t2, p2)
    assert a2.empty  # '>100' is flagged H on the result (clinical.flags), not a review item
    f2 = result_flags(t2, p2)
    assert f2.loc[t2["value_text"].astype(str).str.startswith(">"), "flag"].tolist() == ["H"]
    assert not (a2["value"] == 0).any()


def test_lab02_text_results_not_scored(store, cases):
    t, p = _case(store, cases, "LAB-02", "P0003")
    a = detect_anomalies(t, p)
    text_ids = t.loc[t["result_kind"].isin(["text", "empty"]), "result_id"]
    on_text = a[a["result_id"].isin(text_ids)]
    assert on_text["rule"].tolist() == ["preanalytical:haemolysis_reported"]
    assert on_text["value"].isna().all() and on_text["score"].isna().all()
    f = result_flags(t, p)
    assert t.loc[f["flag"] == "H", "value_canonical"].tolist() == [5.9]  # a flag on the result, not a review item
    assert f.loc[t["result_kind"].isin(["text", "empty"]), "flag"].isna().all()
    assert detect_anomalies(queries.timeline(store, "P0004"), queries.patient_info(store, "P0004")).empty


def test_lab04_mixed_units_do_not_fire(store, cases):
    t, p = _case(store, cases, "LAB-04", "P0006")
    a = detect_anomalies(t, p)
    assert rules_of(a, "delta_check").empty
    missing = t.loc[t["unit_missing"].astype(bool), "result_id"]
    assert len(missing) == 1 and not a["result_id"].isin(missing).any()


def test_lab05_conflicting_results_are_not_a_delta(store, cases):
    t, p = _case(store, cases, "LAB-05", "P0007")
    a = detect_anomalies(t, p)
    assert rules_of(a, "delta_check").empty
    assert not a["text"].str.contains("128.*138|138.*128").any()  # never 'rapid change 128 -> 138 within 0 min'
    assert a.empty and result_flags(t, p)["flag"].eq("L").any()  # 128 is below the interval on its own: a flag
    # the next day's 137 is compared with the value reported last at 14:00 (138): no change beyond RCV
    h = history_from_timeline(t, p)
    assert h[h["collected_at"] == pd.Timestamp("2024-03-10 14:00")]["value"].tolist() == [138.0]


def test_lab10_implausible_values_never_scored(store, cases):
    t, p = _case(store, cases, "LAB-10", "P0012")
    a = detect_anomalies(t, p)
    implausible = t.loc[t["implausible"].astype(bool), "result_id"]
    assert len(implausible) == 3 and not a["result_id"].isin(implausible).any()
    assert rules_of(a, "delta_check").empty  # 139 -> 141 only


# --- pre-analytical patterns --------------------------------------------------------------------


def _specimen(t, values: dict):
    return [(t, code, v) for code, v in values.items()]


def test_edta_pattern_both_ways():
    yes = detect_anomalies(tl(_specimen("2024-01-01", {K: 7.9, CA: 6.1, NA: 140})), ADULT_F, rules=["preanalytical"])
    assert yes["rule"].tolist() == ["preanalytical:edta_contamination"] and yes["analyte_code"].tolist() == [K]
    assert sorted(yes["evidence"].iloc[0]["result_ids"]) == [1, 2]
    assert "consider recollecting the specimen" in yes["text"].iloc[0] and "Cornes" in yes["source"].iloc[0]
    no = detect_anomalies(tl(_specimen("2024-01-01", {K: 7.9, CA: 9.4})), ADULT_F, rules=["preanalytical"])
    assert no.empty
    # calcium that was already low before (e.g. CKD) is not evidence of contamination
    chronic = tl(_specimen("2024-01-01", {K: 5.0, CA: 7.6}) + _specimen("2024-01-08", {K: 6.0, CA: 7.5}))
    assert detect_anomalies(chronic, ADULT_F, rules=["preanalytical"]).empty


def test_haemolysis_pattern_both_ways():
    """Without a haemolysis index the multi-analyte pattern decides, and says so."""
    before = _specimen("2024-01-01", {K: 4.0, LDH: 150})
    yes = detect_anomalies(tl(before + _specimen("2024-01-08", {K: 4.6, LDH: 260})), ADULT_F, rules=["preanalytical"])
    assert yes["rule"].tolist() == ["preanalytical:haemolysis"]
    assert yes["evidence"].iloc[0]["method"] == "multi-analyte pattern"
    assert "multi-analyte pattern used" in yes["text"].iloc[0] and "consider recollecting" in yes["text"].iloc[0]
    assert np.isnan(yes["score"].iloc[0])
    no = detect_anomalies(tl(before + _specimen("2024-01-08", {K: 4.6, LDH: 160})), ADULT_F, rules=["preanalytical"])
    assert no.empty
    k_fell = detect_anomalies(tl(before + _specimen("2024-01-08", {K: 3.6, LDH: 190})), ADULT_F, rules=["preanalytical"])
    assert k_fell.empty  # +27 %: beyond the LDH RCV but K fell, and not the extreme (Z 3.29) rise
    extreme = detect_anomalies(tl(before + _specimen("2024-01-08", {K: 3.6, LDH: 220})), ADULT_F, rules=["preanalytical"])
    assert extreme["rule"].tolist() == ["preanalytical:haemolysis"]


def test_haemolysis_index_decides_both_ways():
    """An index above the cited cut-off (25 mg/dL, serum_indices.csv) fires; at or below it does not,
    even where the multi-analyte pattern alone would fire (LDH 150 -> 260 with potassium up)."""
    ref = load_reference()
    assert ref.serum_indices[(HI, "alert_cutoff")][0] == 25.0
    assert "Goyal" in ref.serum_indices[(HI, "alert_cutoff")][1]
    before = _specimen("2024-01-01", {K: 4.0, LDH: 150, AST: 20, HI: 5})

    def run(index_value, extra=None):
        return detect_anomalies(tl(before + _specimen("2024-01-08", {K: 4.6, LDH: 260, AST: 24, HI: index_value}
                                                      | (extra or {}))), ADULT_F, rules=["preanalytical"])

    above = run(26)
    assert above["rule"].tolist() == ["preanalytical:haemolysis"] and above["analyte_code"].tolist() == [K]
    ev = above["evidence"].iloc[0]
    assert ev["method"] == "haemolysis index" and ev["index_value"] == 26 and ev["cutoff"] == 25
    assert sorted(ev["result_ids"]) == [5, 6, 7, 8]  # K, LDH, AST and the index of the second specimen
    text = above["text"].iloc[0]
    assert text.startswith("Potassium 4.6 mmol/L: haemolysis index above the alert cut-off")
    assert "26 mg/dL > 25 mg/dL" in text and "Lactate dehydrogenase (LDH) 260 U/L" in text
    assert "\u2014 consider recollecting the specimen" in text and "(Goyal 2015)" in text
    assert above["score"].iloc[0] == pytest.approx(26 / 25)
    assert "Goyal" in above["source"].iloc[0] and "Lippi" in above["source"].iloc[0]
    assert run(25).empty and run(5).empty  # at or below the cut-off: the index overrides the LDH pattern
    assert run("<10").empty  # a censored index below the cut-off decides too
    assert run(">100")["evidence"].iloc[0]["index_comparator"] == ">"
    undecided = run("<50")  # could be either side: the pattern decides
    assert undecided["evidence"].iloc[0]["method"] == "multi-analyte pattern"


def test_haemolysis_index_alone_and_laboratory_negations():
    only = detect_anomalies(tl(_specimen("2024-01-08", {HI: 300, NA: 140})), ADULT_F, rules=["preanalytical"])
    assert only["analyte_code"].tolist() == [HI]  # nothing haemolysis-sensitive measured: on the index itself
    assert only["text"].iloc[0].startswith("Haemolysis index above the alert cut-off")
    rows = [("2024-01-01", K, 4.1, {"comment": "VERIFIED.  NOT HEMOLYZED."}),
            ("2024-01-02", K, 4.3, {"comment": "Specimen not Hemolyzed."}),
            ("2024-01-03", K, 5.9, {"comment": "SLIGHTLY HEMOLYZED.  HEMOLYSIS FALSELY ELEVATES K.."})]
    a = detect_anomalies(tl(rows), ADULT_F, rules=["preanalytical"])
    assert a["result_id"].tolist() == [3] and a["rule"].tolist() == ["preanalytical:haemolysis_reported"]


def test_drip_arm_pattern_both_ways():
    before = _specimen("2024-01-01", {GLU: 95, CA: 9.4, K: 4.2})
    yes = detect_anomalies(tl(before + _specimen("2024-01-02", {GLU: 600, CA: 8.2, K: 3.8})), ADULT_F,
                           rules=["preanalytical"])
    assert yes["rule"].tolist() == ["preanalytical:drip_arm"] and yes["analyte_code"].tolist() == [GLU]
    no = detect_anomalies(tl(before + _specimen("2024-01-02", {GLU: 600, CA: 9.3, K: 3.8})), ADULT_F,
                          rules=["preanalytical"])
    assert no.empty


@pytest.fixture(scope="module")
def synthetic_cohort():
    from model.synthetic import generate_cohort

    return generate_cohort(600, seed=21, event_rates={"edta_contamination": 0.01, "drip_arm": 0.02})


def test_pattern_recall_and_precision_on_synthetic_cohort(synthetic_cohort):
    """Targets: recall >= 0.9 at precision >= 0.8 for EDTA contamination and haemolysis, over every
    labelled specimen. The generator reports a haemolysis index with each chemistry specimen, as
    analysers do; the full benchmark (3 seeds x 1500 patients) is benchmarks/clinical.py."""
    r = evaluate_patterns(*synthetic_cohort)
    print({k: {m: v[m] for m in ("recall", "recall_assessable", "precision", "n_labelled")} for k, v in r.items()})
    for kind, n in (("haemolysis", 300), ("edta_contamination", 100)):
        assert r[kind]["n_labelled"] >= n, r[kind]
        assert r[kind]["recall"] >= 0.9, r[kind]
        assert r[kind]["precision"] >= 0.8, r[kind]
    assert r["edta_contamination"]["recall_assessable"] >= 0.9


def test_haemolysis_pattern_without_index_on_synthetic_cohort(synthetic_cohort):
    """The same cohort without its index rows (a laboratory or export without serum indices, like
    MIMIC-IV): the multi-analyte pattern keeps its precision and finds the haemolysed specimens it
    can assess (LDH measured, with a previous LDH), a minority of them."""
    from model.synthetic import HAEMOLYSIS_INDEX

    history, labels = synthetic_cohort
    r = evaluate_patterns(history[history["analyte_code"] != HAEMOLYSIS_INDEX], labels)["haemolysis"]
    assert r["n_assessable"] >= 30, r
    assert r["recall_assessable"] >= 0.85 and r["precision"] >= 0.8, r


# --- rules 4 and 5 (model-based) ------------------------------------------------------------------


class StubForecaster:
    """Forecasts every query with fixed quantiles around ``centre`` (calibrated: its 95 % interval is
    centre +- 1.96 spread)."""

    conformal = "calibrated"

    def __init__(self, centre: float, spread: float):
        self.centre, self.spread = centre, spread

    def forecast(self, history, queries_):
        out = queries_.copy()
        for k, z in zip(QUANTILE_COLUMNS, (-1.645, -1.28, -0.674, 0.0, 0.674, 1.28, 1.645)):
            out[k] = self.centre + z * self.spread
        out["lo95"], out["hi95"] = self.centre - 1.96 * self.spread, self.centre + 1.96 * self.spread
        out["status"], out["model_version"], out["unit"], out["n_history"] = "ok", "stub-1", None, 2
        return out


def test_model_surprise_both_ways():
    rows = [("2024-01-01", NA, 140), ("2024-01-02", NA, 139), ("2024-01-03", NA, 141), ("2024-01-04", NA, 150)]
    a = detect_anomalies(tl(rows), ADULT_F, forecaster=StubForecaster(140, 2), rules=["model_surprise"])
    assert a["result_id"].tolist() == [4] and a["flag"].tolist() == ["ABOVE"] and a["model_version"].tolist() == ["stub-1"]
    assert a["score"].iloc[0] == pytest.approx(0.95) and a["evidence"].iloc[0]["excess_in_interval_widths"] > 0
    assert a["evidence"].iloc[0]["interval_level"] == 0.95
    assert "above the 95 % interval 136–144 mmol/L" in a["text"].iloc[0]
    none = detect_anomalies(tl(rows[:3]), ADULT_F, forecaster=StubForecaster(140, 2), rules=["model_surprise"])
    assert none.empty
    # beyond the interval by less than the allowable error of one sodium result (4 mmol/L): no surprise
    near = rows[:3] + [("2024-01-04", NA, 147)]
    assert detect_anomalies(tl(near), ADULT_F, forecaster=StubForecaster(140, 2), rules=["model_surprise"]).empty
    notes = detect_anomalies(tl(rows), ADULT_F, rules=["model_surprise"]).attrs["notes"]
    assert notes == ["model_surprise not evaluated: no forecaster given"]
    uncalibrated = StubForecaster(140, 2)
    uncalibrated.conformal = None
    a = detect_anomalies(tl(rows), ADULT_F, forecaster=uncalibrated, rules=["model_surprise"])
    assert a.empty and "not calibrated" in a.attrs["notes"][0]


def test_model_surprise_with_a_real_pipeline():
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    steady = [140, 139, 141, 140, 138, 139, 141] * 4
    rows = [(pd.Timestamp("2024-01-01") + pd.Timedelta(days=d), NA, v) for d, v in enumerate(steady + [175])]
    t = tl(rows)
    h = history_from_timeline(t, ADULT_F)
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(h)
    pipe = ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab, AnalyteScaler.fit(h))
    calib = h.iloc[2:len(steady)].rename(columns={"collected_at": "at"})  # the steady days: 26 points
    pipe = pipe.calibrate(h, calib, min_points=19)
    a = detect_anomalies(t, ADULT_F, forecaster=pipe, rules=["model_surprise"])
    assert a["result_id"].tolist() == [len(rows)] and a["model_version"].iloc[0] == pipe.model_version


class StubMasked:
    model_version = "stub-mv"

    def predict(self, history, targets):
        out = targets.copy()
        for k, z in zip(QUANTILE_COLUMNS, (-1.645, -1.28, -0.674, 0.0, 0.674, 1.28, 1.645)):
            out[k] = 4.2 + 0.3 * z
        out["status"] = "ok"
        return out


def test_multivariate_inconsistency_both_ways():
    rows = _specimen("2024-01-01", {K: 5.5, NA: 140})
    a = detect_anomalies(tl(rows), ADULT_F, masked_predictor=StubMasked(), rules=["multivariate_inconsistency"])
    assert a["analyte_code"].tolist() == [K] or set(a["analyte_code"]) == {K, NA}
    assert (a.loc[a["analyte_code"] == K, "flag"] == "ABOVE").all()
    single = detect_anomalies(tl([("2024-01-01", K, 5.5)]), ADULT_F, masked_predictor=StubMasked(),
                              rules=["multivariate_inconsistency"])
    assert single.empty  # one analyte: nothing to be inconsistent with
    ok = detect_anomalies(tl(_specimen("2024-01-01", {K: 4.2})), ADULT_F, masked_predictor=StubMasked(),
                          rules=["multivariate_inconsistency"])
    assert ok.empty


def test_masked_value_predictor_with_a_real_pretraining_model():
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.modeling import LabTrendForPretraining

    rows = _specimen("2024-01-01", {K: 4.1, NA: 139, CREA: 0.9}) + _specimen("2024-01-05", {K: 4.3, NA: 141, CREA: 1.0})
    h = history_from_timeline(tl(rows), ADULT_F)
    vocab = AnalyteVocab.fit(h)
    torch.manual_seed(0)
    pred = MaskedValuePredictor(LabTrendForPretraining(config_preset("tiny", n_analytes=len(vocab))), vocab,
                                AnalyteScaler.fit(h), model_version="pre-test")
    out = pred.predict(h, h[["patient_id", "analyte_code", "collected_at"]])
    assert (out["status"] == "ok").all() and np.isfinite(out[list(QUANTILE_COLUMNS)].to_numpy()).all()
    a = detect_anomalies(tl(rows), ADULT_F, masked_predictor=pred, rules=["multivariate_inconsistency"])
    assert set(a["model_version"]) <= {"pre-test"}


# --- MIMIC-IV demo ------------------------------------------------------------------------------


def test_mimic_demo_patients(mimic_store):
    pats = queries.patients(mimic_store).sort_values("n_results").iloc[::20]["patient_id"].tolist()
    seen_rules = set()
    for pid in pats:
        t = queries.timeline(mimic_store, pid)
        a = detect_anomalies(t, queries.patient_info(mimic_store, pid))
        bad = t.loc[t["implausible"].astype(bool) | t["unit_missing"].astype(bool) | t["result_kind"].isin(["text", "empty"]),
                    "result_id"]
        scored = a[~a["rule"].str.startswith("preanalytical:haemolysis_reported")]
        assert not scored["result_id"].isin(bad).any()
        assert a["source"].str.len().gt(0).all() and a["text"].str.contains("consider").all()
        seen_rules |= set(a["rule"])
    assert {"critical_value", "delta_check"} <= seen_rules and "reference_interval" not in seen_rules


def test_mimic_demo_haemolysis_comments_and_negations(mimic_store):
    """MIMIC-IV has no haemolysis-index item: its haemolysis notes are comments. 'NOT HEMOLYZED' is
    not a haemolysis report; 'HEMOLYSIS FALSELY ELEVATES K' is."""
    with mimic_store.read() as cur:
        pids = [r[0] for r in cur.execute(
            "SELECT DISTINCT patient_id FROM lab_results WHERE lower(comment) LIKE '%hemoly%'").fetchall()]
    assert pids
    negated, reported, flagged = set(), set(), set()
    for pid in pids:
        t = queries.timeline(mimic_store, pid)
        a = detect_anomalies(t, queries.patient_info(mimic_store, pid), rules=["preanalytical"])
        flagged |= {i for ev in a.loc[a["rule"] == "preanalytical:haemolysis_reported", "evidence"]
                    for i in ev["result_ids"]}
        c = t["comment"].fillna("").str.lower()
        negated |= set(t.loc[c.str.contains(r"not hemoly|no hemoly"), "result_id"])
        reported |= set(t.loc[c.str.contains("falsely elevates"), "result_id"])
    assert len(negated) >= 5 and not negated & flagged
    assert reported and reported <= flagged


def test_forecast_targets_skip_the_haemolysis_index():
    """The index comes with every chemistry specimen, so it is the most frequent code of a synthetic
    patient; it describes the specimen and is never a forecast target."""
    from clinical.predict import top_analytes_for
    from model.synthetic import HAEMOLYSIS_INDEX, generate_cohort

    h, _ = generate_cohort(3, seed=0)
    h = h[h["patient_id"] == h["patient_id"].iloc[0]]
    counts = h["analyte_code"].value_counts()
    assert counts.index[0] == HAEMOLYSIS_INDEX and counts.iloc[0] > counts.iloc[1]
    codes = top_analytes_for(h, set(h["analyte_code"]), 3)
    top = counts.drop(HAEMOLYSIS_INDEX)
    assert len(codes) == 3 and set(codes) <= set(top[top == top.max()].index)  # the most frequent patient analytes


# --- runs: consecutive flags of one analyte within one episode are one review item ---------------------------------


def test_consecutive_critical_values_are_one_item_with_their_run():
    rows = [("2024-01-01 06:00", K, 6.8), ("2024-01-01 12:00", K, 7.1), ("2024-01-02 07:00", K, 6.5),  # one run
            ("2024-01-02 12:00", K, 5.0),                                                        # not critical
            ("2024-01-02 18:00", K, 6.6),                                                        # a new item
            ("2024-01-05 06:00", K, 6.9)]                                                        # 2.5 days later
    a = detect_anomalies(tl(rows), ADULT_F, rules=["critical_value"])
    assert a["result_id"].tolist() == [1, 5, 6] and (a["rule"] == "critical_value").all()
    run = a["evidence"].iloc[0]["run"]
    assert run["n"] == 3 and run["result_ids"] == [1, 2, 3] and run["peak"]["value"] == 7.1
    assert a["value"].iloc[0] == 7.1  # the peak
    assert a["text"].iloc[0].startswith("Potassium critical high on 3 consecutive results from 2024-01-01 06:00 to "
                                        "2024-01-02 07:00 (1 day): first 6.8, peak 7.1 (2024-01-01 12:00), last 6.5 "
                                        "mmol/L, above the critical limit 6.2 mmol/L")
    assert "run" not in a["evidence"].iloc[1]  # a single flag keeps its own text
    per_result = detect_anomalies(tl(rows), ADULT_F, rules=["critical_value"], group=False)
    assert len(per_result) == 5
    # a critical low after a critical high is another emergency: another item
    both = detect_anomalies(tl([("2024-01-01", K, 6.8), ("2024-01-01 06:00", K, 2.5)]), ADULT_F, rules=["critical_value"])
    assert both["flag"].tolist() == ["HH", "LL"]


def test_runs_follow_the_admission_when_known():
    rows = [("2024-01-01 06:00", K, 6.8), ("2024-01-03 06:00", K, 6.9), ("2024-01-05 06:00", K, 7.0)]  # 48 h apart
    assert len(detect_anomalies(tl(rows), ADULT_F, rules=["critical_value"])) == 3
    stay = pd.DataFrame({"patient_id": ["P"], "start": [pd.Timestamp("2023-12-31")], "end": [pd.Timestamp("2024-01-04")]})
    a = detect_anomalies(tl(rows), ADULT_F, rules=["critical_value"], episodes=stay)
    assert a["result_id"].tolist() == [1, 3] and a["evidence"].iloc[0]["run"]["episode"] == "admission"


def test_a_delta_check_run_names_its_baseline():
    """The issue's creatinine: 1.0 -> 1.4 -> 2.1 mg/dL in 9 days is x2.1 from 1.0 mg/dL, not '+50 % from the previous'."""
    rows = [("2024-01-01", CREA, 1.0), ("2024-01-05", CREA, 1.4), ("2024-01-10", CREA, 2.1)]
    stay = pd.DataFrame({"patient_id": ["P"], "start": [pd.Timestamp("2023-12-31")], "end": [pd.Timestamp("2024-01-11")]})
    a = detect_anomalies(tl(rows), ADULT_F, rules=["delta_check"], episodes=stay)
    assert len(a) == 1 and a["evidence"].iloc[0]["run"]["result_ids"] == [2, 3]
    assert ("2.1 mg/dL is +1.1 mg/dL (x2.1) from 1.0 mg/dL 9 days earlier (the result before this run)"
            in a["text"].iloc[0])
