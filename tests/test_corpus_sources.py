"""The four corpus sources of issue 13 (PhysioNet 2019, 2012 set C, MIMIC-III demo, CDISC pilot),
source selection, per-source validation splits, the parquet cache, and sources written as sites.

Real files from the shared data folder (skipped where a dataset is missing); PhysioNet 2019 is read
as a slice (its first rows) to keep the suite fast.
"""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pandas as pd
import pytest

import train
from data.catalogue import load_catalogue
from data.importers.pipeline import loinc_check_digit_ok
from data.units import conversion_factor
from data import settings
from model import corpus
from model.corpus import (
    ALL_SOURCES,
    PHYSIONET_ANCHOR,
    SOURCES,
    load_cdisc_pilot,
    load_mimic3_demo,
    load_physionet2012_setc,
    load_physionet2019,
    resolve_sources,
    source_codes,
    source_of,
    split_by_source,
)
from tests.test_corpus import _check_contract, _value

NEW = ("physionet2019", "physionet2012c", "mimic3", "cdisc")
P2019_ROWS = 60_000  # the first ~1,100 patients of the file


def _dir(key: str):
    d = settings.dataset_dir(SOURCES[key].folder)
    if d is None:
        pytest.skip(f"shared dataset '{SOURCES[key].folder}' not found (set LABTREND_DATA_DIR)")
    return d


@pytest.fixture(scope="module")
def p2019():
    return load_physionet2019(_dir("physionet2019"), nrows=P2019_ROWS)


@pytest.fixture(scope="module")
def setc():
    return load_physionet2012_setc(_dir("physionet2012c"))


@pytest.fixture(scope="module")
def mimic3():
    return load_mimic3_demo(_dir("mimic3"))


@pytest.fixture(scope="module")
def cdisc():
    return load_cdisc_pilot(_dir("cdisc"))


# ---- the mapping rows ------------------------------------------------------------------------


def test_new_mapping_rows_are_cited_real_loinc_and_convert():
    codes = source_codes()
    cat = load_catalogue()
    rows = codes[codes["source"].isin(NEW)]
    assert set(rows["source"]) == set(NEW)
    for r in rows.itertuples():
        # a citation on every row: a URL or a repository reference
        assert re.search(r"https?://|repo:|github\.com/", r.note), (r.source, r.source_name)
        if r.loinc:
            assert loinc_check_digit_ok(r.loinc), (r.source, r.source_name, r.loinc)
            a = cat.get(r.loinc)
            assert a is not None, (r.source, r.source_name, r.loinc)
            assert conversion_factor(r.source_unit or None, a) > 0
        else:
            assert r.note.startswith("not mapped"), (r.source, r.source_name)
    mapped = rows[rows["loinc"] != ""]
    assert (mapped["source"] == "physionet2019").sum() == 25  # 26 lab columns, FiO2 is a ventilator setting
    assert (mapped["source"] == "physionet2012c").sum() == 23
    assert (mapped["source"] == "cdisc").sum() == 32
    # where the values are not in the file's unit, the row says why
    mg = codes[(codes["source"] == "physionet2012c") & (codes["source_name"] == "Mg")].iloc[0]
    assert (mg["file_unit"], mg["source_unit"]) == ("mmol/L", "mg/dL") and "UNIT DEVIATES" in mg["note"]


@pytest.mark.parametrize("key,file", [("physionet2012c", "labs_long_hourly.csv.gz"), ("cdisc", "lb_long.csv.gz")])
def test_every_variable_of_the_file_is_in_the_mapping_table(key, file):
    names = set(pd.read_csv(_dir(key) / file, usecols=["parameter"])["parameter"])
    table = set(source_codes().query("source == @key")["source_name"])
    assert names <= table, sorted(names - table)


# ---- loaders: contract, known rows, cleaning --------------------------------------------------


