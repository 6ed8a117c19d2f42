"""Patient ids: invisible characters and stray spaces never make a second patient."""

from __future__ import annotations

import sys
import unicodedata

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data import queries
from data.identifiers import ID_SPACE, patient_id_sql, patient_key
from data.importers import run_import

# characters that make ids look alike: spaces of every kind, format characters, a combining accent
_TRICKY = ["P", "1", "a", "é", "e\u0301", " ", "\t", "\xa0", "\u3000", "\u2007", "\u200b", "\u200c", "\u200d",
           "\u200e", "\u200f", "\u2060", "\ufeff", "\xad", "\x85", "\u2028", "-", "/"]


def _sql(con, values):
    return [r[0] for r in con.execute(
        f"SELECT {patient_id_sql('v')} FROM (SELECT unnest(?::VARCHAR[]) AS v, generate_subscripts(?::VARCHAR[], 1) AS i) "
        "ORDER BY i", [values, values]).fetchall()]


def test_id_space_is_every_unicode_separator():
    separators = {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp")}
    assert separators | set("\t\n\v\f\r\x85") == set(ID_SPACE)


@pytest.mark.parametrize("typed", ["P001", " P001", "P001\xa0", "\u200bP001", "P0\u200d01", "\ufeffP001\u3000",
                                   "\u200eP001\u200f", "P\xad001", "\tP001\r\n"])
def test_lookalike_ids_are_one_key(typed):
    assert patient_key(typed) == "P001"


def test_inner_spaces_and_accents():
    assert patient_key(" Jos\u0065\u0301 Smith ") == "José Smith"
    assert patient_key("\u200b \xa0") is None and patient_key("") is None and patient_key(None) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_TRICKY), max_size=8).map("".join), min_size=1, max_size=20))
def test_sql_and_python_forms_agree(values):
    con = duckdb.connect()
    assert _sql(con, values) == [patient_key(v) for v in values]


def test_import_and_lookup_merge_lookalike_ids(store, tmp_path):
    """One patient whatever invisible characters the export carried; lookups typed with them find it."""
    f = tmp_path / "ids.csv"
    f.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                 "P001,2024-01-01 08:00,2823-3,Potassium,4.1,mmol/L\n"
                 "\u200bP001,2024-01-02 08:00,2823-3,Potassium,4.2,mmol/L\n"
                 "P001\xa0,2024-01-03 08:00,2823-3,Potassium,4.3,mmol/L\n"
                 "\ufeff\u200eP001,2024-01-04 08:00,2823-3,Potassium,4.4,mmol/L\n"
                 "\u200b,2024-01-05 08:00,2823-3,Potassium,4.5,mmol/L\n", encoding="utf-8")
    s = run_import(store, f)
    assert (s.rows_loaded, s.rows_quarantined) == (4, 1)
    assert list(queries.patients(store)["patient_id"]) == ["P001"]
    assert list(queries.timeline(store, "P001\u200b ")["value_num"]) == [4.1, 4.2, 4.3, 4.4]
    with store.read() as cur:
        reason = cur.execute("SELECT column_name, reason FROM quarantine").fetchall()
    assert reason == [("patient_id", "patient id is missing")]


def test_exclude_patients_file_uses_the_same_rule(tmp_path):
    """train.py --exclude-patients: an id pasted with an invisible character still excludes its patient."""
    from train import read_patient_ids

    f = tmp_path / "test_ids.txt"
    f.write_text("\ufeffP001\u200b\n# held out\n \xa0\nP002 # note\nP001\n", encoding="utf-8")
    assert read_patient_ids(str(f)) == ["P001", "P002"]


def test_patient_search_cleans_the_typed_term(store, tmp_path):
    f = tmp_path / "ids.csv"
    f.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                 "P1,2024-01-01 08:00,2823-3,Potassium,4.1,mmol/L\n"
                 "Jos\u00e9,2024-01-01 08:00,2823-3,Potassium,4.2,mmol/L\n", encoding="utf-8")
    run_import(store, f)
    assert list(queries.patients(store, search="P\u200b1")["patient_id"]) == ["P1"]
    assert list(queries.patients(store, search="\xa0P1")["patient_id"]) == ["P1"]
    assert list(queries.patients(store, search="Jose\u0301")["patient_id"]) == ["José"]
    assert len(queries.patients(store, search="\u200b")) == 2  # nothing left to search for: every patient


def test_store_with_uncleaned_ids_merges_lookalike_patients_on_upgrade(tmp_path):
    """A store written before ids were cleaned (migrations 001-004) holds 'L1' and a zero-width
    space + 'L1' as two patients; opening it merges them: one patient with both histories and
    the known demographics, the exact duplicate removed, differing values at one time flagged."""
    from data.db import open_store
    from store_helpers import store_at_version

    path = tmp_path / "old.duckdb"
    con = store_at_version(path, 4)
    con.executemany("INSERT INTO patients VALUES (?, ?, ?, NULL, NULL, 'csv', ?)", [
        ["L1", "F", None, 2], ["\u200bL1", None, "1950-01-01", 1], ["Jose\u0301", "M", None, 1],
        ["P 9", None, None, 1], ["\u200b", None, None, 1]])
    con.execute("INSERT INTO result_keys VALUES (1, '2823-3', '2823-3', 'Potassium', 'mmol/L', 'mmol/L', 1.0, false)")
    rows = [("\u200bL1", "2024-01-01", 4.1, 1, 1), ("\u200bL1", "2024-01-02", 4.2, 1, 2), ("L1", "2024-01-02", 4.2, 2, 1),
            ("L1", "2024-01-03", 4.3, 2, 2), ("L1", "2024-01-01", 4.5, 2, 3), ("Jose\u0301", "2024-01-01", 3.9, 1, 3),
            ("P 9", "2024-01-01", 4.0, 1, 4)]
    con.executemany("INSERT INTO results VALUES (?, ?::TIMESTAMP, 1, 'numeric', '=', ?, ?::VARCHAR, NULL, NULL, NULL, NULL, "
                    "NULL, NULL, false, false, ?, ?)", [[p, t, v, v, b, r] for p, t, v, b, r in rows])
    con.close()

    store = open_store(path)
    pats = queries.patients(store).set_index("patient_id")
    assert sorted(pats.index) == sorted(["L1", "José", "P 9", "\u200b"])
    assert pats.loc["L1", "sex"] == "F" and str(pats.loc["L1", "birth_date"])[:10] == "1950-01-01"
    tl = queries.timeline(store, "L1")
    assert tl["value_num"].tolist() == [4.1, 4.5, 4.2, 4.3]
    assert tl["conflicting"].tolist() == [True, True, False, False]
    assert queries.timeline(store, "José")["value_num"].tolist() == [3.9]
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM results").fetchone()[0] == 6
        assert cur.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] >= 5
