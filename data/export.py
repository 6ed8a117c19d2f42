"""Writing tables for spreadsheets safely.

A cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return is run as a
formula by spreadsheet programs (OWASP "CSV Injection"); such text cells are prefixed
with a single quote. Numbers are left as numbers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["neutralise_formulas", "csv_bytes", "write_safe_csv"]

_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _safe(v):
    if isinstance(v, str) and v.startswith(_TRIGGERS):
        return "'" + v
    return v


def neutralise_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells cannot be read as spreadsheet formulas."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(_safe)
    return out


def csv_bytes(df: pd.DataFrame) -> bytes:
    """``df`` as UTF-8 CSV bytes with formulas neutralised: every CSV the product writes (files and
    dashboard downloads) goes through here."""
    return neutralise_formulas(df).to_csv(index=False).encode("utf-8")


def write_safe_csv(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` as UTF-8 CSV with formulas neutralised (:func:`csv_bytes`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(csv_bytes(df))


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
