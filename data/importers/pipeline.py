"""The common load pipeline: from the staged rows of any importer to the stored results.

Runs inside the import's single transaction (see :func:`data.importers.run_import`), in
DuckDB SQL so that ten million rows load at bulk speed. Per row it decides, in order:

1. **quarantine** (kept in ``quarantine`` with column and reason, never loaded): a control
   character in any field (:data:`CONTROL_CHARACTERS`, one rule for every format); no
   patient id; no or unreadable collection time, one that is no calendar date (30 February,
   hour 25), before 1900 or beyond year 9999; no analyte (neither LOINC nor name);
   a LOINC code whose check digit is wrong; a numeric result whose unit is unknown or
   cannot be converted to the analyte's canonical unit;
2. **skipped as exact duplicate**: same patient, analyte, time, specimen, report time,
   value, unit, flag, comment and reference interval as a row already kept (in this file
   or an earlier import);
3. otherwise **loaded**, with the value parsed (:mod:`data.values`), converted to the
   canonical UCUM unit (:mod:`data.units`), and flagged: ``implausible`` (outside the
   catalogue's cited plausible limits: stored, not dropped), ``unit_missing``,
   ``conflicting`` (another value for the same patient, analyte and time: both kept).

Collection and report times (:mod:`data.timezones`): stored in UTC with the offset of the
source's zone (an ISO offset written in the file, else the import's zone, else none: stored
as written); a local time in a skipped or repeated daylight-saving hour is flagged; a date
without a time is stored as noon of that date with ``time_unknown``; a collection time after
the import started is flagged ``after_import`` unless the source declares shifted dates.

Analyte codes: the LOINC code given, else the site mapping of the row's local code
(:mod:`data.codemap`), else the local code, else ``local:<test name>``. The local code is
kept with the result either way.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from data.catalogue import load_catalogue
from data.identifiers import patient_id_sql
from data.timezones import localize
from data.importers.base import STAGING_COLUMNS, ImportFileError, Staged
from data.units import UnitError, conversion_factor, normalise_unit, parse_ucum
from data.values import other_decimal_mark_sql, other_mark, plain_number_sql, value_select_sql

__all__ = ["CONTROL_CHARACTERS", "ImportSummary", "drop_temp", "load_staged", "loinc_check_digit_ok",
           "local_time_sql", "offset_sql"]


@dataclass
class ImportSummary:
    batch_id: int
    file: str
    format: str
    rows_read: int = 0
    rows_loaded: int = 0
    rows_quarantined: int = 0
    rows_duplicate: int = 0
    rows_skipped: int = 0
    patients: int = 0
    rows_censored: int = 0
    rows_text: int = 0
    rows_implausible: int = 0
    rows_conflicting: int = 0
    rows_unit_missing: int = 0
    rows_time_unknown: int = 0  # a date without a time (stored as noon, flagged)
    rows_dst: int = 0  # a local time in a skipped or repeated daylight-saving hour
    rows_after_import: int = 0  # collected after the import started (not for shifted-date sources)
    time_zone: str | None = None  # the zone local times without an offset were read in
    unmapped_codes: dict = field(default_factory=dict)  # local code -> rows, neither LOINC nor site mapping
    codes_mapped: int = 0  # local codes the site mapping file mapped to LOINC in this file
    skipped_reasons: dict = field(default_factory=dict)
    quarantine_reasons: dict = field(default_factory=dict)
    already_imported: bool = False
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def loinc_check_digit_ok(code: str) -> bool:
    """True when ``code`` is ``digits-checkdigit`` with a correct LOINC Mod 10 check digit.

    The algorithm is the one LOINC publishes (Regenstrief, "LOINC Users' Guide", appendix
    on the Mod 10 check digit), equivalent to Luhn over the digits before the hyphen.
    """
    if not isinstance(code, str) or code.count("-") != 1:
        return False
    body, check = code.split("-")
    if not body.isdigit() or not check.isdigit() or len(check) != 1 or not 1 <= len(body) <= 7:
        return False
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return (10 - total % 10) % 10 == int(check)


def _blank_to_null(col: str) -> str:
    return f"NULLIF(trim({col}), '')"


# A UTC offset or 'Z' at the end of a time (ISO 8601). The regular expression runs only on
# strings that can carry one: longer than 'YYYY-MM-DD HH:MM:SS' (19), or 'YYYY-MM-DDTHH:MMZ'
# (17). The bulk of any export ('YYYY-MM-DD HH:MM[:SS]') is decided by its length alone.
_OFFSET_RE = r"(Z|[+-][0-9]{2}:?[0-9]{2})[ ]*$"
_HAS_OFFSET = ("(CASE WHEN length(@c) > 19 OR (length(@c) = 17 AND ends_with(@c, 'Z')) "
               "THEN regexp_matches(@c, '" + _OFFSET_RE + "') ELSE false END)")


def local_time_sql(col: str, date_order: str | None) -> str:
    """DuckDB expression: the local wall-clock time written in the VARCHAR ``col``, any UTC offset
    dropped (:func:`offset_sql` reads it); a date without a time is noon of that date.

    ISO 8601 (``YYYY-MM-DD``, optional ``HH:MM[:SS[.f]]``, ``T`` or space) is always read; with
    ``date_order`` 'dayfirst' or 'monthfirst', ``dd.mm.yyyy`` / ``mm/dd/yyyy`` (separators
    . / -) too. NULL when unreadable or no calendar date (30 February, hour 25).
    """
    c = col
    has_offset = _HAS_OFFSET.replace("@c", c)
    # DuckDB's cast reads ISO (and other year-first) forms and leading spaces; trailing spaces
    # are trimmed only where the plain cast failed.
    base = (
        f"CASE WHEN {has_offset} THEN TRY_CAST(regexp_replace(trim({c}), '\\s*{_OFFSET_RE}', '') AS TIMESTAMP) "
        f"ELSE COALESCE(TRY_CAST({c} AS TIMESTAMP), TRY_CAST(trim({c}) AS TIMESTAMP)) END"
    )
    if date_order in ("dayfirst", "monthfirst"):
        a, b = ("%d", "%m") if date_order == "dayfirst" else ("%m", "%d")
        fmts = []
        for sep in (".", "/", "-"):
            d = f"{a}{sep}{b}{sep}%Y"
            fmts += [f"{d} %H:%M:%S", f"{d} %H:%M", f"{d}"]
        fmt_list = ", ".join(f"'{f}'" for f in fmts)
        base = f"COALESCE(({base}), try_strptime(trim({c}), [{fmt_list}]))"
    # a date alone: noon, the middle of the day it names (never a precise midnight)
    return f"(CASE WHEN contains({c}, ':') THEN {base} ELSE ({base}) + INTERVAL 12 HOUR END)"


def offset_sql(col: str) -> str:
    """DuckDB expression: minutes east of UTC written at the end of ``col`` ('Z' 0, '+02:00' 120,
    '-0330' -210), NULL when the time carries no offset."""
    c = col
    has_offset = _HAS_OFFSET.replace("@c", c)
    g = f"regexp_extract({c}, '([+-])([0-9]{{2}}):?([0-9]{{2}})[ ]*$', ['s', 'h', 'm'])"
    return (
        f"(CASE WHEN {has_offset} THEN CASE WHEN regexp_matches({c}, 'Z[ ]*$') THEN 0 "
        f"ELSE (CASE WHEN {g}.s = '-' THEN -1 ELSE 1 END) * (TRY_CAST({g}.h AS INTEGER) * 60 "
        f"+ TRY_CAST({g}.m AS INTEGER)) END END)::SMALLINT"
    )


def _time_columns(alias: str, date_order: str | None) -> str:
    """The time columns every row statement reads (``_t_local``, ``_t_off``, ``_t_date``,
    ``_r_local``, ``_r_off``), computed once per row over the staged row ``alias``."""
    return (
        f"{local_time_sql(f'{alias}.collected_at', date_order)} AS _t_local, "
        f"{offset_sql(f'{alias}.collected_at')} AS _t_off, "
        f"COALESCE(NOT contains({alias}.collected_at, ':'), false) AS _t_date, "
        f"{local_time_sql(f'{alias}.reported_at', date_order)} AS _r_local, "
        f"{offset_sql(f'{alias}.reported_at')} AS _r_off"
    )


def _inline_row_columns(sql: str, date_order: str | None, control: str) -> str:
    """``sql`` with the row columns of :func:`_time_columns` (``s._t_local`` ...) and ``s._ctrl``
    written out as expressions over the staged row ``s``: the insert reads ``stg`` directly, as
    a nested projection of every staged column costs about 15 % of the insert at 10 M rows,
    while the quarantine statements (few rows) read the columns from a subquery."""
    exprs = {
        "s._t_local": local_time_sql("s.collected_at", date_order),
        "s._t_off": offset_sql("s.collected_at"),
        "s._t_date": "COALESCE(NOT contains(s.collected_at, ':'), false)",
        "s._r_local": local_time_sql("s.reported_at", date_order),
        "s._r_off": offset_sql("s.reported_at"),
        "s._ctrl": f"({control})",
    }
    return re.sub(r"s\._(t_local|t_off|t_date|r_local|r_off|ctrl)\b", lambda m: exprs[m.group(0)], sql)


#: Characters that quarantine a row wherever they occur (patient id, times, codes, name, value,
#: unit, limits, flag, comment): Unicode category Cc (C0 and C1 controls, DEL) except the
#: whitespace controls tab, LF, VT, FF, CR and NEL, which are spaces (trimmed at the ends of ids,
#: kept inside a comment). NUL, BEL, ESC, backspace or a C1 control inside a value has no
#: reading a laboratory meant; dropping it silently could join two ids ('P1<NUL>2' -> 'P12') or
#: change a number, so the row is kept aside with the column and the character named.
CONTROL_CHARACTERS = r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]"
_CONTROL_COLUMNS = tuple(c for c in STAGING_COLUMNS if c != "source_row")


def _control_sql(alias: str) -> str:
    """True when any staged column of ``alias`` holds one of :data:`CONTROL_CHARACTERS`."""
    cols = ", ".join(f"{alias}.{c}" for c in _CONTROL_COLUMNS)
    return f"regexp_matches(concat({cols}), '{CONTROL_CHARACTERS}')"


def _control_reason_sql(alias: str) -> tuple[str, str]:
    """(column, reason) SQL for a row with a control character: the first column holding one,
    and a reason naming that column and the character's code point."""
    col = "CASE " + " ".join(
        f"WHEN regexp_matches({alias}.{c}, '{CONTROL_CHARACTERS}') THEN '{c}'" for c in _CONTROL_COLUMNS) + " END"
    char = "CASE " + " ".join(
        f"WHEN regexp_matches({alias}.{c}, '{CONTROL_CHARACTERS}') "
        f"THEN unicode(regexp_extract({alias}.{c}, '{CONTROL_CHARACTERS}'))" for c in _CONTROL_COLUMNS) + " END"
    reason = (
        f"'column ''' || ({col}) || ''' holds the control character U+' || printf('%04X', {char}) "
        "|| ' (not a printable character): the row is not loaded; fix the export and import it again'"
    )
    return col, reason


