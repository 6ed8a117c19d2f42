"""Property tests of the value parser: Python and DuckDB forms agree, numbers are never invented."""

from __future__ import annotations

import math

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.values import COMPARATORS, other_decimal_mark, other_decimal_mark_sql, parse_value, value_select_sql

_CON = duckdb.connect()


def _sql(texts, decimal="."):
    _CON.execute("CREATE OR REPLACE TEMP TABLE vt AS SELECT unnest(?::VARCHAR[]) AS v, generate_subscripts(?::VARCHAR[], 1) AS i",
                 [texts, texts])
    rows = _CON.execute(
        f"SELECT value_kind, value_comparator, value_number FROM ({value_select_sql('vt', 'v', decimal)}) ORDER BY i"
    ).fetchall()
    return rows


finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e12, max_value=1e12)
comparators = st.sampled_from(["", "<", "<=", ">", ">=", "≤", "≥"])
spaces = st.sampled_from(["", " ", "  ", "\t"])


@given(finite, comparators, spaces, spaces)
def test_number_with_comparator_round_trips(x, cmp, s1, s2):
    text = f"{s1}{cmp}{s2}{x!r}{s1}"
    p = parse_value(text)
    assert p.number == x or (x == 0 and p.number == 0)
    expected = {"": "=", "≤": "<=", "≥": ">="}.get(cmp, cmp)
    assert p.comparator == expected
    assert p.kind == ("numeric" if expected == "=" else "censored")


@given(st.text(max_size=30))
def test_never_nan_never_zero_from_text(text):
    p = parse_value(text)
    assert p.kind in {"numeric", "censored", "text", "empty"}
    if p.number is not None:
        assert math.isfinite(p.number)
        assert p.comparator in COMPARATORS
        assert any(ch.isdigit() for ch in text)  # a number only comes from digits
    else:
        assert p.comparator is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.text(alphabet=st.sampled_from(list("0123456789.,<>=≤≥+-eE \tNaNinf")), max_size=12),
    st.text(max_size=8)), min_size=1, max_size=20), st.sampled_from([".", ","]))
def test_sql_and_python_agree(texts, decimal):
    got = _sql(texts, decimal)
    for t, (kind, cmp, num) in zip(texts, got):
        p = parse_value(t, decimal)
        assert (kind, cmp) == (p.kind, p.comparator), t
        assert (num is None and p.number is None) or num == pytest.approx(p.number, rel=1e-12), t


@pytest.mark.parametrize("text,kind,cmp,num", [
    ("<10", "censored", "<", 10.0), ("< 0.001", "censored", "<", 0.001), (">100", "censored", ">", 100.0),
    ("HEMOLYZED", "text", None, None), ("see note", "text", None, None), ("NEG", "text", None, None),
    ("", "empty", None, None), (None, "empty", None, None), ("nan", "text", None, None), ("inf", "text", None, None),
    ("1e999", "text", None, None), ("1.5 mmol/L", "text", None, None), ("-0", "numeric", "=", 0.0),
])
def test_examples(text, kind, cmp, num):
    p = parse_value(text)
    assert (p.kind, p.comparator, p.number) == (kind, cmp, num)


def test_decimal_comma():
    assert parse_value("13,4", decimal=",").number == 13.4
    assert parse_value("13.4", decimal=",").kind == "text"
    with pytest.raises(ValueError, match="decimal must be"):
        parse_value("1", decimal=";")
    with pytest.raises(ValueError, match="decimal must be"):
        value_select_sql("t", "v", decimal=";")


@pytest.mark.parametrize("text,decimal,expected", [
    ("4.5", ",", True), ("<0.5", ",", True), ("4,5", ",", False), ("HEMOLYZED", ",", False), ("1.5 mmol/L", ",", False),
    ("4,5", ".", True), ("1,234", ".", True), ("> 1,5", ".", True), ("4.5", ".", False), ("1,234.5", ".", False),
    ("see note, hemolysed", ".", False), ("", ".", False), (None, ",", False), ("nan", ",", False),
])
def test_other_decimal_mark(text, decimal, expected):
    assert other_decimal_mark(text, decimal) is expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="0123456789.,<>= -eE", max_size=8), min_size=1, max_size=30),
       st.sampled_from([".", ","]))
def test_other_decimal_mark_sql_and_python_agree(texts, decimal):
    con = duckdb.connect()
    got = [r[0] for r in con.execute(
        f"SELECT {other_decimal_mark_sql('v', decimal)} FROM (SELECT unnest(?::VARCHAR[]) AS v, "
        "generate_subscripts(?::VARCHAR[], 1) AS i) ORDER BY i", [texts, texts]).fetchall()]
    assert got == [other_decimal_mark(t, decimal) for t in texts]