def test_physionet2019_slice(p2019):
    _check_contract(p2019, "physionet2019:")
    rep = p2019.attrs["report"]["physionet2019"]
    assert rep["rows_read"] == P2019_ROWS and rep["dropped_not_mapped"] == {"FiO2": rep["dropped_not_mapped"]["FiO2"]}
    pid, at = "physionet2019:p000001", PHYSIONET_ANCHOR + pd.Timedelta(minutes=1020)
    assert _value(p2019, pid, "11555-0", at)["value"] == pytest.approx(21.0)  # base excess mmol/L = meq/L
    assert _value(p2019, pid, "6690-2", at)["value"] == pytest.approx(5.7)   # count*10^3/uL = 10*3/uL
    assert _value(p2019, pid, "2075-0", at)["value"] == pytest.approx(85.0)
    assert _value(p2019, pid, "11558-4", PHYSIONET_ANCHOR + pd.Timedelta(minutes=240))["value"] == pytest.approx(7.36)
    assert p2019["sex"].isna().all() and p2019["age_years"].isna().all()  # no demographics in this copy
    assert rep["rows_read"] == rep["rows_loaded"] + sum(rep["dropped_not_mapped"].values()) + \
        sum(rep["dropped_implausible"].values()) + rep["dropped_duplicate"] + rep["dropped_non_numeric"]


def test_physionet2019_ionised_calcium_is_not_kept_as_total_calcium(tmp_path):
    # set B (p1...) writes some ionised values (mmol/L, ~1.1) into 'Calcium' (PROVENANCE.md)
    raw = pd.read_csv(_dir("physionet2019") / "labs_long.csv.gz", skiprows=range(1, 1_170_000), nrows=150_000)
    ionised = raw[(raw["parameter"] == "Calcium") & (raw["value"] < 2)]
    assert len(ionised) > 100 and ionised["record_id"].str.startswith("p1").all()
    raw.to_csv(tmp_path / "labs_long.csv.gz", index=False)
    frame = load_physionet2019(tmp_path)
    assert frame.loc[frame["analyte_code"] == "17861-6", "value"].min() >= 4.0
    assert frame.attrs["report"]["physionet2019"]["dropped_implausible"]["17861-6"] >= len(ionised)


def test_setc_contract_known_rows_and_magnesium_unit(setc):
    _check_contract(setc, "physionet2012c:")
    assert setc["analyte_code"].nunique() == 23
    pid, at = "physionet2012c:152871", PHYSIONET_ANCHOR + pd.Timedelta(minutes=120)
    assert _value(setc, pid, "3094-0", at)["value"] == pytest.approx(36.0)
    assert _value(setc, pid, "2160-0", at)["value"] == pytest.approx(3.7)
    assert _value(setc, pid, "2823-3", at)["value"] == pytest.approx(4.2)   # mEq/L -> mmol/L
    # the file says Mg mmol/L; the values are mg/dL (median 2.0, as set A and eICU): kept, not x2.43
    assert _value(setc, pid, "2601-3", at)["value"] == pytest.approx(2.0)
    assert setc.loc[setc["analyte_code"] == "2601-3", "value"].median() == pytest.approx(2.0, abs=0.1)
    rep = setc.attrs["report"]["physionet2012c"]
    assert rep["dropped_implausible"]["11558-4"] >= 1  # pH 100 and 0 are entry errors
    assert setc.loc[setc["analyte_code"] == "11558-4", "value"].between(6.8, 8.0).all()


def test_mimic3_contract_per_row_units_and_item_ids(mimic3):
    _check_contract(mimic3, "mimic3:")
    rep = mimic3.attrs["report"]["mimic3"]
    assert rep["patients"] == 100 and rep["dropped_unit"] == {}
    # CRP: MIMIC writes mg/dL on one row and mg/L on others; each converts from its own unit
    crp = mimic3[(mimic3["patient_id"] == "mimic3:10006") & (mimic3["analyte_code"] == "1988-5")]
    assert sorted(crp["value"].round(2)) == [89.2, 235.7]
    # MCHC in '%' (g/100 mL) is g/dL: the mimic3 unit override of source_codes.csv
    assert mimic3.loc[mimic3["analyte_code"] == "786-4", "value"].median() == pytest.approx(33.5, abs=0.5)
    assert "Temperature (Blood) [50825]" in rep["dropped_not_mapped"]  # named as in the file


