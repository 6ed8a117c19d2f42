"""The abnormal flag of every result (H, L, HH, LL, A, AA, N), from the right limits.

One rule, in Python (:func:`result_flags`, used by the anomaly rules, the chart and the
cumulative table) and in DuckDB SQL (:func:`flag_counts_sql`, used by the Patients list over
every stored result), tested against each other:

1. **Critical limits** of the critical value list in use (``data/reference/critical_values.csv``,
   Kost 1990, or a site file) always apply: a value beyond one is ``HH`` / ``LL`` whatever else
   was reported (a critical value is site policy and is never hidden by a laboratory flag).
2. **The file's flag** (``flag`` column, FHIR ``interpretation``, MIMIC-IV ``flag``), read with
   ``data/reference/flag_codes.csv`` (HL7 v3 ObservationInterpretation codes and displays):
   ``HH``/``LL``/``H``/``L``/``N`` are taken as reported; ``A`` (abnormal, no direction) and
   ``AA`` (critical, no direction) take their direction from the limits below when those settle
   it, else stay ``A`` / ``AA``. A flag not in the file (e.g. ``'*'``) is ``A``, as before; the
   change codes (U, D, B, W) say nothing about the interval and fall through to the limits.
3. **The file's reference limits** reported with the result (canonical unit), when it has any.
4. **The catalogue's reference interval** (``data/reference/reference_intervals.csv``) for the
   patient's sex and age at collection (age from the birth date, else from the age the source
   gave at its reference date). Sex unknown and only sex-specific intervals: their union (flag
   only outside both). Age unknown: the adult interval (the one that contains 18 years).

A value is compared only when it is a valid number (numeric, or censored when the limit
itself settles it: ``'<3'`` against a low limit of 3.3 is ``L``, ``'<10'`` is not). Text,
empty and unit-missing results get only the file's flag; implausible values (possible entry
errors) get no flag. ``N``: compared and inside the limits, or reported normal; None: nothing
to compare with and no flag reported.

Abnormal (counted in the Patients list): :data:`ABNORMAL_FLAGS`; critical: :data:`CRITICAL_FLAGS`.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

__all__ = [
    "FLAGS",
    "ABNORMAL_FLAGS",
    "CRITICAL_FLAGS",
    "ADULT_AGE_YEARS",
    "load_flag_codes",
    "normalise_flag",
    "limits_frame",
    "critical_frame",
    "classify",
    "flag_of",
    "flags_of",
    "result_flags",
    "flag_counts_sql",
    "register_reference",
]

FLAGS = ("LL", "L", "N", "H", "HH", "A", "AA")
ABNORMAL_FLAGS = frozenset({"L", "H", "LL", "HH", "A", "AA"})
CRITICAL_FLAGS = frozenset({"LL", "HH", "AA"})
# Age unknown: the interval that holds at this age is used (reference_intervals.csv are adult
# intervals; MIMIC-IV includes ages >= 18 only).
ADULT_AGE_YEARS = 18.0
_NO_STATEMENT = "-"  # change codes (U, D, B, W): nothing said about the reference interval


@functools.lru_cache(maxsize=1)
def load_flag_codes() -> dict[str, str]:
    """``flag_codes.csv`` as ``{lower-case spelling: meaning}`` (meaning one of :data:`FLAGS` or ``'-'``).

    Raises ``ValueError`` for other columns, a row without a source, a duplicated spelling or
    an unknown meaning.
    """
    from data.catalogue import reference_file

    frame = pd.read_csv(reference_file("flag_codes.csv"), dtype=str, keep_default_na=False)
    if list(frame.columns) != ["spelling", "meaning", "source"]:
        raise ValueError(f"flag_codes.csv: columns {list(frame.columns)} != ['spelling', 'meaning', 'source']")
    out = {}
    for r in frame.itertuples(index=False):
        key = r.spelling.strip().lower()
        if not r.source.strip():
            raise ValueError(f"flag_codes.csv: {key!r} has no source")
        if key in out:
            raise ValueError(f"flag_codes.csv: duplicated spelling {key!r}")
        if r.meaning not in FLAGS and r.meaning != _NO_STATEMENT:
            raise ValueError(f"flag_codes.csv: {key!r} has meaning {r.meaning!r}, expected one of {list(FLAGS)} or '-'")
        out[key] = r.meaning
    return out


def normalise_flag(flag) -> str | None:
    """A reported flag as one of :data:`FLAGS`, or None (no flag, or a change code that says nothing).

    ``'H'``, ``'high'``, ``'HU'`` -> ``'H'``; ``'abnormal'`` -> ``'A'``; ``'critical high'`` ->
    ``'HH'``; an unknown non-empty flag -> ``'A'``.
    """
    if flag is None or (isinstance(flag, float) and np.isnan(flag)):
        return None
    text = str(flag).strip().lower()
    if not text:
        return None
    meaning = load_flag_codes().get(text, "A")
    return None if meaning == _NO_STATEMENT else meaning


# ---------------------------------------------------------------------------------------------
# The catalogue limits by analyte, sex and age (canonical units)
# ---------------------------------------------------------------------------------------------


def limits_frame(reference=None) -> pd.DataFrame:
    """Catalogue reference intervals to look up: one row per (code, sexkey, age band).

    Columns ``code, sexkey ('F', 'M', 'unknown'), age_low, age_high (years; NaN: open),
    adult (bool: the row used when the age is unknown), low, high (canonical unit; NaN: none),
    source``. A sex with no interval of its own uses the ``'any'`` interval; ``'unknown'`` is
    the ``'any'`` interval or the union of the sex-specific ones (:class:`clinical.anomalies.ClinicalReference`).
    """
    from clinical.anomalies import default_reference

    ref = reference or default_reference()
    iv = ref.intervals
    rows = []
    for code, g in iv.groupby("code", sort=False):
        anyrows = g[g["sex"] == "any"]
        for sexkey in ("F", "M", "unknown"):
            own = g[g["sex"] == sexkey]
            use = own if len(own) else anyrows
            for r in use.itertuples(index=False):
                rows.append((code, sexkey, r.age_low, r.age_high, r.low, r.high, r.source))
    out = pd.DataFrame(rows, columns=["code", "sexkey", "age_low", "age_high", "low", "high", "source"])
    a = ADULT_AGE_YEARS
    out["adult"] = (out["age_low"].isna() | (out["age_low"] <= a)) & (out["age_high"].isna() | (a < out["age_high"]))
    first = out[out["adult"]].drop_duplicates(["code", "sexkey"]).index  # one adult row per (code, sexkey)
    out["adult"] = out.index.isin(first)
    for c in ("age_low", "age_high", "low", "high"):
        out[c] = out[c].astype(float)
    return out[["code", "sexkey", "age_low", "age_high", "adult", "low", "high", "source"]]


def critical_frame(reference=None) -> pd.DataFrame:
    """The critical value list in use: ``code, critical_low, critical_high`` (canonical; NaN: none), ``source``."""
    from clinical.anomalies import default_reference

    ref = reference or default_reference()
    rows = [(c, float(lo), float(hi), src) for c, (lo, hi, src) in ref.critical.items()]
    return pd.DataFrame(rows, columns=["code", "critical_low", "critical_high", "source"])


# ---------------------------------------------------------------------------------------------
# Python: prepared timeline rows -> flags
# ---------------------------------------------------------------------------------------------


def _beyond(v, comp, num, cens, low, high):
    with np.errstate(invalid="ignore"):
        below = num & (v < low)
        above = num & (v > high)
        below |= cens & (((comp == "<") & (v <= low)) | ((comp == "<=") & (v < low)))
        above |= cens & (((comp == ">") & (v >= high)) | ((comp == ">=") & (v > high)))
    return below & np.isfinite(low), above & np.isfinite(high)


# 0-d object arrays: np.where over them fills its result with references to these two strings
_LAB_BASIS = np.array("laboratory reference interval", dtype=object)
_CATALOGUE_BASIS = np.array("catalogue reference interval", dtype=object)


def classify(t: pd.DataFrame, critical_low: np.ndarray, critical_high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flag, basis) arrays for rows prepared by :func:`clinical.anomalies._prepare`.

    ``t`` needs ``value_canonical, comparator, x_num, x_cens, implausible, x_lo, x_hi, x_src,
    x_cite`` and ``flag`` (as reported; may be absent); ``critical_low/high`` are aligned
    arrays (NaN: no critical limit). ``basis`` names where the flag came from: ``'critical
    value list'``, ``'laboratory flag'``, ``'laboratory reference interval'`` or ``'catalogue
    reference interval'`` (None without a flag).
    """
    n = len(t)
    v = t["value_canonical"].to_numpy(float)
    comp = t["comparator"].astype(object).to_numpy()
    num, cens = t["x_num"].to_numpy(bool), t["x_cens"].to_numpy(bool)
    implausible = t["implausible"].to_numpy(bool)
    lo, hi = t["x_lo"].to_numpy(float), t["x_hi"].to_numpy(float)
    cbelow, cabove = _beyond(v, comp, num, cens, np.asarray(critical_low, float), np.asarray(critical_high, float))
    below, above = _beyond(v, comp, num, cens, lo, hi)
    reported = (np.array([normalise_flag(f) for f in t["flag"]], dtype=object) if "flag" in t
                else np.full(n, None, dtype=object))
    limits_basis = np.where(t["x_src"].to_numpy(dtype=object) == "row", _LAB_BASIS, _CATALOGUE_BASIS)  # shared str
    has_limit = np.isfinite(lo) | np.isfinite(hi)
    flag = np.full(n, None, dtype=object)
    basis = np.full(n, None, dtype=object)

    def put(mask, f, b):
        m = mask & (flag == None)  # noqa: E711 - first rule that applies wins
        flag[m] = f if isinstance(f, str) else f[m]
        basis[m] = b if isinstance(b, str) else b[m]

    put(implausible, "", "")  # no flag: cleared below
    put(cabove, "HH", "critical value list")
    put(cbelow, "LL", "critical value list")
    put(np.isin(reported, ["HH", "LL"]), reported, "laboratory flag")
    aa = reported == "AA"
    put(aa & above, "HH", "laboratory flag")
    put(aa & below, "LL", "laboratory flag")
    put(aa, "AA", "laboratory flag")
    put(np.isin(reported, ["H", "L"]), reported, "laboratory flag")
    a = reported == "A"
    put(a & above, "H", "laboratory flag")
    put(a & below, "L", "laboratory flag")
    put(a, "A", "laboratory flag")
    put(reported == "N", "N", "laboratory flag")
    put(above, "H", limits_basis)
    put(below, "L", limits_basis)
    put(num & has_limit, "N", limits_basis)
    flag[implausible] = None
    basis[implausible] = None
    return flag, basis


