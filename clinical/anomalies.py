"""Review-worthy anomalies: which rule fired, on what evidence, from which source.

Input is the timeline frame (:data:`data.queries.TIMELINE_COLUMNS`, one or many patients)
plus patient demographics (:func:`data.queries.patient_info` dicts or a frame of them).
Output is one row per review item (:data:`ANOMALY_COLUMNS`)::

    result_id, patient_id, analyte_code, analyte_name, collected_at, rule, flag, score,
    value, unit, evidence (dict), source (citation), text (decision-support wording),
    model_version (None for rule-based anomalies)

**Alert budget.** A result outside its reference interval is a *flag on the result* (H/L on the
chart, in the table and in the Patients list's counts: :mod:`clinical.flags`), not a review item.
Review items are the rules below; consecutive flags of one rule on one analyte within one
episode (the same admission when admissions are given, else flags no more than
``runs.max_gap_hours`` apart) are ONE item with its run of results (:func:`group_runs`: the
payload lists the run, the text names the first, peak and last results). Critical values keep
their direction (a critical high and a critical low are two items).

Rules (clinical numbers come from ``data/reference/*.csv``, settings and patterns from
``clinical/rules/anomaly_rules.yaml``; none is written here):

1. ``critical_value`` (``LL``/``HH``/``AA``): the result's flag is critical
   (:mod:`clinical.flags`): beyond a limit of the critical value list (site file, default
   ``critical_values.csv``, Kost 1990), or reported critical by the laboratory. Score: distance
   beyond the limit in critical-range widths.
2. ``delta_check`` (``UP``/``DOWN``): change from the previous valid result of the same
   analyte, collected at most ``delta_check.max_interval_days`` earlier, beyond the reference
   change value ``RCV = 2^0.5 Z (CVA^2 + CVI^2)^0.5`` (``Z = delta_check.review_z``, 2.58: the
   check is screened on every result) (for analytes flagged ``skewed`` the
   log-normal RCV ``exp(+-2^0.5 Z sigma) - 1`` with ``sigma^2 = ln(1 + CVA^2) + ln(1 + CVI^2)``,
   Fraser, CCLM 2011) **and** at least the analyte's cited minimum absolute change
   (``delta_check_limits.csv``: KDIGO 0.3 mg/dL for creatinine, the allowable error of one
   result for others). Analytes without a CVI/CVA or a minimum get no delta check. Score: the
   change divided by the RCV limit it crossed (signed). Texts name the baseline they compute from.
3. ``model_surprise`` (``ABOVE``/``BELOW``): outside the **calibrated** prediction interval
   the forecaster gave from the history strictly before the result (95 % split-conformal when
   the model is calibrated at 95 %, else the calibrated 90 %), by more than the allowable error
   of one result (``delta_check_limits.csv``) and the reporting resolution; analytes without a
   cited allowable error are not evaluated (an excess could not be told from analytical error),
   nor is an uncalibrated model. Score: the result's predictive quantile.
4. ``multivariate_inconsistency`` (``ABOVE``/``BELOW``): outside the interval the
   pretraining masked-value head predicts for the result from the rest of its specimen and
   history. Score: predictive quantile, as rule 3.
5. ``preanalytical:<pattern>`` (``SUSPECT``): named patterns (EDTA contamination, haemolysis,
   drip arm, haemolysis reported by the laboratory), one row on the pattern's index result
   with every involved result in ``evidence["result_ids"]`` (the laboratory's words: one row
   per specimen). Haemolysis is judged as a
   laboratory does: by the specimen's haemolysis index (free haemoglobin, LOINC 4635-9, mg/dL)
   when it has one - above the cited alert cut-off of ``serum_indices.csv`` (Goyal 2015:
   > 25 mg/dL) it fires, at or below it does not - and otherwise by the multi-analyte
   pattern (LDH risen beyond its RCV with potassium not lower than before). Score: index /
   cut-off when the index decided, else NaN. ``evidence["method"]`` and the text say which
   was used. Laboratory text ``'NOT HEMOLYZED'`` is not a haemolysis report (``text_exclude``).

Numbers in texts use the analyte's reporting precision (:mod:`clinical.format`).

What is never scored as a number: text and empty results, implausible values (possible entry
errors, LAB-10), unit-missing rows (LAB-04), and censored results (LAB-01) - except that a
censored limit that itself lies beyond a limit is flagged (``'>100'`` above the high limit),
with the text saying the value is censored. Conflicting results at the same collection time
(LAB-05) are never compared with each other: a delta check compares with the previous
*time*, whose value is the one reported last (the cohort rule of ``data.queries.cohort``).
Values are canonical (``value_canonical``), so mixed source units never fire (LAB-04).

Rules 3 and 4 need a forecaster / masked-value predictor passed in; nothing here reads or
writes files except the cached reference tables (:func:`load_reference`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from clinical.flags import CRITICAL_FLAGS, classify, limits_frame
from clinical.format import decimals_by_code, format_change, format_value, reported_precision, reporting_decimals
from data.catalogue import CATALOGUE_VERSION, load_catalogue, load_serum_indices, reference_file
from data.units import UnitError, conversion_factor
from model import HISTORY_COLUMNS, QUANTILE_COLUMNS, QUANTILES

__all__ = [
    "ANOMALY_COLUMNS",
    "RULES",
    "PATTERN_PREFIX",
    "ClinicalReference",
    "MaskedValuePredictor",
    "load_reference",
    "load_serum_indices",
    "default_reference",
    "rcv_limits",
    "short_citation",
    "detect_anomalies",
    "group_runs",
    "history_from_timeline",
    "prepare_timeline",
    "timeline_from_history",
    "specimen_keys",
    "pattern_detections",
    "evaluate_patterns",
]

log = logging.getLogger(__name__)

ANOMALY_COLUMNS = [
    "result_id", "patient_id", "analyte_code", "analyte_name", "collected_at", "rule", "flag", "score",
    "value", "unit", "evidence", "source", "text", "model_version",
]
RULES = ("critical_value", "delta_check", "model_surprise", "multivariate_inconsistency")
PATTERN_PREFIX = "preanalytical:"
_LOWER_COMPARATORS = ("<", "<=")
_UPPER_COMPARATORS = (">", ">=")
_DASH = "\u2013"  # en dash in ranges
_SEP = " \u2014 "  # em dash before the suggestion


# ---------------------------------------------------------------------------------------------
# Reference data (cited files) and rule settings
# ---------------------------------------------------------------------------------------------


def short_citation(source: str) -> str:
    """A short label for a citation: 'Kost GJ. ... JAMA 1990 ...' -> 'Kost 1990', else its first clause."""
    s = " ".join(str(source).split())
    m = re.match(r"([A-Z][A-Za-z'\-]+) [A-Z]{1,3}[.,]", s)
    year = re.search(r"\b(19|20)\d{2}\b", s)
    if m and year:
        return f"{m.group(1)} {year.group(0)}"
    head = re.split(r"[,;(]", s, maxsplit=1)[0].strip()
    return head[:60] or s[:60]


def _rules_file() -> dict:
    text = resources.files("clinical.rules").joinpath("anomaly_rules.yaml").read_text(encoding="utf-8")
    rules = yaml.safe_load(text)
    for key in ("version", "delta_check", "model_surprise", "multivariate", "runs", "patterns"):
        if key not in rules:
            raise ValueError(f"anomaly_rules.yaml: missing section {key!r}")
    for p in rules["patterns"]:
        if not str(p.get("source", "")).strip():
            raise ValueError(f"anomaly_rules.yaml: pattern {p.get('id')!r} has no source")
    return rules


@dataclass(frozen=True)
class ClinicalReference:
    """The reference tables the rules read, in canonical units.

    ``intervals``: ``code, sex ('F', 'M', 'any', 'unknown'), age_low, age_high, low, high,
    source``; the 'unknown' rows are the 'any' interval, or the union of the sex-specific
    ones. ``critical``: code -> (low, high, source). ``variation``: code -> (cvi %, cva %,
    source). ``rules``: the parsed ``anomaly_rules.yaml``. ``critical_list``: how the
    critical list is named in texts ('critical value list' or 'site critical value list').
    ``serum_indices``: (code, parameter) -> (value in the code's canonical unit, source), from
    ``data/reference/serum_indices.csv`` (e.g. the haemolysis-index alert cut-off).
    ``delta_min``: code -> (minimum absolute change in the canonical unit, source), from
    ``data/reference/delta_check_limits.csv``: a delta check fires only beyond both the RCV and
    this change (analytes without a row get no delta check).
    """

    intervals: pd.DataFrame
    critical: dict
    variation: dict
    rules: dict
    critical_list: str
    version: str
    serum_indices: dict = field(default_factory=dict)
    delta_min: dict = field(default_factory=dict)


def _canonical_factor(code: str, unit: str, what: str) -> float | None:
    analyte = load_catalogue().get(code)
    if analyte is None:
        raise ValueError(f"{what}: code {code!r} is not in the analyte catalogue")
    try:
        return conversion_factor(unit, analyte)
    except UnitError as exc:
        log.info("%s: %s %s skipped (%s)", what, code, unit, exc)
        return None


def _num(x) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return math.nan
    return f


def load_reference(critical_values: str | Path | None = None) -> ClinicalReference:
    """Read the reference intervals, critical limits, biological variation and rule settings.

    ``critical_values`` is a site file with the columns of ``data/reference/critical_values.csv``
    (``code, low, high, unit, source``); by default that cited file (Kost 1990 and others).
    Limits are converted to the catalogue's canonical unit; a row whose unit cannot be
    converted is skipped with a warning; a row without a source is a ``ValueError``.
    """
    ri = pd.read_csv(reference_file("reference_intervals.csv"), dtype={"code": str, "sex": str})
    rows = []
    for r in ri.itertuples(index=False):
        f = _canonical_factor(r.code, r.unit, "reference_intervals.csv")
        if f is None:
            continue
        rows.append(dict(code=r.code, sex=r.sex, age_low=_num(r.age_low_years), age_high=_num(r.age_high_years),
                         low=_num(r.low) * f, high=_num(r.high) * f, source=str(r.source)))
    intervals = pd.DataFrame(rows)
    unknown = []
    for code, g in intervals.groupby("code", sort=False):
        anyrow = g[g["sex"] == "any"]
        if len(anyrow):
            unknown.append(anyrow.iloc[0].to_dict() | {"sex": "unknown"})
        else:
            first = g.iloc[0].to_dict()
            unknown.append(first | {"sex": "unknown", "low": g["low"].min(), "high": g["high"].max(),
                                    "source": "union of the sex-specific intervals (sex unknown): " + first["source"]})
    intervals = pd.concat([intervals, pd.DataFrame(unknown)], ignore_index=True)

    path = Path(critical_values) if critical_values else reference_file("critical_values.csv")
    cv = pd.read_csv(path, dtype={"code": str})
    expected = ["code", "low", "high", "unit", "source"]
    if list(cv.columns) != expected:
        raise ValueError(f"{path.name}: columns {list(cv.columns)} != {expected}")
    critical = {}
    for r in cv.itertuples(index=False):
        if not str(r.source).strip() or pd.isna(r.source):
            raise ValueError(f"{path.name}: critical limits for {r.code} have no source")
        f = _canonical_factor(r.code, r.unit, path.name)
        if f is None:
            continue
        critical[r.code] = (_num(r.low) * f, _num(r.high) * f, str(r.source))

    bv = pd.read_csv(reference_file("biological_variation.csv"), dtype={"code": str})
    variation = {
        r.code: (float(r.cvi_pct), float(r.cva_pct), str(r.source))
        for r in bv.itertuples(index=False)
        if np.isfinite(_num(r.cvi_pct)) and np.isfinite(_num(r.cva_pct))
    }
    dl = pd.read_csv(reference_file("delta_check_limits.csv"), dtype={"code": str}, keep_default_na=False)
    if list(dl.columns) != ["code", "min_abs_change", "unit", "source"]:
        raise ValueError(f"delta_check_limits.csv: columns {list(dl.columns)} != ['code', 'min_abs_change', 'unit', 'source']")
    delta_min = {}
    for r in dl.itertuples(index=False):
        if not str(r.source).strip():
            raise ValueError(f"delta_check_limits.csv: {r.code} has no source")
        f = _canonical_factor(r.code, r.unit, "delta_check_limits.csv")
        if f is None:
            continue
        delta_min[r.code] = (float(r.min_abs_change) * f, " ".join(str(r.source).split()))
    rules = _rules_file()
    indices = load_serum_indices()
    for pat in rules["patterns"]:
        si = pat.get("serum_index")
        if si is not None and (str(si["analyte"]), str(si["cutoff"])) not in indices:
            raise ValueError(f"anomaly_rules.yaml: pattern {pat['id']!r} needs ({si['analyte']}, {si['cutoff']}) "
                             "in serum_indices.csv")
    return ClinicalReference(
        intervals=intervals,
        critical=critical,
        variation=variation,
        rules=rules,
        serum_indices=indices,
        delta_min=delta_min,
        critical_list="site critical value list" if critical_values else "critical value list",
        version=f"rules-{rules['version']}+catalogue-{CATALOGUE_VERSION}" + (
            f"+critical-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}" if critical_values else ""),
    )


_LIMITS: dict[int, tuple[ClinicalReference, pd.DataFrame]] = {}


def _limits_for(ref: ClinicalReference) -> pd.DataFrame:
    """:func:`clinical.flags.limits_frame` of ``ref``, built once per reference object."""
    hit = _LIMITS.get(id(ref))
    if hit is None or hit[0] is not ref:
        if len(_LIMITS) > 16:
            _LIMITS.clear()
        hit = _LIMITS[id(ref)] = (ref, limits_frame(ref))
    return hit[1]


@functools.lru_cache(maxsize=1)
def default_reference() -> ClinicalReference:
    """:func:`load_reference` with the shipped critical list (cached)."""
    return load_reference()


def rcv_limits(code: str, z: float, reference: ClinicalReference | None = None) -> tuple[float, float] | None:
    """(down, up) reference change limits as fractions (e.g. (-0.14, +0.16)), or None without CVI/CVA.

    Normal: ``+-2^0.5 Z (CVA^2 + CVI^2)^0.5``. Skewed analytes (catalogue ``skewed``):
    ``exp(+-2^0.5 Z sigma) - 1`` with ``sigma^2 = ln(1 + CVA^2) + ln(1 + CVI^2)`` (Fraser 2011).
    """
    ref = reference or default_reference()
    bv = ref.variation.get(code)
    if bv is None:
        return None
    cvi, cva = bv[0] / 100.0, bv[1] / 100.0
    analyte = load_catalogue().get(code)
    if analyte is not None and analyte.skewed:
        sigma = math.sqrt(math.log1p(cva**2) + math.log1p(cvi**2))
        return math.expm1(-math.sqrt(2) * z * sigma), math.expm1(math.sqrt(2) * z * sigma)
    r = math.sqrt(2) * z * math.sqrt(cva**2 + cvi**2)
    return -r, r


# ---------------------------------------------------------------------------------------------
# Frames: timeline -> prepared rows, history contract, synthetic history -> timeline
# ---------------------------------------------------------------------------------------------

_REQUIRED = ("result_id", "patient_id", "collected_at", "analyte_code", "value_canonical", "result_kind")
_KEEP = (
    "result_id", "patient_id", "specimen_id", "collected_at", "reported_at", "analyte_code", "analyte_name",
    "value_text", "comparator", "value_num", "value_canonical", "unit_canonical", "ref_low_canonical", "ref_high_canonical",
    "comment", "result_kind", "implausible", "unit_missing", "conflicting", "flag", "time_unknown",
)


def _patients_frame(patients, patient_ids) -> pd.DataFrame:
    cols = ["patient_id", "sex", "birth_date", "age_at_ref", "ref_date"]
    if patients is None:
        return pd.DataFrame({"patient_id": pd.Series(sorted(set(patient_ids)), dtype=object)}).reindex(columns=cols)
    if isinstance(patients, dict):
        patients = pd.DataFrame([patients])
    p = patients.reindex(columns=cols).copy()
    p["patient_id"] = p["patient_id"].astype(str)
    return p.drop_duplicates("patient_id")


def specimen_keys(frame: pd.DataFrame) -> pd.Series:
    """One key per specimen: the specimen id when given, else patient + collection time. A result
    whose source gave a date without a time (``time_unknown``; stored at noon) is its own specimen:
    two results of one day are not one draw because they share a placeholder time."""
    t = pd.to_datetime(frame["collected_at"]).astype("datetime64[us]").astype("int64").astype(str)
    by_time = frame["patient_id"].astype(str) + "|t" + t
    if "time_unknown" in frame and "result_id" in frame:
        unknown = frame["time_unknown"].fillna(False).astype(bool)
        by_time = by_time.where(~unknown, frame["patient_id"].astype(str) + "|r" + frame["result_id"].astype(str))
    if "specimen_id" not in frame:
        return by_time
    sid = frame["specimen_id"]
    has = sid.notna() & (sid.astype(str).str.strip() != "")
    return by_time.where(~has, frame["patient_id"].astype(str) + "|s" + sid.astype(str))


def _objects(s: pd.Series) -> np.ndarray:
    """``s`` as an object array, None where missing, with one object per distinct value that every row
    holding it shares (a year of 5-minute results of one analyte: a few strings, not 105,120 copies)."""
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    table = np.empty(len(uniques) + 1, dtype=object)
    table[:-1] = np.asarray(uniques, dtype=object)
    table[-1] = None  # code -1: missing
    return table[codes]


def _prepare(timeline: pd.DataFrame, patients, ref: ClinicalReference) -> pd.DataFrame:
    missing = [c for c in _REQUIRED if c not in timeline.columns]
    if missing:
        raise ValueError(f"timeline is missing column(s) {missing}; expected data.queries.TIMELINE_COLUMNS")
    keep = [c for c in _KEEP if c in timeline.columns]
    # no copy: every column the rules change is replaced below, never written into (copy-on-write), so the
    # timeline's own columns are shared until then (a year of 5-minute results: some 40 MB not copied)
    t = timeline[keep].reset_index(drop=True)
    # object (numpy) strings: takes, sorts and merges on pyarrow strings are several times slower here
    for col in ("patient_id", "analyte_code"):
        t[col] = _objects(t[col].astype(str))
    for col in ("specimen_id", "comparator", "value_text", "comment", "unit_canonical", "analyte_name", "flag"):
        if col in t:
            t[col] = _objects(t[col])
    t["collected_at"] = pd.to_datetime(t["collected_at"]).astype("datetime64[us]")
    for col in ("reported_at",):
        t[col] = pd.to_datetime(t[col]).astype("datetime64[us]") if col in t else t["collected_at"]
    for col in ("specimen_id", "comparator", "value_text", "comment", "unit_canonical", "analyte_name", "flag"):
        if col not in t:
            t[col] = None
    for col in ("implausible", "unit_missing", "conflicting", "time_unknown"):
        t[col] = t[col].fillna(False).astype(bool) if col in t else False
    for col in ("ref_low_canonical", "ref_high_canonical"):
        t[col] = pd.to_numeric(t[col], errors="coerce") if col in t else np.nan
    v = pd.to_numeric(t["value_canonical"], errors="coerce").astype(float)
    t["value_canonical"] = v
    usable = np.isfinite(v.to_numpy()) & ~t["implausible"].to_numpy() & ~t["unit_missing"].to_numpy()
    kind = t["result_kind"].astype(str).to_numpy()
    comp = t["comparator"].astype(object).where(t["comparator"].notna(), None)
    t["x_num"] = usable & (kind == "numeric")
    t["x_cens"] = usable & (kind == "censored") & comp.isin(_LOWER_COMPARATORS + _UPPER_COMPARATORS).to_numpy()
    keys = specimen_keys(t)
    codes, _ = pd.factorize(keys)  # on the keys as they are (no Python string per result)
    t["x_spec"] = codes.astype(np.int64)  # integer specimen ids: joins on them are fast

    # demographics at collection
    # one patient row per result by position (a left merge would copy every column of every row)
    p = _patients_frame(patients, t["patient_id"]).set_index("patient_id")
    at = p.reindex(pd.Index(t["patient_id"].to_numpy(dtype=object), name="patient_id"))
    for col in p.columns:
        t[col] = at[col].to_numpy()
    t["sex"] = t["sex"].where(t["sex"].isin(["F", "M"]), None)
    days = lambda a, b: (pd.to_datetime(a) - pd.to_datetime(b)).dt.total_seconds() / 86400.0  # noqa: E731
    age = pd.Series(np.nan, index=t.index)
    if t["birth_date"].notna().any():
        age = days(t["collected_at"], t["birth_date"]) / 365.25
    has_ref = t["age_at_ref"].notna()
    if has_ref.any():
        shift = days(t["collected_at"], t["ref_date"]).fillna(0.0) / 365.25
        age = age.where(age.notna(), pd.to_numeric(t["age_at_ref"], errors="coerce") + shift)
    t["x_age"] = age.astype(float)

    # names from the catalogue, else as given
    cat = load_catalogue()
    names = {a.code: a.name for a in cat}
    pairs, uniq = pd.factorize(pd.MultiIndex.from_arrays([t["analyte_code"], t["analyte_name"]]))
    t["x_name"] = np.array([names.get(c) or (n if isinstance(n, str) else None) or c for c, n in uniq],  # once per pair
                           dtype=object)[pairs]
    t["x_unit"] = t["unit_canonical"].astype(object).where(t["unit_canonical"].notna(), None)

    # effective reference interval: the laboratory's own, else the catalogue's
    lo, hi = t["ref_low_canonical"].to_numpy(float), t["ref_high_canonical"].to_numpy(float)
    own = (np.isfinite(lo) | np.isfinite(hi)) & ~(np.isfinite(lo) & np.isfinite(hi) & (hi <= lo))
    t["x_lo"] = np.where(own, lo, np.nan)
    t["x_hi"] = np.where(own, hi, np.nan)
    t["x_src"] = np.where(own, "row", None).astype(object)
    t["x_cite"] = np.where(own, "laboratory reference interval reported with the result", None).astype(object)
    t["x_agenote"] = None
    need = ~own
    if need.any():
        iv = _limits_for(ref)
        sexkey = t["sex"].fillna("unknown")
        base = pd.DataFrame({"_i": np.flatnonzero(need), "code": t.loc[need, "analyte_code"].to_numpy(),
                             "sexkey": sexkey[need].to_numpy(), "age": t.loc[need, "x_age"].to_numpy()})
        # the catalogue rows by position: each result's citation is then a reference to the row's one string,
        # not a copy per result (105,120 results of one analyte: 35 MB of copies)
        cite = iv["source"].to_numpy(dtype=object)
        cand = base.merge(iv.drop(columns="source").assign(_iv=np.arange(len(iv))), on=["code", "sexkey"])
        a = cand["age"]
        in_age = np.where(a.isna(), cand["adult"],
                          (cand["age_low"].isna() | (a >= cand["age_low"])) & (cand["age_high"].isna() | (a < cand["age_high"])))
        cand = cand[in_age.astype(bool)].drop_duplicates("_i")
        idx = cand["_i"].to_numpy()
        t.loc[idx, "x_lo"] = cand["low"].to_numpy()
        t.loc[idx, "x_hi"] = cand["high"].to_numpy()
        t.loc[idx, "x_src"] = "catalogue"
        t.loc[idx, "x_cite"] = cite[cand["_iv"].to_numpy()]
        t.loc[idx[cand["age"].isna().to_numpy()], "x_agenote"] = "age unknown: adult interval used"

    # critical limits and the result's flag (clinical.flags: one rule for chart, table, counts and rules)
    codes = t["analyte_code"].to_numpy(dtype=object)
    t["x_clo"] = np.array([ref.critical.get(c, (np.nan, np.nan, ""))[0] for c in codes], dtype=float)
    t["x_chi"] = np.array([ref.critical.get(c, (np.nan, np.nan, ""))[1] for c in codes], dtype=float)
    t["x_flag"], t["x_flag_basis"] = classify(t, t["x_clo"].to_numpy(), t["x_chi"].to_numpy())
    return t


def prepare_timeline(timeline: pd.DataFrame, patients=None, reference: ClinicalReference | None = None
                     ) -> pd.DataFrame:
    """The timeline rows as the rules read them, to pass to :func:`detect_anomalies`,
    :func:`clinical.recommendations.evaluate_rules` and :func:`history_from_timeline` instead of the
    timeline: one preparation serves all three (a year of 5-minute results takes about 1 s and
    100 MB to prepare).

    Args:
        timeline: :data:`data.queries.TIMELINE_COLUMNS` rows (canonical values), one or many patients.
        patients: a :func:`data.queries.patient_info` dict, a frame of them, or None (sex and age unknown).
        reference: default :func:`default_reference`.
    Returns:
        one row per timeline row (index reset), the timeline's columns the rules read plus the
        derived ``x_*`` columns (validity, specimen, age in years, effective reference interval and
        its citation, critical limits, the result's flag from :mod:`clinical.flags`).
    Raises:
        ValueError: a required column is missing.
    """
    return _prepare(timeline, patients, reference or default_reference())


def _prepared(timeline: pd.DataFrame, patients, ref: ClinicalReference) -> pd.DataFrame:
    """``timeline`` when :func:`prepare_timeline` made it, else its preparation."""
    return timeline if "x_num" in timeline.columns else _prepare(timeline, patients, ref)


def history_from_timeline(timeline: pd.DataFrame, patients=None) -> pd.DataFrame:
    """The model's history contract (``model.HISTORY_COLUMNS``) from timeline rows.

    Same rules as :func:`data.queries.cohort`: numeric and censored results in canonical
    units (censored at their limit with ``censor`` -1/+1); text, empty, implausible and
    unit-missing rows left out; conflicting results at one time keep the one reported last.
    """
    t = _prepare(timeline, patients, default_reference()) if "x_num" not in timeline else timeline
    return _history(t)


def _history(t: pd.DataFrame) -> pd.DataFrame:
    h = t[t["x_num"] | t["x_cens"]].sort_values(["patient_id", "analyte_code", "collected_at", "reported_at", "result_id"])
    h = h.drop_duplicates(["patient_id", "analyte_code", "collected_at"], keep="last")
    comp = h["comparator"].astype(object)
    censor = np.where(comp.isin(_LOWER_COMPARATORS), -1, np.where(comp.isin(_UPPER_COMPARATORS), 1, 0))
    out = pd.DataFrame({
        "patient_id": h["patient_id"].to_numpy(dtype=object),
        "collected_at": h["collected_at"].to_numpy(),
        "analyte_code": h["analyte_code"].to_numpy(dtype=object),
        "value": h["value_canonical"].to_numpy(float),
        "censor": np.where(h["x_cens"].to_numpy(), censor, 0).astype(np.int8),
        "unit_canonical": h["x_unit"].to_numpy(dtype=object),
        "sex": h["sex"].to_numpy(dtype=object),
        "age_years": h["x_age"].to_numpy(float),
    })
    return out.sort_values(["patient_id", "collected_at", "analyte_code"], kind="stable").reset_index(drop=True)[
        list(HISTORY_COLUMNS)
    ]


def timeline_from_history(history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A history-contract frame (e.g. :func:`model.synthetic.generate_cohort`) as timeline rows + patients.

    Result ids are 1..n in the history's order; every row is numeric (or censored when
    ``censor`` is not 0), plausible and in its canonical unit; there is no specimen id, so
    results collected at the same time form one specimen. Patients carry the first row's
    sex and age (``age_at_ref`` at ``ref_date``).
    """
    h = history.reset_index(drop=True)
    n = len(h)
    censor = h["censor"].to_numpy() if "censor" in h else np.zeros(n, np.int8)
    comp = np.where(censor < 0, "<", np.where(censor > 0, ">", "="))
    value = h["value"].to_numpy(float)
    tl = pd.DataFrame({
        "result_id": np.arange(1, n + 1, dtype=np.int64),
        "patient_id": h["patient_id"].astype(str).to_numpy(dtype=object),
        "specimen_id": None,
        "collected_at": pd.to_datetime(h["collected_at"]).to_numpy(),
        "reported_at": pd.to_datetime(h["collected_at"]).to_numpy(),
        "analyte_code": h["analyte_code"].astype(str).to_numpy(dtype=object),
        "loinc": h["analyte_code"].astype(str).to_numpy(dtype=object),
        "analyte_name": None,
        "value_text": None,
        "comparator": comp.astype(object),
        "value_num": value,
        "unit": h["unit_canonical"].to_numpy(dtype=object) if "unit_canonical" in h else None,
        "value_canonical": value,
        "unit_canonical": h["unit_canonical"].to_numpy(dtype=object) if "unit_canonical" in h else None,
        "ref_low": np.nan, "ref_high": np.nan, "ref_low_canonical": np.nan, "ref_high_canonical": np.nan,
        "flag": None, "comment": None,
        "result_kind": np.where(censor != 0, "censored", "numeric").astype(object),
        "implausible": False, "unit_missing": False, "conflicting": False,
        "batch_id": 0, "source_row": np.arange(1, n + 1, dtype=np.int64),
    })
    first = h.groupby("patient_id", sort=False).head(1)
    patients = pd.DataFrame({
        "patient_id": first["patient_id"].astype(str).to_numpy(dtype=object),
        "sex": first["sex"].to_numpy(dtype=object) if "sex" in first else None,
        "birth_date": pd.NaT,
        "age_at_ref": first["age_years"].to_numpy(float) if "age_years" in first else np.nan,
        "ref_date": pd.to_datetime(first["collected_at"]).to_numpy(),
    })
    return tl, patients


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _fmt(x, code: str | None = None) -> str:
    """A number as printed in texts: the analyte's reporting precision (:func:`clinical.format.format_value`)."""
    text = format_value(code, x)
    return text if text else "?"


def _shown(value: float, comparator, censored: bool, code: str | None = None) -> str:
    return f"{comparator}{_fmt(value, code)}" if censored else _fmt(value, code)


def _when(days: float) -> str:
    """A time difference as clinicians say it: '9 days', '1 day', '6 h', '40 min'."""
    if days >= 1.5:
        return f"{days:.0f} days"
    if days >= 1:
        return "1 day" if round(days) == 1 else f"{days:.1f} days"
    hours = days * 24
    return f"{hours:.0f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def _change_text(code: str, new: float, base: float, unit) -> str:
    """The change from ``base`` to ``new``: ``'+1.1 mg/dL (x2.1)'`` from x1.5 up, else ``'-12 mmol/L (-8 %)'``."""
    delta = format_change(code, new - base)
    if base > 0 and new / base >= 1.5:
        rel = f"x{new / base:.1f}"
    elif base > 0:
        rel = f"{100 * (new / base - 1):+.0f} %"
    else:
        rel = ""
    return f"{delta}{_u(unit)}" + (f" ({rel})" if rel else "")


def _u(unit) -> str:
    return f" {unit}" if unit and unit != "1" else ""


def _clean(v):
    """A JSON-safe scalar (numpy -> Python, NaN -> None, timestamps -> ISO)."""
    if v is None:
        return None
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, (pd.Timestamp, np.datetime64)):
        ts = pd.Timestamp(v)
        return None if pd.isna(ts) else ts.isoformat()
    if v is pd.NaT:
        return None
    return v


def _evidence(**kw) -> dict:
    return {k: (_clean(v) if not isinstance(v, (list, dict)) else v) for k, v in kw.items()}


def _rows(sel: pd.DataFrame, rule: str, flags, scores, evidences, sources, texts, model_version=None,
          values=None) -> pd.DataFrame:
    n = len(sel)
    return pd.DataFrame({
        "result_id": sel["result_id"].to_numpy(),
        "patient_id": sel["patient_id"].to_numpy(dtype=object),
        "analyte_code": sel["analyte_code"].to_numpy(dtype=object),
        "analyte_name": sel["x_name"].to_numpy(dtype=object),
        "collected_at": sel["collected_at"].to_numpy(),
        "rule": [rule] * n if isinstance(rule, str) else list(rule),
        "flag": list(flags),
        "score": np.asarray(scores, dtype=float) if n else np.array([], float),
        "value": sel["value_canonical"].to_numpy(float) if values is None else np.asarray(values, dtype=float),
        "unit": sel["x_unit"].to_numpy(dtype=object),
        "evidence": list(evidences),
        "source": list(sources),
        "text": list(texts),
        "model_version": [model_version] * n,
    })


# ---------------------------------------------------------------------------------------------
# Rule 1: critical values (clinical.flags)
# ---------------------------------------------------------------------------------------------


def _width_score(v, limit, low, high, sign):
    width = high - low
    with np.errstate(invalid="ignore", divide="ignore"):
        s = sign * (v - limit) / np.where(np.isfinite(width) & (width > 0), width, np.nan)
    return s


def _critical_value(t: pd.DataFrame, ref: ClinicalReference) -> pd.DataFrame:
    """Rule 1: results flagged HH / LL / AA (:mod:`clinical.flags`): beyond a limit of the critical
    value list in use, or reported critical by the laboratory."""
    sel = t[np.isin(t["x_flag"].to_numpy(dtype=object), list(CRITICAL_FLAGS))]
    if sel.empty:
        return _empty()
    v = sel["value_canonical"].to_numpy(float)
    clo, chi = sel["x_clo"].to_numpy(float), sel["x_chi"].to_numpy(float)
    flags = sel["x_flag"].to_numpy(dtype=object)
    lims = np.where(flags == "LL", clo, chi)
    score = _width_score(v, lims, clo, chi, np.where(flags == "LL", -1, 1))
    ev, src, txt = [], [], []
    for r, lim in zip(sel.itertuples(index=False), lims):
        cens = bool(r.x_cens)
        by_list = r.x_flag_basis == "critical value list"
        word = {"HH": "above", "LL": "below"}.get(r.x_flag)
        source = ref.critical[r.analyte_code][2] if by_list else "laboratory flag reported with the result"
        ev.append(_evidence(limit=lim if by_list else None, list=ref.critical_list if by_list else None,
                            basis=r.x_flag_basis, reported_flag=r.flag, censored=cens,
                            comparator=r.comparator if cens else "="))
        src.append(source)
        cens_note = (f" (censored: the true value is {word} {_fmt(r.value_canonical, r.analyte_code)})"
                     if cens and word else "")
        shown = (f"{_shown(r.value_canonical, r.comparator, cens, r.analyte_code)}{_u(r.x_unit)}"
                 if np.isfinite(r.value_canonical) else f"'{r.value_text or ''}'")
        if by_list:
            why = (f"is {word} the critical limit {_fmt(lim, r.analyte_code)}{_u(r.x_unit)}"
                   f"{_SEP}consider urgent clinical review ({ref.critical_list}: {short_citation(source)})")
        else:
            why = (f"is flagged critical ({r.flag}) by the laboratory{_SEP}consider urgent clinical review "
                   "(laboratory flag)")
        txt.append(f"{r.x_name} {shown}{cens_note} {why}")
    return _rows(sel, "critical_value", flags, score, ev, src, txt)


# ---------------------------------------------------------------------------------------------
# Rule 2: delta check against the previous valid result (RCV and a cited minimum change)
# ---------------------------------------------------------------------------------------------


def _with_previous(t: pd.DataFrame) -> pd.DataFrame:
    """Valid numeric rows with ``_prev``, ``_prev_at``, ``_prev_id``: the previous *time*'s value.

    At each (patient, analyte, time) the representative is the result reported last; every
    row at a time is compared with the representative of the previous distinct time, so
    conflicting results at one time are never compared with each other (LAB-05).
    """
    num = t[t["x_num"]].reset_index(drop=True)
    time_key = ["patient_id", "analyte_code", "collected_at"]
    # sorted and shifted on the few columns read, then taken back by time (a merge would copy every column)
    rep = num[[*time_key, "reported_at", "result_id", "value_canonical", "time_unknown"]]
    rep = rep.sort_values([*time_key, "reported_at", "result_id"]).drop_duplicates(time_key, keep="last")
    g = rep.groupby(["patient_id", "analyte_code"], sort=False)
    prev = pd.DataFrame({
        "x_prev": g["value_canonical"].shift(1), "x_prev_at": g["collected_at"].shift(1), "x_prev_id": g["result_id"].shift(1),
        "x_prev_time_unknown": g["time_unknown"].shift(1),
    })
    at = num.groupby(time_key, sort=False, dropna=False).ngroup().to_numpy()  # each row's time
    prev.index = at[rep.index.to_numpy()]  # one representative per time
    prev = prev.reindex(at)
    for col in prev.columns:
        num[col] = prev[col].to_numpy()
    return num


_DELTA_COLUMNS = ["result_id", "patient_id", "analyte_code", "x_name", "collected_at", "value_canonical", "x_unit",
                  "time_unknown", "x_prev", "x_prev_at", "x_prev_id", "x_prev_time_unknown"]


def _delta_check(t: pd.DataFrame, ref: ClinicalReference, withprev: pd.DataFrame, lazy: bool = False):
    """Rule 2: change from the previous valid result beyond the RCV **and** at least the analyte's
    cited minimum absolute change (``delta_min``); analytes without both get no delta check.

    ``lazy``: returns ``(rows, fill)``: the rows without ``evidence`` and ``text`` (None) and a
    ``fill(positions, evidence=, text=)`` that gives them for those rows only (a year of 5-minute
    glucose has some 12,000 delta checks, most of them members of a run whose own evidence and
    text are never read: :func:`group_runs`)."""
    z = float(ref.rules["delta_check"].get("review_z", ref.rules["delta_check"]["z"]))
    settings_source = " ".join(str(ref.rules["delta_check"]["source"]).split())
    limits = {c: rcv_limits(c, z, ref) for c in withprev["analyte_code"].unique()}
    usable = [c for c, lim in limits.items() if lim is not None and c in ref.delta_min]
    has = withprev["analyte_code"].isin(usable).to_numpy()
    window = pd.Timedelta(days=float(ref.rules["delta_check"]["max_interval_days"]))
    recent = (withprev["collected_at"] - withprev["x_prev_at"]).le(window).to_numpy()
    # only the columns the rule reads: the rows with a recent previous result are nearly all of a long series
    w = withprev.loc[has & recent & (withprev["x_prev"].to_numpy(float) > 0), _DELTA_COLUMNS]
    if w.empty:
        return (_empty(), None) if lazy else _empty()
    codes = w["analyte_code"].to_numpy(dtype=object)
    down = np.array([limits[c][0] for c in codes], dtype=float)
    up = np.array([limits[c][1] for c in codes], dtype=float)
    minimum = np.array([ref.delta_min[c][0] for c in codes], dtype=float)
    v, prev = w["value_canonical"].to_numpy(float), w["x_prev"].to_numpy(float)
    change = v / prev - 1.0
    big = np.abs(v - prev) >= minimum - 1e-9 * np.abs(minimum)  # at least the minimum (0.3 mg/dL counts)
    fire_up, fire_down = (change > up) & big, (change < down) & big
    sel_mask = fire_up | fire_down
    sel = w[sel_mask]
    if sel.empty:
        return (_empty(), None) if lazy else _empty()
    ch, lim = change[sel_mask], np.where(fire_up, up, down)[sel_mask]
    flags = np.where(fire_up[sel_mask], "UP", "DOWN")
    score = ch / np.abs(lim)
    mins = minimum[sel_mask]
    sel_codes = sel["analyte_code"].to_numpy(dtype=object)
    days_all = (sel["collected_at"] - sel["x_prev_at"]).dt.total_seconds().to_numpy(float) / 86400.0
    per_code = {}  # the analyte's sources and settings: once per analyte, one string object shared by its rows
    for c in pd.unique(sel_codes):
        cvi, cva, bv_source = ref.variation[c]
        min_source = ref.delta_min[c][1]
        per_code[c] = (_clean(cvi), _clean(cva), min_source, bool(getattr(load_catalogue().get(c), "skewed", False)),
                       f"{settings_source}; CVI/CVA: {bv_source}; minimum change: {min_source}")
    src = [per_code[c][4] for c in sel_codes]

    def _floats(a: np.ndarray) -> list:  # JSON-safe as _clean: NaN -> None
        return [x if math.isfinite(x) else None for x in a.astype(float).tolist()]

    def fill(positions, evidence: bool = True, text: bool = True) -> tuple[list, list]:
        ev, txt = [], []
        part = sel.iloc[positions] if positions is not None else sel
        pos = np.arange(len(sel)) if positions is None else np.asarray(positions, dtype=np.int64)
        if evidence:  # the numbers as columns, each converted once (as _evidence would, value by value)
            p_val, p_id = _floats(part["x_prev"].to_numpy(float)), _floats(part["x_prev_id"].to_numpy(float))
            p_at = [None if pd.isna(x) else x.isoformat() for x in pd.DatetimeIndex(part["x_prev_at"])]
            d_, c_ = _floats(days_all[pos]), _floats(100 * ch[pos])
            a_ = _floats(part["value_canonical"].to_numpy(float) - part["x_prev"].to_numpy(float))
            l_s, m_s = _floats(100 * lim[pos]), _floats(mins[pos])
            for i, code in enumerate(part["analyte_code"].to_numpy(dtype=object).tolist()):
                cvi, cva, min_source, skewed, _ = per_code[code]
                ev.append({"baseline": "previous result", "previous_value": p_val[i], "previous_at": p_at[i],
                           "previous_result_id": p_id[i], "days_since_previous": d_[i], "change_pct": c_[i],
                           "change_abs": a_[i], "rcv_pct": l_s[i], "min_abs_change": m_s[i],
                           "min_abs_change_source": min_source, "z": z, "cvi_pct": cvi, "cva_pct": cva,
                           "log_normal": skewed})
        if not text:
            return ev, txt
        for r, k in zip(part.itertuples(index=False), pos.tolist()):
            l_, f, m, days = lim[k], flags[k], mins[k], days_all[k]
            _, _, min_source, skewed, _ = per_code[r.analyte_code]
            word = "rose" if f == "UP" else "fell"
            code, unit = r.analyte_code, r.x_unit
            prev_unknown = isinstance(r.x_prev_time_unknown, (bool, np.bool_)) and bool(r.x_prev_time_unknown)
            if r.time_unknown or prev_unknown:  # a date without a time: no hours to count
                whole = round(days)
                when = (f"{whole} day{'s' if whole != 1 else ''} earlier" if whole else "the same day") + ", time not given"
            else:
                when = f"{_when(days)} earlier"
            txt.append(f"{r.x_name} {_fmt(r.value_canonical, code)}{_u(unit)} {word} "
                       f"{_change_text(code, r.value_canonical, r.x_prev, unit)} from {_fmt(r.x_prev, code)}{_u(unit)} "
                       f"{when} (the previous result), beyond its reference change value "
                       f"({100 * l_:+.0f} %) and the minimum change of {_fmt(m, code)}{_u(unit)}{_SEP}consider whether "
                       f"this is a true clinical change or a specimen problem (RCV{', log-normal' if skewed else ''}: "
                       f"Fraser 2011; minimum: {short_citation(min_source)})")
        return ev, txt

    if lazy:
        none = [None] * len(sel)
        return _rows(sel, "delta_check", flags, score, none, src, none), fill
    ev, txt = fill(None)
    return _rows(sel, "delta_check", flags, score, ev, src, txt)


# ---------------------------------------------------------------------------------------------
# Named pre-analytical patterns
# ---------------------------------------------------------------------------------------------


def _pattern_wide(withprev: pd.DataFrame, codes: list[str]) -> dict[str, pd.DataFrame]:
    """Per analyte: a frame indexed by specimen key with value, previous value, limits, result id."""
    w = withprev[withprev["analyte_code"].isin(codes)]
    w = w.sort_values(["x_spec", "analyte_code", "reported_at", "result_id"]).drop_duplicates(
        ["x_spec", "analyte_code"], keep="last")
    return {c: g.set_index("x_spec") for c, g in w.groupby("analyte_code", sort=False)}


def _clause(wide: dict, clause: dict, index: pd.Index, ref: ClinicalReference) -> tuple[pd.Series, pd.Series]:
    """(holds, assessable) for one clause over the specimens ``index``; ``{any: [...]}`` holds when one does."""
    if "any" in clause:
        parts = [_clause(wide, c, index, ref) for c in clause["any"]]
        holds = functools.reduce(lambda a, b: a | b, (h for h, _ in parts))
        ok = functools.reduce(lambda a, b: a | b, (o for _, o in parts))
        return holds, ok
    code, test = str(clause["analyte"]), clause["test"]
    g = wide.get(code)
    if g is None:
        present = pd.Series(False, index=index)
        g = pd.DataFrame(columns=["value_canonical", "x_prev", "x_lo", "x_hi"])
    else:
        present = pd.Series(np.isin(index.to_numpy(), g.index.to_numpy()), index=index)
    col = lambda c: g[c].reindex(index).astype(float)  # noqa: E731
    v = col("value_canonical")
    if test == "above_reference_high":
        holds, ok = v > col("x_hi"), present & col("x_hi").notna()
    elif test == "below_reference_low":
        holds, ok = v < col("x_lo"), present & col("x_lo").notna()
    elif test == "not_above_reference_high":
        holds, ok = v <= col("x_hi"), present & col("x_hi").notna()
    elif test in ("rise_beyond_rcv", "fall_beyond_rcv"):
        lim = rcv_limits(code, float(clause.get("z", ref.rules["delta_check"]["z"])), ref)
        if lim is None:
            raise ValueError(f"anomaly_rules.yaml: {test} on {code} needs a CVI/CVA in biological_variation.csv")
        prev = col("x_prev")
        change = v / prev - 1.0
        holds = change > lim[1] if test == "rise_beyond_rcv" else change < lim[0]
        ok = present & prev.notna() & (prev > 0)
    elif test == "not_below_previous":
        prev = col("x_prev")
        holds, ok = v >= prev, present & prev.notna()
    elif test == "no_previous":
        holds, ok = col("x_prev").isna(), present
    else:
        raise ValueError(f"anomaly_rules.yaml: unknown clause test {test!r}")
    holds = holds.fillna(False).astype(bool) & ok
    if clause.get("absent_ok"):
        holds = holds | ~present
        ok = ok | ~present
    return holds, ok


def _clause_text(wide: dict, clause: dict, spec) -> str | None:
    if "any" in clause:
        texts = [_clause_text(wide, c, spec) for c in clause["any"]]
        return next((t for t in texts if t), None)
    g = wide.get(str(clause["analyte"]))
    if g is None or spec not in g.index:
        return None
    r = g.loc[spec]
    name, unit = r["x_name"], r["x_unit"]
    code = str(clause["analyte"])
    val = f"{name} {_fmt(r['value_canonical'], code)}{_u(unit)}"
    test = clause["test"]
    if test == "above_reference_high":
        return f"{val} > {_fmt(r['x_hi'], code)}"
    if test == "below_reference_low":
        return f"{val} < {_fmt(r['x_lo'], code)}"
    if test in ("rise_beyond_rcv", "fall_beyond_rcv", "not_below_previous"):
        return f"{val} (previously {_fmt(r['x_prev'], code)})"
    if test == "not_above_reference_high":
        return f"{val} <= {_fmt(r['x_hi'], code)}"
    return val


def _serum_index_decision(t: pd.DataFrame, si: dict, ref: ClinicalReference):
    """Specimens whose serum index decides the pattern: ``(above, rows, cutoff, source)``.

    ``si`` is a pattern's ``serum_index`` entry (``analyte``: the index's code, ``cutoff``: the
    parameter name in ``serum_indices.csv``). ``rows``: the index result of each specimen (the one
    reported last), indexed by specimen; ``above``: a boolean Series over the same specimens,
    True when the index is strictly above the cut-off. A censored index decides only when its
    limit does (``'<10'`` is below a cut-off of 25, ``'>100'`` above; ``'<50'`` decides nothing,
    and that specimen falls back to the multi-analyte clauses). Implausible and unit-missing
    index results never decide (they are not valid results).
    """
    code = str(si["analyte"])
    cut, source = ref.serum_indices[(code, str(si["cutoff"]))]
    rows = t[(t["analyte_code"] == code) & (t["x_num"] | t["x_cens"])]
    rows = rows.sort_values(["x_spec", "reported_at", "result_id"]).drop_duplicates("x_spec", keep="last")
    rows = rows.set_index("x_spec")
    v = rows["value_canonical"].to_numpy(float)
    comp = rows["comparator"].astype(object).to_numpy()
    cens = rows["x_cens"].to_numpy(bool)
    with np.errstate(invalid="ignore"):
        above = (~cens & (v > cut)) | (cens & (((comp == ">") & (v >= cut)) | ((comp == ">=") & (v > cut))))
        below = (~cens & (v <= cut)) | (cens & np.isin(comp, _LOWER_COMPARATORS) & (v <= cut))
    decided = above | below
    rows = rows[decided]
    return pd.Series(above[decided], index=rows.index), rows, cut, source


def _numeric_pattern(t: pd.DataFrame, withprev: pd.DataFrame, pat: dict, ref: ClinicalReference,
                     with_assessable: bool = False):
    """One pattern's anomalies (one row per specimen, on its index analyte) and, optionally, assessability.

    With a ``serum_index`` entry (the haemolysis index), a specimen that has a decisive index
    result is judged by the index alone (above the cited cut-off: fires; at or below: does not,
    whatever the other results); the ``all`` clauses judge only specimens without one. The
    evidence says which was used (``method``).
    """
    clauses = list(pat["all"])
    support = list(pat.get("supporting", []))
    flat = lambda cs: [x for c in cs for x in (flat(c["any"]) if "any" in c else [c])]  # noqa: E731
    codes = sorted({str(c["analyte"]) for c in flat(clauses + support)})
    wide = _pattern_wide(withprev, codes)
    index = pd.Index(np.unique(np.concatenate([g.index.to_numpy() for g in wide.values()]))) if wide else pd.Index([])
    holds = pd.Series(True, index=index)
    assessable = pd.Series(True, index=index)
    for c in clauses:
        h, ok = _clause(wide, c, index, ref)
        holds &= h
        assessable &= ok
    fired = index[holds.to_numpy()]
    si = pat.get("serum_index")
    by_index = pd.Series(dtype=bool)
    if si is not None:
        by_index, idx_rows, cut, cut_source = _serum_index_decision(t, si, ref)
        fired = fired[~np.isin(fired.to_numpy(), by_index.index.to_numpy())]
        union = index.union(by_index.index)
        assessable = assessable.reindex(union, fill_value=False)
        assessable.loc[by_index.index] = True
        index = union
    support_holds = [_clause(wide, c, fired, ref)[0] for c in support]
    rows = []
    idx_code = str(pat.get("index_analyte", clauses[0]["analyte"]))
    source = " ".join(str(pat["source"]).split())
    for spec in fired:
        g = wide.get(idx_code)
        if g is None or spec not in g.index:
            g = next(w for w in wide.values() if spec in w.index)
        r = g.loc[spec]
        involved = [wide[c].loc[spec] for c in codes if c in wide and spec in wide[c].index]
        ids = sorted({int(x["result_id"]) for x in involved})
        met = [s for s in (_clause_text(wide, c, spec) for c in clauses) if s]
        sup = [s for c, h in zip(support, support_holds) if bool(h.loc[spec]) and (s := _clause_text(wide, c, spec))]
        rows.append(dict(r.to_dict(), x_ids=ids, x_met=met, x_sup=sup))
    parts = []
    if rows:
        sel = pd.DataFrame(rows)
        method = "multi-analyte pattern" if si is not None else None
        ev = [_evidence(pattern=pat["id"], result_ids=x["x_ids"], criteria=x["x_met"], supporting=x["x_sup"],
                        **({"method": method} if method else {})) for x in rows]
        how = f" ({si['absent_note']})" if si is not None else ""
        txt = [f"{x['x_name']} {_fmt(x['value_canonical'], x['analyte_code'])}{_u(x['x_unit'])}: {pat['finding']} "
               f"({'; '.join(x['x_met'] + x['x_sup'])}){how}, suggesting {pat['name']}{_SEP}consider recollecting the "
               f"specimen before acting on these results ({short_citation(source)})" for x in rows]
        parts.append(_rows(sel, PATTERN_PREFIX + pat["id"], ["SUSPECT"] * len(sel), [np.nan] * len(sel), ev,
                           [source] * len(sel), txt))
    if si is not None and by_index.any():
        parts.append(_index_rows(wide, codes, idx_code, by_index.index[by_index.to_numpy()], idx_rows, cut,
                                 cut_source, pat, source))
    out = pd.concat(parts, ignore_index=True) if parts else _empty()
    if with_assessable:
        return out, pd.Series(assessable.to_numpy(), index=index)
    return out


def _index_rows(wide: dict, codes: list[str], idx_code: str, specs, idx_rows: pd.DataFrame, cut: float,
                cut_source: str, pat: dict, source: str) -> pd.DataFrame:
    """Anomaly rows for specimens whose serum index is above the cut-off.

    The row sits on the pattern's index analyte when the specimen has it (potassium), else on
    another pattern analyte, else on the index result itself. Score: index / cut-off.
    """
    specs = pd.Index(specs)
    order = [idx_code] + [c for c in codes if c != idx_code]
    recs = {c: wide[c].loc[wide[c].index.intersection(specs)].to_dict("index") for c in order if c in wide}
    his = idx_rows.loc[specs].to_dict("index")
    rows, ev, txt, scores = [], [], [], []
    finding = pat["serum_index"]["finding"]
    for spec in specs:
        hi = his[spec]
        cens = bool(hi["x_cens"])
        hi_shown = f"{_shown(hi['value_canonical'], hi['comparator'], cens, hi['analyte_code'])}{_u(hi['x_unit'])}"
        present = [recs[c][spec] for c in order if c in recs and spec in recs[c]]
        r = present[0] if present else hi
        affected = [f"{x['x_name']} {_fmt(x['value_canonical'], x['analyte_code'])}{_u(x['x_unit'])}" for x in present]
        ids = sorted({int(hi["result_id"])} | {int(x["result_id"]) for x in present})
        criterion = f"{hi['x_name']} {hi_shown} > {_fmt(cut, hi['analyte_code'])}{_u(hi['x_unit'])}"
        ev.append(_evidence(pattern=pat["id"], method="haemolysis index", result_ids=ids, criteria=[criterion],
                            supporting=affected, index_result_id=int(hi["result_id"]), index_value=hi["value_canonical"],
                            index_comparator=hi["comparator"] if cens else "=", index_unit=hi["x_unit"],
                            cutoff=cut, cutoff_source=cut_source))
        scores.append(hi["value_canonical"] / cut if cut > 0 else np.nan)
        lead = f"{r['x_name']} {_fmt(r['value_canonical'], r['analyte_code'])}{_u(r['x_unit'])}: " if present else ""
        others = affected[1:]  # the lead result is named first already
        also = f"; {'; '.join(others)}" if others else ""
        txt.append(f"{lead}{finding if lead else finding[:1].upper() + finding[1:]} ({criterion}{also}), suggesting "
                   f"{pat['name']}{_SEP}consider recollecting the specimen before acting on these results "
                   f"({short_citation(cut_source)})")
        rows.append(r)
    sel = pd.DataFrame(rows)
    return _rows(sel, PATTERN_PREFIX + pat["id"], ["SUSPECT"] * len(sel), scores, ev,
                 [f"{cut_source}; {source}"] * len(sel), txt)


def _text_pattern(t: pd.DataFrame, pat: dict) -> pd.DataFrame:
    """A laboratory's words (e.g. 'HEMOLYZED') in a result or its comment: one row per specimen, on
    its first reported result (numeric before text), every matching result in ``evidence['result_ids']``."""
    words = [str(w).lower() for w in pat["text_match"]]
    text = (t["value_text"].astype(object).fillna("").astype(str) + " | " +
            t["comment"].astype(object).fillna("").astype(str)).str.lower()
    for phrase in pat.get("text_exclude", []):  # negations ('NOT HEMOLYZED') are not a finding
        text = text.str.replace(str(phrase).lower(), " ", regex=False)
    hit = np.zeros(len(t), bool)
    for w in words:
        hit |= text.str.contains(w, regex=False).to_numpy()
    sel = t[hit]
    if sel.empty:
        return _empty()
    sel = sel.assign(_text=~sel["x_num"]).sort_values(["x_spec", "_text", "collected_at", "result_id"], kind="stable")
    source = " ".join(str(pat["source"]).split())
    ev, txt, vals, leads = [], [], [], []
    for _, g in sel.groupby("x_spec", sort=False):
        r = g.iloc[0]
        numeric = bool(r["x_num"])
        vals.append(r["value_canonical"] if numeric else np.nan)
        txt_of = lambda v: v.strip() if isinstance(v, str) else ""  # noqa: E731 - None / NaN: no text
        shown = [f"{x.x_name} {_fmt(x.value_canonical, x.analyte_code)}{_u(x.x_unit)}" if x.x_num
                 else f"{x.x_name} '{txt_of(x.value_text)}'" for x in g.itertuples(index=False)]
        notes = list(dict.fromkeys(txt_of(x.comment) or txt_of(x.value_text) for x in g.itertuples(index=False)))
        ev.append(_evidence(pattern=pat["id"], result_ids=[int(x) for x in g["result_id"]],
                            value_text=r["value_text"], comment=r["comment"], scored_as_number=False))
        txt.append(f"{'; '.join(shown)}: {pat['finding']}{_SEP}consider recollecting the specimen before acting on "
                   f"{'this result' if len(g) == 1 else 'these results'} (laboratory comment: {'; '.join(notes)})")
        leads.append(r)
    lead = pd.DataFrame(leads)
    return _rows(lead, PATTERN_PREFIX + pat["id"], ["SUSPECT"] * len(lead), [np.nan] * len(lead), ev,
                 [source] * len(lead), txt, values=vals)


# ---------------------------------------------------------------------------------------------
# Rules 3 and 4: model-based
# ---------------------------------------------------------------------------------------------


def _pit(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Predictive quantile level of each value, linear between the forecast quantiles, clipped."""
    out = np.full(len(values), np.nan)
    levels = np.asarray(QUANTILES, dtype=float)
    for i, (x, q) in enumerate(zip(values, quantiles)):
        if np.all(np.isfinite(q)):
            out[i] = float(np.interp(x, q, levels))
    return out


def _interval_rule(sel: pd.DataFrame, q: np.ndarray, lo: np.ndarray, hi: np.ndarray, level: np.ndarray, cfg: dict,
                   rule: str, model_version: str | None, what: str, note: str,
                   margin: np.ndarray | None = None) -> pd.DataFrame:
    """Rows of ``sel`` whose value lies outside ``[lo - margin, hi + margin]`` (per row; ``level`` the
    interval's coverage; texts and evidence give ``[lo, hi]`` and the margin).

    ``q``: the quantiles (``QUANTILE_COLUMNS``) of each row, for the predictive quantile (score).
    """
    v = sel["value_canonical"].to_numpy(float)
    margin = np.zeros(len(sel)) if margin is None else np.asarray(margin, float)
    with np.errstate(invalid="ignore"):
        above, below = v > hi + margin, v < lo - margin
    mask = above | below
    if not mask.any():
        return _empty()
    s, qs, ab = sel[mask], q[mask], above[mask]
    los, his, levels, margins = lo[mask], hi[mask], level[mask], margin[mask]
    pit = _pit(s["value_canonical"].to_numpy(float), qs)
    source = " ".join(str(cfg["source"]).split())
    ev, txt = [], []
    for r, qq, a, p, l_, h_, lev, mg in zip(s.itertuples(index=False), qs, ab, pit, los, his, levels, margins):
        width = h_ - l_
        excess = (r.value_canonical - (h_ if a else l_)) / width if width > 0 else np.nan
        code = r.analyte_code
        ev.append(_evidence(quantiles={c: _clean(x) for c, x in zip(QUANTILE_COLUMNS, qq)}, interval_level=lev,
                            interval_low=l_, interval_high=h_, margin=mg, predictive_quantile=p,
                            excess_in_interval_widths=excess,
                            model_version=model_version))
        txt.append(f"{r.x_name} {_fmt(r.value_canonical, code)}{_u(r.x_unit)} is {'above' if a else 'below'} the "
                   f"{100 * lev:.0f} % interval {_fmt(l_, code)}{_DASH}{_fmt(h_, code)}{_u(r.x_unit)} {what}"
                   f"{_SEP}consider reviewing this result{note} (model {model_version})")
    return _rows(s, rule, np.where(ab, "ABOVE", "BELOW"), pit, ev, [source] * len(s), txt, model_version=model_version)


def _resolution(code: str) -> float:
    """Half a unit of the analyte's last reported decimal (0 when the precision is unknown): a value
    closer than this to a bound prints equal to it."""
    d = reporting_decimals(code)
    return 0.0 if d is None else 0.5 * 10.0 ** -d


def _model_surprise(t: pd.DataFrame, history: pd.DataFrame, forecaster, ref: ClinicalReference, since,
                    notes: list) -> pd.DataFrame:
    """Rule 3: outside the model's **calibrated** interval (95 % when calibrated at 95 %, else 90 %)."""
    if getattr(forecaster, "conformal", None) is None:
        notes.append("model_surprise not evaluated: the model's intervals are not calibrated (no calibration.json), "
                     "so a result outside them is no evidence of a surprise")
        return _empty()
    # only analytes with a cited allowable error of one result (delta_check_limits.csv): a surprise must exceed
    # it to be told from analytical error, the same evidence standard as the delta check
    cand = t[t["x_num"] & t["analyte_code"].isin(list(ref.delta_min)).to_numpy()]
    if since is not None:
        cand = cand[cand["collected_at"] >= pd.Timestamp(since)]
    if cand.empty:
        return _empty()
    queries = cand[["patient_id", "analyte_code", "collected_at"]].drop_duplicates().rename(columns={"collected_at": "at"})
    try:
        fc = forecaster.forecast(history, queries.reset_index(drop=True))
    except ValueError as exc:
        notes.append(f"model_surprise not evaluated: {exc}")
        log.warning("model_surprise not evaluated: %s", exc)
        return _empty()
    fc = fc.rename(columns={"at": "collected_at"})
    fc["collected_at"] = pd.to_datetime(fc["collected_at"]).astype("datetime64[us]")
    wide = [c for c in ("lo95", "hi95") if c in fc]
    m = cand.merge(fc[["patient_id", "analyte_code", "collected_at", "status", "model_version", *QUANTILE_COLUMNS,
                       *wide]], on=["patient_id", "analyte_code", "collected_at"], how="inner")
    m = m[m["status"] == "ok"]
    if m.empty:
        return _empty()
    cfg = ref.rules["model_surprise"]
    q = m[list(QUANTILE_COLUMNS)].to_numpy(float)
    lo_i, hi_i = QUANTILE_COLUMNS.index(cfg["lower"]), QUANTILE_COLUMNS.index(cfg["upper"])
    lo, hi = q[:, lo_i].copy(), q[:, hi_i].copy()
    level = np.full(len(m), QUANTILES[hi_i] - QUANTILES[lo_i])
    if cfg.get("calibrated_95") and len(wide) == 2:
        w_lo, w_hi = m["lo95"].to_numpy(float), m["hi95"].to_numpy(float)
        ok = np.isfinite(w_lo) & np.isfinite(w_hi)
        lo[ok], hi[ok], level[ok] = w_lo[ok], w_hi[ok], 0.95
    # A value beyond the bound by less than the allowable error of one result (delta_check_limits.csv), or
    # that prints equal to the bound at the reporting precision, is no surprise: widen by that margin.
    codes = m["analyte_code"].to_numpy(dtype=object)
    margin = np.array([max(ref.delta_min.get(c, (0.0, ""))[0], _resolution(c)) for c in codes], dtype=float)
    version = str(m["model_version"].iloc[0])
    return _interval_rule(m, q, lo, hi, level, cfg, "model_surprise", version,
                          "calibrated on held-out patients, forecast from the history before it", "", margin=margin)


class MaskedValuePredictor:
    """Rule 4's model: each result predicted from the rest of its specimen and history.

    Wraps a :class:`model.modeling.LabTrendForPretraining` with the vocabulary and scaler it
    was trained with. For a target result collected at ``t`` the row holds the patient's
    results collected at or before ``t`` (the most recent ``max_events``), with ``event_time``
    = days before ``t`` (0 for the same specimen); only the target's value and censor flag
    are hidden (``value_mask``), so its analyte and time stay visible.
    """

    def __init__(self, model, vocab, scaler, model_version: str | None = None, batch_size: int = 128):
        self.model = model.eval()
        self.vocab = vocab
        self.scaler = scaler
        self.batch_size = batch_size
        self.model_version = model_version or getattr(model.config, "_name_or_path", None) or "pretraining"

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu") -> MaskedValuePredictor:
        """A pretraining checkpoint directory holding ``vocab.json`` and ``scaler.json`` too."""
        import json

        from model.features import AnalyteScaler, AnalyteVocab
        from model.inference import resolve_device
        from model.modeling import LabTrendForPretraining

        path = Path(path)
        for name in ("vocab.json", "scaler.json", "config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a pretraining directory with vocabulary and scaler")
        model = LabTrendForPretraining.from_pretrained(path).to(resolve_device(device))
        vocab = AnalyteVocab.from_dict(json.loads((path / "vocab.json").read_text()))
        scaler = AnalyteScaler.from_dict(json.loads((path / "scaler.json").read_text()))
        version_file = path / "model_version"
        version = version_file.read_text().strip() if version_file.is_file() else f"pretraining:{path.name}"
        return cls(model, vocab, scaler, model_version=version)

    def predict(self, history: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
        """Quantiles (canonical unit) of each target ``(patient_id, analyte_code, collected_at)``.

        Returns the targets' columns plus ``q05 .. q95`` and ``status`` ('ok', or why not).
        """
        import torch

        from model.features import N_SPECIAL, SEX_IDS, validate_history

        h = validate_history(history)
        h = h.assign(aid=self.vocab.encode(h["analyte_code"]))
        h = h[h["aid"] >= N_SPECIAL].sort_values(["patient_id", "collected_at", "aid"], kind="stable")
        z = np.zeros(len(h), np.float32)
        if len(h):
            z = self.scaler.normalise(h["analyte_code"].to_numpy(), h["value"].to_numpy())
        h = h.assign(z=z, t_us=h["collected_at"].to_numpy().astype("datetime64[us]").astype(np.int64))
        per = {pid: g for pid, g in h.groupby("patient_id", sort=False)}
        max_events = int(self.model.config.max_events)
        out = targets.reset_index(drop=True).copy()
        q = np.full((len(out), len(QUANTILES)), np.nan)
        status = np.full(len(out), "ok", dtype=object)
        rows = []
        for i, r in enumerate(out.itertuples(index=False)):
            g = per.get(str(r.patient_id))
            t_us = np.datetime64(pd.Timestamp(r.collected_at), "us").astype(np.int64)
            if g is None:
                status[i] = "no history"
                continue
            end = int(np.searchsorted(g["t_us"].to_numpy(), t_us, side="right"))
            start = max(0, end - max_events)
            ev = g.iloc[start:end]
            hit = np.flatnonzero((ev["analyte_code"].to_numpy() == str(r.analyte_code)) & (ev["t_us"].to_numpy() == t_us))
            if not len(hit):
                status[i] = "analyte not in model vocabulary or result not in history"
                continue
            age = ev["age_years"].iloc[-1] if "age_years" in ev else np.nan
            sex = ev["sex"].dropna().iloc[0] if "sex" in ev and ev["sex"].notna().any() else None
            rows.append((i, ev, int(hit[-1]), t_us, age, SEX_IDS.get(sex, 0)))
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s : s + self.batch_size]
            b, e = len(chunk), max(len(c[1]) for c in chunk)
            arr = {k: np.zeros((b, e), dt) for k, dt in (("event_analyte", np.int64), ("event_value", np.float32),
                                                         ("event_censor", np.int64), ("event_time", np.float32),
                                                         ("event_mask", np.int64))}
            vmask = np.zeros((b, e), bool)
            age = np.array([c[4] for c in chunk], np.float32)
            sex = np.array([c[5] for c in chunk], np.int64)
            for j, (_, ev, k, t_us, _, _) in enumerate(chunk):
                n = len(ev)
                arr["event_analyte"][j, :n] = ev["aid"].to_numpy()
                arr["event_value"][j, :n] = ev["z"].to_numpy()
                arr["event_censor"][j, :n] = ev["censor"].to_numpy()
                arr["event_time"][j, :n] = (t_us - ev["t_us"].to_numpy()) / 86_400e6
                arr["event_mask"][j, :n] = 1
                vmask[j, k] = True
            device = next(self.model.parameters()).device
            batch = {k: torch.from_numpy(v).to(device) for k, v in arr.items()}
            batch["patient_age"] = torch.from_numpy(age).to(device)
            batch["patient_sex"] = torch.from_numpy(sex).to(device)
            with torch.inference_mode():
                mq = self.model.predict_masked(batch, torch.from_numpy(vmask).to(device)).float().cpu().numpy()
            for j, (i, ev, k, _, _, _) in enumerate(chunk):
                code = ev["analyte_code"].iloc[k]
                q[i] = self.scaler.denormalise([code], mq[j, k][None, :])[0]
        for c, col in enumerate(QUANTILE_COLUMNS):
            out[col] = q[:, c]
        out["status"] = status
        return out


def _multivariate(t: pd.DataFrame, history: pd.DataFrame, predictor, ref: ClinicalReference, since,
                  notes: list) -> pd.DataFrame:
    cand = t[t["x_num"]]
    if since is not None:
        cand = cand[cand["collected_at"] >= pd.Timestamp(since)]
    sizes = t[t["x_num"] | t["x_cens"]].groupby("x_spec")["analyte_code"].nunique()
    cand = cand[np.array([sizes.get(k, 0) for k in cand["x_spec"]]) >= 2]
    if cand.empty:
        return _empty()
    targets = cand[["patient_id", "analyte_code", "collected_at"]].drop_duplicates()
    try:
        pred = predictor.predict(history, targets.reset_index(drop=True))
    except ValueError as exc:
        notes.append(f"multivariate_inconsistency not evaluated: {exc}")
        log.warning("multivariate_inconsistency not evaluated: %s", exc)
        return _empty()
    pred["collected_at"] = pd.to_datetime(pred["collected_at"]).astype("datetime64[us]")
    m = cand.merge(pred, on=["patient_id", "analyte_code", "collected_at"], how="inner")
    m = m[m["status"] == "ok"]
    if m.empty:
        return _empty()
    cfg = ref.rules["multivariate"]
    q = m[list(QUANTILE_COLUMNS)].to_numpy(float)
    lo_i, hi_i = QUANTILE_COLUMNS.index(cfg["lower"]), QUANTILE_COLUMNS.index(cfg["upper"])
    return _interval_rule(m, q, q[:, lo_i], q[:, hi_i], np.full(len(m), QUANTILES[hi_i] - QUANTILES[lo_i]), cfg,
                          "multivariate_inconsistency", getattr(predictor, "model_version", None),
                          "predicted from the other results of the specimen", " for a specimen problem")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ANOMALY_COLUMNS})


# ---------------------------------------------------------------------------------------------
# Runs: consecutive flags of one analyte within one episode are one review item
# ---------------------------------------------------------------------------------------------

_T = "%Y-%m-%d %H:%M"
_UPWARD = ("HH", "UP", "ABOVE")
_DOWNWARD = ("LL", "DOWN", "BELOW")


def _episodes_of(rows: pd.DataFrame, episodes: pd.DataFrame | None) -> np.ndarray:
    """The index of the episode (admission) each row's collection time falls in, -1 when none is known."""
    out = np.full(len(rows), -1, dtype=np.int64)
    if episodes is None or episodes.empty or rows.empty:
        return out
    e = episodes.assign(patient_id=episodes["patient_id"].astype(str),
                        start=pd.to_datetime(episodes["start"]), end=pd.to_datetime(episodes["end"]))
    e = e.reset_index(drop=True)
    times = pd.to_datetime(rows["collected_at"]).to_numpy()
    pids = rows["patient_id"].astype(str).to_numpy()
    for k, ep in enumerate(e.itertuples(index=False)):
        inside = (pids == ep.patient_id) & (times >= np.datetime64(ep.start)) & (times <= np.datetime64(ep.end))
        out[inside & (out < 0)] = k
    return out


def _run_ids(out: pd.DataFrame, t: pd.DataFrame, max_gap: pd.Timedelta, episodes) -> np.ndarray:
    """A run number per anomaly row: same patient, analyte, rule and direction, consecutive results of
    the analyte (no other result of it in between) and one episode (the same admission, else each
    flag within ``max_gap`` of the previous one)."""
    times = t[["patient_id", "analyte_code", "collected_at"]].drop_duplicates().sort_values(
        ["patient_id", "analyte_code", "collected_at"])
    times["_ord"] = times.groupby(["patient_id", "analyte_code"]).cumcount()
    o = out[["patient_id", "analyte_code", "collected_at", "rule", "flag"]].copy()
    # a run keeps one direction only for critical values (a critical high and a critical low are two
    # emergencies); rises and falls beyond the RCV, or surprises either way, on consecutive results are one
    o["flag"] = np.where(o["rule"] == "critical_value", o["flag"], "")
    o["collected_at"] = pd.to_datetime(o["collected_at"]).astype("datetime64[us]")
    o["_row"] = np.arange(len(o))
    o = o.merge(times, on=["patient_id", "analyte_code", "collected_at"], how="left")
    o["_ep"] = _episodes_of(o, episodes)
    o = o.sort_values(["patient_id", "analyte_code", "rule", "flag", "collected_at", "_row"], kind="stable")
    same = ((o["patient_id"] == o["patient_id"].shift()) & (o["analyte_code"] == o["analyte_code"].shift())
            & (o["rule"] == o["rule"].shift()) & (o["flag"] == o["flag"].shift()))
    step = o["_ord"] - o["_ord"].shift()
    consecutive = same & step.le(1).fillna(False) & o["_ord"].notna()
    ep, prev_ep = o["_ep"].to_numpy(), o["_ep"].shift().fillna(-1).astype(np.int64).to_numpy()
    gap_ok = (o["collected_at"] - o["collected_at"].shift()).le(max_gap).fillna(False).to_numpy()
    episode_ok = np.where((ep >= 0) & (prev_ep >= 0), ep == prev_ep, ((ep < 0) & (prev_ep < 0)) & gap_ok)
    new = ~(consecutive.to_numpy() & episode_ok)
    runs = np.cumsum(new) - 1
    result = np.empty(len(o), dtype=np.int64)
    result[o["_row"].to_numpy()] = runs
    return result


def _peak_index(g: list[dict]) -> int:
    """Position of the run's peak in ``g`` (the run's rows as records, oldest first): the highest critical
    high / lowest critical low, the value farthest from a delta check's baseline, the largest excess
    beyond a model interval, else the largest |score|."""
    rule, flag = g[0]["rule"], g[0]["flag"]
    v = np.array([r["value"] for r in g], dtype=float)
    ev0 = g[0]["evidence"] if isinstance(g[0]["evidence"], dict) else {}
    if rule == "critical_value" and flag == "HH" and np.isfinite(v).any():
        return int(np.nanargmax(v))
    if rule == "critical_value" and flag == "LL" and np.isfinite(v).any():
        return int(np.nanargmin(v))
    if rule == "delta_check" and ev0.get("previous_value") is not None and np.isfinite(v).any():
        return int(np.nanargmax(np.abs(v - float(ev0["previous_value"]))))
    if rule in ("model_surprise", "multivariate_inconsistency"):
        ex = np.array([abs(r["evidence"].get("excess_in_interval_widths") or 0.0) if isinstance(r["evidence"], dict)
                       else 0.0 for r in g], dtype=float)
        return int(np.argmax(ex))
    sc = np.abs(np.array([r["score"] for r in g], dtype=float))
    return int(np.nanargmax(sc)) if np.isfinite(sc).any() else 0


def _run_text(g: list[dict], ref: ClinicalReference, k: int | None = None) -> str:
    """The text of a run: ``g`` its rows as records (oldest first), ``k`` the peak's position (:func:`_peak_index`)."""
    first, last = g[0], g[-1]
    peak = g[_peak_index(g) if k is None else k]
    code, unit, name, rule, flag = first["analyte_code"], first["unit"], first["analyte_name"], first["rule"], first["flag"]
    n = len(g)
    t0, t1 = pd.Timestamp(first["collected_at"]), pd.Timestamp(last["collected_at"])
    span = f"from {t0:{_T}} to {t1:{_T}} ({_when((t1 - t0).total_seconds() / 86400.0)})"
    val = lambda r: _fmt(r["value"], code) if np.isfinite(float(r["value"])) else "text result"  # noqa: E731
    values = f"first {val(first)}, peak {val(peak)} ({pd.Timestamp(peak['collected_at']):{_T}}), last {val(last)}{_u(unit)}"
    ev = first["evidence"] if isinstance(first["evidence"], dict) else {}
    if rule == "critical_value":
        if ev.get("basis") == "critical value list" and flag in ("HH", "LL"):
            lim = ev.get("limit")
            why = (f"{'above' if flag == 'HH' else 'below'} the critical limit {_fmt(lim, code)}{_u(unit)}"
                   f"{_SEP}consider urgent clinical review ({ref.critical_list}: {short_citation(first['source'])})")
        else:
            why = f"flagged critical by the laboratory{_SEP}consider urgent clinical review (laboratory flag)"
        return f"{name} critical {'high' if flag == 'HH' else 'low' if flag == 'LL' else ''} on {n} consecutive " \
               f"results {span}: {values}, {why}".replace("critical  on", "critical on")
    if rule == "delta_check":
        base, base_at = ev.get("previous_value"), ev.get("previous_at")
        days = (t1 - pd.Timestamp(base_at)).total_seconds() / 86400.0 if base_at else float("nan")
        flags = {r["flag"] for r in g}
        word = "rose" if flags == {"UP"} else "fell" if flags == {"DOWN"} else "changed"
        change = _change_text(code, float(last["value"]), float(base), unit) if base else "?"
        m = ev.get("min_abs_change")
        return (f"{name} {word} on {n} consecutive results {span}: {val(last)}{_u(unit)} is {change} from "
                f"{_fmt(base, code)}{_u(unit)} {_when(days)} earlier (the result before this run); peak {val(peak)}"
                f"{_u(unit)} ({pd.Timestamp(peak['collected_at']):{_T}}); each step beyond its reference change value "
                f"and the minimum change of {_fmt(m, code)}{_u(unit)}{_SEP}consider whether this is a true clinical "
                f"change or a specimen problem (RCV: Fraser 2011; minimum: {short_citation(ev.get('min_abs_change_source') or '')})")
    if rule in ("model_surprise", "multivariate_inconsistency"):
        lev = ev.get("interval_level")
        where = f"the {100 * lev:.0f} % interval" if lev else "the model's interval"
        flags = {r["flag"] for r in g}
        side = "above" if flags == {"ABOVE"} else "below" if flags == {"BELOW"} else "outside"
        return (f"{name} {side} {where} on {n} consecutive results {span}: "
                f"{values}{_SEP}consider reviewing these results (model {first['model_version']})")
    if str(rule).startswith(PATTERN_PREFIX):
        pat = next((p for p in ref.rules["patterns"] if PATTERN_PREFIX + p["id"] == rule), {})
        return (f"{name}: {pat.get('finding', rule)} in {n} consecutive specimens {span} ({values}), suggesting "
                f"{pat.get('name', rule)}{_SEP}consider recollecting before acting on these results "
                f"({short_citation(first['source'])})")
    return f"{first['text']} (and {n - 1} more consecutive results {span})"


def _delta_filler(fill):
    """For :func:`group_runs`: gives the delta checks (records with ``_delta``, their position in
    :func:`_delta_check`'s lazy rows) their evidence where they open a run and their text where they
    are a run of one; the other members' are never read."""

    def apply(recs: list[dict], first: np.ndarray, single: np.ndarray) -> None:
        d = np.array([r.get("_delta") for r in recs], dtype=float)
        lazy = np.isfinite(d)
        for mask, kind in ((lazy & first, "evidence"), (lazy & single, "text")):
            at = np.flatnonzero(mask)
            if not len(at):
                continue
            ev, txt = fill(d[at].astype(np.int64), evidence=kind == "evidence", text=kind == "text")
            for i, v in zip(at.tolist(), ev if kind == "evidence" else txt):
                recs[i][kind] = v

    return apply


def group_runs(anomalies: pd.DataFrame, timeline: pd.DataFrame, reference: ClinicalReference | None = None, *,
               episodes: pd.DataFrame | None = None, max_gap_hours: float | None = None,
               _fill=None) -> pd.DataFrame:
    """One row per run of consecutive flags (:data:`ANOMALY_COLUMNS`): see :func:`detect_anomalies`.

    ``anomalies``: per-result rows of one or many patients; ``timeline``: those patients' timeline
    rows (prepared or not), which say whether another result of the analyte lies between two flags.
    ``episodes``: optional admissions ``patient_id, start, end``; ``max_gap_hours`` (default the
    rule file's ``runs.max_gap_hours``) bounds a run where no admission is known.

    A run's row keeps its first result (``result_id``, ``collected_at``: the output's identity
    stays when later results join the run), takes the peak's ``value`` and ``score``, and adds
    ``evidence['run']``: ``n``, ``result_ids``, ``collected_at``, ``values`` (oldest first),
    ``first``, ``peak``, ``last`` (each ``result_id, collected_at, value``) and ``episode`` (how the
    run was bounded). Its text names the first, peak and last results; a delta check's names the
    baseline it computes from (the result before the run). Single flags keep their own text.
    """
    ref = reference or default_reference()
    if anomalies.empty:
        return anomalies
    t = timeline if "x_spec" in timeline else _prepare(timeline, None, ref)
    hours = float(max_gap_hours if max_gap_hours is not None else ref.rules["runs"]["max_gap_hours"])
    a = anomalies.reset_index(drop=True).copy()
    a["collected_at"] = pd.to_datetime(a["collected_at"]).astype("datetime64[us]")
    a["_run"] = _run_ids(a, t, pd.Timedelta(hours=hours), episodes)
    bound = ("admission" if episodes is not None and len(episodes) else f"consecutive flags no more than {hours:g} h apart")
    # one pass over plain records (a year of 5-minute glucose has thousands of runs: a DataFrame per run
    # cost seconds and hundreds of MB of short-lived objects)
    a = a.sort_values(["_run", "collected_at", "result_id"], kind="stable")
    run = a["_run"].to_numpy()
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]]) if len(run) else np.array([], dtype=np.int64)
    recs = a.to_dict("records")
    if _fill is not None:  # rows whose evidence and text were left to build: only where the run reads them
        first, single = np.zeros(len(a), dtype=bool), np.zeros(len(a), dtype=bool)
        first[starts] = True
        single[starts[np.diff(np.r_[starts, len(a)]) == 1]] = True
        _fill(recs, first, single)
    rows = []
    for b, e in zip(starts.tolist(), [*starts[1:].tolist(), len(recs)]):
        first = recs[b]
        if e - b == 1:
            rows.append(first)
            continue
        g = recs[b:e]
        k = _peak_index(g)
        peak, last = g[k], g[-1]
        pick = lambda r: {"result_id": _clean(r["result_id"]), "collected_at": _clean(r["collected_at"]),  # noqa: E731
                          "value": _clean(r["value"])}
        ev = dict(first["evidence"]) if isinstance(first["evidence"], dict) else {}
        members = [r["evidence"].get("result_ids") for r in g
                   if isinstance(r["evidence"], dict) and r["evidence"].get("result_ids")]
        if members:  # pattern rows: every involved result of every specimen of the run
            ev["result_ids"] = sorted({int(i) for ids in members for i in ids})
        ev["run"] = {"n": len(g), "result_ids": [_clean(r["result_id"]) for r in g],
                     "collected_at": [_clean(r["collected_at"]) for r in g], "values": [_clean(r["value"]) for r in g],
                     "scores": [_clean(r["score"]) for r in g],
                     "first": pick(first), "peak": pick(peak), "last": pick(last), "episode": bound}
        rows.append(dict(first, value=peak["value"], score=peak["score"], evidence=ev, text=_run_text(g, ref, k)))
    out = pd.DataFrame(rows).drop(columns=["_run"])
    out["model_version"] = pd.Series([v if isinstance(v, str) else None for v in out["model_version"]], dtype=object,
                                     index=out.index)  # rule-based rows: None, never NaN
    return out.sort_values(["patient_id", "collected_at", "analyte_code", "rule"], kind="stable").reset_index(drop=True)[
        ANOMALY_COLUMNS]


