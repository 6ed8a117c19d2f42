"""One rounding rule for every number a clinician reads: the analyte's reporting precision.

Laboratories report each analyte with a fixed number of decimals (potassium 4.1 mmol/L,
sodium 136 mmol/L, creatinine 1.0 mg/dL). Charts, tables, forecasts, recommendations,
explanations and anomaly texts print values with that precision, so "7.912 mmol/L",
"128.9 mmol/L" or "21.94 mg/dL" never appear next to results reported as 7.9, 129 and 21.9.

* :func:`reporting_decimals` - the decimals of an analyte in its canonical unit, from
  ``data/reference/reporting_precision.csv`` (derived, with a source per row, from the values
  as MIMIC-IV demo's laboratory reported them).
* :func:`decimals_from_reported` - the same rule applied to values as a file reported them,
  for analytes the file does not list (local codes, analytes absent from MIMIC-IV demo).
* :func:`decimals_by_code` and :func:`reported_precision` - for a patient's analytes the file
  does not list: the decimals of their values as reported, in effect while formatting (a
  context, safe across threads).
* :func:`format_value` / :func:`format_quantity` / :func:`format_change` - the formatting.

Rounding is half away from zero on the decimal representation of the value (4.05 -> 4.1, as
laboratory information systems round), never binary half-to-even (``round(4.05, 1) == 4.0``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
from collections.abc import Iterable, Iterator
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

import numpy as np
import pandas as pd

__all__ = [
    "MIN_SHARE",
    "FALLBACK_SIGNIFICANT",
    "reporting_decimals",
    "decimals_from_reported",
    "text_decimals",
    "decimals_by_code",
    "reported_precision",
    "format_value",
    "format_quantity",
    "format_change",
]

# A decimal count is the analyte's precision when at least this share of reported values shows
# it (part of MIMIC-IV's export drops trailing zeros: "2" for "2.0"). Same rule as the file's.
MIN_SHARE = 0.10
# Analytes without a known precision: this many significant digits (integers are never cut).
FALLBACK_SIGNIFICANT = 3
_NUMBER = re.compile(r"^\s*[<>]?=?\s*-?\d+(?:\.(\d+))?\s*$")


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, int]:
    from data.catalogue import reference_file

    frame = pd.read_csv(reference_file("reporting_precision.csv"), dtype={"code": str, "unit": str},
                        keep_default_na=False)
    expected = ["code", "decimals", "unit", "source"]
    if list(frame.columns) != expected:
        raise ValueError(f"reporting_precision.csv: columns {list(frame.columns)} != {expected}")
    out = {}
    for r in frame.itertuples(index=False):
        if not str(r.source).strip():
            raise ValueError(f"reporting_precision.csv: {r.code} has no source")
        if str(r.decimals).strip() == "":
            continue  # not sourced: the caller falls back to the decimals as reported
        d = int(r.decimals)
        if not 0 <= d <= 6:
            raise ValueError(f"reporting_precision.csv: {r.code} decimals {d} outside 0..6")
        out[str(r.code)] = d
    return out


def reporting_decimals(code: str | None) -> int | None:
    """Decimals the analyte ``code`` (LOINC) is reported with in its canonical unit, or None when unknown.

    Source: ``data/reference/reporting_precision.csv`` (MIMIC-IV Clinical Database Demo v2.2,
    decimals as reported per item, rule :data:`MIN_SHARE`). Raises ``ValueError`` when the
    file is malformed.
    """
    return _table().get(str(code)) if code is not None else None


def decimals_from_reported(values: Iterable) -> int | None:
    """The reporting precision shown by values as a file reported them (e.g. ``['4.1', '3.95', '4']``).

    The largest number of decimals found in at least :data:`MIN_SHARE` of the numeric strings
    (comparators such as ``'<0.05'`` count; text such as ``'HEMOLYZED'`` is ignored); None
    when no value is a number.
    """
    counts: dict[int, int] = {}
    n = 0
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        m = _NUMBER.match(str(v))
        if not m:
            continue
        d = len(m.group(1) or "")
        counts[d] = counts.get(d, 0) + 1
        n += 1
    if not n:
        return None
    return max(d for d, c in counts.items() if c >= MIN_SHARE * n)


_REPORTED: contextvars.ContextVar[dict] = contextvars.ContextVar("labtrend_reported_decimals", default={})


SAMPLE_ROWS = 20_000  # reports read per call at most (evenly spread over the rows): a long series says the same
_NUMBER_TEXT = r"^\s*(?:[<>]=?|[≤≥])?\s*[+-]?\d+(?:[.,](\d+))?\s*$"


def text_decimals(texts: pd.Series) -> pd.Series:
    """Digits after the decimal mark of each value as reported (``'4.10'`` -> 2, ``'136'`` -> 0,
    ``'< 0.5'`` -> 1, ``'13,4'`` -> 1); ``<NA>`` for a text that is not a plain number (``'HEMOLYZED'``, ``''``).

    ``texts``: any length; returns nullable integers (``Int64``) on the same index.
    """
    s = texts.astype("string")
    digits = s.str.extract(_NUMBER_TEXT, expand=False)
    number = s.str.match(_NUMBER_TEXT, na=False)
    return digits.str.len().astype("Int64").fillna(0).where(number, pd.NA).astype("Int64")


def decimals_by_code(timeline: pd.DataFrame, every_analyte: bool = False) -> dict[str, int]:
    """Per analyte without a catalogue precision: the decimals of its values as the laboratory reported them.

    The decimals of each reported value (:func:`text_decimals` of ``value_text``) move by the order of
    magnitude of its conversion to the canonical unit (creatinine ``88`` umol/L -> mg/dL, factor 0.0113:
    0 + 2 decimals; glucose ``5.6`` mmol/L -> mg/dL, factor 18: 1 - 1 = 0), clipped to 0..6; an analyte's
    precision is then the largest such count found in at least :data:`MIN_SHARE` of its results (as for
    ``reporting_precision.csv``). Beyond :data:`SAMPLE_ROWS` rows an even sample is read.

    Args:
        timeline: :data:`data.queries.TIMELINE_COLUMNS` rows (``analyte_code``, ``value_text``,
            ``value_num``, ``value_canonical``), any number of patients.
        every_analyte: also analytes the catalogue lists (the precision this site reports them with).
    Returns:
        ``{analyte_code: decimals}`` for analytes with at least one plain-number report.
    """
    if timeline is None or timeline.empty or "value_text" not in timeline:
        return {}
    t = timeline
    if not every_analyte:
        t = t[~t["analyte_code"].astype(str).isin(list(_table()))]
    if t.empty:
        return {}
    if len(t) > SAMPLE_ROWS:
        t = t.iloc[np.linspace(0, len(t) - 1, SAMPLE_ROWS).astype(np.int64)]
    d = text_decimals(t["value_text"]).to_numpy(dtype=float, na_value=np.nan)
    if "value_num" in t and "value_canonical" in t:
        num = pd.to_numeric(t["value_num"], errors="coerce").to_numpy(float)
        can = pd.to_numeric(t["value_canonical"], errors="coerce").to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.abs(can / num)
            ok = np.isfinite(ratio) & (ratio > 0)
            shift = np.where(ok, -np.round(np.log10(np.where(ok, ratio, 1.0))), 0.0)
        d = d + shift
    frame = pd.DataFrame({"code": t["analyte_code"].astype(str).to_numpy(object), "d": np.clip(d, 0, 6)})
    frame = frame.dropna(subset=["d"])
    if frame.empty:
        return {}
    counts = frame.groupby(["code", "d"]).size().rename("n").reset_index()
    counts["share"] = counts["n"] / counts.groupby("code")["n"].transform("sum")
    kept = counts[counts["share"] >= MIN_SHARE]
    return {str(c): int(v) for c, v in kept.groupby("code")["d"].max().items()}


@contextlib.contextmanager
def reported_precision(decimals: dict[str, int]) -> Iterator[None]:
    """Within the block, :func:`format_value` uses ``decimals[code]`` for analytes the catalogue has no
    precision for (e.g. ``decimals_by_code(timeline)``); the catalogue's precision still wins."""
    token = _REPORTED.set(dict(decimals))
    try:
        yield
    finally:
        _REPORTED.reset(token)


