"""Synthea CSV export: ``observations.csv`` (+ ``patients.csv``).

Accepts the export folder (``observations.csv``, optionally ``patients.csv``; names in any
case) or ``observations.csv`` alone (then only that file is read). Columns (matched
case-insensitively): ``DATE, PATIENT, ENCOUNTER, CATEGORY, CODE, DESCRIPTION, VALUE,
UNITS, TYPE`` (OHDSI/Tutorial-ETL, ``etl/sqlmesh-synthea/models/seeds/synthea/
observations.sql``); older exports have no ``CATEGORY`` and possibly no ``TYPE``.
``patients.csv``: ``Id``, ``BIRTHDATE``, ``GENDER`` (``M`` / ``F``) are read.

Rules:

* **With CATEGORY**: rows whose CATEGORY is ``laboratory`` are staged, whatever their
  TYPE (a text lab result such as urine colour is a result); every other row is skipped
  as ``category <CATEGORY>`` (``category vital-signs``, ``category survey`` ...; a blank
  category is ``category (blank)``).
* **Without CATEGORY** (older exports), a row is staged when its CODE has the shape of a
  LOINC code (digits, hyphen, one check digit), TYPE (when the column exists) is
  ``numeric``, and the code is not one of the FHIR R4 vital-sign codes
  (:data:`VITAL_SIGN_LOINC`). Skipped rows are counted as ``no category: code not LOINC``,
  ``no category: type <TYPE>`` or ``no category: vital-sign code``. Without TYPE, text
  results of LOINC-coded surveys cannot be told from labs and are staged.
* CODE is LOINC (``loinc``); a staged code that is not LOINC-shaped becomes the local
  code ``synthea:<CODE>``. DESCRIPTION -> test_name, VALUE -> value, UNITS -> unit,
  PATIENT -> patient, DATE -> collected_at as written (ISO 8601; the pipeline converts
  the trailing ``Z`` to UTC).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from data.importers.base import STAGING_COLUMNS, ImportFileError, ImportOptions, Staged
from data.importers.csvio import _columns_struct, _short, has_control_bytes, read_csv_varchar, sniff

FORMAT = "synthea"

LOINC_SHAPE = "^[0-9]{1,7}-[0-9]$"

# FHIR R4 value set observation-vitalsignresult (http://hl7.org/fhir/ValueSet/observation-vitalsignresult),
# used only for exports without CATEGORY.
VITAL_SIGN_LOINC = (
    "85353-1", "9279-1", "8867-4", "2708-6", "8310-5", "8302-2", "9843-4", "29463-7", "39156-5",
    "85354-9", "8480-6", "8462-4",
)

REQUIRED = ("date", "patient", "code", "value")


def _find(root: Path, name: str) -> Path | None:
    return next((p for p in sorted(root.iterdir()) if p.is_file() and p.name.lower() == name), None)


def files(path: Path) -> list[Path]:
    """observations.csv, then patients.csv when the folder has it; a file is itself."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    obs = _find(path, "observations.csv")
    if obs is None:
        raise ImportFileError(f"{path.name}: not a Synthea CSV folder (no observations.csv)")
    pats = _find(path, "patients.csv")
    return [obs] + ([pats] if pats else [])


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Cols:
    """Columns by lower-case name: ``c('x')`` is the trimmed column (NULL when blank or absent)."""

    def __init__(self, header: list[str]):
        self.names = {h.strip().lower(): h for h in header}

    def has(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str) -> str:
        if name not in self.names:
            return "NULL::VARCHAR"
        return f"NULLIF(trim({_q(self.names[name])}), '')"


def skip_reason_sql(c: _Cols) -> str:
    """SQL giving why a row of ``raw`` is not staged (NULL: staged); rules in the module docstring."""
    if c.has("category"):
        return f"CASE WHEN lower({c('category')}) = 'laboratory' THEN NULL ELSE 'category ' || COALESCE({c('category')}, '(blank)') END"
    vitals = ", ".join(f"'{v}'" for v in VITAL_SIGN_LOINC)
    type_rule = (
        f"WHEN lower(COALESCE({c('type')}, '')) <> 'numeric' THEN 'no category: type ' || COALESCE({c('type')}, '(blank)') "
        if c.has("type") else ""
    )
    return (
        f"CASE WHEN NOT regexp_matches(COALESCE({c('code')}, ''), '{LOINC_SHAPE}') THEN 'no category: code not LOINC' "
        f"{type_rule}"
        f"WHEN {c('code')} IN ({vitals}) THEN 'no category: vital-sign code' END"
    )