def detect_anomalies(
    timeline: pd.DataFrame,
    patients=None,
    *,
    forecaster=None,
    masked_predictor=None,
    reference: ClinicalReference | None = None,
    rules: list[str] | tuple[str, ...] | None = None,
    model_rules_since=None,
    episodes: pd.DataFrame | None = None,
    group: bool = True,
) -> pd.DataFrame:
    """The review-worthy anomalies of ``timeline`` (one or many patients), one row per review item
    (:data:`ANOMALY_COLUMNS`).

    Review-worthy: critical values, delta checks (beyond the RCV and the cited minimum change),
    pre-analytical patterns, model surprise beyond the calibrated interval and multivariate
    inconsistency. A result outside its reference interval is a flag on the result
    (:func:`clinical.flags.result_flags`), not a review item. With ``group`` (default),
    consecutive flags of one rule on one analyte within one episode are one row with its run of
    results (:func:`group_runs`).

    Args:
        timeline: rows as :func:`data.queries.timeline` returns them (canonical values), or
            :func:`prepare_timeline` of them (then ``patients`` and ``reference`` were applied there).
        patients: a :func:`data.queries.patient_info` dict, a frame of them, or None (sex and
            age unknown).
        forecaster: for ``model_surprise``: an object with ``forecast(history, queries)``
            returning the forecasts contract (a :class:`model.inference.ForecastPipeline`) and a
            ``conformal`` calibration (an uncalibrated model is not evaluated; the notes say so).
        masked_predictor: for ``multivariate_inconsistency``: a :class:`MaskedValuePredictor`
            (or any object with the same ``predict``).
        reference: reference tables and rule settings; default :func:`default_reference`.
        rules: names of the rules to run (:data:`RULES` and ``'preanalytical'``); default all
            that have what they need.
        model_rules_since: evaluate rules 3 and 4 only on results collected at or after
            this time (they cost one model row per result time).
        episodes: admissions ``patient_id, start, end`` when known (runs end with them).
        group: one row per run (True) or per result (False).

    Returns the anomalies sorted by patient, time, rule; ``attrs['notes']`` lists rules that
    were asked for but could not run, and why. Raises ``ValueError`` for an unknown rule name.
    """
    ref = reference or default_reference()
    known = set(RULES) | {"preanalytical"}
    if rules is not None and set(rules) - known:
        unknown = sorted(set(rules) - known)
        hint = (" (a result outside its reference interval is a flag on the result now: clinical.flags.result_flags)"
                if "reference_interval" in unknown else "")
        raise ValueError(f"unknown anomaly rule(s) {unknown}; expected some of {sorted(known)}{hint}")
    wanted = set(rules) if rules is not None else known
    with reported_precision(decimals_by_code(timeline)):
        return _detect(timeline, patients, forecaster, masked_predictor, ref, rules, wanted, model_rules_since,
                       episodes, group)