def test_mimic3_refuses_an_item_whose_label_differs_from_the_mapping(tmp_path):
    raw = pd.read_csv(_dir("mimic3") / "labevents_long.csv.gz", nrows=200)
    raw.loc[raw["parameter"] == "Potassium (Blood) [50971]", "parameter"] = "Glucose (Blood) [50971]"
    assert (raw["parameter"] == "Glucose (Blood) [50971]").any()
    raw.to_csv(tmp_path / "labevents_long.csv.gz", index=False)
    with pytest.raises(ValueError, match=r"item 50971 is 'Glucose \(Blood\)' in the file but 'Potassium \(Blood\)'"):
        load_mimic3_demo(tmp_path)


def test_cdisc_si_units_convert_to_the_conventional_values_of_the_first_visit(cdisc):
    """SI results of one visit (LBSTRESN) land on round conventional values: the factors are right."""
    _check_contract(cdisc, "cdisc:")
    pid, at = "cdisc:01-701-1015", pd.Timestamp("2013-12-26 14:45")
    expected = {
        "2160-0": 0.9,     # creatinine 79.56 umol/L
        "718-7": 14.3,     # haemoglobin 8.87458 mmol/L (monomer)
        "785-6": 27.0,     # MCH 1.67562 fmol(Fe)
        "786-4": 34.0,     # MCHC 21.1004 mmol/L
        "4544-3": 42.0,    # haematocrit 0.42 (fraction)
        "3094-0": 10.0,    # urea 3.57 mmol/L -> urea nitrogen mg/dL
        "2345-7": 85.0,    # glucose 4.71835 mmol/L
        "17861-6": 8.8,    # calcium 2.1956 mmol/L
        "2093-3": 230.0,   # cholesterol 5.9478 mmol/L
        "1975-2": 0.6,     # bilirubin 10.26 umol/L
        "3084-1": 4.5,     # urate 267.66 umol/L
        "2777-1": 3.8,     # phosphate 1.22702 mmol/L
        "1751-7": 3.8,     # albumin 38 g/L
        "789-8": 5.3,      # RBC 5.3 TI/L
        "777-3": 266.0,    # platelets 266 GI/L
        "3016-3": 1.68,    # TSH 1.68 mU/L = mIU/L
    }
    for code, value in expected.items():
        assert _value(cdisc, pid, code, at)["value"] == pytest.approx(value, abs=0.051), code
    rep = cdisc.attrs["report"]["cdisc"]
    assert rep["patients"] == 254 and rep["dropped_implausible"] == {}
    assert {"VITB12 (Vitamin B12)", "PH (pH)", "ANISO (Anisocytes)"} <= set(rep["dropped_not_mapped"])
    # outpatient visits weeks apart
    gaps = cdisc.drop_duplicates(["patient_id", "collected_at"]).groupby("patient_id")["collected_at"].diff().dropna()
    assert gaps.median() > pd.Timedelta(days=7)


def test_a_file_whose_unit_changed_is_refused(tmp_path):
    raw = pd.read_csv(_dir("cdisc") / "lb_long.csv.gz", nrows=300)
    raw.loc[raw["parameter"] == "GLUC (Glucose)", "unit"] = "mg/dL"
    raw.to_csv(tmp_path / "lb_long.csv.gz", index=False)
    with pytest.raises(ValueError, match=r"lb_long\.csv\.gz: variable 'GLUC \(Glucose\)' is in unit 'mg/dL', "
                                         r"but source_codes\.csv \(cdisc\) expects 'mmol/L'"):
        load_cdisc_pilot(tmp_path)


# ---- sources, ids and the validation split ----------------------------------------------------


def test_source_selection():
    assert resolve_sources(None) == ALL_SOURCES and len(ALL_SOURCES) == 8
    assert resolve_sources("today") == ("physionet2012", "eicu", "nhanes", "synthetic")
    assert resolve_sources("all", "cdisc,synthetic") == tuple(k for k in ALL_SOURCES if k not in ("cdisc", "synthetic"))
    assert resolve_sources("none") == ()
    assert resolve_sources("cdisc,physionet2019") == ("physionet2019", "cdisc")  # canonical order
    with pytest.raises(ValueError, match="unknown corpus source 'mimic4'"):
        resolve_sources("mimic4")
    with pytest.raises(ValueError, match="unknown corpus source 'x' to exclude"):
        resolve_sources("all", ["x"])


