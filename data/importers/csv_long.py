"""Canonical long CSV: one result per row.

Columns (header names matched case-insensitively, spaces as underscores):
``patient_id, collected_at, loinc, test_name, value, unit`` and optionally
``local_code, specimen_id, reported_at, ref_low, ref_high, flag, comment, sex, birth_date``; at
least one of ``loinc`` / ``local_code`` / ``test_name``. A ``local_code`` (the laboratory's own
test code) is kept as ``site:<code>`` and keyed through the site mapping file
(:mod:`data.codemap`) when the row has no LOINC code. Times may carry an ISO 8601 offset
(``2024-03-31T02:30:00+02:00``, ``Z``); without one they are local times of the import's zone. Separator ``,`` ``;`` tab or ``|``; decimal point or
comma (decided from the ``value`` column, or ``--decimal``); UTF-8 with or without BOM,
else cp1252 / latin-1; ISO dates, or ``dd.mm.yyyy`` / ``mm/dd/yyyy`` with the order
decided from the data (or ``--dayfirst`` / ``--monthfirst``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data.importers.base import STAGING_COLUMNS, ImportFileError, ImportOptions, Staged
from data.importers.csvio import has_control_bytes, read_csv_varchar, sniff

FORMAT = "csv"

# header spellings accepted for each canonical column (after lower-casing, spaces -> _)
SYNONYMS = {
    "patient_id": ("patient_id", "patientid", "patient", "pid"),
    "collected_at": ("collected_at", "collection_time", "collected", "datetime", "date", "sample_time"),
    "reported_at": ("reported_at", "report_time", "reported", "result_time"),
    "loinc": ("loinc", "loinc_code", "loinc_num"),
    "local_code": ("local_code", "test_code", "local_test_code", "lab_code", "order_code"),
    "test_name": ("test_name", "test", "analyte", "name", "testname"),
    "value": ("value", "result", "result_value"),
    "unit": ("unit", "units", "uom"),
    "specimen_id": ("specimen_id", "specimen", "sample_id", "accession"),
    "ref_low": ("ref_low", "reference_low", "range_low", "ref_range_lower"),
    "ref_high": ("ref_high", "reference_high", "range_high", "ref_range_upper"),
    "flag": ("flag", "abnormal_flag", "interpretation"),
    "comment": ("comment", "comments", "note"),
    "sex": ("sex", "gender"),
    "birth_date": ("birth_date", "birthdate", "dob", "date_of_birth"),
}


def _key(h: str) -> str:
    return h.strip().lower().replace(" ", "_").replace("-", "_")


def map_header(header: list[str]) -> dict[str, str]:
    """canonical column -> header name in the file."""
    found = {}
    keys = {_key(h): h for h in header}
    for canon, names in SYNONYMS.items():
        for n in names:
            if n in keys:
                found[canon] = keys[n]
                break
    return found


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def stage(cur, path: Path, options: ImportOptions, label: str) -> Staged:
    dialect = sniff(path)
    cols = map_header(dialect.header)
    missing = [c for c in ("patient_id", "collected_at", "value") if c not in cols]
    if "loinc" not in cols and "test_name" not in cols and "local_code" not in cols:
        missing.append("loinc or test_name")
    if missing:
        raise ImportFileError(
            f"{label}: missing column(s) {', '.join(missing)} (found: {', '.join(dialect.header) or 'none'})"
        )

    def sel(c: str) -> str:
        if c == "source_row":
            return "source_row"
        if c == "local_code":  # the laboratory's own code, namespaced like every source's local codes
            return (f"CASE WHEN NULLIF(trim({_q(cols[c])}), '') IS NOT NULL THEN 'site:' || trim({_q(cols[c])}) END "
                    "AS local_code") if c in cols else "NULL::VARCHAR AS local_code"
        return f"{_q(cols[c])} AS {c}" if c in cols else f"NULL::VARCHAR AS {c}"

    extras = [f"{_q(cols[c])} AS {c}" for c in ("sex", "birth_date") if c in cols]
    select_sql = "SELECT " + ", ".join([sel(c) for c in STAGING_COLUMNS] + extras) + " FROM raw"
    # the byte scan for control characters runs while DuckDB reads the file (DuckDB releases the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        scan = pool.submit(has_control_bytes, path)
        encoding = read_csv_varchar(cur, dialect, "stg", select_sql, as_view=True)
        control = scan.result()
    staged = Staged(format=FORMAT, files=[path])
    staged.control_possible = control or encoding not in ("utf-8", "utf-8-sig")
    n_rej = cur.execute("SELECT count(*) FROM csv_rejects").fetchone()[0]
    if n_rej:
        staged.rejects_table = "csv_rejects"
    staged.decimal = options.decimal  # None: the pipeline decides from the value column
    staged.date_order = options.date_order
    staged.options = {"encoding": encoding, "delimiter": dialect.delimiter, "columns": cols}
    if "sex" in cols or "birth_date" in cols:
        cur.execute(
            "CREATE OR REPLACE TEMP TABLE stg_patients AS SELECT DISTINCT patient_id, "
            + ("sex, " if "sex" in cols else "NULL AS sex, ")
            + ("birth_date, " if "birth_date" in cols else "NULL AS birth_date, ")
            + "NULL AS age_at_ref, NULL AS ref_date FROM stg"
        )
        staged.has_patients = True
    return staged