def _detect(timeline, patients, forecaster, masked_predictor, ref, rules, wanted, model_rules_since, episodes,
            group) -> pd.DataFrame:
    t = _prepared(timeline, patients, ref)
    notes: list[str] = []
    parts = []
    if "critical_value" in wanted:
        parts.append(_critical_value(t, ref))
    withprev = _with_previous(t) if {"delta_check", "preanalytical"} & wanted else None
    fill = None
    if "delta_check" in wanted:
        # grouped: the evidence and text of a delta check are built only where its run reads them
        delta, fill = _delta_check(t, ref, withprev, lazy=True) if group else (_delta_check(t, ref, withprev), None)
        if fill is not None:
            delta["_delta"] = np.arange(len(delta))
        parts.append(delta)
    if "preanalytical" in wanted:
        for pat in ref.rules["patterns"]:
            parts.append(_text_pattern(t, pat) if "text_match" in pat else _numeric_pattern(t, withprev, pat, ref))
    history = None
    if "model_surprise" in wanted and forecaster is not None:
        history = _history(t)
        parts.append(_model_surprise(t, history, forecaster, ref, model_rules_since, notes))
    elif "model_surprise" in wanted and rules is not None:
        notes.append("model_surprise not evaluated: no forecaster given")
    if "multivariate_inconsistency" in wanted and masked_predictor is not None:
        history = _history(t) if history is None else history
        parts.append(_multivariate(t, history, masked_predictor, ref, model_rules_since, notes))
    elif "multivariate_inconsistency" in wanted and rules is not None:
        notes.append("multivariate_inconsistency not evaluated: no pretraining model given")
    parts = [p for p in parts if len(p)]
    out = pd.concat(parts, ignore_index=True) if parts else _empty()
    if len(out) and group:
        out = group_runs(out, t, ref, episodes=episodes, _fill=_delta_filler(fill) if fill is not None else None)
    elif len(out):
        out = out.sort_values(["patient_id", "collected_at", "analyte_code", "rule"], kind="stable").reset_index(drop=True)
    out.attrs["notes"] = notes
    out.attrs["reference_version"] = ref.version
    return out