def _file_profile(
    cur, file_label: str, decimal: str | None, date_order: str | None, detect_dates: bool = True,
    delimiter: str | None = None,
) -> tuple[str, str | None]:
    """One pass over ``stg`` deciding the decimal mark of ``value`` and the order of non-ISO dates.

    Returns (decimal, date_order). Raises :class:`ImportFileError` when the file mixes
    both decimal marks, when every ',' number has three digits after the ',' (``1,234``:
    a decimal comma or a thousands separator), or when day and month cannot be told apart
    (every day <= 12).
    """
    # The regular expressions sit in CASE branches: DuckDB runs both sides of an AND on every
    # row, and a CASE branch only on the rows its condition selects (10 M rows: 0.64 s -> 0.33 s).
    has_comma = cur.execute("SELECT EXISTS (SELECT 1 FROM stg WHERE contains(value, ','))").fetchone()[0]
    n_comma, n_comma_grouped, n_dot, n_dmy, max_a, max_b = cur.execute(
        r"""
        SELECT count(*) FILTER (WHERE CASE WHEN contains(value, ',')
                                           THEN regexp_full_match(trim(value), '[<>≤≥]?=?\s*[+-]?[0-9]*,[0-9]+') END),
               count(*) FILTER (WHERE CASE WHEN contains(value, ',')
                                           THEN regexp_full_match(trim(value), '[<>≤≥]?=?\s*[+-]?[0-9]{1,3},[0-9]{3}') END),
               count(*) FILTER (WHERE CASE WHEN {check_dots} AND contains(value, '.')
                                           THEN regexp_full_match(trim(value), '[<>≤≥]?=?\s*[+-]?[0-9]*\.[0-9]+') END),
               count(*) FILTER (WHERE g.a <> ''),
               max(TRY_CAST(NULLIF(g.a, '') AS INTEGER)),
               max(TRY_CAST(NULLIF(g.b, '') AS INTEGER))
        FROM (
            SELECT value,
                   CASE WHEN TRY_CAST(collected_at AS TIMESTAMP) IS NULL
                        THEN regexp_extract(trim(collected_at), '^([0-9]{1,2})[./-]([0-9]{1,2})[./-][0-9]{4}', ['a', 'b'])
                   END AS g
            FROM stg
        )
        """.replace("{check_dots}", "true" if has_comma else "false")
    ).fetchone()
    if decimal is None:
        if n_comma and n_dot:
            raise ImportFileError(
                f"{file_label}: column 'value' has both ',' and '.' decimals ({n_comma} and {n_dot} rows); "
                "choose the decimal mark with --decimal (values written with the other mark are then quarantined)"
            )
        if n_comma and n_comma == n_comma_grouped:
            raise ImportFileError(
                f"{file_label}: column 'value' has numbers like '1,234' and no other decimals ({n_comma} rows): "
                "the ',' may be a decimal mark (1.234) or separate thousands (1234); "
                "choose the decimal mark with --decimal"
            )
        if n_comma and delimiter == ",":
            raise ImportFileError(
                f"{file_label}: column 'value' has ',' decimals in a comma-separated file; "
                "choose the decimal mark with --decimal"
            )
        decimal = "," if n_comma else "."
    if detect_dates and date_order is None and n_dmy:
        if max_a > 12 and max_b > 12:
            raise ImportFileError(f"{file_label}: column 'collected_at' mixes day-first and month-first dates; fix the file")
        if max_a > 12:
            date_order = "dayfirst"
        elif max_b > 12:
            date_order = "monthfirst"
        else:
            raise ImportFileError(
                f"{file_label}: column 'collected_at' has dates like '01.02.2024' where every day is <= 12, "
                "so day and month cannot be told apart; re-run with --dayfirst or --monthfirst"
            )
    return decimal, date_order


