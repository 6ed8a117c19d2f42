"""The seeded synthetic cohort generator: contract, determinism, variation and labelled events."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data.catalogue import load_catalogue
from model import HISTORY_COLUMNS
from model.synthetic import (
    CANONICAL_CSV_COLUMNS,
    CHEMISTRY_PANELS,
    HAEMOLYSIS_INDEX,
    PANELS,
    LABEL_COLUMNS,
    LABEL_KINDS,
    analyte_parameters,
    generate_cohort,
    patterns,
    to_canonical_csv,
)

K, CA, MG, ALP, GLU, NA, CL, ALB = "2823-3", "17861-6", "2601-3", "6768-6", "2345-7", "2951-2", "2075-0", "1751-7"
LDH, CREA, CRP, HB, A1C = "2532-0", "2160-0", "1988-5", "718-7", "4548-4"
NO_ERRORS = {"haemolysis": 0.0, "edta_contamination": 0.0, "drip_arm": 0.0}


@pytest.fixture(scope="module")
def cohort():
    """A cohort with errors oversampled so every kind has enough events."""
    return generate_cohort(500, seed=7, event_rates={"edta_contamination": 0.02, "drip_arm": 0.05})


def _at_events(history, labels, kind, code):
    """(value at the labelled specimen, median of the patient's other results) for one analyte."""
    ev = labels[labels["kind"] == kind][["patient_id", "collected_at"]]
    h = history[history["analyte_code"] == code]
    hit = h.merge(ev, on=["patient_id", "collected_at"])
    bad = history.merge(labels[labels["kind"].isin(["haemolysis", "edta_contamination", "drip_arm"])][["patient_id", "collected_at"]],
                        on=["patient_id", "collected_at"])
    clean = h.merge(bad[["patient_id", "collected_at"]].drop_duplicates(), on=["patient_id", "collected_at"], how="left", indicator=True)
    clean = clean[clean["_merge"] == "left_only"]
    base = clean.groupby("patient_id")["value"].median().rename("base")
    return hit.join(base, on="patient_id").dropna(subset=["base"])


def test_contract(cohort):
    history, labels = cohort
    cat = load_catalogue()
    assert tuple(history.columns) == HISTORY_COLUMNS
    assert pd.api.types.is_datetime64_any_dtype(history["collected_at"])
    assert history["censor"].dtype == np.int8 and (history["censor"] == 0).all()
    assert history["patient_id"].str.startswith("synthetic:").all()
    assert set(history["sex"]) <= {"F", "M"} and history["age_years"].between(18, 100).all()
    assert not history.duplicated(["patient_id", "analyte_code", "collected_at"]).any()
    for code, grp in history.groupby("analyte_code"):
        a = cat.get(code)
        assert (grp["unit_canonical"] == a.canonical_unit).all()
        if a.plausible_low is not None:
            assert grp["value"].min() >= a.plausible_low
        if a.plausible_high is not None:
            assert grp["value"].max() <= a.plausible_high
    assert tuple(labels.columns) == LABEL_COLUMNS
    assert set(labels["kind"]) == set(LABEL_KINDS)
    assert set(labels["patient_id"]) <= set(history["patient_id"])
    spec = labels[labels["kind"].isin(["haemolysis", "edta_contamination", "drip_arm"])]
    assert (spec["analyte_code"] == "*").all()
    # specimen labels point at real specimens
    times = history[["patient_id", "collected_at"]].drop_duplicates()
    assert len(spec.merge(times, on=["patient_id", "collected_at"])) == len(spec)


def test_deterministic_for_a_seed():
    h1, l1 = generate_cohort(120, seed=11)
    h2, l2 = generate_cohort(120, seed=11)
    pd.testing.assert_frame_equal(h1, h2)
    pd.testing.assert_frame_equal(l1, l2)
    h3, _ = generate_cohort(120, seed=12)
    assert not h3["value"].head(500).equals(h1["value"].head(500))


def test_edta_specimens_have_high_potassium_and_low_calcium(cohort):
    history, labels = cohort
    k = _at_events(history, labels, "edta_contamination", K)
    ca = _at_events(history, labels, "edta_contamination", CA)
    assert len(k) >= 100 and len(ca) >= 80
    assert (k["value"] >= k["base"] + 1.0).all()  # >= 10 % v:v contamination: about +1.7 mmol/L or more
    assert k["value"].median() > 6.5
    assert (ca["value"] <= 0.85 * ca["base"]).all()
    for code in (MG, ALP):
        d = _at_events(history, labels, "edta_contamination", code)
        assert len(d) > 10 and (d["value"] < d["base"]).mean() > 0.9


def test_haemolysed_specimens_have_high_potassium_and_ldh(cohort):
    history, labels = cohort
    k = _at_events(history, labels, "haemolysis", K)
    assert len(k) >= 200
    diff = k["value"] - k["base"]
    assert diff.mean() > 0.5 and (diff > 0).mean() > 0.85
    ldh = _at_events(history, labels, "haemolysis", LDH)
    assert len(ldh) > 20 and (ldh["value"] > ldh["base"]).mean() > 0.9


def test_haemolysis_index_with_every_chemistry_specimen_rises_with_haemolysis(cohort):
    """One index result per chemistry specimen (none on CBC/HbA1c-only draws); in haemolysed specimens
    it is the injected free haemoglobin (g/L x 100 = mg/dL) on top of the specimen's own, and the
    potassium increment follows it at the cited 0.33 mmol/L per g/L (Hemokalc 2025)."""
    history, labels = cohort
    chem = {c for g in CHEMISTRY_PANELS for c in PANELS[g][0]}
    spec = history.groupby(["patient_id", "collected_at"])["analyte_code"]
    has_chem = spec.agg(lambda c: bool(chem & set(c)))
    n_index = spec.agg(lambda c: int((c == HAEMOLYSIS_INDEX).sum()))
    assert (n_index[has_chem] == 1).all() and (n_index[~has_chem] == 0).all() and (~has_chem).sum() > 50
    hi = history[history["analyte_code"] == HAEMOLYSIS_INDEX]
    assert (hi["unit_canonical"] == "mg/dL").all() and (hi["value"] >= 0).all()
    ev = labels[labels["kind"] == "haemolysis"][["patient_id", "collected_at", "severity"]]
    at = hi.merge(ev, on=["patient_id", "collected_at"])
    assert len(at) == len(ev) >= 200  # every haemolysed specimen carries its index
    own = at["value"] - 100.0 * at["severity"]  # the specimen's own free Hb (ARUP interval 0-11.3 mg/dL)
    assert own.between(-0.5, 25).all() and own.median() < 11.3
    clean = hi.merge(ev, on=["patient_id", "collected_at"], how="left", indicator=True)
    clean = clean[clean["_merge"] == "left_only"]
    assert (clean["value"] > 25).mean() < 0.001 and clean["value"].quantile(0.975) == pytest.approx(11.3, abs=2.5)
    k = _at_events(history, labels, "haemolysis", K).merge(at[["patient_id", "collected_at", "value"]],
                                                          on=["patient_id", "collected_at"], suffixes=("", "_hi"))
    slope = np.polyfit(k["value_hi"] / 100.0, k["value"] - k["base"], 1)[0]
    assert slope == pytest.approx(0.33, abs=0.06)


def test_without_the_index_the_other_results_are_identical():
    with_index, labels = generate_cohort(60, seed=9)
    without, labels2 = generate_cohort(60, seed=9, haemolysis_index=False)
    assert HAEMOLYSIS_INDEX not in set(without["analyte_code"])
    rest = with_index[with_index["analyte_code"] != HAEMOLYSIS_INDEX].reset_index(drop=True)
    pd.testing.assert_frame_equal(rest, without.reset_index(drop=True))
    pd.testing.assert_frame_equal(labels, labels2)
    assert with_index.attrs["report"]["haemolysis_index_results"] == (with_index["analyte_code"] == HAEMOLYSIS_INDEX).sum()


def test_drip_arm_specimens_are_glucose_high_and_diluted(cohort):
    history, labels = cohort
    glu = _at_events(history, labels, "drip_arm", GLU)
    assert len(glu) >= 50
    assert (glu["value"] > 2.0 * glu["base"]).all()
    for code in (CA, K, ALB):  # diluted
        d = _at_events(history, labels, "drip_arm", code)
        assert len(d) > 10 and (d["value"] < d["base"]).mean() > 0.85, code
    cl = _at_events(history, labels, "drip_arm", CL)  # pulled toward 154 mmol/L
    assert (cl["value"] - cl["base"]).mean() > 2.0


def test_stable_patients_within_subject_cv_matches_configured_cvi():
    history, _ = generate_cohort(400, seed=5, profile_mix={"stable": 1.0}, event_rates=NO_ERRORS)
    params = analyte_parameters()
    for code in (NA, K, CREA, CA, HB, GLU, "6690-2", "777-3"):
        g = history[history["analyte_code"] == code].groupby("patient_id")["value"]
        st = g.agg(["mean", "std", "count"])
        st = st[st["count"] >= 8]
        assert len(st) > 100
        cv_total2 = ((st["std"] / st["mean"]) ** 2).mean()
        p = params[code]
        cvi_est = np.sqrt(max(cv_total2 - p.cva**2, 0.0))
        assert cvi_est == pytest.approx(p.cvi, rel=0.15), (code, cvi_est, p.cvi)


def test_episodes_and_chronic_drifts_move_the_right_analytes(cohort):
    history, labels = cohort
    crea = history[history["analyte_code"] == CREA]
    ok = []
    for ev in labels[labels["kind"] == "aki"].itertuples():
        mine = crea[crea["patient_id"] == ev.patient_id]
        before = mine[mine["collected_at"] < ev.collected_at]["value"]
        during = mine[(mine["collected_at"] >= ev.collected_at) & (mine["collected_at"] <= ev.end_at)]["value"]
        if len(before) >= 2 and len(during) >= 2:
            ok.append(during.max() / before.median() >= 1.3)
    assert len(ok) > 20 and np.mean(ok) > 0.8

    crp = history[history["analyte_code"] == CRP]
    ok = []
    for ev in labels[labels["kind"] == "infection"].itertuples():
        mine = crp[crp["patient_id"] == ev.patient_id]
        before = mine[mine["collected_at"] < ev.collected_at]["value"]
        during = mine[(mine["collected_at"] >= ev.collected_at) & (mine["collected_at"] <= ev.end_at)]["value"]
        if len(before) and len(during):
            ok.append(during.max() > 5 * before.median())
    assert len(ok) > 10 and np.mean(ok) > 0.8

    def slope(code, kind):
        pids = labels.loc[labels["kind"] == kind, "patient_id"]
        h = history[(history["analyte_code"] == code) & history["patient_id"].isin(pids)]
        x = (h["collected_at"] - h["collected_at"].min()).dt.days.to_numpy()
        return h.assign(x=x).groupby("patient_id").apply(
            lambda g: np.polyfit(g["x"], g["value"], 1)[0] if len(g) > 5 else np.nan, include_groups=False).dropna()

    assert (slope(CREA, "ckd") > 0).mean() > 0.9
    assert (slope(HB, "anaemia") < 0).mean() > 0.9
    dm = labels.loc[labels["kind"] == "diabetes", "patient_id"]
    a1c = history[(history["analyte_code"] == A1C) & history["patient_id"].isin(dm)]["value"]
    assert a1c.median() >= 6.5


def test_scales_to_a_million_rows_vectorised():
    history, labels = generate_cohort(2200, seed=3)
    assert len(history) >= 1_000_000
    assert history["patient_id"].nunique() == 2200


def test_unknown_analyte_is_rejected():
    with pytest.raises(ValueError, match="cannot simulate"):
        generate_cohort(3, seed=0, analytes=["2093-3"])  # cholesterol: no reference interval in the file


def test_patterns_file_is_cited_and_coded():
    f = patterns()
    cat = load_catalogue()
    assert list(f.columns) == ["pattern", "parameter", "loinc", "effect", "effect_unit", "source"]
    assert all(code == "*" or code in cat for code in f["loinc"])
    assert (f["source"].str.len() > 15).all()
    assert set(f["pattern"]) >= {"haemolysis", "edta_contamination", "drip_arm", "aki", "infection", "ckd", "diabetes", "anaemia"}


def test_canonical_csv_goes_through_the_normal_importer(tmp_path):
    from data.db import open_store
    from data.importers import run_import
    from data.queries import cohort as store_cohort

    history, _ = generate_cohort(12, seed=2)
    path = to_canonical_csv(history, tmp_path / "synthetic.csv")
    assert pd.read_csv(path, nrows=1).columns.tolist() == list(CANONICAL_CSV_COLUMNS)
    store = open_store(tmp_path / "lab.duckdb")
    summary = run_import(store, path)
    assert summary.rows_loaded == len(history) and summary.rows_quarantined == 0
    back = store_cohort(store)
    m = back.merge(history, on=["patient_id", "collected_at", "analyte_code"], suffixes=("_db", "_syn"))
    assert len(m) == len(history)
    assert np.allclose(m["value_db"], m["value_syn"])
    assert (m["sex_db"] == m["sex_syn"]).all()
    assert np.allclose(m["age_years_db"], m["age_years_syn"], atol=0.01)