def _finite(x) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def flag_of(value, comparator, kind, *, reported=None, low=None, high=None, critical_low=None, critical_high=None,
            implausible: bool = False, unit_missing: bool = False) -> str | None:
    """The flag of one result by the rule of this module (for a chart point or a table cell).

    ``value`` in the canonical unit; ``comparator`` ``'='``, ``'<'``, ``'<='``, ``'>'``, ``'>='``;
    ``kind`` ``'numeric'``, ``'censored'``, ``'text'`` or ``'empty'``; ``reported`` the file's flag
    as given; ``low/high`` the limits to compare with (the file's, else the catalogue's: the caller
    chooses, as :func:`classify` does); ``critical_low/high`` the critical list's. Returns one of
    :data:`FLAGS` or None. Same answers as :func:`classify` (tested against each other).
    """
    if implausible:
        return None
    v = None if unit_missing else _finite(value)
    comp = comparator if isinstance(comparator, str) else None
    num = v is not None and kind == "numeric"
    cens = v is not None and kind == "censored" and comp in ("<", "<=", ">", ">=")

    def above(lim):
        lim = _finite(lim)
        return lim is not None and ((num and v > lim) or (cens and ((comp == ">" and v >= lim) or (comp == ">=" and v > lim))))

    def below(lim):
        lim = _finite(lim)
        return lim is not None and ((num and v < lim) or (cens and ((comp == "<" and v <= lim) or (comp == "<=" and v < lim))))

    if above(critical_high):
        return "HH"
    if below(critical_low):
        return "LL"
    rf = normalise_flag(reported)
    if rf in ("HH", "LL", "H", "L", "N"):
        return rf
    if rf == "AA":
        return "HH" if above(high) else "LL" if below(low) else "AA"
    if rf == "A":
        return "H" if above(high) else "L" if below(low) else "A"
    if above(high):
        return "H"
    if below(low):
        return "L"
    if num and (_finite(low) is not None or _finite(high) is not None):
        return "N"
    return None