def _analyte_code(loinc, local_code, test_name, mapping: dict | None = None) -> str | None:
    """LOINC when given, else the site mapping of the local code, else the local code, else
    ``local:<test name lower-cased>``. A LOINC code is never chosen by the test name."""
    if isinstance(loinc, str) and loinc.strip():
        return loinc.strip()
    if isinstance(local_code, str) and local_code.strip():
        return (mapping or {}).get(local_code.strip()) or local_code.strip()
    if isinstance(test_name, str) and test_name.strip():
        return "local:" + test_name.strip().lower()
    return None


def _key_map(cur, mapping: dict | None = None) -> pd.DataFrame:
    """One row per distinct (loinc, local_code, test_name, unit) of ``stg``: the analyte code,
    the factor to its canonical unit or why there is none, whether a LOINC code fails its
    check digit, and ``n`` (rows). Decided in Python once per distinct key, joined back in SQL.

    ``mapping``: local code -> LOINC code (the site mapping file, :mod:`data.codemap`)."""
    keys = pd.DataFrame(
        cur.execute("SELECT loinc, local_code, test_name, unit, count(*) AS n FROM stg GROUP BY ALL").fetchall(),
        columns=["loinc", "local_code", "test_name", "unit", "n"],
        dtype=object,
    )
    keys["analyte_code"] = np.array(
        [_analyte_code(*t, mapping=mapping) for t in zip(keys["loinc"], keys["local_code"], keys["test_name"])],
        dtype=object)
    pairs = keys[keys["analyte_code"].notna()].groupby(["analyte_code", "unit"], dropna=False, sort=False)["n"].sum()
    pairs = pairs.reset_index()
    umap = _unit_map(cur, pairs)
    out = keys.merge(umap, on=["analyte_code", "unit"], how="left")
    out["bad_loinc"] = [
        isinstance(lo, str) and bool(lo.strip()) and not loinc_check_digit_ok(lo.strip()) for lo in out["loinc"]
    ]
    out["unit_missing"] = out["unit_missing"].fillna(False).astype(bool)
    out["factor"] = out["factor"].astype("float64")
    return out


def _unit_map(cur, pairs: pd.DataFrame) -> pd.DataFrame:
    """For each (analyte_code, unit, n): factor to canonical, canonical unit, error, missing."""
    cat = load_catalogue()
    local_codes = sorted({c for c in pairs["analyte_code"] if c not in cat})
    existing = dict(
        cur.execute(
            "SELECT analyte_code, any_value(unit_canonical) FROM result_keys "
            "WHERE unit_canonical IS NOT NULL AND list_contains(?::VARCHAR[], analyte_code) GROUP BY analyte_code",
            [local_codes],
        ).fetchall()
    ) if local_codes else {}
    # canonical unit for analytes outside the catalogue: what the store already uses,
    # else the most frequent readable unit in this file.
    local_canonical: dict[str, str | None] = {}
    for code, grp in pairs.groupby("analyte_code", sort=False):
        if code in cat:
            continue
        if code in existing:
            local_canonical[code] = existing[code]
            continue
        best = None
        for unit, _n in sorted(zip(grp["unit"], grp["n"]), key=lambda t: -t[1]):
            u = normalise_unit(unit)
            if u is None:
                continue
            try:
                parse_ucum(u)
            except UnitError:
                continue
            best = u
            break
        local_canonical[code] = best
    rows = []
    for code, unit in zip(pairs["analyte_code"], pairs["unit"]):
        factor, canonical, error, missing = None, None, None, False
        analyte = cat.get(code)
        if analyte is not None:
            canonical = analyte.canonical_unit
            try:
                factor = conversion_factor(unit, analyte)
            except UnitError as exc:
                if normalise_unit(unit) is None:
                    missing = True
                else:
                    error = str(exc)
        else:
            canonical = local_canonical.get(code)
            u = normalise_unit(unit)
            if u is None:
                if canonical is None:
                    factor = 1.0  # a code that never carries a unit (counts, ratios, text tests)
                else:
                    missing = True
            elif canonical is None:
                error = f"unit '{unit}' is not a known UCUM unit (test {code})"
            else:
                try:
                    q = 1.0 * parse_ucum(u)
                    target = parse_ucum(canonical)
                    factor = float(q.to(target.units).magnitude / target.magnitude)
                except Exception:
                    error = f"unit '{unit}' cannot be converted to {canonical} for test {code}"
        rows.append((code, unit, factor, canonical, error, missing))
    return pd.DataFrame(rows, columns=["analyte_code", "unit", "factor", "unit_canonical", "unit_error", "unit_missing"],
                        dtype=object)