def test_patient_ids_of_different_sources_never_collide(p2019, setc, mimic3, cdisc):
    prefixes = [s.prefix for s in SOURCES.values()]
    assert len(set(prefixes)) == len(prefixes)
    assert not any(a != b and b.startswith(a) for a in prefixes for b in prefixes)
    frames = {"physionet2019": p2019, "physionet2012c": setc, "mimic3": mimic3, "cdisc": cdisc}
    seen: set[str] = set()
    for key, frame in frames.items():
        ids = set(frame["patient_id"])
        assert (source_of(list(ids)) == key).all(), key
        assert not (ids & seen)
        seen |= ids
    # set C and set A are different stays of one challenge: different prefixes, never one series
    assert source_of(["physionet2012:152871", "physionet2012c:152871", "site-42"]).tolist() == [
        "physionet2012", "physionet2012c", ""]


def test_validation_patients_are_chosen_within_each_source_and_do_not_depend_on_the_others(setc, mimic3, cdisc):
    both = pd.concat([cdisc, mimic3], ignore_index=True)
    tr_a, va_a, counts_a = split_by_source(cdisc, 0.05, seed=0)
    tr_b, va_b, counts_b = split_by_source(both, 0.05, seed=0)
    cdisc_val = [p for p in va_b if p.startswith("cdisc:")]
    assert cdisc_val == va_a  # the same cdisc validation patients whether mimic3 is there or not
    assert counts_b["cdisc"] == counts_a["cdisc"] == {"train": 241, "validation": 13}
    assert counts_b["mimic3"] == {"train": 95, "validation": 5}
    assert not set(tr_b) & set(va_b) and set(tr_b) | set(va_b) == set(both["patient_id"])
    assert split_by_source(both, 0.05, seed=0)[1] == va_b            # deterministic
    assert split_by_source(both, 0.05, seed=1)[1] != va_b            # and seeded
    capped = split_by_source(setc, 0.5, seed=0, max_val_patients_per_source=40)[2]["physionet2012c"]
    assert capped["validation"] == 40


# ---- the cache -----------------------------------------------------------------------------------


def test_cache_reads_back_the_same_frame_and_rebuilds_when_an_input_changes(tmp_path, monkeypatch, cdisc):
    monkeypatch.setenv("LABTREND_CORPUS_CACHE", str(tmp_path / "cache"))
    calls = []

    def loader(folder):
        calls.append(folder)
        return load_cdisc_pilot(folder)

    monkeypatch.setitem(corpus._LOADERS, "cdisc", loader)
    first = corpus.load_source("cdisc")
    second = corpus.load_source("cdisc")
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("cdisc-*.parquet"))) == 1
    pd.testing.assert_frame_equal(first.reset_index(drop=True), second.reset_index(drop=True), check_dtype=False)
    assert second["sex"].map(lambda v: v is None).all()
    assert second.attrs["report"] == json.loads(json.dumps(first.attrs["report"]))
    # another mapping (here: another cache key) is never served a stale frame
    monkeypatch.setattr(corpus, "_cache_key", lambda key, folder: "changed")
    corpus.load_source("cdisc")
    assert len(calls) == 2
    monkeypatch.setenv("LABTREND_CORPUS_CACHE", "off")
    assert corpus.corpus_cache_dir() is None


# ---- train.py: --sources / --exclude-source, pretraining.json, sites, zero-shot ------------------

TINY = ["--config", "tiny", "--no-progress", "--device", "cpu", "--batch-size", "8", "--eval-rows", "24",
        "--final-eval-rows", "300", "--warmup-steps", "2", "--steps", "4", "--eval-every", "2"]


@pytest.fixture(scope="module")
def cdisc_pretrained(tmp_path_factory):
    _dir("cdisc")
    out = tmp_path_factory.mktemp("pre") / "cdisc-tiny"
    rc = train.main(["--stage", "pretrain", "--init", str(out), "--sources", "cdisc,mimic3",
                     "--exclude-source", "synthetic", *TINY])
    assert rc == 0
    return out


