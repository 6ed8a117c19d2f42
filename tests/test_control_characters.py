"""NUL and other control characters in any field: one rule for every format (issue 14, point 7).

The row is quarantined with the column and the character named (never stored as is, never
silently edited); whitespace controls keep their meaning (trimmed around ids, kept in comments).
"""

from __future__ import annotations

import pytest

from data import queries
from data.db import open_store
from data.importers import run_import
from data.importers.pipeline import CONTROL_CHARACTERS
from source_builders import FORMATS, write_source

# (field of the row, character, the staged column it lands in) per format: every format carries a
# name and a value; comments exist in CSV, FHIR and MIMIC.
CASES = [
    ("comment", "\x00", "comment"),
    ("value", "4.\x001", "value"),
    ("name", "Potassium\x1b[31m", "test_name"),
    ("unit", "mmol/L\x07", "unit"),
    ("pid", "P\x001", "patient_id"),
    ("name", "Potassium\x85\x9b", "test_name"),  # C1 control after a NEL (a space)
]


def _applies(fmt: str, field: str) -> bool:
    return not (field == "comment" and fmt in ("omop", "synthea"))  # those formats have no comment


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("field,char,column", CASES)
def test_control_character_quarantines_the_row_in_every_format(tmp_path, fmt, field, char, column):
    if not _applies(fmt, field):
        pytest.skip(f"{fmt} has no {field}")
    store = open_store(tmp_path / "lab.duckdb")
    bad = {"pid": "10002", "t": "2024-01-02 08:00:00", "loinc": "2823-3", field: char}
    if field == "pid" and fmt in ("omop", "mimic"):
        bad["pid"] = "1000\x002"  # numeric person ids
    if fmt == "mimic":
        bad["local"] = "51000"  # its own item: a MIMIC test name belongs to the item
    good = {"pid": "10001", "t": "2024-01-01 08:00:00", "loinc": "2823-3", "comment": "tab\tand\r\nnew line"}
    src = write_source(fmt, tmp_path / "in", [good, bad])
    s = run_import(store, src, fmt=fmt)
    assert (s.rows_loaded, s.rows_quarantined) == (1, 1), s.quarantine_reasons
    assert s.rows_loaded + s.rows_quarantined + s.rows_skipped == s.rows_read
    with store.read() as cur:
        (row, col, reason), = cur.execute("SELECT source_row, column_name, reason FROM quarantine").fetchall()
        stored = cur.execute("SELECT string_agg(concat_ws('|', patient_id, analyte_name, value_text, unit, comment)) "
                             "FROM lab_results").fetchone()[0]
    assert row == 2 and col == column
    code = next(c for c in (bad.get(field) or "") if c in CONTROL_CHARS)
    assert f"U+{ord(code):04X}" in reason and f"'{column}'" in reason
    assert not any(c in stored for c in CONTROL_CHARS)


CONTROL_CHARS = {chr(c) for c in [*range(0, 9), *range(14, 32), *range(127, 133), *range(134, 160)]}


def test_the_rule_covers_exactly_the_non_whitespace_controls():
    import re
    import unicodedata

    rx = re.compile(CONTROL_CHARACTERS)
    for c in range(0x110000):
        ch = chr(c)
        expected = unicodedata.category(ch) == "Cc" and ch not in "\t\n\v\f\r\x85"
        assert bool(rx.fullmatch(ch)) == expected, hex(c)
    assert CONTROL_CHARS == {chr(c) for c in range(0x110000) if rx.fullmatch(chr(c))}


def test_whitespace_controls_keep_their_meaning(store, tmp_path):
    """A tab or line break inside a comment is text; around an id it is a space (data.identifiers)."""
    f = write_source("csv", tmp_path / "in", [
        {"pid": "\tP1\r", "t": "2024-01-01 08:00", "loinc": "2823-3", "comment": "line one\r\nline\ttwo"}])
    s = run_import(store, f)
    assert (s.rows_loaded, s.rows_quarantined) == (1, 0)
    tl = queries.timeline(store, "P1")
    assert tl["comment"].tolist() == ["line one\r\nline\ttwo"]