def _register_table(cur, name: str, frame: pd.DataFrame, sql_select: str = "*") -> None:
    cur.register(f"{name}_df", frame)
    cur.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT {sql_select} FROM {name}_df")
    cur.unregister(f"{name}_df")


# The quarantine rule, one SQL expression per output, over ``s`` (a staged row with its
# parsed value: value_kind, and its time columns: _t_local ...) joined to ``k`` (its key_map
# row). A row is loaded exactly when q_reason is NULL.
_Q_COLUMN = """CASE
    WHEN {control} THEN {control_column}
    WHEN {patient_id} IS NULL THEN 'patient_id'
    WHEN s._t_local IS NULL OR NOT ({ts_in_range}) THEN 'collected_at'
    WHEN k.analyte_code IS NULL THEN 'loinc'
    WHEN k.bad_loinc THEN 'loinc'
    WHEN s.value_kind IN ('numeric', 'censored') AND k.unit_error IS NOT NULL THEN 'unit'
    WHEN {other_mark} THEN 'value'
    WHEN {bad_ref_low} THEN 'ref_low'
    WHEN {bad_ref_high} THEN 'ref_high'
END"""
# q_reason IS NULL, written without building the reason (the insert's filter).
_LOADED = """NOT {control} AND {patient_id} IS NOT NULL AND {ts_in_range} AND k.analyte_code IS NOT NULL
    AND NOT k.bad_loinc AND (k.unit_error IS NULL OR s.value_kind NOT IN ('numeric', 'censored')) AND NOT {other_mark}
    AND NOT {bad_ref_low} AND NOT {bad_ref_high}"""
_Q_REASON = """CASE
    WHEN {control} THEN {control_reason}
    WHEN {patient_id} IS NULL THEN 'patient id is missing'
    WHEN NULLIF(trim(s.collected_at), '') IS NULL THEN 'collection time is missing'
    WHEN s._t_local IS NULL AND regexp_matches(s.collected_at, '^\\s*[0-9]{{4}}-[0-9]{{1,2}}-[0-9]{{1,2}}')
         THEN 'collection time ''' || s.collected_at || ''' is not a date or time on the calendar '
              || '(a day the month does not have, month 13, hour 25 or minute 60)'
    WHEN s._t_local IS NULL THEN 'cannot read collection time ''' || s.collected_at || ''''
    WHEN year(s._t_local) < 1900 THEN 'collection time ''' || s.collected_at || ''' is read as year '
         || year(s._t_local) || ', before 1900: check for a two-digit or mistyped year'
    WHEN NOT ({ts_in_range}) THEN 'collection time ''' || s.collected_at || ''' is read as year '
         || year(s._t_local) || ', beyond 9999: no calendar date'
    WHEN k.analyte_code IS NULL THEN 'neither a LOINC code nor a test name'
    WHEN k.bad_loinc THEN 'LOINC code ''' || trim(s.loinc) || ''' fails its check digit'
    WHEN s.value_kind IN ('numeric', 'censored') AND k.unit_error IS NOT NULL THEN k.unit_error
    WHEN {other_mark} THEN {other_mark_reason}
    WHEN {bad_ref_low} THEN {bad_ref_low_reason}
    WHEN {bad_ref_high} THEN {bad_ref_high_reason}
END"""
_KEY_JOIN = """LEFT JOIN key_map k ON k.loinc IS NOT DISTINCT FROM s.loinc AND k.local_code IS NOT DISTINCT FROM s.local_code
     AND k.test_name IS NOT DISTINCT FROM s.test_name AND k.unit IS NOT DISTINCT FROM s.unit"""

# Every accepted row parsed and written once, straight from the staged rows; sorted by
# patient unless the file already keeps each patient's rows together, so that DuckDB's
# zone maps answer one patient's timeline without scanning the table.
_INSERT_SQL = """
INSERT INTO results (patient_id, collected_at, key_id, result_kind, comparator, value_num, value_text, specimen_id,
                     reported_at, ref_low, ref_high, flag, comment, implausible, conflicting, batch_id, source_row,
                     utc_offset_min, time_unknown, time_flag, after_import)
SELECT {patient_id}, {ts_utc}, k.key_id, s.value_kind::result_kind, s.value_comparator::result_comparator,
       s.value_number, s.value, {specimen_id}, {rts_utc}, {ref_low}, {ref_high}, NULLIF(trim(s.flag), ''), s.comment,
       COALESCE(s.value_kind IN ('numeric', 'censored') AND NOT k.unit_missing AND (
           s.value_number * k.factor < k.plausible_low OR s.value_number * k.factor > k.plausible_high), false),
       false, {batch_id}, s.source_row, {ts_offset}, s._t_date, {ts_flag}, {after_import}
FROM ({values}) s
{key_join}
{zone_join}
WHERE {loaded}
{order_by}
"""

# Quarantined rows. Only rows that fail a cheap test (a control character, no patient, no
# time, no analyte, bad LOINC, a unit that cannot be converted) have their value parsed again;
# the test is implied by q_reason being non-NULL, so the two statements split the rows exactly.
_QUARANTINE_SQL = """
INSERT INTO quarantine
SELECT {batch_id}, s.source_row, {q_column}, {q_reason}, to_json(s.raw_row)
FROM ({values}) s
{key_join}
WHERE {q_reason} IS NOT NULL
ORDER BY s.source_row
"""
_QUARANTINE_CANDIDATES = """(
SELECT s.* FROM (SELECT t.*, {time_columns}, {control_sql} AS _ctrl, t AS raw_row FROM stg t) s
{key_join}
WHERE {control} OR {patient_id} IS NULL OR s._t_local IS NULL OR NOT ({ts_in_range}) OR k.analyte_code IS NULL
   OR k.bad_loinc OR k.unit_error IS NOT NULL OR {other_mark} OR {bad_ref_low} OR {bad_ref_high}
) c"""