def pattern_detections(timeline: pd.DataFrame, patients=None, reference: ClinicalReference | None = None):
    """Pre-analytical pattern anomalies plus, per numeric pattern, which specimens could be assessed.

    Returns ``(anomalies, assessable)`` where ``assessable[pattern_id]`` is a boolean Series
    over specimen keys (:func:`specimen_keys`): every clause had the data it needs (analytes
    measured, previous results present). Used to report recall where a pattern is defined.
    """
    ref = reference or default_reference()
    t = _prepare(timeline, patients, ref)
    withprev = _with_previous(t)
    parts, assessable = [], {}
    for pat in ref.rules["patterns"]:
        if "text_match" in pat:
            parts.append(_text_pattern(t, pat))
            continue
        out, ok = _numeric_pattern(t, withprev, pat, ref, with_assessable=True)
        parts.append(out)
        keys = specimen_keys(t).to_numpy(dtype=object)
        first = pd.Series(np.arange(len(t))).groupby(t["x_spec"].to_numpy()).first()
        names = keys[first.reindex(ok.index.to_numpy()).to_numpy()]
        assessable[pat["id"]] = pd.Series(ok.to_numpy(), index=pd.Index(names, dtype=object))
    parts = [p for p in parts if len(p)]
    return (pd.concat(parts, ignore_index=True) if parts else _empty()), assessable



