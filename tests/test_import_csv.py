"""Canonical CSV and MIMIC-IV imports: accounting, bad input, atomicity, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pandas as pd
import pytest

from data import queries
from data.importers import ImportFileError, run_import
from labtrend.cli import main as cli_main

HEADER = "patient_id,collected_at,loinc,test_name,value,unit\n"


def test_mimic_every_event_accounted_for(mimic_store):
    s = mimic_store.mimic_summary
    assert s.rows_read == 107_727
    assert s.rows_loaded + s.rows_quarantined + s.rows_skipped == 107_727
    assert s.patients == 100
    with mimic_store.read() as cur:
        n_res, n_q = cur.execute("SELECT (SELECT count(*) FROM lab_results), (SELECT count(*) FROM quarantine)").fetchone()
        assert cur.execute("SELECT count(*) FROM patients").fetchone()[0] == 100
        no_reason = cur.execute("SELECT count(*) FROM quarantine WHERE reason IS NULL OR reason = ''").fetchone()[0]
        sexes = dict(cur.execute("SELECT sex, count(*) FROM patients GROUP BY 1").fetchall())
    assert (n_res, n_q) == (s.rows_loaded, s.rows_quarantined)
    assert no_reason == 0
    assert sexes == {"M": 57, "F": 43}
    assert sum(s.quarantine_reasons.values()) == s.rows_quarantined
    assert sum(s.skipped_reasons.values()) == s.rows_skipped
    # the 40 most frequent blood tests are on LOINC
    top = queries.top_analytes(mimic_store, 40)
    assert (~top["analyte_code"].str.startswith("mimic:")).sum() >= 36


def test_mimic_known_result(mimic_store):
    """A potassium in mEq/L is stored in mmol/L with its reference interval."""
    with mimic_store.read() as cur:
        row = cur.execute(
            "SELECT unit, unit_canonical, value_num = value_canonical, ref_low, ref_high FROM lab_results "
            "WHERE analyte_code = '2823-3' AND unit = 'mEq/L' AND ref_low IS NOT NULL LIMIT 1").fetchone()
    assert row[:3] == ("mEq/L", "mmol/L", True) and row[3] < row[4]


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"\x00\x01\x02binary", "not a text file"),
    (b"just one line of words\n", "no delimiter"),
    (b"patient_id,loinc,value,unit\nA,2823-3,4,mmol/L\n", "missing column.*collected_at"),
    (b"collected_at,loinc,value,unit\n2024-01-01,2823-3,4,mmol/L\n", "missing column.*patient_id"),
    (b"patient_id,collected_at,value,unit\nA,2024-01-01,4,mmol/L\n", "loinc or test_name"),
    (b"patient_id,collected_at,loinc,test_name,value,unit\n", "no result rows"),
])
def test_unreadable_files_name_file_and_write_nothing(store, tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_bytes(content)
    with pytest.raises(ImportFileError, match=match) as err:
        run_import(store, p)
    assert "bad.csv" in str(err.value)
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM lab_results").fetchone()[0] == 0
        assert cur.execute("SELECT count(*) FROM import_batches").fetchone()[0] == 0


def test_bad_rows_quarantined_with_row_column_reason(store, tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text(HEADER +
                 "A,2024-01-01 08:00,2823-3,Potassium,4.1,mmol/L\n"      # 1 ok
                 ",2024-01-01 08:00,2823-3,Potassium,4.1,mmol/L\n"       # 2 no patient
                 "A,yesterday,2823-3,Potassium,4.1,mmol/L\n"             # 3 bad time
                 "A,2024-01-02 08:00,2823-4,Potassium,4.1,mmol/L\n"      # 4 bad LOINC
                 "A,2024-01-03 08:00,2823-3,Potassium,4.1,parsecs\n"     # 5 bad unit
                 "A,2024-01-04 08:00,2823-3,Potassium,4.1,mmol/L,extra\n"  # 6 wrong field count
                 "A,2024-01-05 08:00,,,4.1,mmol/L\n"                     # 7 no analyte
                 "A,2024-01-06 08:00,2823-3,Potassium,4.3,mmol/L\n",     # 8 ok
                 encoding="utf-8")
    s = run_import(store, p)
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined) == (8, 2, 6)
    q = queries.quarantine_rows(store, s.batch_id)
    assert q["row"].tolist() == [2, 3, 4, 5, 6, 7]
    assert q["column"].tolist()[:5] == ["patient_id", "collected_at", "loinc", "unit", None] or \
        q.set_index("row").loc[[2, 3, 4, 5, 7], "column"].tolist() == ["patient_id", "collected_at", "loinc", "unit", "loinc"]
    reasons = q.set_index("row")["reason"]
    assert "patient id is missing" in reasons[2]
    assert "yesterday" in reasons[3]
    assert "check digit" in reasons[4]
    assert "parsecs" in reasons[5]
    assert "line cannot be read" in reasons[6]
    assert all(q["file"] == "rows.csv")
    assert json.loads(q.set_index("row")["raw_row"][3])["collected_at"] == "yesterday"
    # the good rows after the bad line keep their own row numbers
    assert queries.timeline(store, "A")["source_row"].tolist() == [1, 8]


def test_quarantine_export_cli_neutralises_formulas(tmp_path, capsys):
    db = tmp_path / "db.duckdb"
    p = tmp_path / "f.csv"
    p.write_text(HEADER + "=HYPERLINK(\"x\"),2024-01-01,2823-3,K,4,mmol/L\n@SUM(A1),bad,2823-3,K,4,mmol/L\n", encoding="utf-8")
    assert cli_main(["import", str(p), "--db", str(db)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rows_quarantined"] == 1 and out["rows_loaded"] == 1
    assert out["rows_loaded"] + out["rows_quarantined"] + out["rows_skipped"] == out["rows_read"]
    qfile = tmp_path / "q.csv"
    assert cli_main(["quarantine", "--batch", str(out["batch_id"]), "--out", str(qfile), "--db", str(db)]) == 0
    capsys.readouterr()
    q = pd.read_csv(qfile)
    assert q["row"].tolist() == [2] and "bad" in q["reason"][0]
    assert q["raw_patient_id"][0] == "'@SUM(A1)" and q["raw_collected_at"][0] == "bad"
    # the formula-looking patient id is stored as given and is a patient of its own
    assert cli_main(["patients", "--db", str(db), "--format", "json"]) == 0
    pats = json.loads(capsys.readouterr().out)
    assert [x["patient_id"] for x in pats] == ["=HYPERLINK(\"x\")"]
    assert cli_main(["timeline", "--patient", "=HYPERLINK(\"x\")", "--db", str(db), "--format", "csv"]) == 0
    capsys.readouterr()
    # a batch that does not exist: exit 2 and a message, no empty file that looks like success
    assert cli_main(["quarantine", "--batch", "99", "--out", str(tmp_path / "none.csv"), "--db", str(db)]) == 2
    assert "no import batch 99" in capsys.readouterr().err and not (tmp_path / "none.csv").exists()


def test_cli_bad_file_exit_2(tmp_path, capsys):
    p = tmp_path / "empty.csv"
    p.write_bytes(b"")
    assert cli_main(["import", str(p), "--db", str(tmp_path / "d.duckdb")]) == 2
    err = capsys.readouterr().err
    assert "empty.csv" in err and "empty" in err


def test_cli_timeline_filters(tmp_path, cases, capsys):
    db = str(tmp_path / "d.duckdb")
    cli_main(["import", str(cases / "LAB-04.csv"), "--db", db])
    capsys.readouterr()
    assert cli_main(["timeline", "--patient", "P0006", "--analyte", "2345-7", "--db", db, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and {r["analyte_code"] for r in rows} == {"2345-7"}
    assert cli_main(["timeline", "--patient", "NOPE", "--db", db]) == 2


def _big_csv(path, n):
    with open(path, "w") as f:
        f.write(HEADER)
        for i in range(n):
            j = i // 500  # each patient's j-th result, one minute apart: no duplicates
            f.write(f"P{i % 500},2024-01-{1 + j // 1440:02d} {(j // 60) % 24:02d}:{j % 60:02d},2823-3,Potassium,"
                    f"{4 + (i % 100) / 100},mmol/L\n")


def test_killed_import_leaves_no_partial_batch(tmp_path):
    """kill -9 in the middle of an import: the store has no batch and no rows from it."""
    db = tmp_path / "k.duckdb"
    big = tmp_path / "big.csv"
    _big_csv(big, 1_500_000)
    proc = subprocess.Popen([sys.executable, "-m", "labtrend.cli", "import", str(big), "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait until the import has started writing (the database file exists), then kill it
    deadline = time.time() + 60
    while time.time() < deadline and not db.exists():
        time.sleep(0.05)
    time.sleep(0.8)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    con = duckdb.connect(str(db))
    n_batches = con.execute("SELECT count(*) FROM import_batches").fetchone()[0]
    n_rows = con.execute("SELECT count(*) FROM lab_results").fetchone()[0]
    con.close()
    if proc.returncode == 0:  # finished before the kill on a fast machine: then it is whole
        assert (n_batches, n_rows) == (1, 1_500_000)
    else:
        assert (n_batches, n_rows) == (0, 0)


def test_decimal_comma_in_comma_separated_file_asks(store, tmp_path):
    p = tmp_path / "c.csv"
    p.write_text(HEADER + 'A,2024-01-01,2823-3,K,"4,1",mmol/L\n', encoding="utf-8")
    with pytest.raises(ImportFileError, match="choose the decimal mark"):
        run_import(store, p)
    from data.importers import ImportOptions

    s = run_import(store, p, options=ImportOptions(decimal=","))
    assert queries.timeline(store, "A")["value_num"].tolist() == [4.1]
    assert s.rows_loaded == 1


def test_utc_offsets_converted_and_unsorted_file_grouped(store, tmp_path):
    p = tmp_path / "tz.csv"
    p.write_text(HEADER + "B,2024-01-01T10:00:00+02:00,2823-3,K,4.1,mmol/L\n"
                 "A,2024-01-01T08:00:00Z,2823-3,K,4.2,mmol/L\n"
                 "B,2024-01-02 09:30,2823-3,K,4.3,mmol/L\n", encoding="utf-8")
    run_import(store, p)
    b = queries.timeline(store, "B")
    assert b["collected_at"].dt.strftime("%Y-%m-%d %H:%M").tolist() == ["2024-01-01 08:00", "2024-01-02 09:30"]
    with store.read() as cur:
        order = [r[0] for r in cur.execute("SELECT patient_id FROM lab_results").fetchall()]
    assert order == sorted(order)  # stored grouped by patient


@pytest.mark.parametrize("reject_at, keep_order", [(None, True), (150_001, True), (None, False)])
def test_source_rows_follow_the_file_across_row_groups(tmp_path, reject_at, keep_order):
    """300,000 rows (three DuckDB row groups): every stored row keeps its own file row, and
    quarantined rows theirs, with and without a line DuckDB cannot split in the middle, and
    on a database told not to preserve insertion order."""
    from data.db import open_store

    store = open_store(tmp_path / "lab.duckdb", extra_config={"preserve_insertion_order": keep_order})
    n = 300_000
    bad_time, bad_unit = {7, 123_457, 299_999}, {250_000}
    lines = []
    for i in range(1, n + 1):
        if i == reject_at:
            lines.append(f"P{i // 500:04d},2024-01-01 08:00,2823-3,Potassium,{i},mmol/L,extra\n")
        elif i in bad_time:
            lines.append(f"P{i // 500:04d},not a time,2823-3,Potassium,{i},mmol/L\n")
        else:
            minute = i % 1440
            unit = "parsecs" if i in bad_unit else "mmol/L"
            lines.append(f"P{i // 500:04d},2024-01-{1 + i % 28:02d} {minute // 60:02d}:{minute % 60:02d},2823-3,Potassium,{i},{unit}\n")
    p = tmp_path / "big.csv"
    p.write_text(HEADER + "".join(lines), encoding="utf-8")
    s = run_import(store, p)
    rejected = {reject_at} if reject_at else set()
    assert (s.rows_read, s.rows_quarantined) == (n, len(bad_time | bad_unit | rejected))
    with store.read() as cur:
        mismatched = cur.execute("SELECT count(*) FROM lab_results WHERE value_num <> source_row").fetchone()[0]
        loaded = cur.execute("SELECT count(*) FROM lab_results").fetchone()[0]
        q = dict(cur.execute("SELECT source_row, column_name FROM quarantine").fetchall())
    assert loaded == n - len(bad_time | bad_unit | rejected) and mismatched == 0
    assert q == {**{r: "collected_at" for r in bad_time}, **{r: "unit" for r in bad_unit}, **{r: None for r in rejected}}


def test_store_written_before_the_narrow_results_table_migrates_unchanged(tmp_path):
    """A store created by migrations 001-003 (one wide lab_results table) opens with every
    result, canonical value and flag as it was."""
    from data.db import open_store
    from store_helpers import store_at_version

    path = tmp_path / "old.duckdb"
    con = store_at_version(path, 3)
    old_rows = [
        # creatinine in umol/L -> mg/dL, with a reference interval; potassium censored; a text
        # result; a dimensioned result with the unit missing; two conflicting values
        ((1 << 32) + 1, "A", "S1", "2024-01-01 08:00", None, "2160-0", "2160-0", "Creatinine", "88.4", "=", 88.4, "umol/L",
         1.0, "mg/dL", 62.0, 106.0, 62.0 / 88.4, 106.0 / 88.4, None, None, "numeric", False, False, False, 1, 1),
        ((1 << 32) + 2, "A", None, "2024-01-01 08:00", None, "2823-3", "2823-3", "Potassium", "<2.0", "<", 2.0, "mmol/L",
         2.0, "mmol/L", None, None, None, None, "L", None, "censored", False, False, True, 1, 2),
        ((1 << 32) + 3, "A", None, "2024-01-01 08:00", None, "2823-3", "2823-3", "Potassium", "4.1", "=", 4.1, "mmol/L",
         4.1, "mmol/L", None, None, None, None, None, None, "numeric", False, False, True, 1, 3),
        ((1 << 32) + 4, "B", None, "2024-01-02 09:00", "2024-01-02 10:00", "2823-3", "2823-3", "Potassium", "HEMOLYZED",
         None, None, "mmol/L", None, "mmol/L", None, None, None, None, None, "see note", "text", False, False, False, 1, 4),
        ((1 << 32) + 5, "B", None, "2024-01-03 09:00", None, "2951-2", "2951-2", "Sodium", "140", "=", 140.0, None,
         None, "mmol/L", None, None, None, None, None, None, "numeric", False, True, False, 1, 5),
    ]
    con.executemany("INSERT INTO lab_results VALUES (" + ", ".join(["?"] * 26) + ")", old_rows)
    con.close()
    store = open_store(path)
    got = queries.timeline(store, "A")
    assert got["result_id"].tolist() == [(1 << 32) + 1, (1 << 32) + 2, (1 << 32) + 3]
    assert got["value_canonical"].tolist() == pytest.approx([1.0, 2.0, 4.1], rel=1e-12)
    assert got["ref_low_canonical"].iloc[0] == pytest.approx(62.0 / 88.4, rel=1e-12)
    assert got["comparator"].tolist() == ["=", "<", "="] and got["conflicting"].tolist() == [False, True, True]
    b = queries.timeline(store, "B")
    assert b["result_kind"].tolist() == ["text", "numeric"] and b["unit_missing"].tolist() == [False, True]
    assert pd.isna(b["value_canonical"]).all() and b["comment"].iloc[0] == "see note"
    with store.read() as cur:
        assert cur.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] >= 4
        assert cur.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'lab_results'"
                           ).fetchone()[0] == "VIEW"


def test_utf8_file_with_one_stray_cp1252_byte_keeps_its_utf8_text(store, tmp_path):
    """Only the byte that is not UTF-8 is read as cp1252: the patient stays 'José', and both
    creatinines (µmol/L written in UTF-8 and in cp1252) convert."""
    p = tmp_path / "mixed.csv"
    p.write_bytes(HEADER.encode() + "José,2024-01-01,2160-0,Creatinine,88,µmol/L\n".encode("utf-8")
                  + "José,2024-01-02,2160-0,Creatinine,90,".encode("utf-8") + b"\xb5mol/L\n")
    s = run_import(store, p)
    assert (s.rows_loaded, s.rows_quarantined) == (2, 0)
    assert queries.patients(store)["patient_id"].tolist() == ["José"]
    tl = queries.timeline(store, "José")
    assert tl["unit"].tolist() == ["µmol/L", "µmol/L"] and tl["value_canonical"].round(3).tolist() == [0.995, 1.018]
    assert '"encoding": "utf-8 with cp1252 bytes"' in queries.batches(store).iloc[0]["options"]


def test_collection_times_with_spaces_load_and_two_digit_years_are_quarantined(store, tmp_path):
    p = tmp_path / "times.csv"
    p.write_text(HEADER + "A, 2024-01-05 ,2345-7,Glucose,109,mg/dL\n"   # 1 spaces around: read
                 "A,24-01-06,2345-7,Glucose,110,mg/dL\n"              # 2 two-digit year: year 24
                 "A,16.01.24,2345-7,Glucose,111,mg/dL\n"              # 3 the same, day first
                 "A,17.01.2024,2345-7,Glucose,112,mg/dL\n",           # 4 read (day first)
                 encoding="utf-8")
    s = run_import(store, p)
    assert (s.rows_loaded, s.rows_quarantined) == (2, 2)
    assert queries.timeline(store, "A")["value_num"].tolist() == [109.0, 112.0]
    q = queries.quarantine_rows(store, s.batch_id)
    assert q["row"].tolist() == [2, 3] and set(q["column"]) == {"collected_at"}
    assert q["reason"].str.contains("year 24, before 1900").all()


def test_the_same_number_written_twice_is_not_a_conflict(store, tmp_path):
    """110 and 110.0 mg/dL (or 4.4 mmol/L and 4.4 mEq/L) are one value; 110 and 111 are two."""
    p = tmp_path / "same.csv"
    p.write_text(HEADER + "A,2024-01-02 08:00,2345-7,Glucose,110,mg/dL\n"
                 "A,2024-01-02 08:00,2345-7,Glucose,110.0,mg/dL\n"
                 "A,2024-01-02 08:00,2823-3,Potassium,4.4,mmol/L\n"
                 "A,2024-01-02 08:00,2823-3,Potassium,4.4,mEq/L\n"
                 "A,2024-01-03 08:00,2345-7,Glucose,110,mg/dL\n"
                 "A,2024-01-03 08:00,2345-7,Glucose,111,mg/dL\n", encoding="utf-8")
    s = run_import(store, p)
    assert (s.rows_loaded, s.rows_duplicate, s.rows_conflicting) == (6, 0, 2)
    tl = queries.timeline(store, "A")
    assert tl.loc[tl["conflicting"], "value_num"].tolist() == [110.0, 111.0]


def test_a_patient_id_typed_with_a_combining_accent_is_the_same_patient(store, tmp_path):
    nfc, nfd = "Jos\u00e9", "Jose\u0301"
    p = tmp_path / "ids.csv"
    p.write_text(HEADER + f"{nfc},2024-01-01,2823-3,K,4.1,mmol/L\n{nfd},2024-01-02,2823-3,K,4.3,mmol/L\n",
                 encoding="utf-8")
    run_import(store, p)
    assert queries.patients(store)["patient_id"].tolist() == [nfc]
    assert queries.timeline(store, nfd)["value_num"].tolist() == [4.1, 4.3]  # looked up either way
    assert queries.patient_info(store, nfd)["patient_id"] == nfc


def test_empty_lines_before_a_rejected_line_do_not_shift_row_numbers(store, tmp_path):
    """Data rows are numbered without empty lines, and so is a line DuckDB cannot split, even
    after a quoted field spanning two lines."""
    p = tmp_path / "blank.csv"
    p.write_text(HEADER + "K,2024-01-01,2345-7,Glucose,1,mg/dL\n\n\n"          # row 1, two empty lines
                 'K,2024-01-02,2345-7,"Glu\ncose",2,mg/dL\n'                   # row 2 (two lines)
                 "K,2024-01-03,2345-7,Glucose,3,mg/dL,EXTRA\n"                 # row 3: too many fields
                 "K,2024-01-04,2345-7,Glucose,4,mg/dL\n"                       # row 4
                 ",2024-01-05,2345-7,Glucose,5,mg/dL\n", encoding="utf-8")     # row 5: no patient
    s = run_import(store, p)
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined) == (5, 3, 2)
    q = queries.quarantine_rows(store, s.batch_id)
    assert q["row"].tolist() == [3, 5] and q["column"].isna().tolist() == [True, False]
    assert queries.timeline(store, "K")["source_row"].tolist() == [1, 2, 4]


@pytest.mark.parametrize("decimal,loaded,quarantined", [(",", 4.1, "4.2"), (".", 4.2, "4,1")])
def test_value_with_the_other_decimal_mark_is_quarantined(store, tmp_path, decimal, loaded, quarantined):
    """A file that mixes decimal marks stops and asks for --decimal; once chosen, a value that is a
    number only with the other mark ('4.2' in a decimal-comma file) is quarantined with its
    reason, never stored as a number or as a text result."""
    from data.importers import ImportOptions

    p = tmp_path / "mixed.csv"
    p.write_text("patient_id;collected_at;loinc;test_name;value;unit\n"
                 "A;2024-01-01;2823-3;K;4,1;mmol/L\nA;2024-01-02;2823-3;K;4.2;mmol/L\n"
                 "A;2024-01-03;2823-3;K;HEMOLYZED;mmol/L\n", encoding="utf-8")
    s = run_import(store, p, options=ImportOptions(decimal=decimal))
    assert (s.rows_loaded, s.rows_quarantined) == (2, 1)
    tl = queries.timeline(store, "A")
    assert tl["value_num"].tolist()[0] == loaded and tl["value_text"].tolist()[1] == "HEMOLYZED"
    q = queries.quarantine_rows(store, s.batch_id)
    assert q["column"].tolist() == ["value"]
    row = 2 if decimal == "," else 1
    assert q["row"].tolist() == [row]
    other = "." if decimal == "," else ","
    assert q["reason"].iloc[0] == (f"value '{quarantined}' is a number only with the decimal mark '{other}' and "
                                   f"this file's decimal mark is '{decimal}': the '{other}' may separate thousands, "
                                   "so it is not read as a number")


def test_renamed_copy_is_already_imported(store, tmp_path):
    """The same bytes under another name (an export saved twice, a download renamed) add nothing,
    quarantine nothing again, and say which batch holds them."""
    a = tmp_path / "export.csv"
    a.write_text(HEADER + "A,2024-01-01,2823-3,K,4.1,mmol/L\nA,,2823-3,K,4.2,mmol/L\n", encoding="utf-8")
    first = run_import(store, a)
    assert (first.rows_loaded, first.rows_quarantined) == (1, 1)
    b = tmp_path / "export (1).csv"
    b.write_bytes(a.read_bytes())
    again = run_import(store, b)
    assert again.already_imported and again.batch_id == first.batch_id
    assert "export.csv" in again.message and "nothing added" in again.message
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM import_batches").fetchone()[0] == 1
        assert cur.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1


def test_file_imported_by_an_older_version_is_still_recognised(store, tmp_path):
    """Stores written before single files were identified by their bytes alone recorded the
    file's name with its digest; re-importing such a file still adds nothing."""
    import hashlib

    a = tmp_path / "old.csv"
    a.write_text(HEADER + "A,2024-01-01,2823-3,K,4.1,mmol/L\n", encoding="utf-8")
    first = run_import(store, a)
    legacy = hashlib.sha256(b"old.csv\0" + hashlib.sha256(a.read_bytes()).digest()).hexdigest()
    with store.write() as cur:
        cur.execute("UPDATE import_batches SET sha256 = ? WHERE batch_id = ?", [legacy, first.batch_id])
    assert run_import(store, a).already_imported
    assert run_import(store, a).batch_id == first.batch_id