_TEMP_TABLES = ("key_map", "tz_map", "multi_hash", "multi", "dup", "conflict_rows")


def _assign_key_ids(cur, keys: pd.DataFrame) -> pd.DataFrame:
    """``keys`` plus ``key_id``: the ``result_keys`` row of each (analyte code, LOINC, name,
    unit, canonical unit, factor, unit missing), created when new. Keys without an analyte
    code (their rows are quarantined) get none."""
    keys = keys.copy()
    keys["loinc_given"] = [v.strip() if isinstance(v, str) and v.strip() else None for v in keys["loinc"]]
    keys["analyte_name"] = [v.strip() if isinstance(v, str) and v.strip() else None for v in keys["test_name"]]
    keys["local_given"] = [v.strip() if isinstance(v, str) and v.strip() else None for v in keys["local_code"]]
    ident = ["analyte_code", "loinc_given", "analyte_name", "unit", "unit_canonical", "factor", "unit_missing",
             "local_given"]
    wanted = keys.loc[keys["analyte_code"].notna(), ident].drop_duplicates().reset_index(drop=True)
    wanted["wanted_id"] = range(len(wanted))
    _register_table(
        cur, "wanted_keys", wanted,
        "wanted_id, analyte_code::VARCHAR AS analyte_code, loinc_given::VARCHAR AS loinc_given, "
        "analyte_name::VARCHAR AS analyte_name, unit::VARCHAR AS unit, unit_canonical::VARCHAR AS unit_canonical, "
        "factor::DOUBLE AS factor, unit_missing::BOOLEAN AS unit_missing, local_given::VARCHAR AS local_given",
    )
    same = """r.analyte_code = w.analyte_code AND r.loinc IS NOT DISTINCT FROM w.loinc_given
              AND r.analyte_name IS NOT DISTINCT FROM w.analyte_name AND r.unit IS NOT DISTINCT FROM w.unit
              AND r.unit_canonical IS NOT DISTINCT FROM w.unit_canonical AND r.factor IS NOT DISTINCT FROM w.factor
              AND r.unit_missing = w.unit_missing AND r.local_code IS NOT DISTINCT FROM w.local_given"""
    cur.execute(
        f"""
        INSERT INTO result_keys (key_id, analyte_code, loinc, analyte_name, unit, unit_canonical, factor, unit_missing,
                                 local_code)
        SELECT (SELECT COALESCE(max(key_id), 0) FROM result_keys) + row_number() OVER (ORDER BY w.wanted_id),
               w.analyte_code, w.loinc_given, w.analyte_name, w.unit, w.unit_canonical, w.factor, w.unit_missing,
               w.local_given
        FROM wanted_keys w
        WHERE NOT EXISTS (SELECT 1 FROM result_keys r WHERE {same})
        """
    )
    ids = dict(cur.execute(f"SELECT w.wanted_id, r.key_id FROM wanted_keys w JOIN result_keys r ON {same}").fetchall())
    cur.execute("DROP TABLE wanted_keys")
    wanted["key_id"] = wanted["wanted_id"].map(ids)
    out = keys.merge(wanted.drop(columns=["wanted_id"]), on=ident, how="left")
    out["key_id"] = out["key_id"].astype("Int64")
    return out.drop(columns=["loinc_given", "analyte_name", "local_given"])


def drop_temp(cur, name: str) -> None:
    """Drop the import's temp table or view ``name``, whichever exists."""
    kind = cur.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_catalog = 'temp' AND table_name = ?", [name]
    ).fetchone()
    if kind is not None:
        cur.execute(f"DROP {'VIEW' if kind[0] == 'VIEW' else 'TABLE'} {name}")


