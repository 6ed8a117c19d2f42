"""OMOP CDM v5.4 importer: MEASUREMENT + PERSON + CONCEPT, folder or single file."""

from __future__ import annotations

import csv
import gzip
import shutil
from datetime import date, datetime
from pathlib import Path

import pandas as pd
import pytest

from data.db import open_store
from store_helpers import patients_by_id as _patients
from store_helpers import quarantine_rows as _quarantine
from store_helpers import results_by_row as _results

from data.importers import ImportFileError, detect_format, run_import
from data.importers.omop import GENDERS, OPERATORS

FIXTURES = Path(__file__).parent / "fixtures" / "omop"






def _none(x) -> bool:
    return x is None or x != x


def test_detect_format():
    assert detect_format(FIXTURES) == "omop"
    assert detect_format(FIXTURES / "measurement.csv") == "omop"


def test_operator_and_gender_concepts_match_the_concept_table():
    """The built-in maps agree with the CONCEPT rows of the fixture (Athena layout)."""
    with open(FIXTURES / "concept.csv", newline="") as fh:
        names = {int(r["concept_id"]): r["concept_name"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)}
    assert OPERATORS == {4171756: "<", 4171754: "<=", 4172703: "=", 4171755: ">=", 4172704: ">"}
    assert all(names[k] == v for k, v in OPERATORS.items())
    assert GENDERS == {8532: "F", 8507: "M"}


def test_folder_with_person_and_concept(db):
    s = run_import(db, FIXTURES)
    assert s.format == "omop"
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined, s.rows_skipped) == (10, 9, 1, 0)
    assert (s.rows_censored, s.rows_text, s.patients) == (3, 2, 3)
    assert _quarantine(db) == [(10, "patient_id", "patient id is missing")]

    r = _results(db)
    creat = r[1]
    assert (creat["patient_id"], creat["loinc"], creat["analyte_code"]) == ("1", "2160-0", "2160-0")
    assert creat["analyte_name"] == "Creatinine [Mass/volume] in Serum or Plasma"
    assert creat["collected_at"] == datetime(2021, 6, 1, 8, 15)
    # operator '=' adds nothing; value as written in the file
    assert (creat["value_text"], creat["comparator"], creat["value_num"], creat["unit"]) == ("1.04", "=", 1.04, "mg/dL")
    assert (creat["ref_low"], creat["ref_high"], creat["value_canonical"]) == (0.57, 1.11, 1.04)

    # no unit_source_value: unit from CONCEPT (UCUM concept_code of unit_concept_id 8753)
    assert (r[2]["loinc"], r[2]["value_num"], r[2]["unit"], r[2]["unit_canonical"]) == ("2823-3", 4.2, "mmol/L", "mmol/L")

    # operator_concept_id -> comparator prefix
    assert (r[3]["value_text"], r[3]["comparator"], r[3]["value_num"], r[3]["result_kind"]) == ("<0.6", "<", 0.6, "censored")
    assert (r[4]["value_text"], r[4]["comparator"], r[4]["unit"], r[4]["value_canonical"]) == (">600", ">", "mg/dl", 600.0)
    assert (r[5]["value_text"], r[5]["comparator"], r[5]["value_num"]) == (">=20.0", ">=", 20.0)
    # measurement_date + measurement_time
    assert r[4]["collected_at"] == datetime(2021, 6, 2, 7, 45)

    # value_as_number empty: value_source_value, else the CONCEPT name of value_as_concept_id
    assert (r[6]["value_text"], r[6]["result_kind"]) == ("HEMOLYZED", "text") and _none(r[6]["value_num"])
    assert (r[7]["value_text"], r[7]["analyte_code"], r[7]["analyte_name"]) == ("Negative", "local:upreg", "UPREG")

    # measurement_date only
    assert (r[8]["patient_id"], r[8]["collected_at"], r[8]["value_text"]) == ("3", datetime(2021, 6, 3, 12), "0.90")
    assert r[8]["time_unknown"]  # a date alone: noon of that day, time unknown
    # a concept that is not in CONCEPT keeps its local code
    assert (r[9]["analyte_code"], r[9]["analyte_name"], r[9]["unit"]) == ("omop:3999999", "LOCALX", "U/L")
    assert _none(r[9]["loinc"])

    p = _patients(db)
    assert p["1"]["sex"] == "F" and p["1"]["birth_date"] == pd.Timestamp(date(1962, 7, 3))
    # year and month of birth only: age 0 at the 15th of that month
    assert p["2"]["sex"] == "M" and _none(p["2"]["birth_date"])
    assert p["2"]["age_at_ref"] == 0.0 and p["2"]["ref_date"] == pd.Timestamp(date(1980, 5, 15))
    assert _none(p["3"]["sex"])  # no PERSON row