def test_reference_limits_follow_the_decimal_mark(store, tmp_path):
    """A reference limit that is not a plain number with the file's decimal mark is quarantined
    (column ref_low / ref_high, with its reason): '4.000' /uL in a decimal-comma file is never
    read as 4.0, and an unreadable limit is never dropped silently."""
    p = tmp_path / "wbc.csv"
    p.write_text("patient_id;collected_at;loinc;test_name;value;unit;ref_low;ref_high\n"
                 "W1;2024-01-01 08:00;6690-2;Leukozyten;7500;/uL;4.000;10.000\n"
                 "W1;2024-01-02 08:00;6690-2;Leukozyten;6,8;10*3/uL;4,0;10,0\n"
                 "W1;2024-01-03 08:00;6690-2;Leukozyten;7,1;10*3/uL;4,0;abc\n"
                 "W1;2024-01-04 08:00;6690-2;Leukozyten;7,2;10*3/uL;;\n", encoding="utf-8")
    s = run_import(store, p)
    assert (s.rows_loaded, s.rows_quarantined) == (2, 2)
    tl = queries.timeline(store, "W1")
    assert tl["value_num"].tolist() == [6.8, 7.2]
    assert tl["ref_low"].tolist()[0] == 4.0 and tl["ref_high"].tolist()[0] == 10.0
    assert tl["ref_low"].isna().tolist() == [False, True]
    q = queries.quarantine_rows(store, s.batch_id)
    assert q[["row", "column"]].values.tolist() == [[1, "ref_low"], [3, "ref_high"]]
    assert q["reason"].tolist() == [
        "reference limit '4.000' is not a plain number with the decimal mark ',': the '.' may separate thousands",
        "reference limit 'abc' is not a plain number with the decimal mark ','",
    ]


