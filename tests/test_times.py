"""Collection times: UTC plus the source's zone, daylight-saving flags, dates without a time,
dates after the import, and what no calendar allows (issue 14, points 4 and 6)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from data import queries, timezones
from data.db import open_store
from data.importers import ImportFileError, ImportOptions, run_import
from source_builders import FORMATS, write_source

BERLIN = "Europe/Berlin"


def _rows(store):
    with store.read() as cur:
        return cur.execute(
            "SELECT source_row, collected_at, utc_offset_min, time_unknown, time_flag, after_import, value_num "
            "FROM lab_results ORDER BY source_row").df().set_index("source_row")


def test_dst_gap_and_fold_are_flagged_and_stored_in_utc(store, tmp_path):
    """Europe/Berlin: 31 Mar 2024 02:00 -> 03:00 (02:30 never happened), 27 Oct 2024 03:00 -> 02:00
    (02:10 and 02:30 happened twice). Stored in UTC with the offset; the flagged times say so."""
    f = write_source("csv", tmp_path / "in", [
        {"pid": "P1", "t": "2024-03-31 01:30", "value": "4.0"},
        {"pid": "P1", "t": "2024-03-31 02:30", "value": "4.1"},   # skipped hour
        {"pid": "P1", "t": "2024-03-31 03:30", "value": "4.2"},
        {"pid": "P1", "t": "2024-10-27 02:30", "value": "4.3"},   # repeated hour
        {"pid": "P1", "t": "2024-10-27 03:30", "value": "4.4"},
        {"pid": "P1", "t": "2024-07-01 12:00", "value": "4.5"},
    ])
    s = run_import(store, f, options=ImportOptions(timezone=BERLIN))
    assert (s.rows_loaded, s.rows_dst, s.time_zone) == (6, 2, BERLIN)
    assert "daylight-saving" in s.message
    r = _rows(store)
    assert list(r["collected_at"]) == [datetime(2024, 3, 31, 0, 30), datetime(2024, 3, 31, 1, 30),
                                       datetime(2024, 3, 31, 1, 30), datetime(2024, 10, 27, 0, 30),
                                       datetime(2024, 10, 27, 2, 30), datetime(2024, 7, 1, 10, 0)]
    assert list(r["utc_offset_min"]) == [60, 60, 120, 120, 60, 120]
    assert [None if pd.isna(x) else x for x in r["time_flag"]] == [None, "skipped_hour", None, "repeated_hour",
                                                                    None, None]
    with store.read() as cur:
        assert cur.execute("SELECT time_zone, rows_dst FROM import_batches").fetchone() == (BERLIN, 2)


def test_offsets_in_the_file_win_and_order_is_by_instant(store, tmp_path):
    """A written offset (or Z) is used as it is, whatever the import's zone; results across a
    fall-back change sort by the instant, not the wall clock."""
    f = write_source("csv", tmp_path / "in", [
        {"pid": "P1", "t": "2024-10-27T02:40:00+01:00", "value": "5.0"},  # second 02:40 (after the change)
        {"pid": "P1", "t": "2024-10-27T02:20:00+02:00", "value": "4.0"},  # first 02:20
        {"pid": "P1", "t": "2024-10-27T09:00:00Z", "value": "4.5"},
    ])
    s = run_import(store, f, options=ImportOptions(timezone="America/New_York"))
    assert s.rows_dst == 0
    tl = queries.timeline(store, "P1")
    assert list(tl["value_num"]) == [4.0, 5.0, 4.5]
    assert list(tl["collected_at"]) == [datetime(2024, 10, 27, 0, 20), datetime(2024, 10, 27, 1, 40),
                                        datetime(2024, 10, 27, 9, 0)]
    assert list(tl["utc_offset_min"]) == [120, 60, 0]


def test_site_zone_setting_and_unknown_zones(store, tmp_path, monkeypatch):
    f = write_source("csv", tmp_path / "in", [{"pid": "P1", "t": "2024-01-15 08:00"}])
    monkeypatch.setenv("LABTREND_TIMEZONE", "Europe/Berln")  # mistyped: refused before anything is read
    with pytest.raises(ImportFileError, match="unknown time zone 'Europe/Berln'"):
        run_import(store, f)
    with pytest.raises(ImportFileError, match="unknown time zone 'CEST'"):
        run_import(store, f, options=ImportOptions(timezone="CEST"))
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM import_batches").fetchone()[0] == 0
    monkeypatch.setenv("LABTREND_TIMEZONE", "Asia/Kolkata")
    s = run_import(store, f)
    assert s.time_zone == "Asia/Kolkata"
    assert queries.timeline(store, "P1")["collected_at"].tolist() == [datetime(2024, 1, 15, 2, 30)]


def test_without_a_zone_times_are_kept_as_written_and_say_so(store, tmp_path, monkeypatch):
    monkeypatch.delenv("LABTREND_TIMEZONE", raising=False)
    f = write_source("csv", tmp_path / "in", [{"pid": "P1", "t": "2024-03-31 02:30"}])
    s = run_import(store, f)
    assert (s.time_zone, s.rows_dst) == (None, 0)
    tl = queries.timeline(store, "P1")
    assert tl["collected_at"].tolist() == [datetime(2024, 3, 31, 2, 30)] and pd.isna(tl["utc_offset_min"][0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_follows_the_zone_rule(tmp_path, fmt):
    """One rule for every format: a local time without an offset is read in the import's zone and
    flagged in a skipped hour; MIMIC-IV's shifted dates get no zone (documented in its importer)."""
    store = open_store(tmp_path / "lab.duckdb")
    t = "2024-03-31T02:30:00" if fmt in ("fhir", "synthea") else "2024-03-31 02:30:00"
    src = write_source(fmt, tmp_path / "in", [{"pid": "10001", "t": t, "loinc": "2823-3"},
                                               {"pid": "10001", "t": t.replace("03-31", "07-01"), "loinc": "2823-3"}])
    s = run_import(store, src, fmt=fmt, options=ImportOptions(timezone=BERLIN))
    assert s.rows_loaded == 2, s.quarantine_reasons
    r = _rows(store)
    if fmt == "mimic":
        assert s.time_zone is None and s.rows_dst == 0
        assert r["utc_offset_min"].isna().all()
        assert list(r["collected_at"]) == [datetime(2024, 3, 31, 2, 30), datetime(2024, 7, 1, 2, 30)]
    else:
        assert (s.time_zone, s.rows_dst) == (BERLIN, 1)
        assert list(r["utc_offset_min"]) == [60, 120]
        assert list(r["collected_at"]) == [datetime(2024, 3, 31, 1, 30), datetime(2024, 7, 1, 0, 30)]
        assert r["time_flag"].iloc[0] == "skipped_hour"


