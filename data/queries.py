"""Read queries over the lab store (bound parameters only).

Every function takes a :class:`data.db.Store` and returns pandas objects; none keeps a
connection. Times are naive ``datetime64``: UTC where ``utc_offset_min`` is known (the local
time at collection is ``collected_at + utc_offset_min``, :func:`data.timezones.local_time`),
else as exported (zone unknown). ``time_unknown`` marks a date given without a time (stored
as noon of that date), ``time_flag`` a local time in a skipped or repeated daylight-saving
hour, ``after_import`` a collection time later than its import.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from data.db import Store
from data.identifiers import patient_key

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
    "admissions",
]

TIMELINE_COLUMNS = [
    "result_id", "patient_id", "specimen_id", "collected_at", "reported_at", "analyte_code", "loinc",
    "analyte_name", "value_text", "comparator", "value_num", "unit", "value_canonical", "unit_canonical",
    "ref_low", "ref_high", "ref_low_canonical", "ref_high_canonical", "flag", "comment", "result_kind",
    "implausible", "unit_missing", "conflicting", "batch_id", "source_row",
    "local_code", "utc_offset_min", "time_unknown", "time_flag", "after_import",
]


def patients(store: Store, search: str | None = None, limit: int = 500) -> pd.DataFrame:
    """Patients with result counts.

    Returns columns ``patient_id, sex, age_at_ref, ref_date, birth_date, age_years (at the last
    result, else today: from the birth date, else from the age the source gave at its reference
    date), n_results, n_abnormal (flags H, L, HH, LL, A, AA), n_critical (HH, LL, AA),
    n_implausible, first_result, last_result``, ordered by patient id. Flags follow
    :mod:`clinical.flags` for every source: the file's flag, else its reference limits, else the
    catalogue's interval for the patient's sex and age; the critical value list always.
    ``search`` matches a substring of the id (cleaned as ids are: ``data.identifiers.patient_key``).
    """
    from clinical.flags import flag_counts_sql, register_reference

    sql = f"""
        WITH c AS ({flag_counts_sql()})
        SELECT p.patient_id, p.sex, p.age_at_ref, p.ref_date, p.birth_date,
               CASE WHEN p.birth_date IS NOT NULL
                        THEN (epoch(coalesce(c.last_result, now()::TIMESTAMP)) - epoch(p.birth_date::TIMESTAMP))
                             / 86400.0 / 365.25
                    WHEN p.age_at_ref IS NOT NULL
                        THEN p.age_at_ref + coalesce((epoch(coalesce(c.last_result, now()::TIMESTAMP))
                                                      - epoch(p.ref_date::TIMESTAMP)) / 86400.0 / 365.25, 0.0)
               END AS age_years,
               coalesce(c.n_results, 0) AS n_results, coalesce(c.n_abnormal, 0) AS n_abnormal,
               coalesce(c.n_critical, 0) AS n_critical, coalesce(c.n_implausible, 0) AS n_implausible,
               c.first_result, c.last_result
        FROM patients p LEFT JOIN c USING (patient_id)
        WHERE (? IS NULL OR contains(lower(p.patient_id), lower(?)))
        ORDER BY p.patient_id LIMIT ?
    """
    if search is not None:  # typed or pasted with the same invisible characters ids are cleaned of
        search = patient_key(search)
    with store.read() as cur:
        register_reference(cur)
        df = cur.execute(sql, [search, search, limit]).df()
    for c in ("n_results", "n_abnormal", "n_critical", "n_implausible"):
        df[c] = df[c].astype("int64")
    return df


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
    """One patient's results, one row per result (:data:`TIMELINE_COLUMNS`), oldest first
    (then by analyte code and import row).

    ``analytes`` filters by analyte code (LOINC or local code); ``start``/``end`` bound
    ``collected_at`` (inclusive). The rows and values are those of the ``lab_results`` view;
    they are read from ``results`` and joined here with the analyte keys, which this
    process keeps while its connection is open (a key row never changes once written).
    """
    where, params = ["patient_id = ?"], [patient_key(patient_id)]
    if analytes is not None:
        where.append("key_id IN (SELECT key_id FROM result_keys WHERE list_contains(?::VARCHAR[], analyte_code))")
        params.append(list(analytes))
    if start is not None:
        where.append("collected_at >= ?::TIMESTAMP")
        params.append(start)
    if end is not None:
        where.append("collected_at <= ?::TIMESTAMP")
        params.append(end)
    sql = f"SELECT {_RESULT_COLUMNS} FROM results WHERE {' AND '.join(where)}"
    with store.read_with_memo() as (cur, memo):
        raw = cur.sql(sql, params=params).to_arrow_table()
        has_comparator = raw.column("comparator").is_valid().to_numpy(zero_copy_only=False)
        r = {k: _from_arrow(raw.column(k)) for k in raw.column_names}
        del raw
        keys = memo.get("result_keys")
        if keys is None or not keys.covers(r["key_id"]):
            keys = memo["result_keys"] = _ResultKeys.load(cur)
    # The view's join and expressions in numpy: a few hundred rows are joined, sorted and
    # framed faster here than DuckDB binds the 26-column view and sorts them
    # (benchmarks/ingest.py, timeline latency).
    k = r["key_id"]
    factor, missing = keys.factor[k], keys.unit_missing[k]
    cols = {
        "result_id": (r["batch_id"].astype(np.int64) << 32) + r["source_row"],
        "patient_id": np.full(len(k), params[0], dtype=object),
        **{c: keys.text[c][k] for c in _KEY_TEXT},
        "value_canonical": np.where(has_comparator & ~missing, r["value_num"] * factor, np.nan),
        "ref_low_canonical": np.where(~missing, r["ref_low"] * factor, np.nan),
        "ref_high_canonical": np.where(~missing, r["ref_high"] * factor, np.nan),
        "unit_missing": missing & has_comparator,
    }
    cols.update((c, v) for c, v in r.items() if c in TIMELINE_COLUMNS)
    order = np.lexsort((cols["result_id"], keys.code_rank[k], cols["collected_at"]))
    return pd.DataFrame({c: cols[c][order] for c in TIMELINE_COLUMNS}, columns=TIMELINE_COLUMNS, copy=False)


_RESULT_COLUMNS = (
    "batch_id, source_row, specimen_id, collected_at, reported_at, key_id, value_text, "
    "comparator::VARCHAR AS comparator, value_num, ref_low, ref_high, flag, comment, "
    "result_kind::VARCHAR AS result_kind, implausible, conflicting, "
    "utc_offset_min, time_unknown, time_flag::VARCHAR AS time_flag, after_import"
)
_KEY_TEXT = ("analyte_code", "loinc", "analyte_name", "unit", "unit_canonical", "local_code")


class _ResultKeys:
    """``result_keys`` as arrays indexed by ``key_id`` (a few hundred rows at most)."""

    def __init__(self, text: dict[str, np.ndarray], factor: np.ndarray, unit_missing: np.ndarray, known: np.ndarray):
        self.text, self.factor, self.unit_missing, self.known = text, factor, unit_missing, known
        # rank of each key's analyte code among all codes: sorting by it sorts by code
        codes = np.where(known, text["analyte_code"], "")
        self.code_rank = np.unique(codes.astype(str), return_inverse=True)[1]

    @classmethod
    def load(cls, cur) -> "_ResultKeys":
        k = {c: _unmask(v) for c, v in cur.execute(
            f"SELECT key_id, factor, unit_missing, {', '.join(_KEY_TEXT)} FROM result_keys").fetchnumpy().items()}
        ids = k["key_id"].astype(np.int64)
        n = int(ids.max()) + 1 if len(ids) else 1
        text = {}
        for c in _KEY_TEXT:
            text[c] = np.full(n, np.nan, dtype=object)
            text[c][ids] = k[c]
        factor = np.full(n, np.nan)
        factor[ids] = k["factor"]
        unit_missing = np.zeros(n, dtype=bool)
        unit_missing[ids] = k["unit_missing"]
        known = np.zeros(n, dtype=bool)
        known[ids] = True
        return cls(text, factor, unit_missing, known)

    def covers(self, key_ids: np.ndarray) -> bool:
        """True when every id in ``key_ids`` is loaded (ids are never reused or changed)."""
        return not len(key_ids) or (int(key_ids.max()) < len(self.known) and bool(self.known[key_ids].all()))


def _from_arrow(col) -> np.ndarray:
    """An Arrow column as :func:`_unmask` gives DuckDB's numpy column: NaN / NaT / NaN-in-object where NULL.

    Text comes back with one Python string per distinct value, shared by the rows holding it (a year
    of 5-minute results of one analyte: a few hundred strings, not a string object per row and column).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        enc = pc.dictionary_encode(col)
        table = np.empty(len(enc.dictionary) + 1, dtype=object)
        table[:-1] = enc.dictionary.to_numpy(zero_copy_only=False)
        table[-1] = np.nan  # NULL
        return table[enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)]
    if not col.null_count or pa.types.is_floating(col.type) or pa.types.is_timestamp(col.type):
        return col.to_numpy(zero_copy_only=False)  # floats: NaN, timestamps: NaT where NULL
    out = np.array(col.to_pylist(), dtype=object)  # other types with NULLs: objects, as _unmask
    out[~col.is_valid().to_numpy(zero_copy_only=False)] = np.nan
    return out


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

    One row per (patient, analyte, collection time); ``collected_at`` is UTC where the zone is
    known, and a date given without a time is noon of that date (``time_unknown`` in the
    timeline), never a precise midnight. Columns ``patient_id, collected_at,
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


def admissions(store: Store, patient_id: str) -> pd.DataFrame:
    """One patient's admissions (``admission_id, admitted_at, discharged_at, admission_type``), oldest first;
    empty when the source had none (only MIMIC-IV's ``admissions`` are imported)."""
    with store.read() as cur:
        return cur.execute(
            "SELECT admission_id, admitted_at, discharged_at, admission_type FROM admissions "
            "WHERE patient_id = ? ORDER BY admitted_at, admission_id", [patient_key(patient_id)]).df()
