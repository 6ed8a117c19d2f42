"""The LAB- cases of the shared case book, each as a test of the whole kind."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest

from data import queries
from data.importers import ImportFileError, ImportOptions, run_import


def _rows(store, patient):
    return queries.timeline(store, patient)


def test_lab01_censored_values_split_and_kept(store, cases):
    """A user imports '<10', '< 0.001' and '>100': all stored as (comparator, number)."""
    s = run_import(store, cases / "LAB-01.csv")
    assert (s.rows_read, s.rows_loaded, s.rows_censored) == (5, 5, 3)
    assert s.message.startswith("5 rows") and "3 censored" in s.message
    got = []
    for pid in ("P0001", "P0002"):
        df = _rows(store, pid)
        got += list(zip(df["comparator"], df["value_num"]))
    assert got == [("<", 10.0), ("=", 14.0), ("<", 0.001), (">", 100.0), ("=", 2.1)]
    df = _rows(store, "P0002")
    assert df["value_text"].tolist() == ["< 0.001", ">100", "2.1"]
    assert df["result_kind"].tolist() == ["censored", "censored", "numeric"]
    # the forecaster receives the limit with a censor flag, never 0
    c = queries.cohort(store)
    p1 = c[c.patient_id == "P0001"]
    assert p1["value"].tolist() == [10.0, 14.0] and p1["censor"].tolist() == [-1, 0]
    assert (c["value"] != 0).all()


def test_lab02_text_results_stored_not_zero(store, cases):
    s = run_import(store, cases / "LAB-02.csv")
    assert s.rows_loaded == 5 and s.rows_quarantined == 0
    k = _rows(store, "P0003")
    assert [None if pd.isna(v) else v for v in k["value_num"]] == [4.1, None, None, 5.9]
    assert [None if pd.isna(v) else v for v in k["value_text"]] == ["4.1", "HEMOLYZED", None, "5.9"]
    assert k["comment"].iloc[1] == "specimen hemolyzed - recollect"
    assert k["comment"].iloc[2] == "see note"
    assert k["result_kind"].tolist() == ["numeric", "text", "empty", "numeric"]
    neg = _rows(store, "P0004").iloc[0]
    assert neg["value_text"] == "NEG" and pd.isna(neg["value_num"]) and neg["result_kind"] == "text"
    # neither text row reaches the model: the series is 4.1 then 5.9
    c = queries.cohort(store)
    assert c[c.patient_id == "P0003"]["value"].tolist() == [4.1, 5.9]
    assert c[c.patient_id == "P0004"].empty


@pytest.mark.parametrize("repeat", [1, 700])
def test_lab03_excel_european_locale(store, cases, tmp_path, repeat):
    """BOM + ';' + decimal comma + dd.mm.yyyy: numbers, same types at 4 and 2,100 lines."""
    raw = (cases / "LAB-03.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    lines = raw.split(b"\n")
    header, body = lines[0], [l for l in lines[1:] if l.strip()]
    path = tmp_path / f"lab03_{repeat}.csv"
    # each repetition is another patient, so no row is an exact copy of another
    rows = [l.replace(b"P0005", b"P0005" if i == 0 else b"R%04d" % i) for i in range(repeat) for l in body]
    path.write_bytes(header + b"\n" + b"\n".join(rows) + b"\n")
    s = run_import(store, path)
    assert s.rows_read == 3 * repeat and s.rows_loaded == 3 * repeat
    df = _rows(store, "P0005")
    assert list(df.columns)[1] == "patient_id"
    assert df["value_num"].dtype == "float64"
    first = df
    assert first["value_num"].tolist() == [13.4, 12.9, 1.02]
    assert first["collected_at"].dt.strftime("%Y-%m-%d %H:%M").tolist() == [
        "2024-01-02 07:30", "2024-01-09 07:35", "2024-01-16 07:20"]
    assert first["analyte_name"].tolist()[0] == "Hämoglobin"
    b = queries.batches(store).iloc[0]
    assert '"decimal": ","' in b["options"] and '"date_order": "dayfirst"' in b["options"]


def test_lab03_undecidable_decimal_mark_stops(store, tmp_path):
    p = tmp_path / "mixed.csv"
    p.write_text("patient_id;collected_at;loinc;test_name;value;unit\n"
                 "A;2024-01-01;2823-3;K;4,1;mmol/L\nA;2024-01-02;2823-3;K;4.2;mmol/L\n", encoding="utf-8")
    with pytest.raises(ImportFileError, match="column 'value' has both ',' and '.' decimals"):
        run_import(store, p)
    assert queries.batches(store).empty


def test_lab04_units_converted_and_missing_unit_flagged(store, cases):
    s = run_import(store, cases / "LAB-04.csv")
    assert s.rows_loaded == 6 and s.rows_unit_missing == 1
    df = _rows(store, "P0006")
    glu = df[df.analyte_code == "2345-7"]
    assert glu["value_canonical"].round(1).tolist() == [99.0, 100.9, 101.0]
    assert set(glu["unit_canonical"]) == {"mg/dL"}
    assert glu["unit"].tolist() == ["mg/dL", "mmol/L", "mg/dl"]  # originals kept
    hb = df[df.analyte_code == "718-7"]
    assert hb["value_canonical"].round(2).tolist()[:2] == [13.8, 13.6]
    missing = hb.iloc[2]
    assert missing["unit_missing"] and pd.isna(missing["value_canonical"]) and missing["value_num"] == 13.5
    # kept out of the model
    c = queries.cohort(store)
    assert c[(c.patient_id == "P0006") & (c.analyte_code == "718-7")]["value"].round(2).tolist() == [13.8, 13.6]


def test_lab04_unit_without_conversion_is_quarantined_with_names(store, tmp_path):
    p = tmp_path / "u.csv"
    p.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                 "A,2024-01-01,2345-7,Glucose,99,mg/dL\nA,2024-01-02,2345-7,Glucose,5,g/s\n", encoding="utf-8")
    s = run_import(store, p)
    assert (s.rows_loaded, s.rows_quarantined) == (1, 1)
    q = queries.quarantine_rows(store, s.batch_id).iloc[0]
    assert q["row"] == 2 and q["column"] == "unit"
    assert "g/s" in q["reason"] and "Glucose" in q["reason"]


def test_lab05_exact_copy_removed_conflict_kept(store, cases):
    s = run_import(store, cases / "LAB-05.csv")
    assert (s.rows_read, s.rows_loaded, s.rows_duplicate, s.rows_skipped) == (4, 3, 1, 1)
    assert "1 duplicate row removed" in s.message
    df = _rows(store, "P0007")
    assert df["value_num"].tolist() == [128.0, 138.0, 137.0]
    assert df["conflicting"].tolist() == [True, True, False]
    # the model uses the latest reported value at that time: 138
    c = queries.cohort(store)
    assert c["value"].tolist() == [138.0, 137.0]


def test_lab05_duplicate_across_files_and_conflict_across_batches(store, cases, tmp_path):
    run_import(store, cases / "LAB-05.csv")
    p = tmp_path / "later.csv"
    p.write_text("patient_id,collected_at,reported_at,specimen_id,loinc,test_name,value,unit\n"
                 "P0007,2024-03-10 14:00,2024-03-10 14:40,S-101,2951-2,Sodium,128,mmol/L\n"
                 "P0007,2024-03-11 06:00,2024-03-11 09:00,S-104,2951-2,Sodium,139,mmol/L\n", encoding="utf-8")
    s = run_import(store, p)
    assert (s.rows_loaded, s.rows_duplicate) == (1, 1)
    df = _rows(store, "P0007")
    assert df[df.collected_at == pd.Timestamp("2024-03-11 06:00")]["conflicting"].tolist() == [True, True]


def test_lab08_cp1252_decoded_exactly(store, cases):
    s = run_import(store, cases / "LAB-08.csv")
    assert s.rows_loaded == 3 and s.rows_quarantined == 0
    df = _rows(store, "P0010")
    assert df["unit"].tolist()[:2] == ["µmol/L", "µmol/L"]
    assert df["analyte_name"].tolist()[2] == "Hämoglobin"
    text = df.to_csv()
    assert "\ufffd" not in text and "Â" not in text
    assert '"encoding": "cp1252"' in queries.batches(store).iloc[0]["options"]


def test_lab10_implausible_values_flagged_not_dropped(store, cases):
    s = run_import(store, cases / "LAB-10.csv")
    assert s.rows_loaded == 6 and s.rows_implausible == 3
    df = _rows(store, "P0012")
    flagged = sorted(df[df.implausible]["value_num"].tolist())
    assert flagged == [45.0, 1390.0, 1276103.0]
    assert not df["implausible"][df.value_num.isin([139, 141, 104])].any()
    c = queries.cohort(store)
    na = c[c.analyte_code == "2951-2"]["value"].tolist()
    assert na == [139.0, 141.0]
    assert all(math.isfinite(v) for v in c["value"])


def test_reimport_same_file_adds_nothing(store, cases):
    first = run_import(store, cases / "LAB-01.csv")
    again = run_import(store, cases / "LAB-01.csv")
    assert again.already_imported and again.batch_id == first.batch_id
    assert "nothing added" in again.message
    assert len(_rows(store, "P0001")) == 2 and len(queries.batches(store)) == 1


def test_ambiguous_dates_stop_and_ask(store, tmp_path):
    p = tmp_path / "amb.csv"
    p.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                 "A,01/02/2024,2823-3,K,4.1,mmol/L\nA,03/04/2024,2823-3,K,4.2,mmol/L\n", encoding="utf-8")
    with pytest.raises(ImportFileError, match="--dayfirst or --monthfirst"):
        run_import(store, p)
    s = run_import(store, p, options=ImportOptions(date_order="monthfirst"))
    assert _rows(store, "A")["collected_at"].dt.strftime("%Y-%m-%d").tolist() == ["2024-01-02", "2024-03-04"]
