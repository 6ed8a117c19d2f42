"""Pretraining corpus loaders on the real shared datasets (skipped where a dataset is missing)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from data.catalogue import load_catalogue
from data.units import conversion_factor
from data import settings
from model import HISTORY_COLUMNS
from model import corpus
from model.corpus import (
    EICU_ANCHOR,
    NHANES_DATE,
    PHYSIONET_ANCHOR,
    load_eicu_hourly,
    load_nhanes,
    load_physionet2012,
    load_pretraining_corpus,
    source_codes,
)


def _dir(key: str):
    folder = corpus.DATASETS[key][0]
    d = settings.dataset_dir(folder)
    if d is None:
        pytest.skip(f"shared dataset '{folder}' not found (set LABTREND_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def physionet():
    return load_physionet2012(_dir("physionet2012"))


@pytest.fixture(scope="session")
def eicu():
    return load_eicu_hourly(_dir("eicu"))


@pytest.fixture(scope="session")
def nhanes():
    return load_nhanes(_dir("nhanes"))


def _value(frame, pid, code, at):
    hit = frame[(frame["patient_id"] == pid) & (frame["analyte_code"] == code) & (frame["collected_at"] == at)]
    assert len(hit) == 1, (pid, code, at, len(hit))
    return hit.iloc[0]


def _check_contract(frame: pd.DataFrame, prefix: str) -> None:
    cat = load_catalogue()
    assert tuple(frame.columns) == HISTORY_COLUMNS
    assert len(frame) > 0
    assert pd.api.types.is_datetime64_any_dtype(frame["collected_at"])
    assert frame["value"].dtype == np.float64 and np.isfinite(frame["value"]).all()
    assert frame["censor"].dtype == np.int8 and set(frame["censor"].unique()) <= {-1, 0, 1}
    assert frame["patient_id"].str.startswith(prefix).all()
    assert set(frame["sex"].dropna().unique()) <= {"F", "M"}
    assert not frame.duplicated(["patient_id", "analyte_code", "collected_at"]).any()
    for code, grp in frame.groupby("analyte_code"):
        a = cat.get(code)
        assert a is not None, code
        assert (grp["unit_canonical"] == a.canonical_unit).all(), code
        if a.plausible_low is not None:
            assert grp["value"].min() >= a.plausible_low, code
        if a.plausible_high is not None:
            assert grp["value"].max() <= a.plausible_high, code


# ---- the mapping table -------------------------------------------------------------------


def test_source_codes_table_is_consistent():
    codes = source_codes()
    cat = load_catalogue()
    assert list(codes.columns) == ["source", "source_name", "file_unit", "source_unit", "loinc", "note"]
    assert set(codes["source"]) == {"physionet2012", "eicu", "nhanes", "physionet2019", "physionet2012c", "mimic3", "cdisc"}
    assert (codes["note"].str.len() > 20).all(), "every row cites its documentation"
    mapped = codes[codes["loinc"] != ""]
    for r in mapped.itertuples():
        a = cat.get(r.loinc)
        assert a is not None, (r.source, r.source_name, r.loinc)
        f = conversion_factor(r.source_unit or None, a)  # raises if the unit cannot be converted
        assert f > 0
    # the 23 PhysioNet labs documented in PROVENANCE.md are all mapped
    assert (mapped["source"] == "physionet2012").sum() == 23
    # PhysioNet Mg: documented as mmol/L, but the values are mg/dL (see the row's note)
    mg = codes[(codes["source"] == "physionet2012") & (codes["source_name"] == "Mg")].iloc[0]
    assert mg["source_unit"] == "mg/dL" and "mmol/L" in mg["note"]


def test_nhanes_si_duplicates_convert_like_the_primary_variable():
    """The catalogue molar masses reproduce NHANES' own SI columns (a real-data unit check)."""
    folder = _dir("nhanes")
    cat = load_catalogue()
    raw = pd.read_csv(folder / "nhanes_p_labs_long.csv.gz", usecols=["SEQN", "variable", "value"])
    codes = source_codes()
    codes = codes[(codes["source"] == "nhanes") & (codes["loinc"] != "")].set_index("source_name")
    checked = 0
    for var, row in codes[codes["note"].str.startswith("SI-unit duplicate of")].iterrows():
        primary = row["note"].split("SI-unit duplicate of ")[1].split(" ")[0]
        if primary not in codes.index or codes.loc[primary, "loinc"] != row["loinc"]:
            continue
        a = cat.get(row["loinc"])
        si = raw[raw["variable"] == var].set_index("SEQN")["value"] * conversion_factor(row["source_unit"], a)
        pr = raw[raw["variable"] == primary].set_index("SEQN")["value"] * conversion_factor(codes.loc[primary, "source_unit"], a)
        both = pd.concat([si, pr], axis=1, keys=["si", "pr"]).dropna()
        both = both[both["pr"] > 0]
        rel = ((both["si"] - both["pr"]).abs() / both["pr"]).quantile(0.99)
        assert rel < 0.02, (var, primary, rel)
        checked += 1
    assert checked >= 15
    # e.g. creatinine 55.69 umol/L (SEQN 109266) = 0.63 mg/dL
    f = conversion_factor("umol/L", cat.get("2160-0"))
    assert math.isclose(55.69 * f, 0.63, abs_tol=0.005)


