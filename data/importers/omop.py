"""OMOP CDM v5.4: ``MEASUREMENT``, with ``PERSON`` and ``CONCEPT`` when present.

Accepts a folder holding ``measurement`` (file name in any case, ``.csv`` / ``.tsv`` /
``.txt``, optionally ``.gz``; comma, semicolon, tab or pipe separated) and optionally
``person`` and ``concept`` files named the same way, or a single MEASUREMENT file (then only
that file is read). Column names are matched case-insensitively (field names of the CDM
v5.4 field-level specification, OHDSI/CommonDataModel ``OMOP_CDMv5.4_Field_Level.csv``).
Only the concepts the measurements use are read from CONCEPT, so the full Athena
``CONCEPT.csv`` (tab separated, unquoted) can be given as it is.

Rules (one MEASUREMENT row = one staged row; nothing is skipped):

* ``person_id`` -> patient; ``measurement_datetime``, else ``measurement_date`` (plus
  ``measurement_time`` when given) -> collected_at. A ``measurement_datetime`` at exactly
  midnight without a ``measurement_time`` is read as the date with the time unknown: ETLs fill
  DATETIME columns with 00:00:00 when the source has no time (OHDSI THEMIS convention
  discussion, OHDSI/Themis issue #147 "what to do with DATETIME columns when the raw data has
  no time or is given as 00:00:00"), so such a midnight is not a time of collection;
* analyte: with CONCEPT, a ``measurement_concept_id`` whose ``vocabulary_id`` is LOINC
  gives the LOINC ``concept_code``; otherwise the local code is ``omop:<concept_id>``
  (concept 0, "no matching concept", gives no code: the test is then known by its name).
  ``test_name`` is the concept's ``concept_name``, else ``measurement_source_value``;
* value: ``value_as_number`` as written in the file, prefixed by the comparator of
  ``operator_concept_id`` (see :data:`OPERATORS`; '=' and 0 add nothing; an unknown id
  makes the value text ``operator_concept_id <id> <value>`` so it is never read as exact).
  When ``value_as_number`` is empty: ``value_source_value``, else the CONCEPT name of
  ``value_as_concept_id``, else ``concept:<value_as_concept_id>`` (a text result);
* unit: ``unit_source_value``, else the UCUM ``concept_code`` of ``unit_concept_id``, else
  ``concept:<unit_concept_id>`` (which the pipeline quarantines as an unknown unit: give
  CONCEPT or unit_source_value);
* ``range_low`` / ``range_high`` -> ref_low / ref_high;
* PERSON: ``gender_concept_id`` 8532 -> F, 8507 -> M (else ``gender_source_value``);
  ``birth_datetime``, else ``year_of_birth`` / ``month_of_birth`` / ``day_of_birth``. A
  birth date without day (or without month) is stored as age 0 at the 15th of the month
  (1 July of the year), the same approximation as MIMIC's anchor age.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from data.importers.base import STAGING_COLUMNS, ImportFileError, ImportOptions, Staged
from data.importers.csvio import _columns_struct, _short, has_control_bytes, read_csv_varchar, sniff

FORMAT = "omop"

SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")

# Standard concepts of the "Meas Value Operator" domain (SNOMED qualifier values) -> comparator.
# Source: i2b2/i2b2-data, edu.harvard.i2b2.data/Release_1-7/NewInstall/Crcdata/scripts/act-omop/
# sqlserver/BUILD_ACT_OMOP_VIEWS_ALL_MSSQL.sql (ACT-OMOP views, updated July 2023; commit 323e893):
# OPERATOR_CONCEPT_ID 4172703 'E', 4171756 'LT', 4172704 'GT', 4171754 'LE', 4171755 'GE'.
# Note that 4171755 is '>=' and 4172704 is '>'. When CONCEPT is given and names the operator
# with one of the five symbols (as Athena's CONCEPT does), that name is used instead.
OPERATORS = {4171756: "<", 4171754: "<=", 4172703: "=", 4171755: ">=", 4172704: ">"}

# Gender concepts: FEMALE 8532, MALE 8507 (OHDSI Vocabulary-v5.0 wiki, "Vocab. GENDER":
# "The domain contains only two standard concepts: FEMALE (concept_id=8532) and MALE
# (concept_id=8507)").
GENDERS = {8532: "F", 8507: "M"}

REQUIRED = ("person_id", "measurement_concept_id")

# MEASUREMENT columns read (CDM v5.4 names); absent ones are NULL
MEASUREMENT_COLUMNS = (
    "person_id", "measurement_concept_id", "measurement_date", "measurement_datetime", "measurement_time",
    "operator_concept_id", "value_as_number", "value_as_concept_id", "unit_concept_id", "range_low", "range_high",
    "measurement_source_value", "unit_source_value", "value_source_value",
)
CONCEPT_ID_COLUMNS = ("measurement_concept_id", "unit_concept_id", "operator_concept_id", "value_as_concept_id")


def _find(root: Path, table: str) -> Path | None:
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        name = p.name.lower()
        if p.is_file() and any(name == table + s for s in SUFFIXES):
            return p
    return None


def files(path: Path) -> list[Path]:
    """MEASUREMENT, then PERSON and CONCEPT when the folder has them; a file is itself."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    meas = _find(path, "measurement")
    if meas is None:
        raise ImportFileError(f"{path.name}: not an OMOP folder (no measurement.csv[.gz] or .tsv)")
    return [meas] + [p for p in (_find(path, "person"), _find(path, "concept")) if p is not None]