def flags_of(value, comparator, kind, *, reported, low, high, critical_low, critical_high, implausible,
             unit_missing) -> np.ndarray:
    """:func:`flag_of` of many results at once (same rule, vectorised; tested against it row by row).

    Every argument is an array-like of one length n: ``value`` canonical floats (NaN unknown),
    ``comparator`` strings or None, ``kind`` ``'numeric'``/``'censored'``/..., ``reported`` the
    file's flags as given, ``low/high/critical_low/critical_high`` floats (NaN: no limit),
    ``implausible/unit_missing`` booleans. Returns an object array (n,) of :data:`FLAGS` or None.
    """
    v = np.asarray(pd.to_numeric(pd.Series(value), errors="coerce"), dtype=float)
    n = len(v)
    unit_missing = np.asarray(unit_missing, dtype=bool)
    implausible = np.asarray(implausible, dtype=bool)
    known = np.isfinite(v) & ~unit_missing
    comp = np.array([c if isinstance(c, str) else None for c in comparator], dtype=object)
    kind = np.asarray(kind, dtype=object)
    num = known & (kind == "numeric")
    cens = known & (kind == "censored") & np.isin(comp, ["<", "<=", ">", ">="])

    def lim(x):
        return np.asarray(pd.to_numeric(pd.Series(x), errors="coerce"), dtype=float)

    lo, hi, clo, chi = lim(low), lim(high), lim(critical_low), lim(critical_high)
    with np.errstate(invalid="ignore"):
        def above(b):
            return np.isfinite(b) & ((num & (v > b)) | (cens & (((comp == ">") & (v >= b)) | ((comp == ">=") & (v > b)))))

        def below(b):
            return np.isfinite(b) & ((num & (v < b)) | (cens & (((comp == "<") & (v <= b)) | ((comp == "<=") & (v < b)))))

        a_hi, b_lo = above(hi), below(lo)
        codes = {f: normalise_flag(f) for f in pd.unique(pd.Series(reported, dtype=object).dropna())}
        rf = np.array([codes.get(f) if f is not None and not (isinstance(f, float) and np.isnan(f)) else None
                       for f in reported], dtype=object)
        conds = [implausible, above(chi), below(clo), np.isin(rf, ["HH", "LL", "H", "L", "N"]),
                 (rf == "AA") & a_hi, (rf == "AA") & b_lo, rf == "AA",
                 (rf == "A") & a_hi, (rf == "A") & b_lo, rf == "A",
                 a_hi, b_lo, num & (np.isfinite(lo) | np.isfinite(hi))]
        choices = [None, "HH", "LL", rf, "HH", "LL", "AA", "H", "L", "A", "H", "L", "N"]
    out = np.full(n, None, dtype=object)
    done = np.zeros(n, dtype=bool)
    for c, ch in zip(conds, choices):
        m = np.asarray(c, dtype=bool) & ~done
        out[m] = ch[m] if isinstance(ch, np.ndarray) else ch
        done |= m
    return out