# ---- PhysioNet 2012 ----------------------------------------------------------------------


def test_physionet_contract_and_known_rows(physionet):
    _check_contract(physionet, "physionet2012:")
    assert physionet["analyte_code"].nunique() == 23
    at = PHYSIONET_ANCHOR + pd.Timedelta(minutes=637)  # record 132539, 10:37
    k = _value(physionet, "physionet2012:132539", "2823-3", at)
    assert k["value"] == pytest.approx(4.4) and k["unit_canonical"] == "mmol/L"  # mEq/L -> mmol/L (valence 1)
    assert _value(physionet, "physionet2012:132539", "2951-2", at)["value"] == pytest.approx(137.0)
    mg = _value(physionet, "physionet2012:132539", "2601-3", at)
    # Mg stays 1.5 mg/dL: not multiplied by 2.43 as the documented mmol/L would require
    assert mg["value"] == pytest.approx(1.5) and mg["unit_canonical"] == "mg/dL"
    assert k["sex"] == "F" and k["age_years"] == pytest.approx(54.0)


def test_physionet_entry_errors_are_removed_and_counted(physionet):
    rep = physionet.attrs["report"]["physionet2012"]
    ph = physionet[physionet["analyte_code"] == "11558-4"]["value"]
    assert ph.max() <= 8.0 and ph.min() >= 6.8  # pH 735, 734, 187, 1.0 ... gone
    assert not ((physionet["patient_id"] == "physionet2012:140525") & (physionet["analyte_code"] == "11558-4")
                & (physionet["collected_at"] == PHYSIONET_ANCHOR + pd.Timedelta(minutes=1365))).any()
    assert rep["dropped_implausible"]["11558-4"] >= 3
    assert rep["dropped_implausible"]["2601-3"] >= 3  # Mg 9.9, 9.8, 8.8 (record 134900)
    assert rep["dropped_not_mapped"]["HR"] > 100_000  # vitals are not labs
    assert rep["rows_read"] == rep["rows_loaded"] + sum(rep["dropped_not_mapped"].values()) + \
        sum(rep["dropped_implausible"].values()) + rep["dropped_duplicate"] + rep["dropped_non_numeric"]


def test_physionet_magnesium_distribution_matches_eicu_mg_per_dl(physionet, eicu):
    """Evidence for the Mg unit decision: both medians are ~2.0 mg/dL."""
    p = physionet.loc[physionet["analyte_code"] == "2601-3", "value"].median()
    e = eicu.loc[eicu["analyte_code"] == "2601-3", "value"].median()
    assert abs(p - e) / e < 0.1


# ---- eICU (YAIB/ricu hourly) ---------------------------------------------------------------


def test_eicu_contract_and_known_row(eicu):
    _check_contract(eicu, "eicu:")
    assert eicu["analyte_code"].nunique() == 39
    at = EICU_ANCHOR + pd.Timedelta(hours=10)
    k = _value(eicu, "eicu:141765", "2823-3", at)
    assert k["value"] == pytest.approx(4.1)
    assert _value(eicu, "eicu:141765", "2951-2", at)["value"] == pytest.approx(139.0)
    assert _value(eicu, "eicu:141765", "2160-0", at)["value"] == pytest.approx(1.04)
    assert k["sex"] == "F" and k["age_years"] == pytest.approx(87.0)
    rep = eicu.attrs["report"]["eicu"]
    assert "hr" in rep["dropped_not_mapped"] and rep["rows_loaded"] == 134_504