def _role(paths: list[Path], table: str) -> Path | None:
    return next((p for p in paths[1:] if p.name.lower().split(".")[0] == table), None)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Cols:
    """Columns of one file by lower-case CDM name: ``c('x')`` is the quoted column or NULL."""

    def __init__(self, header: list[str], alias: str = ""):
        self.names = {h.strip().lower(): h for h in header}
        self.alias = alias

    def has(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str) -> str:
        if name not in self.names:
            return "NULL::VARCHAR"
        return f"NULLIF(trim({self.alias}{_q(self.names[name])}), '')"

    def id(self, name: str) -> str:
        """The column as a concept id (BIGINT; 0 and unreadable -> NULL)."""
        return f"NULLIF(TRY_CAST({self(name)} AS BIGINT), 0)"


def _read_aux(cur, path: Path, table: str, cols: dict[str, str], where: str = "") -> None:
    """Temp ``table`` with the named columns (alias -> SQL over ``f``) of a PERSON/CONCEPT file."""
    dialect = sniff(path)
    quote = "" if dialect.delimiter == "\t" else '"'  # Athena's tab files are unquoted
    select = ", ".join(f"{sql} AS {alias}" for alias, sql in cols.items())
    try:
        cur.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {table} AS
            SELECT {select}
            FROM read_csv(?, delim = ?, header = true, all_varchar = true, quote = ?, escape = ?,
                          auto_detect = false, columns = {_columns_struct(dialect.header)}, strict_mode = false) f
            {where}
            """,
            [str(path), dialect.delimiter, quote, quote],
        )
    except (duckdb.InvalidInputException, duckdb.ConversionException, duckdb.BinderException) as exc:
        raise ImportFileError(f"{path.name}: cannot be read as CSV ({_short(exc)})") from exc


def _read_concepts(cur, path: Path) -> None:
    """``omop_concept``: the CONCEPT rows of the ids in ``omop_ids``."""
    c = _Cols(sniff(path).header, "f.")
    missing = [n for n in ("concept_id", "vocabulary_id", "concept_code") if not c.has(n)]
    if missing:
        raise ImportFileError(f"{path.name}: CONCEPT file lacks column(s) {', '.join(missing)}")
    _read_aux(
        cur, path, "omop_concept",
        {"concept_id": c.id("concept_id"), "concept_name": c("concept_name"),
         "vocabulary_id": c("vocabulary_id"), "concept_code": c("concept_code")},
        f"WHERE {c.id('concept_id')} IN (SELECT id FROM omop_ids)",
    )


def _read_persons(cur, path: Path) -> None:
    """``stg_patients`` from PERSON (sex and birth date rules in the module docstring)."""
    c = _Cols(sniff(path).header, "f.")
    if not c.has("person_id"):
        raise ImportFileError(f"{path.name}: PERSON file lacks column person_id")
    gender = "CASE " + " ".join(f"WHEN {c.id('gender_concept_id')} = {k} THEN '{v}'" for k, v in GENDERS.items())
    y, m, d = (f"TRY_CAST({c(n)} AS INTEGER)" for n in ("year_of_birth", "month_of_birth", "day_of_birth"))
    birth = f"COALESCE(left({c('birth_datetime')}, 10), strftime(try(make_date({y}, {m}, {d})), '%Y-%m-%d'))"
    _read_aux(
        cur, path, "stg_patients",
        {
            "patient_id": c("person_id"),
            "sex": f"{gender} ELSE {c('gender_source_value')} END",
            "birth_date": birth,
            "age_at_ref": f"CASE WHEN {birth} IS NULL AND {y} IS NOT NULL THEN '0' END",
            "ref_date": f"CASE WHEN {birth} IS NULL AND {y} IS NOT NULL THEN "
                        f"CASE WHEN {m} BETWEEN 1 AND 12 THEN printf('%04d-%02d-15', {y}, {m}) "
                        f"ELSE printf('%04d-07-01', {y}) END END",
        },
    )


def _id(col: str) -> str:
    """A column of ``omop_meas`` as a concept id (BIGINT; 0 and unreadable -> NULL)."""
    return f"NULLIF(TRY_CAST(m.{col} AS BIGINT), 0)"


def _read_measurements(cur, dialect) -> str:
    """``omop_meas``: source_row plus :data:`MEASUREMENT_COLUMNS` (trimmed, blank -> NULL)."""
    c = _Cols(dialect.header)
    cols = ", ".join(f"{c(n)} AS {n}" for n in MEASUREMENT_COLUMNS)
    return read_csv_varchar(cur, dialect, "omop_meas", f"SELECT source_row, {cols} FROM raw")


def _select_sql(with_concepts: bool) -> str:
    """SELECT of the staging columns from ``omop_meas`` (m) joined to ``omop_concept``."""
    joins = ""
    mc = uc = oc = vc = None
    if with_concepts:
        joins = "\n".join(
            f"LEFT JOIN omop_concept {a} ON {a}.concept_id = {_id(col)}"
            for a, col in (("mc", "measurement_concept_id"), ("uc", "unit_concept_id"),
                           ("oc", "operator_concept_id"), ("vc", "value_as_concept_id"))
        )
        mc, uc, oc, vc = "mc", "uc", "oc", "vc"
    op_id = _id("operator_concept_id")
    builtin = "CASE " + " ".join(f"WHEN {op_id} = {k} THEN '{v}'" for k, v in OPERATORS.items()) + " END"
    op = f"COALESCE(CASE WHEN {oc}.concept_name IN ('<', '<=', '=', '>=', '>') THEN {oc}.concept_name END, {builtin})" if oc else builtin
    value = f"""CASE
        WHEN m.value_as_number IS NOT NULL THEN CASE
            WHEN {op_id} IS NULL OR {op} = '=' THEN m.value_as_number
            WHEN {op} IS NOT NULL THEN {op} || m.value_as_number
            ELSE 'operator_concept_id ' || {op_id} || ' ' || m.value_as_number END
        WHEN m.value_source_value IS NOT NULL THEN m.value_source_value
        WHEN {_id('value_as_concept_id')} IS NOT NULL
            THEN COALESCE({f'{vc}.concept_name' if vc else 'NULL'}, 'concept:' || {_id('value_as_concept_id')})
        END"""
    ucum = f"CASE WHEN {uc}.vocabulary_id = 'UCUM' THEN {uc}.concept_code END" if uc else "NULL"
    loinc = f"CASE WHEN {mc}.vocabulary_id = 'LOINC' THEN {mc}.concept_code END" if mc else "NULL"
    exprs = {
        "source_row": "m.source_row",
        "patient_id": "m.person_id",
        "collected_at": (
            "CASE WHEN m.measurement_datetime IS NOT NULL AND NOT (m.measurement_time IS NULL AND "
            "regexp_matches(m.measurement_datetime, '[ T]00:00(:00(\\.0+)?)?([+-][0-9:]+|Z)?$')) "
            "THEN m.measurement_datetime "
            "ELSE COALESCE(m.measurement_date, left(m.measurement_datetime, 10)) "
            "|| COALESCE(' ' || m.measurement_time, '') END"),
        "loinc": loinc,
        "local_code": f"CASE WHEN ({loinc}) IS NULL THEN 'omop:' || {_id('measurement_concept_id')} END",
        "test_name": f"COALESCE({f'{mc}.concept_name' if mc else 'NULL'}, m.measurement_source_value)",
        "value": value,
        "unit": f"COALESCE(m.unit_source_value, {ucum}, 'concept:' || {_id('unit_concept_id')})",
        "ref_low": "m.range_low",
        "ref_high": "m.range_high",
    }
    cols = ", ".join(
        f"{exprs[s]} AS {s}" if s == "source_row" else f"({exprs.get(s, 'NULL')})::VARCHAR AS {s}" for s in STAGING_COLUMNS
    )
    return f"SELECT {cols} FROM omop_meas m {joins} ORDER BY m.source_row"


def _decimal(cur, label: str) -> str:
    """Decimal mark of ``value_as_number``: ',' only when every decimal number uses it."""
    n_comma, n_dot = cur.execute(
        "SELECT count(*) FILTER (WHERE regexp_full_match(value_as_number, '[+-]?[0-9]*,[0-9]+')), "
        "count(*) FILTER (WHERE regexp_full_match(value_as_number, '[+-]?[0-9]*\\.[0-9]+([eE][+-]?[0-9]+)?')) "
        "FROM omop_meas"
    ).fetchone()
    if n_comma and n_dot:
        raise ImportFileError(
            f"{label}: column value_as_number has both ',' and '.' decimals ({n_comma} and {n_dot} rows); "
            "choose the decimal mark with --decimal"
        )
    return "," if n_comma else "."


def stage(cur, path: Path, options: ImportOptions, label: str) -> Staged:
    """Stage MEASUREMENT rows into ``stg`` (and PERSON into ``stg_patients``)."""
    paths = files(Path(path))
    meas, person, concept = paths[0], _role(paths, "person"), _role(paths, "concept")
    dialect = sniff(meas)
    c = _Cols(dialect.header)
    missing = [n for n in REQUIRED if not c.has(n)]
    if not (c.has("measurement_date") or c.has("measurement_datetime")):
        missing.append("measurement_date or measurement_datetime")
    if missing:
        raise ImportFileError(
            f"{meas.name}: not an OMOP MEASUREMENT table, missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(dialect.header) or 'none'})"
        )
    encoding = _read_measurements(cur, dialect)
    if concept is not None:
        ids = " UNION ".join(f"SELECT {_id(n)} AS id FROM omop_meas m" for n in CONCEPT_ID_COLUMNS)
        cur.execute(f"CREATE OR REPLACE TEMP TABLE omop_ids AS {ids}")
        _read_concepts(cur, concept)
    cur.execute(f"CREATE OR REPLACE TEMP TABLE stg AS {_select_sql(concept is not None)}")
    staged = Staged(format=FORMAT, files=paths)
    staged.control_possible = has_control_bytes(meas) or concept is not None or encoding not in ("utf-8", "utf-8-sig")
    if cur.execute("SELECT count(*) FROM csv_rejects").fetchone()[0]:
        staged.rejects_table = "csv_rejects"
    staged.decimal = options.decimal or _decimal(cur, label)
    staged.date_order = options.date_order
    if person is not None:
        _read_persons(cur, person)
        staged.has_patients = True
    staged.options = {
        "encoding": encoding, "delimiter": dialect.delimiter,
        "tables": {"measurement": meas.name, "person": person and person.name, "concept": concept and concept.name},
    }
    for t in ("omop_meas", "omop_ids", "omop_concept"):
        cur.execute(f"DROP TABLE IF EXISTS {t}")
    return staged