@pytest.mark.parametrize("fmt", ["csv", "fhir", "omop", "synthea"])
def test_a_date_without_a_time_is_not_midnight(tmp_path, fmt):
    store = open_store(tmp_path / "lab.duckdb")
    src = write_source(fmt, tmp_path / "in", [{"pid": "10001", "t": "2024-05-01", "loinc": "2823-3"},
                                               {"pid": "10001", "t": "2024-05-01T00:00:00" if fmt in ("fhir", "synthea")
                                                else "2024-05-01 00:00:00", "loinc": "2823-3", "value": "4.9"}])
    s = run_import(store, src, fmt=fmt, options=ImportOptions(timezone=BERLIN))
    r = _rows(store)
    unknown = r[r["time_unknown"]]
    assert unknown["collected_at"].iloc[0] == datetime(2024, 5, 1, 10, 0)  # noon in Berlin, in UTC
    if fmt == "omop":  # a midnight datetime without measurement_time is a date (OMOP ETL convention)
        assert r["time_unknown"].all() and s.rows_time_unknown == 2
    else:  # a written 00:00 is a real midnight
        assert len(unknown) == 1 and s.rows_time_unknown == 1
        assert r.loc[~r["time_unknown"], "collected_at"].iloc[0] == datetime(2024, 4, 30, 22, 0)


def test_day_first_date_without_time(store, tmp_path):
    f = tmp_path / "eu.csv"
    f.write_text("patient_id;collected_at;loinc;test_name;value;unit\nP1;15.03.2024;2823-3;Kalium;4,1;mmol/L\n",
                 encoding="utf-8")
    s = run_import(store, f)
    assert s.rows_time_unknown == 1
    tl = queries.timeline(store, "P1")
    assert tl["collected_at"].tolist() == [datetime(2024, 3, 15, 12)] and bool(tl["time_unknown"][0])


@pytest.mark.parametrize("fmt", ["csv", "fhir", "omop", "synthea"])
def test_collected_after_the_import_is_flagged(tmp_path, fmt):
    store = open_store(tmp_path / "lab.duckdb")
    later = pd.Timestamp.now("UTC").tz_localize(None) + pd.Timedelta(days=2)
    src = write_source(fmt, tmp_path / "in", [
        {"pid": "10001", "t": "9999-12-30 10:00:00" if fmt not in ("fhir", "synthea") else "9999-12-30T10:00:00"},
        {"pid": "10001", "t": later.strftime("%Y-%m-%dT%H:%M:%S") + "Z" if fmt in ("fhir", "synthea")
         else later.strftime("%Y-%m-%d %H:%M:%S+00:00")},
        {"pid": "10001", "t": "2024-01-02T10:00:00" if fmt in ("fhir", "synthea") else "2024-01-02 10:00:00"},
    ])
    s = run_import(store, src, fmt=fmt)
    assert (s.rows_loaded, s.rows_after_import) == (3, 2), s.quarantine_reasons
    assert "after the import time" in s.message
    assert list(_rows(store)["after_import"]) == [True, True, False]