def test_pretraining_json_records_the_sources_and_their_counts(cdisc_pretrained, cdisc, mimic3):
    report = json.loads((cdisc_pretrained / "pretraining.json").read_text())
    summary = report["corpus_summary"]
    assert summary["sources"] == ["mimic3", "cdisc"]  # no synthetic cohort: it was excluded
    per = summary["per_source"]["cdisc"]
    rep = cdisc.attrs["report"]["cdisc"]
    assert (per["patients"], per["values"], per["analytes"]) == (254, len(cdisc), 32)
    assert per["rows_read"] == rep["rows_read"]
    assert per["dropped"]["not_mapped"] == sum(rep["dropped_not_mapped"].values())
    assert per["values"] + sum(per["dropped"].values()) == per["rows_read"]
    assert per["validation_patients"] == 13 and summary["per_source"]["mimic3"]["validation_patients"] == 5
    assert summary["total"]["values"] == len(cdisc) + len(mimic3) == report["rows"]
    # the checkpoint's validation patients are the per-source split
    _, val, _ = split_by_source(pd.concat([mimic3, cdisc], ignore_index=True), 0.05, seed=0, max_val_patients_per_source=1000)
    assert report["validation_patients"] == val
    assert report["args"]["corpus_sources"] == "mimic3,cdisc" and report["args"]["exclude_source"] == "synthetic"


def test_unknown_source_is_a_usage_error(capsys):
    assert train.main(["--stage", "pretrain", "--sources", "mimic4", "--init", "unused", *TINY]) == train.EXIT_BAD_INPUT
    assert "unknown corpus source 'mimic4'" in capsys.readouterr().err


def test_fine_tuning_replays_from_the_sources_its_checkpoint_records(cdisc_pretrained):
    args = train.build_parser().parse_args(["--synthetic-patients", "50"])
    assert train.corpus_selection(args, "finetune", cdisc_pretrained) == (("mimic3", "cdisc"), 0)
    assert train.corpus_selection(args, "pretrain") == (tuple(k for k in ALL_SOURCES if k != "synthetic"), 50)
    shipped = settings.SHIPPED_PRETRAINED  # recorded before sources were selectable: its three datasets + synthetic
    assert train.corpus_selection(args, "finetune", shipped) == (("physionet2012", "eicu", "nhanes"), 1000)


def test_a_source_written_as_a_site_imports_whole_and_scores_zero_shot(tmp_path, cdisc, cdisc_pretrained):
    from data.db import open_store
    from data.queries import cohort
    from model.source_sites import score_checkpoint, write_site

    ids = sorted(cdisc["patient_id"].unique())[:15]
    part = cdisc[cdisc["patient_id"].isin(ids)].reset_index(drop=True)
    files = write_site(part, tmp_path / "site", test_fraction=0.2, seed=0)
    train_ids = [x for x in files.train_patients.read_text().splitlines() if not x.startswith("#")]
    test_ids = [x for x in files.test_patients.read_text().splitlines() if not x.startswith("#")]
    assert len(test_ids) == 3 and not set(train_ids) & set(test_ids) and set(train_ids) | set(test_ids) == set(ids)
    with gzip.open(files.csv, "rt") as fh:
        assert fh.readline().strip() == "patient_id,collected_at,loinc,test_name,value,unit,specimen_id,sex,birth_date"
    assert files.counts["rows_loaded"] == len(part) and files.counts["rows_quarantined"] == 0
    back = cohort(open_store(files.db)).merge(part, on=["patient_id", "collected_at", "analyte_code"], suffixes=("_db", ""))
    assert len(back) == len(part) and np.allclose(back["value_db"], back["value"], rtol=1e-6)

    result = score_checkpoint(cdisc_pretrained, part, patients=test_ids, folds=3, leakage_check=5)
    assert result["patients"] == 3 and result["n_targets"] > 100
    assert result["ratio"] == pytest.approx(result["nmae"] / result["last_value_nmae"])
    assert sum(r["n"] for r in result["per_analyte"]) == result["n_targets"]
    # the cohort's source was in this checkpoint's corpus: not a zero-shot figure, and it says so
    overlap = result["pretraining_overlap"]
    assert overlap["overlapping_sources"] == ["cdisc"]
    assert overlap["validation_patients"] + overlap["patients_possibly_trained_on"] == 3