def _select_sql(c: _Cols) -> str:
    """SELECT from ``raw`` of the staging columns plus ``skip_reason``, for every row."""
    loinc_shaped = f"regexp_matches(COALESCE({c('code')}, ''), '{LOINC_SHAPE}')"
    exprs = {
        "source_row": "source_row",
        "patient_id": c("patient"),
        "collected_at": c("date"),
        "loinc": f"CASE WHEN {loinc_shaped} THEN {c('code')} END",
        "local_code": f"CASE WHEN NOT {loinc_shaped} THEN 'synthea:' || {c('code')} END",
        "test_name": c("description"),
        "value": _q(c.names["value"]),
        "unit": c("units"),
    }
    cols = ", ".join(
        f"{exprs[s]} AS {s}" if s == "source_row" else f"({exprs.get(s, 'NULL')})::VARCHAR AS {s}" for s in STAGING_COLUMNS
    )
    return f"SELECT {cols}, {skip_reason_sql(c)} AS skip_reason FROM raw"


def _read_patients(cur, path: Path) -> None:
    """``stg_patients`` from patients.csv (Id, BIRTHDATE, GENDER)."""
    dialect = sniff(path)
    c = _Cols(dialect.header)
    if not c.has("id"):
        raise ImportFileError(f"{path.name}: Synthea patients file lacks column Id")
    try:
        cur.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE stg_patients AS
            SELECT {c('id')} AS patient_id, {c('gender')} AS sex, left({c('birthdate')}, 10) AS birth_date,
                   NULL::VARCHAR AS age_at_ref, NULL::VARCHAR AS ref_date
            FROM read_csv(?, delim = ?, header = true, all_varchar = true, quote = '"', escape = '"',
                          auto_detect = false, columns = {_columns_struct(dialect.header)}, strict_mode = false)
            """,
            [str(path), dialect.delimiter],
        )
    except (duckdb.InvalidInputException, duckdb.ConversionException) as exc:
        raise ImportFileError(f"{path.name}: cannot be read as CSV ({_short(exc)})") from exc


def stage(cur, path: Path, options: ImportOptions, label: str) -> Staged:
    """Stage the laboratory rows of observations.csv into ``stg``; count the others as skipped."""
    paths = files(Path(path))
    obs = paths[0]
    dialect = sniff(obs)
    c = _Cols(dialect.header)
    missing = [n.upper() for n in REQUIRED if not c.has(n)]
    if missing:
        raise ImportFileError(
            f"{obs.name}: not a Synthea observations file, missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(dialect.header) or 'none'})"
        )
    encoding = read_csv_varchar(cur, dialect, "stg", _select_sql(c))
    skipped = cur.execute(
        "SELECT skip_reason, count(*) FROM stg WHERE skip_reason IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1"
    ).fetchall()
    cur.execute("DELETE FROM stg WHERE skip_reason IS NOT NULL; ALTER TABLE stg DROP COLUMN skip_reason")
    staged = Staged(format=FORMAT, files=paths, skipped={r: int(n) for r, n in skipped})
    staged.control_possible = has_control_bytes(obs) or encoding not in ("utf-8", "utf-8-sig")
    if cur.execute("SELECT count(*) FROM csv_rejects").fetchone()[0]:
        staged.rejects_table = "csv_rejects"
    staged.decimal = options.decimal or "."
    staged.date_order = options.date_order
    if len(paths) > 1:
        _read_patients(cur, paths[1])
        staged.has_patients = True
    staged.options = {
        "encoding": encoding, "delimiter": dialect.delimiter,
        "rule": "category laboratory" if c.has("category") else "no CATEGORY: LOINC-coded numeric, not vital signs",
        "files": [p.name for p in paths],
    }
    return staged