def load_staged(cur, staged: Staged, batch_id: int, file_label: str, *, zone_name: str | None = None,
                mapping: dict | None = None, started: datetime | None = None) -> ImportSummary:
    """Move ``stg`` into ``results`` / ``quarantine`` / ``patients``; return the counts.

    ``zone_name``: IANA zone of the file's local times without an offset (None: stored as
    written, zone unknown); ignored for a source with shifted dates (``staged.shifted_dates``).
    ``mapping``: local code -> LOINC (the site mapping file). ``started``: the import's start
    (naive UTC; a collection time after it is flagged ``after_import``).

    Must run inside the caller's transaction; raises :class:`ImportFileError` for a file
    whose dates or decimal mark cannot be read without a choice from the user.
    """
    n_rejected = cur.execute(f"SELECT count(*) FROM {staged.rejects_table}").fetchone()[0] if staged.rejects_table else 0
    if not staged.skipped and not n_rejected and not cur.execute("SELECT EXISTS (SELECT 1 FROM stg)").fetchone()[0]:
        raise ImportFileError(f"{file_label}: no result rows to import (nothing but a header, or no lab result in it)")
    iso_only = staged.date_order == "iso"
    decimal, date_order = staged.decimal, (None if iso_only else staged.date_order)
    if decimal is None or (date_order is None and not iso_only):
        decimal, date_order = _file_profile(
            cur, file_label, decimal, date_order, detect_dates=not iso_only, delimiter=staged.options.get("delimiter")
        )
    staged.decimal = decimal
    staged.options["date_order"] = date_order
    staged.options["decimal"] = decimal
    if staged.shifted_dates:
        zone_name = None  # shifted de-identified dates: a zone would invent a meaning they do not have
    staged.options["time_zone"] = zone_name
    started = started or datetime.now(timezone.utc).replace(tzinfo=None)
    b = int(batch_id)

    # 1. analyte codes, units and LOINC check digits: decided once per distinct key
    keys = _key_map(cur, mapping)
    _register_table(cur, "key_map", _assign_key_ids(cur, keys))
    cur.execute(
        "CREATE OR REPLACE TEMP TABLE key_map AS SELECT k.*, a.plausible_low, a.plausible_high "
        "FROM key_map k LEFT JOIN analytes a ON a.code = k.analyte_code"
    )
    has_existing = cur.execute("SELECT EXISTS (SELECT 1 FROM results)").fetchone()[0]
    # 2. one pass: parse and write every accepted row, sorted by patient unless the file
    #    already keeps each patient's rows together (checked cheaply by aggregation)
    grouped = cur.execute(
        "SELECT COALESCE(bool_and(mx - mn + 1 = n), true) FROM "
        "(SELECT min(source_row) AS mn, max(source_row) AS mx, count(*) AS n FROM stg GROUP BY patient_id)"
    ).fetchone()[0]
    control_col, control_reason = _control_reason_sql("s")
    parts = dict(
        # invisible characters dropped, Unicode NFC (data.identifiers)
        patient_id=patient_id_sql("s.patient_id"),
        specimen_id=_blank_to_null("s.specimen_id"),
        ref_low=plain_number_sql("s.ref_low", decimal),
        ref_high=plain_number_sql("s.ref_high", decimal),
        batch_id=b,
        key_join=_KEY_JOIN,
        time_columns=_time_columns("t", date_order),
        # control characters: one rule for every format (checked when the file may hold one)
        control_sql=_control_sql("t") if staged.control_possible else "false",
        control="s._ctrl",
        control_column=control_col,
        control_reason=control_reason,
    )
    # A collection time before 1900 is an entry error (a two-digit year read as year 24, a
    # mistyped century), not a result to chart; one beyond 9999 is no calendar date. Later
    # dates are kept: de-identified exports (MIMIC-IV) shift dates far into the future on
    # purpose, and a source without shifted dates has them flagged after_import instead.
    parts["ts_in_range"] = "(s._t_local >= TIMESTAMP '1900-01-01' AND s._t_local < TIMESTAMP '10000-01-01')"
    # the zone of local times written without an offset: looked up once per distinct time
    zone_join, t_zone_off, t_zone_flag, r_zone_off = "", "NULL", "NULL", "NULL"
    if zone_name is not None:
        n_times = _zone_map(cur, parts["time_columns"], zone_name)
        if n_times:
            zone_join = ("LEFT JOIN tz_map z ON z.t = s._t_local AND s._t_off IS NULL\n"
                         "LEFT JOIN tz_map zr ON zr.t = s._r_local AND s._r_off IS NULL")
            t_zone_off, t_zone_flag, r_zone_off = "z.offset_min", "z.flag", "zr.offset_min"
    t_off = f"COALESCE(s._t_off, {t_zone_off})" if zone_join else "s._t_off"
    r_off = f"COALESCE(s._r_off, {r_zone_off})" if zone_join else "s._r_off"
    parts["ts_offset"] = t_off
    parts["ts_utc"] = f"(CASE WHEN {t_off} IS NULL THEN s._t_local ELSE s._t_local - to_minutes({t_off}) END)"
    parts["rts_utc"] = f"(CASE WHEN {r_off} IS NULL THEN s._r_local ELSE s._r_local - to_minutes({r_off}) END)"
    parts["ts_flag"] = (f"(CASE WHEN s._t_off IS NULL THEN {t_zone_flag} END)::time_flag" if zone_join
                        else "NULL::time_flag")
    parts["zone_join"] = zone_join
    # After the import started (5 minutes allowed for clocks that run fast). A date without a
    # time counts from the start of that day; an unknown zone allows the widest offset (+14 h).
    if staged.shifted_dates:
        parts["after_import"] = "false"
    else:
        t_check = "(s._t_local - CASE WHEN s._t_date THEN INTERVAL 12 HOUR ELSE INTERVAL 0 HOUR END)"
        start_sql = f"TIMESTAMP '{started:%Y-%m-%d %H:%M:%S}'"
        parts["after_import"] = (
            f"COALESCE(CASE WHEN {t_off} IS NULL THEN {t_check} > {start_sql} + INTERVAL 14 HOUR + INTERVAL 5 MINUTE "
            f"ELSE {t_check} - to_minutes({t_off}) > {start_sql} + INTERVAL 5 MINUTE END, false)"
        )
    # '4.5' in a decimal-comma file (or '4,5' with '.'): quarantined, never guessed
    other = other_mark(decimal)
    parts["other_mark"] = other_decimal_mark_sql("s.value", decimal)
    parts["other_mark_reason"] = (
        f"'value ''' || s.value || ''' is a number only with the decimal mark ''{other}'' and this file''s "
        f"decimal mark is ''{decimal}'': the ''{other}'' may separate thousands, so it is not read as a number'"
    )
    # A reference limit given but not a plain number with the file's decimal mark: quarantined,
    # never dropped silently or read with the other mark (4.000 /uL read as 4.0)
    for lim in ("ref_low", "ref_high"):
        parts[f"bad_{lim}"] = f"(CASE WHEN NULLIF(trim(s.{lim}), '') IS NULL THEN false ELSE {parts[lim]} IS NULL END)"
        parts[f"bad_{lim}_reason"] = (
            f"'reference limit ''' || s.{lim} || ''' is not a plain number with the decimal mark ''{decimal}'''"
            f" || CASE WHEN contains(s.{lim}, '{other}') THEN ': the ''{other}'' may separate thousands' ELSE '' END"
        )
    parts["q_reason"] = _Q_REASON.format(**parts)
    parts["q_column"] = _Q_COLUMN.format(**parts)
    parts["loaded"] = _LOADED.format(**parts)
    insert = _INSERT_SQL.format(
        **parts, values=value_select_sql("stg", "value", decimal), order_by="" if grouped else "ORDER BY 1, 2")
    cur.execute(_inline_row_columns(insert, date_order, parts["control_sql"].replace("t.", "s.")))
    # 3. quarantine, each row with its column, reason and the row as read (the rows the
    #    insert left out: none in a clean file, which is then not read again)
    n_stg, n_inserted = cur.execute(
        f"SELECT (SELECT count(*) FROM stg), (SELECT count(*) FROM results WHERE batch_id = {b})"
    ).fetchone()
    if n_inserted < n_stg:
        candidates = _QUARANTINE_CANDIDATES.format(**parts)
        cur.execute(_QUARANTINE_SQL.format(**parts, values=value_select_sql(candidates, "value", decimal)))
    # 4. exact duplicates removed, conflicting results flagged
    n_dup = _duplicates_and_conflicts(cur, b, has_existing)

    if staged.rejects_table:
        cur.execute(
            f"INSERT INTO quarantine SELECT {b}, source_row, NULL, ? || ' cannot be read: ' || reason, "
            f"to_json({{'line': line}}) FROM {staged.rejects_table} ORDER BY source_row",
            [staged.rejects_label.split(" cannot")[0]],
        )
    _upsert_patients(cur, staged, b)
    _insert_admissions(cur, staged, b)

    counts = cur.execute(
        f"""
        SELECT count(*),
               count(*) FILTER (WHERE r.result_kind = 'censored'),
               count(*) FILTER (WHERE r.result_kind = 'text'),
               count(*) FILTER (WHERE r.implausible),
               count(*) FILTER (WHERE r.conflicting),
               count(*) FILTER (WHERE k.unit_missing AND r.comparator IS NOT NULL),
               count(DISTINCT r.patient_id),
               count(*) FILTER (WHERE r.time_unknown),
               count(*) FILTER (WHERE r.time_flag IS NOT NULL),
               count(*) FILTER (WHERE r.after_import)
        FROM results r JOIN result_keys k ON k.key_id = r.key_id WHERE r.batch_id = {b}
        """
    ).fetchone()
    q_reasons = dict(
        cur.execute(
            "SELECT CASE WHEN column_name = 'unit' THEN 'unit unknown or not convertible' ELSE reason END AS r, count(*) "
            f"FROM quarantine WHERE batch_id = {b} AND column_name IS NOT NULL GROUP BY r ORDER BY 2 DESC, 1"
        ).fetchall()
    )
    if n_rejected:
        q_reasons[staged.rejects_label] = int(n_rejected)
    skipped = Counter(staged.skipped)
    if n_dup:
        skipped["exact duplicate of a row already kept"] += n_dup
    s = ImportSummary(
        batch_id=b,
        file=file_label,
        format=staged.format,
        rows_read=int(n_stg + n_rejected + sum(staged.skipped.values())),
        rows_loaded=int(counts[0]),
        rows_quarantined=int(sum(q_reasons.values())),
        rows_duplicate=int(n_dup),
        rows_skipped=int(sum(skipped.values())),
        patients=int(counts[6]),
        rows_censored=int(counts[1]),
        rows_text=int(counts[2]),
        rows_implausible=int(counts[3]),
        rows_conflicting=int(counts[4]),
        rows_unit_missing=int(counts[5]),
        rows_time_unknown=int(counts[7]),
        rows_dst=int(counts[8]),
        rows_after_import=int(counts[9]),
        time_zone=zone_name,
        unmapped_codes=_unmapped(keys),
        codes_mapped=_n_mapped(keys, mapping),
        skipped_reasons=dict(skipped),
        quarantine_reasons=q_reasons,
    )
    if s.rows_loaded + s.rows_quarantined + s.rows_skipped != s.rows_read:
        raise RuntimeError(f"internal accounting error for {file_label}: {s.to_dict()}")
    for t in _TEMP_TABLES:
        drop_temp(cur, t)
    return s