# ---- NHANES ----------------------------------------------------------------------------------


def test_nhanes_contract_and_known_rows(nhanes):
    _check_contract(nhanes, "nhanes:")
    assert (nhanes["collected_at"] == NHANES_DATE).all()  # cross-sectional: one fixed date per person
    pid = "nhanes:109266"
    assert _value(nhanes, pid, "2160-0", NHANES_DATE)["value"] == pytest.approx(0.63)
    assert _value(nhanes, pid, "2345-7", NHANES_DATE)["value"] == pytest.approx(83.0)
    row = _value(nhanes, pid, "2823-3", NHANES_DATE)
    assert row["value"] == pytest.approx(3.6) and row["sex"] == "F" and row["age_years"] == pytest.approx(29.0)
    rep = nhanes.attrs["report"]["nhanes"]
    assert rep["dropped_si_duplicate"] > 200_000
    assert {"LBXMPSI", "LBXNRBC", "LBXUIB", "LBDPCT"} <= set(rep["dropped_not_mapped"])


def test_nhanes_below_detection_limit_is_left_censored_at_the_lod(nhanes):
    cens = nhanes[nhanes["censor"] == -1]
    assert len(cens) > 300
    assert set(cens["analyte_code"]) >= {"1988-5"}  # hs-CRP is most of them
    # ALT of SEQN 110882: NCHS imputed 2.0 = LOD/sqrt(2) -> reported as '<' 2.83
    alt = _value(nhanes, "nhanes:110882", "1742-6", NHANES_DATE)
    assert alt["censor"] == -1 and alt["value"] == pytest.approx(2.0 * math.sqrt(2.0))


# ---- combined corpus -------------------------------------------------------------------------


def test_pretraining_corpus_combines_prefixes_and_respects_max_rows(monkeypatch, physionet, eicu, nhanes):
    fixtures = {"physionet2012": physionet, "eicu": eicu, "nhanes": nhanes}
    monkeypatch.setattr(corpus, "_LOADERS", {k: (lambda *_, f=f: f.copy()) for k, f in fixtures.items()})
    full = load_pretraining_corpus(include_synthetic_patients=20, seed=1, cache=False)
    assert tuple(full.columns) == HISTORY_COLUMNS
    prefixes = set(full["patient_id"].str.split(":").str[0])
    assert prefixes == {"physionet2012", "eicu", "nhanes", "synthetic"}
    assert len(full) == len(physionet) + len(eicu) + len(nhanes) + full.attrs["report"]["synthetic"]["rows_loaded"]
    cut = load_pretraining_corpus(max_rows=100_000, include_synthetic_patients=20, seed=1, cache=False)
    assert 90_000 < len(cut) <= 100_000
    # whole patients only: each kept patient has all of their rows
    counts_full = full.groupby("patient_id").size()
    counts_cut = cut.groupby("patient_id").size()
    assert (counts_full.loc[counts_cut.index] == counts_cut).all()


def test_pretraining_corpus_skips_missing_datasets_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("LABTREND_DATA_DIR", str(tmp_path))  # an empty shared-data folder
    with pytest.warns(UserWarning, match="skipping") as caught:
        out = load_pretraining_corpus(include_synthetic_patients=5, seed=0)
    assert sum("skipping" in str(w.message) for w in caught) == 3
    assert out["patient_id"].str.startswith("synthetic:").all()
    assert all("skipped" in out.attrs["report"][k] for k in ("physionet2012", "eicu", "nhanes"))


def test_censored_corpus_rows_survive_the_canonical_csv_and_importer(tmp_path, nhanes):
    from data.db import open_store
    from data.importers import run_import
    from data.queries import cohort
    from model.synthetic import to_canonical_csv

    pids = ["nhanes:110882", "nhanes:109266"]
    part = nhanes[nhanes["patient_id"].isin(pids)].reset_index(drop=True)
    store = open_store(tmp_path / "lab.duckdb")
    summary = run_import(store, to_canonical_csv(part, tmp_path / "nhanes.csv"))
    assert summary.rows_loaded == len(part) and summary.rows_censored == int((part["censor"] != 0).sum()) >= 1
    back = cohort(store).merge(part, on=["patient_id", "collected_at", "analyte_code"], suffixes=("_db", ""))
    assert len(back) == len(part)
    assert (back["censor_db"] == back["censor"]).all() and np.allclose(back["value_db"], back["value"])
