"""Reading result values as exported: numbers, censored numbers, text.

One rule, written once in two forms that are tested against each other (hypothesis):
``parse_value`` for Python and ``value_select_sql`` for DuckDB (bulk imports).

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

__all__ = ["ParsedValue", "parse_value", "value_select_sql", "plain_number_sql", "other_mark", "other_decimal_mark",
           "other_decimal_mark_sql", "COMPARATORS", "NUMBER_PATTERN"]

COMPARATORS = ("=", "<", "<=", ">", ">=")

# RE2- and Python-compatible. Group 1: comparator; group 2: the number.
WHITESPACE = " \t\r\n\f\v"
NUMBER_PATTERN = r"^[ \t\r\n\f\v]*(<=|>=|<|>|≤|≥)?[ \t\r\n\f\v]*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)[ \t\r\n\f\v]*$"
_NUMBER = re.compile(NUMBER_PATTERN)
_UNICODE_CMP = {"≤": "<=", "≥": ">="}


def other_mark(decimal: str) -> str:
    """The decimal mark that is not ``decimal`` ('.' <-> ',').

    Raises ValueError for a ``decimal`` other than '.' or ','.
    """
    if decimal not in (".", ","):
        raise ValueError(f"decimal must be '.' or ',', got {decimal!r}")
    return "." if decimal == "," else ","


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


SIMPLE_NUMBER_PATTERN = r"[0-9]{1,15}(\.[0-9]{1,15})?"


def value_select_sql(relation: str, column: str, decimal: str = ".") -> str:
    """A DuckDB SELECT over ``relation`` adding ``value_kind``, ``value_comparator`` and
    ``value_number`` — the same answers as :func:`parse_value` for ``column``.

    Plain unsigned decimals (the bulk of any export) take a fast path (a cast); everything
    else goes through one regular-expression extraction. ``relation`` and ``column`` must
    be trusted identifiers (the importer's own staging names), never user input.

    Raises ValueError for a ``decimal`` other than '.' or ','.
    """
    if decimal not in (".", ","):
        raise ValueError(f"decimal must be '.' or ',', got {decimal!r}")
    src = column if decimal == "." else f"(CASE WHEN contains({column}, '.') THEN NULL ELSE replace({column}, ',', '.') END)"
    pat = NUMBER_PATTERN.replace("'", "''")
    ws = "chr(32) || chr(9) || chr(13) || chr(10) || chr(12) || chr(11)"
    return f"""
        SELECT * EXCLUDE (_src, _simple, _g),
               CASE WHEN _simple THEN _src::DOUBLE + 0.0
                    WHEN NULLIF(_g.num, '') IS NOT NULL AND isfinite(TRY_CAST(_g.num AS DOUBLE))
                    THEN TRY_CAST(_g.num AS DOUBLE) + 0.0 END AS value_number,
               CASE WHEN _simple THEN '='
                    WHEN NULLIF(_g.num, '') IS NULL OR NOT isfinite(TRY_CAST(_g.num AS DOUBLE)) THEN NULL
                    WHEN _g.cmp = '' THEN '=' WHEN _g.cmp = '≤' THEN '<=' WHEN _g.cmp = '≥' THEN '>='
                    ELSE _g.cmp END AS value_comparator,
               CASE WHEN _simple THEN 'numeric'
                    WHEN {column} IS NULL OR trim({column}, {ws}) = '' THEN 'empty'
                    WHEN NULLIF(_g.num, '') IS NULL OR NOT isfinite(TRY_CAST(_g.num AS DOUBLE)) THEN 'text'
                    WHEN _g.cmp IN ('', '=') THEN 'numeric' ELSE 'censored' END AS value_kind
        FROM (
            SELECT *, CASE WHEN _simple THEN NULL ELSE regexp_extract(_src, '{pat}', ['cmp', 'num']) END AS _g
            FROM (SELECT *, {src} AS _src, COALESCE(regexp_full_match({src}, '{SIMPLE_NUMBER_PATTERN}'), false) AS _simple
                  FROM {relation})
        )
    """


def plain_number_sql(column: str, decimal: str = ".") -> str:
    """DuckDB expression: ``column`` as a finite DOUBLE when it is a plain number written with
    the file's decimal mark, else NULL.

    For reference-interval limits, which exports give as plain numbers. A '.' in a
    decimal-comma file (``4.000``) or a ',' in a decimal-point file (``1,234``) is not read:
    it may separate thousands (the importer quarantines such a limit).
    """
    if decimal == ".":
        src = f"(CASE WHEN contains({column}, ',') THEN NULL ELSE trim({column}) END)"
    else:
        src = f"(CASE WHEN contains({column}, '.') THEN NULL ELSE replace(trim({column}), ',', '.') END)"
    return f"(CASE WHEN isfinite(TRY_CAST({src} AS DOUBLE)) THEN TRY_CAST({src} AS DOUBLE) END)"


def other_decimal_mark(text: str | None, decimal: str = ".") -> bool:
    """True when ``text`` is a number only when read with the other decimal mark: ``'4.5'`` in
    a decimal-comma file, ``'4,5'`` in a decimal-point file.

    Such a value is ambiguous (``'4.500'`` is 4500 where '.' separates thousands, ``'1,234'``
    is 1234 where ',' does), so the importer quarantines it rather than guess; it is never
    read as a number. :func:`other_decimal_mark_sql` is the same rule for DuckDB.

    Raises ValueError for a ``decimal`` other than '.' or ','.
    """
    other = other_mark(decimal)
    if text is None:
        return False
    s = str(text)
    return other in s and parse_value(s, decimal=other).kind in ("numeric", "censored")


def other_decimal_mark_sql(column: str, decimal: str = ".") -> str:
    """DuckDB boolean expression of :func:`other_decimal_mark` on the VARCHAR ``column``
    (a trusted identifier); false for NULL."""
    other_mark(decimal)  # validates
    pat = NUMBER_PATTERN.replace("'", "''")
    if decimal == ",":
        cond, src = f"contains({column}, '.')", column
    else:
        cond, src = f"contains({column}, ',') AND NOT contains({column}, '.')", f"replace({column}, ',', '.')"
    number = f"TRY_CAST(NULLIF(regexp_extract({src}, '{pat}', 2), '') AS DOUBLE)"
    # CASE, not AND: DuckDB evaluates both sides of an AND for every row, and the regular
    # expression would then run on all 10 million values of a benchmark import (+2 s)
    return f"CASE WHEN {cond} THEN COALESCE(isfinite({number}), false) ELSE false END"
