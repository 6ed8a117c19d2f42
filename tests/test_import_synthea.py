"""Synthea CSV importer: observations.csv (+ patients.csv), with and without CATEGORY."""

from __future__ import annotations

import csv
from datetime import date, datetime
from pathlib import Path

import pandas as pd
import pytest

from data.db import open_store
from store_helpers import patients_by_id as _patients
from store_helpers import results_by_row as _results

from data.importers import ImportFileError, detect_format, run_import

FIXTURES = Path(__file__).parent / "fixtures" / "synthea"
PAT_A = "b9c610cd-28a6-4636-ccb6-c7a0d2a4cb85"
PAT_B = "5e1f1b2a-7c3d-4e5f-8a9b-0c1d2e3f4a5b"





def _none(x) -> bool:
    return x is None or x != x


def test_detect_format():
    assert detect_format(FIXTURES) == "synthea"
    assert detect_format(FIXTURES / "observations.csv") == "synthea"


def test_folder_only_laboratory_rows_are_loaded(db):
    s = run_import(db, FIXTURES)
    assert s.format == "synthea"
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined, s.rows_skipped) == (15, 9, 0, 6)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_skipped
    assert s.skipped_reasons == {
        "category vital-signs": 3,
        "category survey": 2,
        "exact duplicate of a row already kept": 1,
    }
    assert (s.rows_duplicate, s.rows_text, s.patients) == (1, 1, 2)

    r = _results(db)
    assert sorted(r) == [4, 5, 6, 7, 8, 9, 12, 13, 14]
    glucose = r[4]
    assert (glucose["patient_id"], glucose["loinc"], glucose["analyte_name"]) == (PAT_A, "2339-0", "Glucose [Mass/volume] in Blood")
    assert glucose["collected_at"] == datetime(2019, 2, 16, 21, 23, 6)  # '...Z' read as UTC
    assert (glucose["value_text"], glucose["comparator"], glucose["value_num"], glucose["unit"]) == ("91.6", "=", 91.6, "mg/dL")
    assert (glucose["value_canonical"], glucose["unit_canonical"]) == (91.6, "mg/dL")
    # a LOINC code outside the catalogue keeps its unit as canonical
    assert (r[5]["analyte_code"], r[5]["value_canonical"], r[5]["unit_canonical"]) == ("38483-4", 0.83, "mg/dL")
    assert (r[9]["value_num"], r[9]["unit"]) == (5.9, "%")
    # a text laboratory result (TYPE text) is a result
    assert (r[12]["value_text"], r[12]["result_kind"], r[12]["analyte_name"]) == ("Yellow", "text", "Color of Urine")
    assert _none(r[12]["unit"])
    assert (r[13]["patient_id"], r[13]["collected_at"], r[13]["value_num"]) == (PAT_B, datetime(2020, 7, 1, 9, 12, 44), 13.2)
    assert (r[14]["value_num"], r[14]["unit"], r[14]["value_canonical"]) == (7.4, "10*3/uL", 7.4)

    p = _patients(db)
    assert p[PAT_A]["sex"] == "F" and p[PAT_A]["birth_date"] == pd.Timestamp(date(1985, 3, 14))
    assert p[PAT_B]["sex"] == "M" and p[PAT_B]["birth_date"] == pd.Timestamp(date(1950, 11, 2))


def test_observations_alone(db):
    s = run_import(db, FIXTURES / "observations.csv")
    assert (s.rows_read, s.rows_loaded) == (15, 9)
    assert all(_none(p["sex"]) for p in _patients(db).values())


def test_reimport_adds_nothing(db):
    first = run_import(db, FIXTURES)
    again = run_import(db, FIXTURES)
    assert again.already_imported and again.batch_id == first.batch_id
    with db.read() as cur:
        assert cur.execute("SELECT count(*) FROM lab_results").fetchone()[0] == 9


def _without(columns: set[str], dest: Path) -> Path:
    with open(FIXTURES / "observations.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [c for c in rows[0] if c not in columns]
    with open(dest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keep, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return dest


def test_old_export_without_category(tmp_path):
    """No CATEGORY: LOINC-coded numeric rows that are not FHIR vital signs are staged."""
    path = _without({"CATEGORY"}, tmp_path / "observations.csv")
    db = open_store(tmp_path / "t.duckdb")
    s = run_import(db, path)
    assert (s.rows_read, s.rows_skipped) == (15, 6)
    assert s.skipped_reasons == {
        "no category: vital-sign code": 3,
        "no category: type text": 2,  # smoking status and urine colour
        "exact duplicate of a row already kept": 1,
    }
    # the PHQ-9 score (row 11) is LOINC-coded and numeric: indistinguishable from a lab
    # without CATEGORY, so it is staged (loaded, or quarantined for its unit '{score}')
    assert s.rows_loaded + s.rows_quarantined == 9
    with db.read() as cur:
        staged = {r[0] for r in cur.execute("SELECT source_row FROM lab_results UNION SELECT source_row FROM quarantine").fetchall()}
    assert staged == {4, 5, 6, 7, 8, 9, 11, 13, 14}


def test_old_export_without_category_and_type(tmp_path):
    path = _without({"CATEGORY", "TYPE"}, tmp_path / "observations.csv")
    s = run_import(open_store(tmp_path / "t.duckdb"), path)
    assert (s.rows_read, s.rows_loaded + s.rows_quarantined) == (15, 11)
    assert s.skipped_reasons == {"no category: vital-sign code": 3, "exact duplicate of a row already kept": 1}


def test_missing_columns_raise(tmp_path):
    bad = tmp_path / "observations.csv"
    bad.write_text("DATE,PATIENT,ENCOUNTER,DESCRIPTION\n2020-01-01,p1,e1,Glucose\n")
    with pytest.raises(ImportFileError, match=r"observations\.csv: not a Synthea observations file, missing column\(s\) CODE, VALUE"):
        run_import(open_store(tmp_path / "t.duckdb"), bad, fmt="synthea")
