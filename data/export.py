"""The one way LabTrend writes CSV: spreadsheet formulas neutralised in every cell.

Every CSV the product writes goes through :func:`write_csv` (a file or a stream: the CLI's
``timeline``/``patients``/``batches --format csv``, ``quarantine``, ``forecast``, ``annotations
export``, the synthetic cohort) or :func:`csv_bytes` (every dashboard download button); no
other module calls ``DataFrame.to_csv`` or the ``csv`` writer (``tests/test_export.py`` checks
the source tree).

A text cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return is run as a
formula by spreadsheet programs (OWASP, "CSV Injection",
https://owasp.org/www-community/attacks/CSV_Injection): such a cell is prefixed with a single
quote, which the spreadsheet shows as text. Header names get the same treatment. Numbers are
left as numbers, and so is text that is a plain number ('-3', '+1.5e-2': no formula can hide
in it), so a base excess of -3 stays -3. Lines end with CRLF (RFC 4180), so that a cell
holding a carriage return is quoted and cannot split a row in a spreadsheet.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import TextIO

import pandas as pd

__all__ = ["FORMULA_TRIGGERS", "neutralise", "neutralise_formulas", "csv_text", "csv_bytes", "write_csv",
           "write_safe_csv", "quarantine_table"]

#: Characters that make a spreadsheet read a cell as a formula (OWASP CSV Injection).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def neutralise(value):
    """``value`` safe for a spreadsheet cell: a text starting with a formula trigger gets a
    leading single quote (plain numbers written as text excepted); anything else unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def neutralise_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells and header names cannot be read as spreadsheet formulas."""
    out = df.copy()
    for col in out.columns:
        s = out[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype):
            out[col] = s.astype(object).map(neutralise)
    out.columns = [neutralise(c) if isinstance(c, str) else c for c in out.columns]
    return out


def _options(kwargs: dict) -> dict:
    kwargs.setdefault("lineterminator", "\r\n")  # RFC 4180; a cell with a bare CR is then quoted
    return kwargs


def csv_text(df: pd.DataFrame, **to_csv_kwargs) -> str:
    """``df`` as CSV text (no index, CRLF line ends), formulas neutralised."""
    buf = io.StringIO()
    neutralise_formulas(df).to_csv(buf, index=False, **_options(to_csv_kwargs))
    return buf.getvalue()


def csv_bytes(df: pd.DataFrame, **to_csv_kwargs) -> bytes:
    """``df`` as UTF-8 CSV bytes, formulas neutralised: the data of every dashboard download button."""
    return csv_text(df, **to_csv_kwargs).encode("utf-8")


def write_csv(df: pd.DataFrame, target: str | Path | TextIO | None = None, **to_csv_kwargs) -> None:
    """Write ``df`` as CSV (no index, formulas neutralised) to a path (UTF-8; parent folders
    made; ``.gz`` compressed) or an open text stream (``None``: standard output).

    ``to_csv_kwargs`` go to :meth:`pandas.DataFrame.to_csv` (``float_format``, ``compression``).
    """
    safe = neutralise_formulas(df)
    to_csv_kwargs = _options(to_csv_kwargs)
    if target is None or hasattr(target, "write"):
        safe.to_csv(target if target is not None else sys.stdout, index=False, **to_csv_kwargs)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_csv_kwargs.setdefault("encoding", "utf-8")
    safe.to_csv(path, index=False, **to_csv_kwargs)


def write_safe_csv(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` as UTF-8 CSV with formulas neutralised (:func:`write_csv`)."""
    write_csv(df, path)


def quarantine_table(df: pd.DataFrame) -> pd.DataFrame:
    """Quarantined rows with the raw row spread into its own columns (for fixing and re-import).

    ``df`` is :func:`data.queries.quarantine_rows`'s frame; returns ``batch_id, file, row,
    column, reason`` followed by the source columns as given.
    """
    import json

    raw = pd.DataFrame([json.loads(r) if isinstance(r, str) else {} for r in df.get("raw_row", [])], index=df.index)
    raw = raw.drop(columns=[c for c in ("source_row",) if c in raw.columns])
    base = df.drop(columns=["raw_row"]) if "raw_row" in df.columns else df
    return pd.concat([base, raw.add_prefix("raw_")], axis=1)
