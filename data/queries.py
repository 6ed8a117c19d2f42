"""Read queries over the lab store (bound parameters only).

Every function takes a :class:`data.db.Store` and returns pandas objects; none keeps a
connection. Times are naive ``datetime64`` in the store's time base (UTC when the source
gave an offset, else as exported).
"""

from __future__ import annotations

import unicodedata
from datetime import datetime

import numpy as np
import pandas as pd

from data.db import Store

__all__ = [
    "TIMELINE_COLUMNS",
    "patient_key",
    "patients",
    "timeline",
    "cohort",
    "top_analytes",
    "batches",
    "quarantine_rows",
    "patient_info",
]

TIMELINE_COLUMNS = [
    "result_id", "patient_id", "specimen_id", "collected_at", "reported_at", "analyte_code", "loinc",
    "analyte_name", "value_text", "comparator", "value_num", "unit", "value_canonical", "unit_canonical",
    "ref_low", "ref_high", "ref_low_canonical", "ref_high_canonical", "flag", "comment", "result_kind",
    "implausible", "unit_missing", "conflicting", "batch_id", "source_row",
]


def patient_key(patient_id: str) -> str:
    """A patient id as the store keeps it: trimmed, Unicode NFC (as the importers store it)."""
    return unicodedata.normalize("NFC", str(patient_id).strip())


def patients(store: Store, search: str | None = None, limit: int = 500) -> pd.DataFrame:
    """Patients with result counts.

    Returns columns ``patient_id, sex, age_at_ref, ref_date, birth_date, n_results,
    n_abnormal (rows with an abnormal flag as given), n_implausible, first_result,
    last_result``, ordered by patient id. ``search`` matches a substring of the id.
    """
    sql = """
        SELECT p.patient_id, p.sex, p.age_at_ref, p.ref_date, p.birth_date,
               count(r.result_id) AS n_results,
               count(r.result_id) FILTER (WHERE r.flag IS NOT NULL AND lower(r.flag) NOT IN ('n', 'normal', '')) AS n_abnormal,
               count(r.result_id) FILTER (WHERE r.implausible) AS n_implausible,
               min(r.collected_at) AS first_result, max(r.collected_at) AS last_result
        FROM patients p LEFT JOIN lab_results r ON r.patient_id = p.patient_id
        WHERE (? IS NULL OR contains(lower(p.patient_id), lower(?)))
        GROUP BY ALL ORDER BY p.patient_id LIMIT ?
    """
    with store.read() as cur:
        return cur.execute(sql, [search, search, limit]).df()


def patient_info(store: Store, patient_id: str) -> dict | None:
    """One patient's demographics as a dict, or None when unknown."""
    with store.read() as cur:
        df = cur.execute("SELECT * FROM patients WHERE patient_id = ?", [patient_key(patient_id)]).df()
    return None if df.empty else df.iloc[0].to_dict()