def result_flags(timeline: pd.DataFrame, patients=None, reference=None) -> pd.DataFrame:
    """The flag of every row of ``timeline`` (:data:`data.queries.TIMELINE_COLUMNS`), in its order.

    Returns a frame with the timeline's index and columns ``result_id, flag`` (one of
    :data:`FLAGS` or None), ``flag_basis`` (see :func:`classify`), ``ref_low, ref_high`` (the
    limits compared with, canonical unit), ``ref_source`` (``'row'`` or the catalogue citation),
    ``critical_low, critical_high``. ``patients``: a :func:`data.queries.patient_info` dict or a
    frame of them (sex and age at collection choose the catalogue interval). Raises
    ``ValueError`` when a required timeline column is missing.
    """
    from clinical.anomalies import _prepare, default_reference

    ref = reference or default_reference()
    t = _prepare(timeline, patients, ref)
    text = lambda col: np.array([x if isinstance(x, str) else None for x in t[col]], dtype=object)  # noqa: E731
    out = pd.DataFrame({
        "result_id": t["result_id"].to_numpy(),
        "flag": pd.Series(text("x_flag"), dtype=object, index=timeline.index),
        "flag_basis": pd.Series(text("x_flag_basis"), dtype=object, index=timeline.index),
        "ref_low": t["x_lo"].to_numpy(float), "ref_high": t["x_hi"].to_numpy(float),
        "ref_source": np.where(t["x_src"].to_numpy(dtype=object) == "row", "row", t["x_cite"].to_numpy(dtype=object)),
        "critical_low": t["x_clo"].to_numpy(float), "critical_high": t["x_chi"].to_numpy(float),
    }, index=timeline.index)
    return out


