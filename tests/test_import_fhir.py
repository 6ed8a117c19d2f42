"""FHIR R4 importer: Bundle, single resource, NDJSON (with a broken line), .gz, folders."""

from __future__ import annotations

import gzip
import json
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
from data.importers.fhir import _fhir_time, observation_row

FIXTURES = Path(__file__).parent / "fixtures" / "fhir"
BUNDLE = FIXTURES / "bundle_lab.json"
NDJSON = FIXTURES / "observations.ndjson"






def pd_date(y, m, d) -> pd.Timestamp:
    return pd.Timestamp(date(y, m, d))


def _none(x) -> bool:
    return x is None or x != x  # NaN / NaT from pandas


def test_detect_format(tmp_path):
    assert detect_format(BUNDLE) == "fhir"
    assert detect_format(NDJSON) == "fhir"
    shutil.copy(NDJSON, tmp_path / "Observation.ndjson")
    assert detect_format(tmp_path) == "fhir"


def test_bundle_summary_accounts_for_every_entry(db):
    s = run_import(db, BUNDLE)
    assert s.format == "fhir"
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined, s.rows_skipped) == (15, 9, 1, 5)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_skipped
    assert s.skipped_reasons == {
        "resource type Patient": 1,
        "resource type Encounter": 1,
        "category vital-signs": 1,
        "status entered-in-error": 1,
        "has components, no value": 1,
    }
    assert (s.rows_censored, s.rows_text, s.patients) == (1, 2, 2)
    assert _quarantine(db) == [(12, "loinc", "LOINC code '2160-1' fails its check digit")]


def test_bundle_values_as_stored(db):
    run_import(db, BUNDLE)
    r = _results(db)
    assert sorted(r) == [3, 4, 5, 6, 7, 8, 9, 10, 11]

    creat = r[3]
    # subject urn:uuid:... resolved through the Patient's fullUrl to Patient.id
    assert creat["patient_id"] == "pat-001"
    assert creat["loinc"] == "2160-0" and creat["analyte_name"] == "Creatinine"
    # +01:00 -> UTC
    assert creat["collected_at"] == datetime(2024, 3, 1, 7, 30)
    assert creat["reported_at"] == datetime(2024, 3, 1, 9, 2, 11, 250000)
    assert (creat["value_text"], creat["comparator"], creat["value_num"]) == ("1.10", "=", 1.1)
    assert (creat["unit"], creat["value_canonical"], creat["unit_canonical"]) == ("mg/dL", 1.1, "mg/dL")
    assert (creat["ref_low"], creat["ref_high"], creat["flag"]) == (0.5, 1.1, "N")
    assert creat["specimen_id"] == "Specimen/sp-20240301-01"

    assert (r[4]["value_num"], r[4]["flag"], r[4]["ref_low"], r[4]["ref_high"]) == (5.9, "H", 3.5, 5.1)

    crp = r[5]  # valueQuantity.comparator '<'
    assert (crp["value_text"], crp["comparator"], crp["value_num"], crp["result_kind"]) == ("<0.5", "<", 0.5, "censored")
    assert (crp["unit"], crp["value_canonical"], crp["analyte_name"]) == ("mg/L", 0.5, "CRP")

    hemolyzed = r[6]
    assert (hemolyzed["value_text"], hemolyzed["result_kind"]) == ("HEMOLYZED", "text")
    assert _none(hemolyzed["value_num"]) and _none(hemolyzed["comparator"])
    assert hemolyzed["comment"] == "Sample hemolysed.; Please repeat."
    assert hemolyzed["collected_at"] == datetime(2024, 3, 5, 7, 0)

    sodium = r[7]  # effectivePeriod.start, status preliminary noted
    assert (sodium["value_text"], sodium["collected_at"]) == ("139", datetime(2024, 3, 5, 7, 0))
    assert sodium["comment"] == "status preliminary"

    glucose = r[8]  # UCUM code wins over the display unit 'mmol/l'
    assert glucose["unit"] == "mmol/L" and glucose["unit_canonical"] == "mg/dL"
    assert glucose["value_canonical"] == pytest.approx(5.6 * 180.16 / 10)

    hb = r[9]  # dataAbsentReason
    assert hb["result_kind"] == "empty" and _none(hb["value_text"])
    assert hb["comment"] == "data absent: specimen clotted"

    local = r[10]  # no LOINC coding: '<system tail>:<code>'
    assert (local["analyte_code"], local["analyte_name"], local["value_num"]) == ("local-tests:HIDX", "Hemolysis index", 2.0)
    assert _none(local["loinc"])

    hcg = r[11]  # valueCodeableConcept, date-only effectiveDateTime, Patient/<id> without Patient resource
    assert (hcg["patient_id"], hcg["value_text"], hcg["result_kind"]) == ("pat-002", "Negative", "text")
    # a date without a time: noon of that date, flagged time unknown (never a precise midnight)
    assert (hcg["collected_at"], hcg["time_unknown"]) == (datetime(2024, 2, 10, 12), True)


