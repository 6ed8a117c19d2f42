"""Local test codes kept, mapped through the site mapping file, re-keyed without re-import
(issue 14, point 5). A blood-gas potassium is never merged into serum potassium."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from data import codemap, queries
from data.db import open_store
from data.importers import ImportFileError, ImportOptions, run_import
from source_builders import write_source

ROWS = [  # the laboratory's own codes, no LOINC: serum K and blood-gas K are both "Potassium"
    {"pid": "P1", "t": "2024-06-01 10:00", "local": "K", "name": "Potassium", "value": "4.1", "unit": "mmol/L"},
    {"pid": "P1", "t": "2024-06-01 10:00", "local": "KBG", "name": "Potassium", "value": "3.6", "unit": "mmol/L"},
    {"pid": "P1", "t": "2024-06-02 10:00", "local": "K", "name": "Potassium", "value": "4.4", "unit": "mEq/L"},
    {"pid": "P1", "t": "2024-06-02 10:00", "local": "KBG", "name": "K+ (blood gas)", "value": "3.9", "unit": "mmol/L"},
    {"pid": "P1", "t": "2024-06-03 10:00", "local": "NA", "name": "Sodium", "value": "139", "unit": "mmol/L"},
]


@pytest.fixture
def imported(tmp_path):
    store = open_store(tmp_path / "lab.duckdb")
    map_file = tmp_path / "site" / "local_code_map.csv"
    s = run_import(store, write_source("csv", tmp_path / "in", ROWS), options=ImportOptions(code_map=str(map_file)))
    return store, map_file, s


def _keyed(store) -> list[tuple]:
    tl = queries.timeline(store, "P1")
    return list(zip(tl["local_code"], tl["analyte_code"], tl["value_canonical"]))


def test_local_codes_are_kept_and_listed_unmapped(imported):
    store, _, s = imported
    assert s.unmapped_codes == {"site:K": 2, "site:KBG": 2, "site:NA": 1}
    assert "3 local test codes without a LOINC mapping" in s.message
    assert json.loads(queries.batches(store)["unmapped_codes"][0]) == s.unmapped_codes
    # kept, and never merged by their look-alike names
    assert sorted(set(_keyed(store)), key=str)[:2] == [("site:K", "site:K", 4.1), ("site:K", "site:K", 4.4)]
    assert {c for _, c, _ in _keyed(store)} == {"site:K", "site:KBG", "site:NA"}
    codes = codemap.local_codes(store)
    assert list(codes["local_code"]) == ["site:K", "site:KBG", "site:NA"] and not codes["mapped"].any()


def test_mapping_rekeys_results_without_reimport_and_is_audited(imported):
    store, map_file, _ = imported
    event = codemap.map_code(store, map_file, "site:K", "2823-3", "serum or plasma",
                             "lab test catalogue 2024, entry K", by="ana")
    assert (event["new_analyte"], event["results_moved"]) == ("2823-3", 2)
    keyed = _keyed(store)
    assert [(lc, a) for lc, a, _ in keyed if lc == "site:K"] == [("site:K", "2823-3")] * 2
    assert [v for lc, _, v in keyed if lc == "site:K"] == [4.1, 4.4]  # mEq/L -> mmol/L (valence 1)
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM import_batches").fetchone()[0] == 1  # no re-import
        ev = cur.execute("SELECT username, local_code, old_analyte, new_analyte, source, results_moved "
                         "FROM code_map_events").fetchall()
    assert ev == [("ana", "site:K", "site:K", "2823-3", "lab test catalogue 2024, entry K", 2)]
    rows = codemap.read_map(map_file)
    assert [(r.local_code, r.loinc, r.specimen, r.mapped_by) for r in rows] == [
        ("site:K", "2823-3", "serum or plasma", "ana")]
    assert rows[0].mapped_at and rows[0].source
    # withdrawn: the results go back to the local code; the file keeps the history
    codemap.map_code(store, map_file, "site:K", None, "serum or plasma", "", by="ana")
    assert {a for lc, a, _ in _keyed(store) if lc == "site:K"} == {"site:K"}
    assert len(codemap.read_map(map_file)) == 2


def test_blood_gas_potassium_is_never_merged_into_serum_potassium(imported):
    store, map_file, _ = imported
    with pytest.raises(codemap.CodeMapError, match=r"blood.*cannot be mapped to 2823-3.*Serum or Plasma"):
        codemap.map_code(store, map_file, "site:KBG", "2823-3", "blood", "looks the same", by="ana")
    # stating the wrong specimen does not help: its exported names say blood gas
    with pytest.raises(codemap.CodeMapError, match=r"exported as 'K\+ \(blood gas\)'"):
        codemap.map_code(store, map_file, "site:KBG", "2823-3", "serum or plasma", "looks the same", by="ana")
    assert not map_file.exists() and {a for lc, a, _ in _keyed(store) if lc == "site:KBG"} == {"site:KBG"}
    codemap.map_code(store, map_file, "site:KBG", "6298-4", "blood", "lab test catalogue, entry KBG", by="ana")
    codemap.map_code(store, map_file, "site:K", "2823-3", "serum or plasma", "lab test catalogue, entry K", by="ana")
    tl = queries.timeline(store, "P1")
    assert tl.groupby("analyte_code")["local_code"].agg(set).to_dict() == {
        "2823-3": {"site:K"}, "6298-4": {"site:KBG"}, "site:NA": {"site:NA"}}
    assert not tl["conflicting"].any()  # 4.1 and 3.6 at 10:00 are two tests, not one conflicting result


def test_the_mapping_file_keys_later_imports_and_earlier_batches(imported, tmp_path):
    store, map_file, _ = imported
    codemap.append_mapping(map_file, codemap.Mapping("site:NA", "2951-2", "serum or plasma", "lab lead",
                                                     "2024-07-01", "lab test catalogue, entry NA"))
    more = write_source("csv", tmp_path / "in2", [{"pid": "P2", "t": "2024-06-05 09:00", "local": "NA",
                                                    "name": "Sodium", "value": "141", "unit": "mmol/L"}])
    s = run_import(store, more, options=ImportOptions(code_map=str(map_file)))
    assert (s.codes_mapped, s.unmapped_codes) == (1, {})
    assert queries.timeline(store, "P2")["analyte_code"].tolist() == ["2951-2"]
    # the earlier batch follows the file too, audited as the OS user who ran the import
    assert queries.timeline(store, "P1").query("local_code == 'site:NA'")["analyte_code"].tolist() == ["2951-2"]
    with store.read() as cur:
        assert cur.execute("SELECT username, results_moved FROM code_map_events").fetchall() == [
            (codemap.os_user(), 1)]


@pytest.mark.parametrize("text,match", [
    ("code,loinc\nK,2823-3\n", "header must be"),
    ("local_code,loinc,specimen,mapped_by,mapped_at,source\nsite:K,2823-4,serum or plasma,a,2024-01-01,x\n",
     r"row 1, column 'loinc'.*check digit"),
    ("local_code,loinc,specimen,mapped_by,mapped_at,source\nsite:K,2823-3,plasma-ish,a,2024-01-01,x\n",
     r"row 1, column 'specimen'"),
    ("local_code,loinc,specimen,mapped_by,mapped_at,source\nsite:K,2823-3,serum or plasma,,2024-01-01,x\n",
     r"row 1, column 'mapped_by'"),
    ("local_code,loinc,specimen,mapped_by,mapped_at,source\nsite:K,2823-3,serum or plasma,a,yesterday,x\n",
     r"row 1, column 'mapped_at'"),
    ("local_code,loinc,specimen,mapped_by,mapped_at,source\nsite:K,2823-3,serum or plasma,a,2024-01-01,=HYPERLINK(1)\n",
     r"row 1, column 'source'.*formula"),
])
def test_a_broken_mapping_file_stops_the_import(tmp_path, text, match):
    store = open_store(tmp_path / "lab.duckdb")
    mp = tmp_path / "map.csv"
    mp.write_text(text, encoding="utf-8")
    with pytest.raises(ImportFileError, match=match):
        run_import(store, write_source("csv", tmp_path / "in", ROWS[:1]), options=ImportOptions(code_map=str(mp)))
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM import_batches").fetchone()[0] == 0


def test_every_format_keeps_its_local_code(tmp_path, mimic_store):
    """FHIR keeps a non-LOINC coding beside LOINC; MIMIC-IV keeps the item id of mapped items."""
    store = open_store(tmp_path / "lab.duckdb")
    src = write_source("fhir", tmp_path / "f", [{"pid": "P1", "t": "2024-01-01T08:00:00", "loinc": "2823-3",
                                                  "local": "KPL"}])
    run_import(store, src)
    assert queries.timeline(store, "P1")[["analyte_code", "local_code"]].values.tolist() == [["2823-3", "codes:KPL"]]
    with mimic_store.read() as cur:
        assert cur.execute("SELECT DISTINCT local_code FROM lab_results WHERE analyte_code = '2823-3'").fetchall() == [
            ("mimic:50971",)]


def test_cli_codes_list_and_map(tmp_path, capsys, monkeypatch):
    from labtrend.cli import main

    db = tmp_path / "lab.duckdb"
    mp = tmp_path / "map.csv"
    assert main(["import", str(write_source("csv", tmp_path / "in", ROWS)), "--db", str(db), "--code-map", str(mp)]) == 0
    capsys.readouterr()
    assert main(["codes", "map", "site:KBG", "2823-3", "--specimen", "blood", "--source", "x", "--db", str(db),
                 "--code-map", str(mp)]) == 2
    assert "cannot be mapped to 2823-3" in capsys.readouterr().err
    assert main(["codes", "map", "site:KBG", "6298-4", "--specimen", "blood", "--source", "lab catalogue",
                 "--db", str(db), "--code-map", str(mp)]) == 0
    assert json.loads(capsys.readouterr().out)["results_moved"] == 2
    assert main(["codes", "list", "--db", str(db), "--format", "csv"]) == 0
    listed = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert listed.set_index("local_code").loc["site:KBG", "analyte_code"] == "6298-4"


# -- the analyst page -------------------------------------------------------------------------------
def test_analyst_maps_a_code_on_the_page(tmp_path, monkeypatch):
    import app_helpers
    from dashboard import access, audit

    store = open_store(tmp_path / "lab.duckdb")
    map_file = tmp_path / "local_code_map.csv"
    run_import(store, write_source("csv", tmp_path / "in", ROWS), options=ImportOptions(code_map=str(map_file)))
    monkeypatch.setenv("LABTREND_DB", str(tmp_path / "lab.duckdb"))
    monkeypatch.setenv("LABTREND_CODE_MAP", str(map_file))
    monkeypatch.setenv("LABTREND_MODEL", str(tmp_path / "no-model"))
    assert access.can_open(["analyst"], "codes") and not access.can_open(["clinician"], "codes")
    at = app_helpers.signed_in("ana", "analyst")
    at.switch_page("app_pages/codes.py").run()
    assert not at.exception and at.title[0].value == "Local test codes"
    at.selectbox(key="codes_local").set_value("site:KBG")
    at.selectbox(key="codes_specimen").set_value("blood")
    at.selectbox(key="codes_loinc").set_value("2823-3")
    at.text_input(key="codes_source").input("the names look alike")
    at.button[0].click().run()
    assert any("cannot be mapped to 2823-3" in e.value for e in at.error)
    at.selectbox(key="codes_loinc").set_value("6298-4")
    at.text_input(key="codes_source").input("lab test catalogue, entry KBG")
    at.button[0].click().run()
    assert not at.exception
    assert any("site:KBG is now keyed as 6298-4: 2 stored results re-keyed" in s.value for s in at.success)
    assert queries.timeline(store, "P1").query("local_code == 'site:KBG'")["analyte_code"].unique().tolist() == [
        "6298-4"]
    log = audit.read_log(store, action="code_map")
    assert len(log) == 1 and log["username"][0] == "ana" and "6298-4" in log["detail"][0]
    assert codemap.read_map(map_file)[0].mapped_by == "ana"


def test_specimen_reference_file_is_consistent():
    from data.catalogue import load_catalogue, reference_file
    from data.importers.pipeline import loinc_check_digit_ok

    frame = pd.read_csv(reference_file("analyte_specimens.csv"), dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["code", "specimen", "loinc_name", "source"] and frame["code"].is_unique
    cat = load_catalogue()
    for r in frame.itertuples(index=False):
        assert r.code in cat and loinc_check_digit_ok(r.code), r.code
        assert r.specimen in codemap.SPECIMENS and r.source.strip() and r.loinc_name.strip(), r.code
        # the LOINC long name says the same specimen
        assert ("in Blood" in r.loinc_name or "of Blood" in r.loinc_name) == (r.specimen == "blood"), r.code