def test_single_file_without_concept(db):
    s = run_import(db, FIXTURES / "measurement.csv")
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined) == (10, 8, 2)
    r = _results(db)
    assert (r[1]["analyte_code"], r[1]["analyte_name"]) == ("omop:3016723", "CREA") and _none(r[1]["loinc"])
    # the built-in operator map, no CONCEPT needed
    assert [r[i]["value_text"] for i in (3, 4, 5)] == ["<0.6", ">600", ">=20.0"]
    assert r[7]["value_text"] == "concept:9189"
    # unit_concept_id without CONCEPT cannot be named: quarantined with its reason
    q = dict((row, reason) for row, _, reason in _quarantine(db))
    assert "concept:8753" in q[2] and q[10] == "patient id is missing"
    assert all(_none(p["sex"]) for p in _patients(db).values())


def test_athena_style_upper_case_tab_gz(tmp_path):
    """Upper-case file and column names, tab separated, gzipped MEASUREMENT: same result."""
    folder = tmp_path / "cdm"
    folder.mkdir()
    with open(FIXTURES / "measurement.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    rows[0] = [h.upper() for h in rows[0]]
    with gzip.open(folder / "MEASUREMENT.csv.gz", "wt", newline="") as fh:
        csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(rows)
    shutil.copy(FIXTURES / "person.csv", folder / "PERSON.csv")
    shutil.copy(FIXTURES / "concept.csv", folder / "CONCEPT.csv")
    db = open_store(tmp_path / "t.duckdb")
    assert detect_format(folder) == "omop"
    s = run_import(db, folder)
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined) == (10, 9, 1)
    r = _results(db)
    assert (r[1]["loinc"], r[3]["value_text"], r[7]["value_text"]) == ("2160-0", "<0.6", "Negative")
    assert _patients(db)["1"]["sex"] == "F"


def test_reimport_adds_nothing(db):
    first = run_import(db, FIXTURES)
    again = run_import(db, FIXTURES)
    assert again.already_imported and again.batch_id == first.batch_id
    with db.read() as cur:
        assert cur.execute("SELECT count(*) FROM lab_results").fetchone()[0] == 9


def test_not_a_measurement_table_raises(tmp_path):
    bad = tmp_path / "measurement.csv"
    bad.write_text("measurement_id,measurement_concept_id,value_as_number\n1,3016723,1.0\n")
    with pytest.raises(ImportFileError, match=r"measurement\.csv: not an OMOP MEASUREMENT table, missing column\(s\) person_id"):
        run_import(open_store(tmp_path / "t.duckdb"), bad, fmt="omop")


def test_folder_without_measurement_raises(tmp_path):
    (tmp_path / "cdm").mkdir()
    shutil.copy(FIXTURES / "person.csv", tmp_path / "cdm" / "person.csv")
    with pytest.raises(ImportFileError, match="cdm: not an OMOP folder"):
        run_import(open_store(tmp_path / "t.duckdb"), tmp_path / "cdm", fmt="omop")