def _decimals(code, value: float, decimals: int | None) -> int:
    if decimals is not None:
        return int(decimals)
    d = reporting_decimals(code)
    if d is not None:
        return d
    d = _REPORTED.get().get(str(code)) if code is not None else None
    if d is not None:
        return int(d)
    if value == 0:
        return 0
    return max(0, FALLBACK_SIGNIFICANT - 1 - int(math.floor(math.log10(abs(value)))))


def format_value(code: str | None, value, decimals: int | None = None) -> str:
    """``value`` (canonical unit of ``code``) as text with the analyte's reporting precision.

    ``decimals`` overrides the catalogue (e.g. :func:`decimals_from_reported` for a local
    code); then the catalogue, then the decimals as reported (:func:`reported_precision`);
    without any, :data:`FALLBACK_SIGNIFICANT` significant digits. Missing or
    non-finite values give ``''``. Examples: potassium 7.912 -> ``'7.9'``, sodium 128.9 ->
    ``'129'``, creatinine 2.05 -> ``'2.1'`` (half away from zero).
    """
    if value is None:
        return ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(x):
        return ""
    d = _decimals(code, x, decimals)
    try:
        q = Decimal(repr(x)).quantize(Decimal(1).scaleb(-d), rounding=ROUND_HALF_UP)
    except InvalidOperation:  # beyond Decimal's default precision: a huge value, print it whole
        return f"{x:.{d}f}"
    if q == 0:
        q = abs(q)  # never '-0.0'
    text = f"{q:f}"
    if _fallback(code, decimals) and "." in text:  # significant digits only: no precision is claimed (4.2, not 4.20)
        text = text.rstrip("0").rstrip(".")
    return text


def _fallback(code, decimals) -> bool:
    """True when no precision is known for ``code`` (:func:`format_value` falls back to significant digits)."""
    if decimals is not None or reporting_decimals(code) is not None:
        return False
    return code is None or _REPORTED.get().get(str(code)) is None


def format_quantity(code: str | None, value, unit: str | None, decimals: int | None = None) -> str:
    """``format_value`` followed by the unit (omitted when dimensionless ``'1'`` or missing): ``'6.8 mmol/L'``."""
    text = format_value(code, value, decimals)
    if not text:
        return ""
    return f"{text} {unit}" if unit and str(unit) != "1" else text


def format_change(code: str | None, delta, decimals: int | None = None) -> str:
    """A signed change with the analyte's precision: ``'+0.3'``, ``'-12'`` (``'0'`` when it rounds to zero)."""
    text = format_value(code, delta, decimals)
    if not text or text.lstrip("-").strip("0.") == "":
        return text.lstrip("-")
    return text if text.startswith("-") else "+" + text