def test_bundle_patients(db):
    run_import(db, BUNDLE)
    p = _patients(db)
    assert set(p) == {"pat-001", "pat-002"}
    assert p["pat-001"]["sex"] == "F" and p["pat-001"]["birth_date"] == pd_date(1958, 4, 12)
    assert _none(p["pat-002"]["sex"]) and _none(p["pat-002"]["birth_date"])


def test_reimport_adds_nothing(db):
    first = run_import(db, BUNDLE)
    again = run_import(db, BUNDLE)
    assert again.already_imported and again.batch_id == first.batch_id
    with db.read() as cur:
        assert cur.execute("SELECT count(*) FROM lab_results").fetchone()[0] == 9
        assert cur.execute("SELECT count(*) FROM import_batches").fetchone()[0] == 1


def test_ndjson_broken_line_is_quarantined_not_fatal(db):
    s = run_import(db, NDJSON)
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined, s.rows_skipped) == (6, 3, 1, 2)
    assert s.skipped_reasons == {"resource type Patient": 1, "resource type Condition": 1}
    [(row, column, reason)] = _quarantine(db)
    assert row == 3 and column is None  # NDJSON line number
    assert reason.startswith("record cannot be read: not valid JSON")
    with db.read() as cur:
        raw = cur.execute("SELECT raw_row FROM quarantine").fetchone()[0]
    assert '"nd-broken"' in json.loads(raw)["line"]

    r = _results(db)
    assert sorted(r) == [2, 5, 6]  # the blank line 4 is not a row
    assert r[2]["collected_at"] == datetime(2023, 11, 21, 4, 45)  # 23:45 -05:00
    assert (r[2]["value_text"], r[2]["value_canonical"]) == ("0.92", 0.92)
    assert (r[5]["value_text"], r[5]["unit"], r[5]["specimen_id"]) == ("7.20", "10*3/uL", "Specimen/nd-sp-1")
    assert (r[6]["value_text"], r[6]["comparator"], r[6]["value_num"]) == (">14.0", ">", 14.0)

    # birthDate '1971' (year only): age 0 in the middle of that year
    pat = _patients(db)["pat-101"]
    assert pat["sex"] == "M" and _none(pat["birth_date"])
    assert pat["age_at_ref"] == 0.0 and pat["ref_date"] == pd_date(1971, 7, 1)


def test_folder_of_gz_and_plain_ndjson(tmp_path):
    folder = tmp_path / "bulk"
    folder.mkdir()
    lines = NDJSON.read_text().splitlines(keepends=True)
    (folder / "Patient.ndjson").write_text(lines[0])
    with gzip.open(folder / "Observation.ndjson.gz", "wt") as fh:
        fh.writelines(lines[1:])
    (folder / "README.txt").write_text("not read")
    db = open_store(tmp_path / "t.duckdb")
    s = run_import(db, folder)
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined, s.rows_skipped) == (6, 3, 1, 2)
    # files in name order; rows continue across files: Observation lines 1-6, Patient line 1 -> row 7
    with db.read() as cur:
        opts = json.loads(cur.execute("SELECT options FROM import_batches").fetchone()[0])
    assert [(f["name"], f["first_row"]) for f in opts["files"]] == [("Observation.ndjson.gz", 1), ("Patient.ndjson", 7)]
    assert sorted(_results(db)) == [1, 4, 5]
    assert _quarantine(db)[0][0] == 2
    assert _patients(db)["pat-101"]["sex"] == "M"  # Patient from another file of the folder
    assert run_import(db, folder).already_imported


