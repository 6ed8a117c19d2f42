"""The dashboard's side of the one rounding rule: every number of an analyte at its reporting precision.

The rule itself lives in :mod:`clinical.format` (charts, tables, forecasts, review cards, explanation
bars here; anomaly and recommendation texts there): the cited catalogue
(``data/reference/reporting_precision.csv``) first, else the decimals as the laboratory reported the
analyte (moved by the order of magnitude of any unit conversion), else three significant digits; rounding
half away from zero. This module only adapts it to the dashboard's calls: one ``{analyte_code: decimals}``
map per patient (:func:`reporting_decimals`) handed to the drawing code, and :func:`fmt` /
:func:`fmt_signed` for a number whose analyte is already resolved to its decimals.
"""

from __future__ import annotations

import pandas as pd

from clinical import format as cformat

__all__ = ["text_decimals", "reporting_decimals", "decimals_for", "fmt", "fmt_signed"]

text_decimals = cformat.text_decimals


def reporting_decimals(results: pd.DataFrame) -> dict[str, int]:
    """``{analyte_code: decimals}`` of the analytes in ``results`` (:data:`data.queries.TIMELINE_COLUMNS` rows):
    the catalogue's precision, else the decimals as reported (:func:`clinical.format.decimals_by_code`).
    Analytes with neither are absent (callers then pass ``None`` to :func:`fmt`: three significant digits)."""
    if results is None or results.empty:
        return {}
    out = cformat.decimals_by_code(results)
    for code in pd.unique(results["analyte_code"].astype(str)):
        d = cformat.reporting_decimals(code)
        if d is not None:
            out[code] = d
    return out


def decimals_for(decimals: dict | None, code) -> int | None:
    """The decimals of ``code`` in a :func:`reporting_decimals` map (None when unknown)."""
    if not decimals or code is None:
        return None
    return decimals.get(str(code))


def fmt(value, decimals: int | None = None) -> str:
    """A number with ``decimals`` digits after the point, rounded half away from zero ('' for None/NaN/inf);
    ``decimals=None``: three significant digits (``0.0683``; whole numbers never cut)."""
    return cformat.format_value(None, value, decimals)


def fmt_signed(value, decimals: int | None = None) -> str:
    """A change or an attribution with its sign (``+1.2``, ``-0.4``); one that rounds to zero at a known precision
    is ``≈0`` (not ``+0.0683`` on an analyte reported in whole numbers)."""
    s = fmt(value, decimals)
    if not s:
        return ""
    if decimals is not None and float(s) == 0:
        return "≈0"
    return s if s.startswith("-") else "+" + s