# ---------------------------------------------------------------------------------------------
# SQL: the same rule over the store (the Patients list)
# ---------------------------------------------------------------------------------------------

_INTERVALS, _CRITICAL, _CODES = "lt_flag_intervals", "lt_flag_critical", "lt_flag_codes"


def register_reference(cur, reference=None) -> None:
    """Register the catalogue limits, the critical list and the flag codes on a DuckDB cursor
    for :func:`flag_counts_sql` (views named ``lt_flag_*``, local to the cursor's connection).

    NaN limits are registered as NULL (DuckDB orders NaN above every number, so ``v < NaN``
    would be true).
    """
    iv = limits_frame(reference)[["code", "sexkey", "age_low", "age_high", "adult", "low", "high"]]
    cv = critical_frame(reference)[["code", "critical_low", "critical_high"]]
    codes = pd.DataFrame(sorted(load_flag_codes().items()), columns=["spelling", "meaning"])
    for name, frame in ((_INTERVALS, iv), (_CRITICAL, cv), (_CODES, codes)):
        cur.register(name, frame.astype(object).where(frame.notna(), None))


def flag_counts_sql() -> str:
    """A SELECT over ``results``, ``result_keys`` and ``patients`` giving, per patient with results,
    ``patient_id, n_results, n_abnormal, n_critical, n_implausible, first_result, last_result``
    by the rule of this module (one scan of ``results``).

    Needs :func:`register_reference` on the same cursor first. The comparator and result kind
    stay DuckDB enums and each comparison is computed once (``benchmarks/patients_list.py``).
    """
    def outside(lo: str, hi: str) -> str:  # a missing limit never settles anything (+-infinity)
        hi, lo = f"coalesce({hi}, 'inf'::DOUBLE)", f"coalesce({lo}, '-inf'::DOUBLE)"
        return (f"CASE WHEN num THEN v > {hi} OR v < {lo} WHEN cens THEN CASE comp WHEN '>' THEN v >= {hi} "
                f"WHEN '>=' THEN v > {hi} WHEN '<' THEN v <= {lo} WHEN '<=' THEN v < {lo} ELSE false END ELSE false END")

    return f"""
        WITH kx AS (  -- per analyte key (a few hundred rows): conversion factor and the critical limits
            SELECT k.key_id, k.factor, k.unit_missing, c.critical_low AS clo, c.critical_high AS chi
            FROM result_keys k LEFT JOIN {_CRITICAL} c ON c.code = k.analyte_code
        ), lim AS (  -- catalogue intervals per analyte key and sex (0 F, 1 M, 2 unknown)
            SELECT k.key_id, CASE l.sexkey WHEN 'F' THEN 0 WHEN 'M' THEN 1 ELSE 2 END AS sexcode,
                   l.age_low, l.age_high, l.adult, l.low, l.high
            FROM result_keys k JOIN {_INTERVALS} l ON l.code = k.analyte_code
        ), px AS (
            SELECT patient_id, CASE sex WHEN 'F' THEN 0 WHEN 'M' THEN 1 ELSE 2 END AS sexcode,
                   epoch(birth_date::TIMESTAMP) AS birth_s, age_at_ref, epoch(ref_date::TIMESTAMP) AS ref_s
            FROM patients
        ), y AS (
            SELECT r.patient_id, r.collected_at, r.implausible, r.key_id, r.comparator AS comp,
                   CASE WHEN r.flag IS NULL OR trim(r.flag) = '' THEN NULL
                        WHEN fc.meaning = '-' THEN NULL ELSE coalesce(fc.meaning, 'A') END AS rf,
                   CASE WHEN NOT kx.unit_missing AND NOT r.implausible AND isfinite(r.value_num * kx.factor)
                        THEN r.value_num * kx.factor END AS v,
                   r.result_kind AS kind, kx.clo, kx.chi,
                   CASE WHEN NOT kx.unit_missing THEN r.ref_low * kx.factor END AS own_lo,
                   CASE WHEN NOT kx.unit_missing THEN r.ref_high * kx.factor END AS own_hi,
                   coalesce(px.sexcode, 2) AS sexcode,
                   CASE WHEN px.birth_s IS NOT NULL THEN (epoch(r.collected_at) - px.birth_s) / 86400.0 / 365.25
                        WHEN px.age_at_ref IS NOT NULL
                            THEN px.age_at_ref + coalesce((epoch(r.collected_at) - px.ref_s) / 86400.0 / 365.25, 0.0)
                   END AS age
            FROM results r JOIN kx USING (key_id) LEFT JOIN px USING (patient_id)
            LEFT JOIN {_CODES} fc ON r.flag IS NOT NULL AND fc.spelling = lower(trim(r.flag))
        ), y2 AS (
            SELECT y.*, v IS NOT NULL AND comp IS NOT NULL AND kind = 'numeric' AS num,
                   v IS NOT NULL AND kind = 'censored' AND comp IN ('<', '<=', '>', '>=') AS cens,
                   coalesce((isfinite(own_lo) OR isfinite(own_hi))
                            AND NOT coalesce(isfinite(own_lo) AND isfinite(own_hi) AND own_hi <= own_lo, false),
                            false) AS own
            FROM y
        ), z AS (
            SELECT y2.patient_id, y2.collected_at, y2.implausible, y2.rf, y2.num, y2.cens, y2.v, y2.comp, y2.clo, y2.chi,
                   CASE WHEN y2.own THEN CASE WHEN isfinite(y2.own_lo) THEN y2.own_lo END ELSE l.low END AS lo,
                   CASE WHEN y2.own THEN CASE WHEN isfinite(y2.own_hi) THEN y2.own_hi END ELSE l.high END AS hi
            FROM y2
            LEFT JOIN lim l ON NOT y2.own AND l.key_id = y2.key_id AND l.sexcode = y2.sexcode
                 AND CASE WHEN y2.age IS NULL THEN l.adult
                          ELSE (l.age_low IS NULL OR y2.age >= l.age_low) AND (l.age_high IS NULL OR y2.age < l.age_high) END
        ), b AS (
            SELECT patient_id, collected_at, implausible, rf, {outside("lo", "hi")} AS outside,
                   {outside("clo", "chi")} AS beyond_critical
            FROM z
        ), f AS (
            -- the flag of clinical.flags.classify, reduced to what the list counts (no string per row):
            -- critical = HH, LL or AA; abnormal = critical, H, L or A
            SELECT patient_id, collected_at, implausible,
                   NOT implausible AND (beyond_critical OR (rf IS NOT NULL AND rf IN ('HH', 'LL', 'AA'))) AS critical,
                   NOT implausible AND (beyond_critical OR CASE WHEN rf IS NULL THEN outside
                                                               ELSE rf IN ('HH', 'LL', 'AA', 'H', 'L', 'A') END) AS abnormal
            FROM b
        )
        SELECT patient_id, count(*) AS n_results,
               count(*) FILTER (WHERE abnormal) AS n_abnormal,
               count(*) FILTER (WHERE critical) AS n_critical,
               count(*) FILTER (WHERE implausible) AS n_implausible,
               min(collected_at) AS first_result, max(collected_at) AS last_result
        FROM f GROUP BY patient_id
    """