def timeline(
    store: Store,
    patient_id: str,
    analytes: list[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """One patient's results, one row per result (:data:`TIMELINE_COLUMNS`), oldest first.

    ``analytes`` filters by analyte code (LOINC or local code); ``start``/``end`` bound
    ``collected_at`` (inclusive).
    """
    where, params = ["patient_id = ?"], [patient_key(patient_id)]
    if analytes is not None:
        where.append("list_contains(?::VARCHAR[], analyte_code)")
        params.append(list(analytes))
    if start is not None:
        where.append("collected_at >= ?::TIMESTAMP")
        params.append(start)
    if end is not None:
        where.append("collected_at <= ?::TIMESTAMP")
        params.append(end)
    sql = f"SELECT {', '.join(TIMELINE_COLUMNS)} FROM lab_results WHERE {' AND '.join(where)}"
    with store.read() as cur:
        arrays = cur.execute(sql, params).fetchnumpy()
    # A few hundred rows: numpy sorts them and builds the frame faster than DuckDB's ORDER BY
    # and pandas' reading of masked arrays (benchmarks/ingest.py, timeline latency).
    arrays = {k: _unmask(v) for k, v in arrays.items()}
    _, analyte_rank = np.unique(arrays["analyte_code"].astype(str), return_inverse=True)
    order = np.lexsort((arrays["result_id"], analyte_rank, arrays["collected_at"]))
    return pd.DataFrame({k: arrays[k][order] for k in TIMELINE_COLUMNS}, columns=TIMELINE_COLUMNS, copy=False)


def _unmask(a: np.ndarray) -> np.ndarray:
    """A DuckDB numpy column without its mask: NaN / NaT / NaN-in-object where NULL."""
    if not isinstance(a, np.ma.MaskedArray):
        return a
    if a.dtype.kind == "f":
        return a.filled(np.nan)
    if a.dtype.kind == "M":
        return a.filled(np.datetime64("NaT"))
    out = a.data.astype(object, copy=True)
    out[np.ma.getmaskarray(a)] = np.nan
    return out


def top_analytes(store: Store, n: int = 20, numeric_only: bool = True) -> pd.DataFrame:
    """The ``n`` analytes with most results: ``analyte_code, analyte_name, unit_canonical, n, n_patients``."""
    where = "WHERE value_canonical IS NOT NULL AND NOT implausible" if numeric_only else ""
    sql = f"""
        SELECT analyte_code, mode(analyte_name) AS analyte_name, mode(unit_canonical) AS unit_canonical,
               count(*) AS n, count(DISTINCT patient_id) AS n_patients
        FROM lab_results {where} GROUP BY analyte_code ORDER BY n DESC, analyte_code LIMIT ?
    """
    with store.read() as cur:
        return cur.execute(sql, [n]).df()


def cohort(
    store: Store,
    analytes: list[str] | None = None,
    exclude_patients: list[str] | None = None,
    patients: list[str] | None = None,
) -> pd.DataFrame:
    """The model-ready cohort: numeric and censored results in canonical units.

    One row per (patient, analyte, collection time); columns ``patient_id, collected_at,
    analyte_code, value (canonical unit), censor (-1: '<' or '<=', 0: exact, +1: '>' or
    '>='), unit_canonical, sex ('F'/'M'/None), age_years (at collection, NaN when unknown)``.

    Left out, by written rule: text and empty results, implausible values (possible entry
    errors), rows with a missing unit. Conflicting results at the same time keep the one
    reported last (``reported_at``, then the later import row).
    """
    sql = """
        WITH r AS (
            SELECT patient_id, collected_at, analyte_code, value_canonical AS value,
                   CASE WHEN comparator IN ('<', '<=') THEN -1 WHEN comparator IN ('>', '>=') THEN 1 ELSE 0 END AS censor,
                   unit_canonical,
                   row_number() OVER (PARTITION BY patient_id, analyte_code, collected_at
                                      ORDER BY reported_at DESC NULLS LAST, result_id DESC) AS rn
            FROM lab_results
            WHERE value_canonical IS NOT NULL AND NOT implausible AND NOT unit_missing
              AND isfinite(value_canonical)
              AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], analyte_code))
              AND (?::VARCHAR[] IS NULL OR NOT list_contains(?::VARCHAR[], patient_id))
              AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], patient_id))
        )
        SELECT r.patient_id, r.collected_at, r.analyte_code, r.value, r.censor::TINYINT AS censor, r.unit_canonical,
               p.sex,
               CASE WHEN p.birth_date IS NOT NULL THEN datediff('day', p.birth_date, r.collected_at) / 365.25
                    WHEN p.age_at_ref IS NOT NULL THEN p.age_at_ref + datediff('day', p.ref_date, r.collected_at) / 365.25
               END AS age_years
        FROM r LEFT JOIN patients p ON p.patient_id = r.patient_id
        WHERE r.rn = 1
        ORDER BY r.patient_id, r.collected_at, r.analyte_code
    """
    with store.read() as cur:
        return cur.execute(sql, [analytes, analytes, exclude_patients, exclude_patients, patients, patients]).df()


def batches(store: Store) -> pd.DataFrame:
    """All import batches, newest first."""
    with store.read() as cur:
        return cur.execute("SELECT * FROM import_batches ORDER BY batch_id DESC").df()


def quarantine_rows(store: Store, batch_id: int) -> pd.DataFrame:
    """Quarantined rows of one batch: ``batch_id, file, row, column, reason, raw_row``."""
    with store.read() as cur:
        return cur.execute(
            """
            SELECT q.batch_id, b.file_name AS file, q.source_row AS row, q.column_name AS "column", q.reason,
                   q.raw_row::VARCHAR AS raw_row
            FROM quarantine q JOIN import_batches b USING (batch_id)
            WHERE q.batch_id = ? ORDER BY q.source_row
            """,
            [batch_id],
        ).df()