# Local times read in a zone (the zone database and Python's datetime end at year 9999; later
# times are quarantined, and 31 December 9999 keeps its time as written)
_ZONE_RANGE = "TIMESTAMP '1900-01-01' AND TIMESTAMP '9999-12-30 23:59:59'"


def _zone_map(cur, time_columns: str, zone_name: str) -> int:
    """Temp table ``tz_map`` (t, offset_min, flag): every distinct local time of ``stg`` written
    without an offset (collection and report), read in ``zone_name`` (:func:`data.timezones.localize`).
    Returns its number of rows."""
    local = cur.execute(
        f"""
        WITH q AS (SELECT {time_columns} FROM stg t)
        SELECT _t_local AS t FROM q WHERE _t_off IS NULL AND _t_local BETWEEN {_ZONE_RANGE}
        UNION SELECT _r_local FROM q WHERE _r_off IS NULL AND _r_local BETWEEN {_ZONE_RANGE}
        """
    ).fetchnumpy()["t"]
    frame = localize(np.asarray(local), zone_name)
    frame = pd.DataFrame({"t": frame["local"], "offset_min": frame["offset_min"], "flag": frame["flag"]})
    _register_table(cur, "tz_map", frame, "t::TIMESTAMP AS t, offset_min::SMALLINT AS offset_min, flag::VARCHAR AS flag")
    return len(frame)


def _unmapped(keys: pd.DataFrame) -> dict[str, int]:
    """Local codes of the file with no LOINC code given and none from the site mapping: code -> rows."""
    out: dict[str, int] = {}
    for lo, local, code, n in zip(keys["loinc"], keys["local_code"], keys["analyte_code"], keys["n"]):
        if isinstance(local, str) and local.strip() and not (isinstance(lo, str) and lo.strip()) \
                and code == local.strip():
            out[local.strip()] = out.get(local.strip(), 0) + int(n)
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _n_mapped(keys: pd.DataFrame, mapping: dict | None) -> int:
    """Distinct local codes of the file that the site mapping turned into a LOINC code."""
    if not mapping:
        return 0
    return len({local.strip() for lo, local in zip(keys["loinc"], keys["local_code"])
                if isinstance(local, str) and local.strip() in mapping and not (isinstance(lo, str) and lo.strip())})


# What makes two results at the same patient, analyte and time exact copies of each other.
_IDENTITY = ("specimen_id", "reported_at", "value_text", "unit", "flag", "comment", "ref_low", "ref_high")