def test_shifted_dates_are_not_flagged(tmp_path):
    """MIMIC-IV declares shifted dates (years 2100-2200); so can any export with --shifted-dates."""
    store = open_store(tmp_path / "lab.duckdb")
    s = run_import(store, write_source("mimic", tmp_path / "m", [{"pid": "10001", "t": "2180-05-01 10:00:00"}]))
    assert (s.rows_loaded, s.rows_after_import) == (1, 0)
    store2 = open_store(tmp_path / "lab2.duckdb")
    src = write_source("csv", tmp_path / "c", [{"pid": "P1", "t": "2180-05-01 10:00", "loinc": "2823-3"}])
    assert run_import(store2, src, options=ImportOptions(shifted_dates=True)).rows_after_import == 0


def test_what_no_calendar_allows_is_quarantined(store, tmp_path):
    f = write_source("csv", tmp_path / "in", [
        {"pid": "P1", "t": "2024-02-30 10:00"}, {"pid": "P1", "t": "2023-02-29"}, {"pid": "P1", "t": "2024-13-01"},
        {"pid": "P1", "t": "2024-01-01 25:00"}, {"pid": "P1", "t": "10000-01-01"}, {"pid": "P1", "t": "99999-01-01 10:00"},
        {"pid": "P1", "t": "2024-02-29 10:00"},
    ])
    s = run_import(store, f)
    assert (s.rows_loaded, s.rows_quarantined) == (1, 6)
    assert s.rows_loaded + s.rows_quarantined + s.rows_skipped == s.rows_read
    with store.read() as cur:
        reasons = dict(cur.execute("SELECT source_row, reason FROM quarantine").fetchall())
    assert all("not a date or time on the calendar" in reasons[i] for i in (1, 2, 3, 4))
    assert all("beyond 9999" in reasons[i] for i in (5, 6))


# -- what the UI shows ------------------------------------------------------------------------
def test_local_time_in_hover_and_table():
    from dashboard import figures

    rows = pd.DataFrame({
        "result_id": [1, 2, 3], "patient_id": ["P1"] * 3, "analyte_code": ["2823-3"] * 3,
        "analyte_name": ["Potassium"] * 3, "collected_at": pd.to_datetime(["2024-03-31 01:30", "2024-05-01 10:00",
                                                                          "2024-06-01 08:00"]),
        "utc_offset_min": pd.array([60, 120, 120], dtype="Int16"), "time_unknown": [False, True, False],
        "time_flag": ["skipped_hour", None, None], "value_canonical": [4.1, 4.2, 4.3], "value_text": ["4.1"] * 3,
        "comparator": ["="] * 3, "unit_canonical": ["mmol/L"] * 3, "result_kind": ["numeric"] * 3,
        "implausible": [False] * 3, "unit_missing": [False] * 3, "conflicting": [False] * 3, "flag": [None] * 3,
        "ref_low_canonical": [np.nan] * 3, "ref_high_canonical": [np.nan] * 3, "reported_at": [pd.NaT] * 3,
    })
    hover = [figures.time_label(r) for r in rows.to_dict("records")]
    assert hover[0].startswith("2024-03-31 02:30 (UTC+01:00)") and "skipped" in hover[0]
    assert hover[1] == "2024-05-01 (time not given)"
    assert hover[2] == "2024-06-01 10:00 (UTC+02:00)"
    table = figures.make_cumulative_table(rows)
    assert list(table.columns[3:]) == ["2024-03-31 02:30 (clock change)", "2024-05-01 (time not given)",
                                       "2024-06-01 10:00"]
    fig = figures.make_timeline_figure(rows, ["2823-3"])
    hovers = [h for tr in fig.data for h in (tr.customdata or []) if isinstance(h, str)]
    assert any("2024-06-01 10:00 (UTC+02:00)" in h for h in hovers)
    assert any("2024-05-01 (time not given)" in h for h in hovers)


def test_timezones_localize_uses_the_zone_database():
    out = timezones.localize(np.array(["2024-04-07T01:45", "2024-10-06T02:15"], dtype="datetime64[us]"),
                             "Australia/Lord_Howe")  # half-hour daylight saving
    assert list(out["flag"]) == ["repeated_hour", "skipped_hour"]
    assert list(out["offset_min"]) == [660, 630]


# -- downstream: a date without a time is never a precise midnight ------------------------------
def test_anomaly_rules_do_not_treat_dates_as_one_draw():
    from clinical.anomalies import specimen_keys

    t = pd.DataFrame({"result_id": [1, 2, 3], "patient_id": ["P1"] * 3, "specimen_id": [None] * 3,
                      "collected_at": pd.to_datetime(["2024-05-01 10:00"] * 3), "time_unknown": [True, True, False]})
    keys = specimen_keys(t)
    assert keys[0] != keys[1]  # two results of one day without times: not one specimen
    assert keys[2] not in (keys[0], keys[1])
