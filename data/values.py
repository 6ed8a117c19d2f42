"""Reading result values as exported: numbers, censored numbers, text.

One rule, written once in two forms that are tested against each other (hypothesis):
``parse_value`` for Python and ``value_sql`` for DuckDB (bulk imports).

* ``"4.1"``            -> ('=', 4.1), kind 'numeric'
* ``"<0.5"``, ``"> 1000"``, ``"<= 3"``, ``"≥7"`` -> (comparator, number), kind 'censored'
* ``"HEMOLYZED"``, ``"NEG"``, ``"see note"``, ``"1.5 mmol/L"`` -> no number, kind 'text'
* ``""`` / missing     -> no number, kind 'empty'

A number is never invented: text is never read as 0, non-finite numbers (``nan``,
``inf``, ``1e999``) are text, and the original string is always kept by the caller.
With ``decimal=','`` the decimal mark is a comma (``13,4`` -> 13.4).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["ParsedValue", "parse_value", "value_sql", "COMPARATORS", "NUMBER_PATTERN"]

COMPARATORS = ("=", "<", "<=", ">", ">=")

# RE2- and Python-compatible. Group 1: comparator; group 2: the number.
WHITESPACE = " \t\r\n\f\v"
NUMBER_PATTERN = r"^[ \t\r\n\f\v]*(<=|>=|<|>|≤|≥)?[ \t\r\n\f\v]*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)[ \t\r\n\f\v]*$"
_NUMBER = re.compile(NUMBER_PATTERN)
_UNICODE_CMP = {"≤": "<=", "≥": ">="}


@dataclass(frozen=True)
class ParsedValue:
    kind: str  # 'numeric' | 'censored' | 'text' | 'empty'
    comparator: str | None  # one of COMPARATORS, None for text/empty
    number: float | None  # finite, None for text/empty


def parse_value(text: str | None, decimal: str = ".") -> ParsedValue:
    """Split a result string into (kind, comparator, number).

    Parameters
    ----------
    text : the result as exported (any type; None and blank mean empty).
    decimal : '.' or ',' — the file's decimal mark.

    Raises
    ------
    ValueError
        ``decimal`` is neither '.' nor ','.
    """
    if decimal not in (".", ","):
        raise ValueError(f"decimal must be '.' or ',', got {decimal!r}")
    if text is None:
        return ParsedValue("empty", None, None)
    s = str(text)
    if not s.strip(WHITESPACE):
        return ParsedValue("empty", None, None)
    if decimal == ",":
        if "." in s:
            return ParsedValue("text", None, None)
        s = s.replace(",", ".")
    m = _NUMBER.match(s)
    if not m:
        return ParsedValue("text", None, None)
    number = float(m.group(2))
    if not math.isfinite(number):
        return ParsedValue("text", None, None)
    if number == 0.0:
        number = 0.0  # no negative zero
    cmp = _UNICODE_CMP.get(m.group(1), m.group(1)) if m.group(1) else "="
    return ParsedValue("censored" if cmp != "=" else "numeric", cmp, number)


def value_sql(column: str, decimal: str = ".") -> dict[str, str]:
    """DuckDB expressions equivalent to :func:`parse_value` over a VARCHAR column.

    Returns a dict with SQL for ``kind``, ``comparator`` and ``number``. ``column`` must be
    a trusted identifier (it is the importer's own staging column, never user input).
    """
    if decimal not in (".", ","):
        raise ValueError(f"decimal must be '.' or ',', got {decimal!r}")
    src = column if decimal == "." else f"(CASE WHEN contains({column}, '.') THEN NULL ELSE replace({column}, ',', '.') END)"
    pat = NUMBER_PATTERN.replace("'", "''")
    groups = f"regexp_extract({src}, '{pat}', ['cmp', 'num'])"
    num = (
        f"(CASE WHEN regexp_full_match({src}, '{pat}') "
        f"AND isfinite(TRY_CAST({groups}.num AS DOUBLE)) "
        f"THEN TRY_CAST({groups}.num AS DOUBLE) + 0.0 END)"
    )
    cmp_raw = f"{groups}.cmp"
    comparator = (
        f"(CASE WHEN {num} IS NULL THEN NULL "
        f"WHEN {cmp_raw} = '' THEN '=' WHEN {cmp_raw} = '≤' THEN '<=' WHEN {cmp_raw} = '≥' THEN '>=' "
        f"ELSE {cmp_raw} END)"
    )
    kind = (
        f"(CASE WHEN {column} IS NULL OR trim({column}, chr(32) || chr(9) || chr(13) || chr(10) || chr(12) || chr(11)) = '' THEN 'empty' "
        f"WHEN {num} IS NULL THEN 'text' "
        f"WHEN {comparator} = '=' THEN 'numeric' ELSE 'censored' END)"
    )
    return {"kind": kind, "comparator": comparator, "number": num}