def test_reference_limit_with_a_comma_in_a_decimal_point_file(store, tmp_path):
    p = tmp_path / "k.tsv"
    p.write_text("patient_id\tcollected_at\tloinc\ttest_name\tvalue\tunit\tref_low\tref_high\n"
                 "K1\t2024-01-01 08:00\t2823-3\tK\t4.2\tmmol/L\t3,5\t5.1\n"
                 "K1\t2024-01-02 08:00\t2823-3\tK\t4.3\tmmol/L\t3.5\t5.1\n", encoding="utf-8")
    s = run_import(store, p)
    assert (s.rows_loaded, s.rows_quarantined) == (1, 1)
    q = queries.quarantine_rows(store, s.batch_id)
    assert q["column"].tolist() == ["ref_low"] and "'3,5'" in q["reason"].iloc[0]


def test_thousands_grouped_numbers_stop_the_import(store, tmp_path):
    """'1,234' and '12,480' with no other decimal in the file: the ',' may be a decimal mark or
    a thousands separator, so the import asks (exit 2 from the CLI) instead of storing 1.234 U/L."""
    from data.importers import ImportOptions

    p = tmp_path / "ck.tsv"
    p.write_text("patient_id\tcollected_at\tloinc\ttest_name\tvalue\tunit\n"
                 "K1\t2024-01-01 08:00\t2157-6\tCK\t145\tU/L\n"
                 "K1\t2024-01-02 08:00\t2157-6\tCK\t1,234\tU/L\n"
                 "K1\t2024-01-03 08:00\t2157-6\tCK\t12,480\tU/L\n", encoding="utf-8")
    with pytest.raises(ImportFileError, match=r"numbers like '1,234'.*choose the decimal mark with --decimal"):
        run_import(store, p)
    assert queries.batches(store).empty
    s = run_import(store, p, options=ImportOptions(decimal=","))
    assert queries.timeline(store, "K1")["value_num"].tolist() == [145.0, 1.234, 12.48]
    # one unambiguous decimal comma ('6,8') decides the file
    p2 = tmp_path / "ck2.tsv"
    p2.write_text(p.read_text(encoding="utf-8") + "K2\t2024-01-01 08:00\t2157-6\tCK\t6,8\tU/L\n", encoding="utf-8")
    s2 = run_import(store, p2)  # read as decimal comma without asking: the same three results, and K2's 6.8
    assert (s.rows_loaded, s2.rows_loaded, s2.rows_duplicate) == (3, 1, 3)
    assert queries.timeline(store, "K2")["value_num"].tolist() == [6.8]
