"""One rounding rule for every number the dashboard shows: the analyte's reporting precision.

A value, a reference limit, a forecast quantile, a change or an attribution of one analyte is
written with as many decimals as the laboratory writes that analyte's results: sodium
``136`` (0 decimals), potassium ``4.1`` (1), creatinine ``0.84`` (2). Charts (hover, labels),
tables, forecasts, review cards and explanation bars all format through :func:`fmt`, with the
decimals from :func:`reporting_decimals`, so the same number reads the same everywhere.

**Source of the precision: the reports themselves.** No reference file gives a reporting
precision per analyte and laboratory, and precision differs between laboratories and
analysers, so it is read from the results as reported (``value_text``): the number of digits
after the decimal mark (``'4.10'`` -> 2, ``'<0.5'`` -> 1, ``'136'`` -> 0; text results such as
``HEMOLYZED`` say nothing). When the value was converted to the analyte's canonical unit, the
decimals move by the order of magnitude of the conversion factor (glucose ``100`` mg/dL ->
mmol/L, factor 0.0555: 0 + 1 decimals, ``5.6``; creatinine ``88`` umol/L -> mg/dL, factor
0.0113: 0 + 2, ``1.00``). The precision of an analyte is the most frequent of its results'
decimals (ties: the finer one), clipped to 0-:data:`MAX_DECIMALS`. An analyte with no readable
report falls back to three significant digits (:func:`fmt` with ``decimals=None``).

This module is the one place to swap for a site's own precision table (e.g. a ``clinical/``
formatting function): every caller goes through :func:`reporting_decimals` and :func:`fmt`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["MAX_DECIMALS", "text_decimals", "reporting_decimals", "decimals_for", "fmt", "fmt_signed"]

MAX_DECIMALS = 4
SAMPLE_ROWS = 20_000  # reports read per call at most (evenly spread); an analyte's precision is its most frequent
_NUMBER = r"^\s*(?:[<>]=?|[≤≥])?\s*[+-]?\d+(?:[.,](\d+))?\s*$"


def text_decimals(texts: pd.Series) -> pd.Series:
    """Digits after the decimal mark of each reported value (``'4.10'`` -> 2, ``'136'`` -> 0,
    ``'< 0.5'`` -> 1); ``<NA>`` for a text that is not a plain number (``'HEMOLYZED'``, ``''``).

    Args:
        texts: the results as reported (``value_text``), any length.
    Returns:
        Nullable integers (``Int64``), same index.
    """
    s = texts.astype("string")
    m = s.str.extract(_NUMBER, expand=False)
    number = s.str.match(_NUMBER, na=False)
    out = m.str.len().astype("Int64").fillna(0)
    return out.where(number, pd.NA).astype("Int64")


def reporting_decimals(results: pd.DataFrame) -> dict[str, int]:
    """``{analyte_code: decimals}`` for the canonical unit, from the results as reported (module docstring).

    Args:
        results: rows with ``analyte_code, value_text, value_num, value_canonical``
            (:data:`data.queries.TIMELINE_COLUMNS`); any number of patients. Beyond
            :data:`SAMPLE_ROWS` rows an even sample of them is read.
    Returns:
        One entry per analyte with at least one plain-number report; analytes without one
        are absent (callers then pass ``None`` to :func:`fmt`).
    """
    if results is None or results.empty:
        return {}
    if len(results) > SAMPLE_ROWS:  # a long series: an even sample over time says the same, 5x faster
        results = results.iloc[np.linspace(0, len(results) - 1, SAMPLE_ROWS).astype(np.int64)]
    d = text_decimals(results["value_text"])
    num = pd.to_numeric(results["value_num"], errors="coerce").to_numpy(float)
    can = pd.to_numeric(results["value_canonical"], errors="coerce").to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(can / num)
        shift = np.where(np.isfinite(ratio) & (ratio > 0), -np.round(np.log10(np.where(ratio > 0, ratio, 1.0))), 0.0)
    frame = pd.DataFrame({"code": results["analyte_code"].to_numpy(object), "d": d.to_numpy(dtype=float, na_value=np.nan)})
    frame["d"] = np.clip(frame["d"] + shift, 0, MAX_DECIMALS)
    frame = frame.dropna(subset=["d"])
    if frame.empty:
        return {}
    counts = frame.groupby(["code", "d"]).size().reset_index(name="n")
    counts = counts.sort_values(["code", "n", "d"], ascending=[True, False, False])
    best = counts.drop_duplicates("code")
    return {str(c): int(v) for c, v in zip(best["code"], best["d"])}


def decimals_for(decimals: dict | None, code) -> int | None:
    """The decimals of ``code`` in a :func:`reporting_decimals` map (None when unknown)."""
    if not decimals or code is None:
        return None
    return decimals.get(str(code))


def _significant(v: float) -> str:
    """The fallback without a known precision: 3 significant digits, whole numbers from 1000."""
    if abs(v) >= 1000:
        return f"{v:.0f}"
    s = f"{v:.3g}" if abs(v) < 10 else f"{v:.4g}"
    return s if "e" not in s else f"{v:.6f}".rstrip("0").rstrip(".")


def fmt(value, decimals: int | None = None) -> str:
    """A number with ``decimals`` digits after the point ('' for None/NaN/inf).

    ``decimals=None`` (precision unknown): three significant digits (``139``, ``4.1``,
    ``0.001``; ``1276103`` whole).
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(v):
        return ""
    if decimals is None:
        return _significant(v)
    s = f"{v:.{int(decimals)}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # never "-0.0"


def fmt_signed(value, decimals: int | None = None) -> str:
    """A change or an attribution with its sign (``+1.2``, ``-0.4``); one that rounds to zero at this
    precision is ``≈0`` (not ``+0.0683`` on an analyte reported in whole numbers)."""
    s = fmt(value, decimals)
    if not s:
        return ""
    if decimals is not None and float(s) == 0:
        return "≈0"
    return s if s.startswith("-") else "+" + s