def evaluate_patterns(history: pd.DataFrame, labels: pd.DataFrame, reference: ClinicalReference | None = None) -> dict:
    """Specimen-level recall and precision of the numeric patterns on a labelled synthetic cohort.

    ``history, labels`` as :func:`model.synthetic.generate_cohort` returns them. For each
    pattern id that is also a label kind: ``n_labelled``, ``tp``, ``fp``, ``fn``, ``recall``,
    ``precision``, ``false_positive_rate`` (per unlabelled specimen), and the recall among
    specimens where the pattern could be assessed (``n_assessable``, ``recall_assessable``).
    A detection of another pattern's specimen counts as a false positive.
    """
    tl, pats = timeline_from_history(history)
    found, assessable = pattern_detections(tl, pats, reference)
    spec = specimen_keys(tl)
    spec_of = pd.Series(spec.to_numpy(), index=tl["result_id"].to_numpy())
    all_specs = pd.Index(spec.unique())
    lab_spec = specimen_keys(labels.assign(specimen_id=None))
    out = {}
    for pat_id, ok in assessable.items():
        lab = set(lab_spec[(labels["kind"] == pat_id).to_numpy()])
        det = set(spec_of.reindex(found.loc[found["rule"] == PATTERN_PREFIX + pat_id, "result_id"]).dropna())
        tp, fp, fn = len(det & lab), len(det - lab), len(lab - det)
        ok_specs = set(ok.index[ok.to_numpy()])
        lab_ok = lab & ok_specs
        negatives = len(all_specs) - len(lab)
        out[pat_id] = {
            "n_specimens": int(len(all_specs)), "n_labelled": len(lab), "tp": tp, "fp": fp, "fn": fn,
            "recall": tp / len(lab) if lab else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "false_positive_rate": fp / negatives if negatives else None,
            "n_assessable": len(lab_ok),
            "recall_assessable": len(det & lab_ok) / len(lab_ok) if lab_ok else None,
            "precision_assessable": (len(det & lab_ok) / len(det & ok_specs)) if det & ok_specs else None,
        }
    return out