def _duplicates_and_conflicts(cur, b: int, has_existing: bool) -> int:
    """Remove batch ``b``'s exact duplicates and flag conflicting results; return the number removed.

    A row of the batch is an exact duplicate when an earlier row (of an earlier batch, or
    earlier in this file) has the same patient, analyte, collection time and
    :data:`_IDENTITY`: the first is kept. A (patient, analyte, time) left with more than
    one distinct value (numbers compared in the canonical unit, text as written) is marked
    ``conflicting`` on every row, old and new. Only keys that
    occur more than once can hold either; they are found by a hash of the key, and the
    full key is compared afterwards.
    """
    cur.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE multi_hash AS
        SELECT hash(r.patient_id, k.analyte_code, r.collected_at) AS key_hash
        FROM results r JOIN result_keys k ON k.key_id = r.key_id
        WHERE r.batch_id = {b}
        GROUP BY key_hash HAVING count(*) > 1
        """
    )
    existing = (
        f"""UNION
        SELECT DISTINCT n.patient_id, n.analyte_code, n.collected_at
        FROM lab_results n JOIN lab_results o
          ON o.patient_id = n.patient_id AND o.analyte_code = n.analyte_code AND o.collected_at = n.collected_at
        WHERE n.batch_id = {b} AND o.batch_id <> {b}"""
        if has_existing
        else ""
    )
    cur.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE multi AS
        SELECT DISTINCT l.patient_id, l.analyte_code, l.collected_at FROM lab_results l
        SEMI JOIN multi_hash h ON h.key_hash = hash(l.patient_id, l.analyte_code, l.collected_at)
        WHERE l.batch_id = {b}
        {existing}
        """
    )
    if not cur.execute("SELECT count(*) FROM multi").fetchone()[0]:
        return 0
    cur.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE dup AS
        SELECT source_row FROM (
            SELECT l.batch_id, l.source_row, row_number() OVER (
                PARTITION BY l.patient_id, l.analyte_code, l.collected_at, {', '.join('l.' + c for c in _IDENTITY)}
                ORDER BY l.batch_id, l.source_row) AS rn
            FROM lab_results l SEMI JOIN multi m
              ON m.patient_id = l.patient_id AND m.analyte_code = l.analyte_code AND m.collected_at = l.collected_at
        ) WHERE rn > 1 AND batch_id = {b}
        """
    )
    n_dup = cur.execute("SELECT count(*) FROM dup").fetchone()[0]
    if n_dup:
        cur.execute(f"DELETE FROM results WHERE batch_id = {b} AND source_row IN (SELECT source_row FROM dup)")
    cur.execute(
        """
        CREATE OR REPLACE TEMP TABLE conflict_rows AS
        WITH kept AS (
            SELECT l.patient_id, l.analyte_code, l.collected_at, l.batch_id, l.source_row,
                   -- the result as a value: numbers in the canonical unit (110 and 110.0 mg/dL,
                   -- or 4.4 mmol/L and 4.4 mEq/L, are one value), anything else as written
                   COALESCE(l.comparator || printf('%.9g', l.value_canonical), 'as written:' || COALESCE(l.value_text, ''))
                       AS result_value
            FROM lab_results l SEMI JOIN multi m
              ON m.patient_id = l.patient_id AND m.analyte_code = l.analyte_code AND m.collected_at = l.collected_at
        ),
        conflicting AS (
            SELECT patient_id, analyte_code, collected_at FROM kept GROUP BY ALL
            HAVING count(DISTINCT result_value) > 1
        )
        SELECT kept.batch_id, kept.source_row FROM kept SEMI JOIN conflicting c
          ON c.patient_id = kept.patient_id AND c.analyte_code = kept.analyte_code AND c.collected_at = kept.collected_at
        """
    )
    cur.execute(
        """
        UPDATE results SET conflicting = true FROM conflict_rows c
        WHERE results.batch_id = c.batch_id AND results.source_row = c.source_row AND NOT results.conflicting
        """
    )
    return int(n_dup)



_SEX_SQL = """CASE
    WHEN lower(trim(sex)) IN ('f', 'female', 'w', 'woman', 'weiblich', 'femme') THEN 'F'
    WHEN lower(trim(sex)) IN ('m', 'male', 'man', 'männlich', 'homme') THEN 'M'
END"""


def _upsert_patients(cur, staged: Staged, batch_id: int) -> None:
    """Create patients seen in this batch; fill sex / birth date / age where still unknown."""
    if staged.has_patients:
        src = f"""
            SELECT {patient_id_sql("patient_id")} AS patient_id, any_value({_SEX_SQL}) AS sex,
                   any_value(TRY_CAST(birth_date AS DATE)) AS birth_date,
                   any_value(TRY_CAST(age_at_ref AS DOUBLE)) AS age_at_ref,
                   any_value(TRY_CAST(ref_date AS DATE)) AS ref_date
            FROM stg_patients WHERE {patient_id_sql("patient_id")} IS NOT NULL GROUP BY 1
        """
    else:
        src = "SELECT NULL::VARCHAR AS patient_id, NULL::VARCHAR AS sex, NULL::DATE AS birth_date, NULL::DOUBLE AS age_at_ref, NULL::DATE AS ref_date WHERE false"
    cur.execute(
        f"""
        INSERT INTO patients (patient_id, sex, birth_date, age_at_ref, ref_date, source, batch_id)
        SELECT ids.patient_id, src.sex, src.birth_date, src.age_at_ref, src.ref_date, ?, {batch_id}
        FROM (SELECT DISTINCT patient_id FROM results WHERE batch_id = {batch_id}
              UNION SELECT patient_id FROM ({src})) ids
        LEFT JOIN ({src}) src ON src.patient_id = ids.patient_id
        ON CONFLICT (patient_id) DO UPDATE SET
            sex = COALESCE(patients.sex, EXCLUDED.sex),
            birth_date = COALESCE(patients.birth_date, EXCLUDED.birth_date),
            age_at_ref = COALESCE(patients.age_at_ref, EXCLUDED.age_at_ref),
            ref_date = COALESCE(patients.ref_date, EXCLUDED.ref_date)
        """,
        [staged.format],
    )


def _insert_admissions(cur, staged: Staged, batch_id: int) -> None:
    """Store the staged admissions of patients with results (an admission already stored is kept as it is);
    an admission without a readable admission time is left out."""
    if not staged.has_admissions:
        return
    cur.execute(
        f"""
        INSERT INTO admissions (patient_id, admission_id, admitted_at, discharged_at, admission_type, batch_id)
        SELECT {patient_id_sql("patient_id")}, trim(admission_id), TRY_CAST(admitted_at AS TIMESTAMP),
               TRY_CAST(NULLIF(trim(discharged_at), '') AS TIMESTAMP), NULLIF(trim(admission_type), ''), {batch_id}
        FROM stg_admissions
        WHERE TRY_CAST(admitted_at AS TIMESTAMP) IS NOT NULL AND NULLIF(trim(admission_id), '') IS NOT NULL
          AND {patient_id_sql("patient_id")} IN (SELECT patient_id FROM patients)
        ON CONFLICT DO NOTHING
        """
    )
    drop_temp(cur, "stg_admissions")


def summary_json(summary: ImportSummary) -> str:
    keys = ["batch_id", "file", "format", "rows_read", "rows_loaded", "rows_quarantined", "rows_duplicate",
            "rows_skipped", "patients", "rows_censored", "rows_text", "rows_implausible", "rows_conflicting",
            "rows_unit_missing", "rows_time_unknown", "rows_dst", "rows_after_import", "time_zone",
            "unmapped_codes", "codes_mapped", "skipped_reasons", "quarantine_reasons", "already_imported", "message"]
    d = summary.to_dict()
    return json.dumps({k: d[k] for k in keys}, ensure_ascii=False, default=str)