def test_single_observation_json(tmp_path):
    obs = json.loads(BUNDLE.read_text())["entry"][4]["resource"]  # the censored CRP
    path = tmp_path / "crp.json"
    path.write_text(json.dumps(obs))
    db = open_store(tmp_path / "t.duckdb")
    s = run_import(db, path)
    assert (s.rows_read, s.rows_loaded) == (1, 1)
    [row] = _results(db).values()
    assert (row["patient_id"], row["value_text"], row["comparator"]) == ("pat-001", "<0.5", "<")


def test_json_file_that_is_not_json_raises_with_name_and_line(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"resourceType": "Bundle",\n "entry": [ {"resource": \n')
    db = open_store(tmp_path / "t.duckdb")
    with pytest.raises(ImportFileError, match=r"broken\.json: not valid JSON \(line 3"):
        run_import(db, bad)
    with db.read() as cur:
        assert cur.execute("SELECT count(*) FROM import_batches").fetchone()[0] == 0


def test_ndjson_without_any_readable_line_raises(tmp_path):
    bad = tmp_path / "export.ndjson"
    bad.write_text("patient,value\nP1,4.2\n")
    with pytest.raises(ImportFileError, match=r"export\.ndjson: .*line 1"):
        run_import(open_store(tmp_path / "t.duckdb"), bad)


def test_json_without_resource_type_raises(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text('{"patients": []}')
    with pytest.raises(ImportFileError, match="other.json: not a FHIR resource or Bundle"):
        run_import(open_store(tmp_path / "t.duckdb"), bad)


def test_time_normalisation():
    # the offset is kept for the pipeline, which stores UTC and the offset
    assert _fhir_time("2024-03-01T08:30:00+01:00") == "2024-03-01 08:30:00+01:00"
    assert _fhir_time("2024-03-01T23:30:00-02:30") == "2024-03-01 23:30:00-02:30"
    assert _fhir_time("2024-03-01T08:30:00Z") == "2024-03-01 08:30:00+00:00"
    assert _fhir_time("2024-03-01T08:30:00") == "2024-03-01 08:30:00"  # no offset: kept as local time
    assert _fhir_time("2024-03-01") == "2024-03-01"
    assert _fhir_time("yesterday") == "yesterday"  # left for the pipeline to quarantine
    assert _fhir_time(None) is None


def test_observation_rules():
    base = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]}}
    assert observation_row({**base, "status": "cancelled"}) == "status cancelled"
    assert observation_row({**base, "category": [{"coding": [{"code": "survey"}]}]}) == "category survey"
    assert observation_row({**base, "hasMember": [{"reference": "Observation/1"}]}) == "panel (hasMember), no value"
    row = observation_row({**base, "category": [{"coding": [{"code": "laboratory"}]}, {"coding": [{"code": "chemistry"}]}],
                           "valueQuantity": {"value": "4.1", "comparator": ">=", "unit": "mmol/l"},
                           "subject": {"reference": "https://fhir.example.org/r4/Patient/123/_history/2"}})
    assert (row["value"], row["unit"], row["subject_guess"]) == (">=4.1", "mmol/l", "123")
    row = observation_row({**base, "valueBoolean": True, "subject": {"identifier": {"value": "MRN-7"}}})
    assert (row["value"], row["subject_guess"]) == ("true", "MRN-7")
    row = observation_row({**base, "valueRange": {"low": {"value": "1"}, "high": {"value": "3"}},
                           "interpretation": [{"text": "abnormal"}]})
    assert (row["value"], row["flag"]) == ("1-3", "abnormal")
