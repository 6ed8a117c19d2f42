"""From history and query frames to the padded arrays the network reads (numpy/pandas only).

Encoding rules (the same in pretraining, fine-tuning and inference — FC-12):

* **Strictly before.** A query ``(patient, analyte, at)`` sees only that patient's results
  with ``collected_at < at``. A result collected exactly at ``at`` is not history.
* **Events.** Each prior result of an analyte in the vocabulary becomes one event:
  ``analyte id``, ``value`` normalised per analyte by :class:`AnalyteScaler`, ``censor``
  (-1 for '<', 0 exact, +1 for '>'), and ``time`` = days from collection to ``at``
  (continuous, > 0, no grid). Results of analytes outside the vocabulary are left out of
  the events (their values cannot be normalised) but still count in ``n_history`` of a
  query for that analyte. Only the most recent ``max_events`` events are kept, oldest first.
* **Censored results** (LAB-01) enter with their limit as the value and the censor flag as
  a separate input: ``'<10'`` is ``value = normalise(10), censor = -1``, never 0.
* **Text, implausible and unit-missing results** never reach this module (history
  contract in ``model/__init__.py``); a non-numeric or non-finite value is a ``ValueError``.
* **Patient.** Age in years at ``at`` (NaN when unknown) and sex (0 unknown, 1 F, 2 M).
* **Queries.** ``analyte id``, ``horizon`` = days from the analyte's last prior result to
  ``at``, and that last result as the **anchor** (normalised value and censor flag): the
  forecasting head predicts quantiles relative to it. Each query also carries a
  **summary** of every prior result of its analyte (not only those among the ``max_events``
  events): :data:`QUERY_SUMMARY`, computed by :func:`summary_from_sums`.
* **Padding.** Rows are right-padded to the longest row of the batch. ``event_mask`` and
  ``query_mask`` are 1 for a real event/query and 0 for padding; padded slots hold analyte
  id 0 (PAD), value 0, censor 0 and time 0, and the network never lets them influence real
  positions. The same convention is used for training and inference.

Shapes: events ``(batch, events)``, queries ``(batch, queries)``, patients ``(batch,)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from model import MIN_HISTORY

__all__ = [
    "PAD_ID", "UNK_ID", "MASK_ID", "N_SPECIAL", "SEX_UNKNOWN", "SEX_IDS",
    "STATUS_OK", "STATUS_UNKNOWN_ANALYTE", "status_too_few",
    "AnalyteVocab", "AnalyteStats", "AnalyteScaler",
    "validate_history", "validate_queries",
    "ContextRow", "EncodedQueries", "encode_queries", "collate",
    "QUERY_SUMMARY", "summary_from_sums",
]

PAD_ID, UNK_ID, MASK_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>")
N_SPECIAL = len(SPECIAL_TOKENS)
SEX_UNKNOWN = 0
SEX_IDS = {"F": 1, "M": 2}

STATUS_OK = "ok"
STATUS_UNKNOWN_ANALYTE = "analyte not in model vocabulary"

_US_PER_DAY = 86_400 * 1_000_000

# Summary of a query analyte's prior results, normalised units relative to the anchor a (the
# last prior result): mean - a, previous result - a (0 with one result), min - a, max - a,
# standard deviation (population), log1p(number of prior results) / 5. Clipped to +-10.
QUERY_SUMMARY = ("mean_d", "prev_d", "min_d", "max_d", "std", "log_n")
_SUMMARY_CLIP = 10.0


def summary_from_sums(n, s, ss, lo, hi, anchor, prev) -> np.ndarray:
    """:data:`QUERY_SUMMARY` from running statistics of the analyte's prior results.

    Arguments are arrays of shape ``(queries,)`` in normalised units (float64 sums): ``n``
    count (>= 1), ``s`` sum, ``ss`` sum of squares, ``lo``/``hi`` minimum/maximum,
    ``anchor`` the last result, ``prev`` the one before it (NaN when there is none).
    Returns ``(queries, len(QUERY_SUMMARY))`` float32. Training (``ExampleBuilder``) and
    inference (:func:`encode_queries`) both call it with sums accumulated oldest first, so a
    query gets the same features in both.
    """
    n = np.asarray(n, dtype=np.float64)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    prev_d = np.where(np.isnan(prev), 0.0, prev - anchor)
    out = np.stack([mean - anchor, prev_d, lo - anchor, hi - anchor, std, np.log1p(n) / 5.0], axis=-1)
    return np.clip(out, -_SUMMARY_CLIP, _SUMMARY_CLIP).astype(np.float32)


SOFT_LIMIT = 8.0  # AnalyteScaler: robust z-scores beyond about this are compressed (asinh), never clipped
SOFT_CLIP = 60.0  # ... and cut only beyond this in compressed units (raw z of about 7,000: typos, overflow)
_MAX_LOG = 700.0  # exp() of more overflows float64


def status_too_few(n: int, minimum: int = MIN_HISTORY) -> str:
    """The status of a query with ``n`` prior results of its analyte (FC-12)."""
    return f"Not enough measurements to forecast ({n}; minimum {minimum})"


# ---------------------------------------------------------------------------------------------
# Vocabulary and per-analyte normalisation (fitted on training data, saved with the model)
# ---------------------------------------------------------------------------------------------


class AnalyteVocab:
    """Analyte code -> integer id. Ids 0, 1, 2 are PAD, UNK and MASK; analytes start at 3."""

    def __init__(self, codes: Iterable[str]):
        self.codes: list[str] = []
        self._ids: dict[str, int] = {}
        for code in codes:
            code = str(code)
            if code in self._ids:
                raise ValueError(f"duplicate analyte code {code!r} in vocabulary")
            self._ids[code] = N_SPECIAL + len(self.codes)
            self.codes.append(code)

    @classmethod
    def fit(cls, history: pd.DataFrame, min_count: int = 1) -> AnalyteVocab:
        """The analytes with at least ``min_count`` results in ``history``, sorted by code."""
        counts = history["analyte_code"].astype(str).value_counts()
        return cls(sorted(counts.index[counts >= min_count]))

    def __len__(self) -> int:
        return N_SPECIAL + len(self.codes)

    def __contains__(self, code: object) -> bool:
        return str(code) in self._ids

    def encode(self, codes: Iterable[str]) -> np.ndarray:
        """Ids of ``codes`` as int64; codes outside the vocabulary get :data:`UNK_ID`."""
        return np.fromiter((self._ids.get(str(c), UNK_ID) for c in codes), dtype=np.int64)

    def to_dict(self) -> dict:
        return {"special_tokens": list(SPECIAL_TOKENS), "codes": list(self.codes)}

    @classmethod
    def from_dict(cls, d: dict) -> AnalyteVocab:
        if tuple(d.get("special_tokens", SPECIAL_TOKENS)) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary special tokens {d.get('special_tokens')} != expected {list(SPECIAL_TOKENS)}")
        return cls(d["codes"])


@dataclass(frozen=True)
class AnalyteStats:
    """How one analyte is normalised: ``z = (t(x) - center) / scale``.

    ``transform`` is 'log' (``t(x) = log(max(x, lower))``) or 'identity' (``t(x) = x``);
    ``center`` and ``scale`` are in transformed units; ``unit`` is the canonical unit the
    statistics were fitted in; ``n`` the number of training results.
    """

    transform: str
    center: float
    scale: float
    lower: float
    unit: str | None
    n: int


class AnalyteScaler:
    """Robust per-analyte normalisation (median and IQR / 1.349), fitted on training results.

    A series with zero spread would divide by zero (tslearn's NaN, FC-12), so the scale is
    floored at ``min_rel_scale`` of the typical value: 0.05 log units (5 %) for log-scaled
    analytes, 5 % of ``|median|`` (or 1.0 when the median is 0) otherwise.

    **Extremes are compressed, never clipped** (``soft_limit`` L, the default for new fits): the
    robust z-score goes through ``L * asinh(z / L)``, the identity within a few units (z = 3 ->
    2.93) and logarithmic beyond, and back through ``L * sinh(z / L)``. A real but extreme result
    (WBC 342 x10^3/uL on a site whose WBC spread is narrow: z = 200) therefore comes back as
    itself instead of the clip's value. Only ``|z_compressed| > clip`` is cut, against overflow
    from a typo (60 means raw z beyond about 7,000). ``soft_limit=None`` (scalers saved before
    it existed) keeps the former hard clip of the raw z-score at ``[-clip, clip]``.
    """

    def __init__(self, stats: dict[str, AnalyteStats], clip: float = 20.0, soft_limit: float | None = None):
        self.stats = dict(stats)
        self.clip = float(clip)
        self.soft_limit = None if soft_limit is None else float(soft_limit)

    @classmethod
    def fit(
        cls, history: pd.DataFrame, *, log_ratio: float = 3.0, min_rel_scale: float = 0.05, clip: float | None = None,
        soft_limit: float | None = SOFT_LIMIT,
    ) -> AnalyteScaler:
        """Fit on ``history`` (history contract). Censored results count at their limit.

        An analyte is modelled on a log scale when all its values are > 0 and they span a
        wide multiplicative range (``q95 / q05 >= log_ratio``: creatinine, CRP, TSH); else
        on its raw scale (sodium, haemoglobin, HbA1c).
        """
        h = validate_history(history)
        units = h["unit_canonical"] if "unit_canonical" in h else pd.Series(None, index=h.index, dtype=object)
        stats = {}
        for code, idx in h.groupby("analyte_code", sort=True).groups.items():
            x = h.loc[idx, "value"].to_numpy(np.float64)
            q05, q25, q50, q75, q95 = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
            use_log = bool(x.min() > 0 and q95 >= log_ratio * q05)
            lower = float(0.5 * x.min()) if use_log else 0.0
            t = np.log(x) if use_log else x
            center = float(np.median(t))
            robust = float(np.subtract(*np.quantile(t, [0.75, 0.25]))) / 1.349
            floor = min_rel_scale if use_log else (min_rel_scale * abs(center) if center != 0 else 1.0)
            unit_values = units.loc[idx].dropna()
            stats[str(code)] = AnalyteStats(
                transform="log" if use_log else "identity",
                center=center,
                scale=max(robust, floor),
                lower=lower,
                unit=str(unit_values.mode().iloc[0]) if len(unit_values) else None,
                n=int(len(x)),
            )
        if clip is None:
            clip = SOFT_CLIP if soft_limit is not None else 20.0
        return cls(stats, clip=clip, soft_limit=soft_limit)

    def __contains__(self, code: object) -> bool:
        return str(code) in self.stats

    def _columns(self, codes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        codes = np.asarray(codes, dtype=object)
        missing = sorted({str(c) for c in codes} - set(self.stats))
        if missing:
            raise ValueError(f"analyte(s) {missing[:5]} have no scaler statistics (not in the training data)")
        table = {c: self.stats[str(c)] for c in set(codes.tolist())}
        is_log = np.fromiter((table[c].transform == "log" for c in codes), dtype=bool, count=len(codes))
        center = np.fromiter((table[c].center for c in codes), dtype=np.float64, count=len(codes))
        scale = np.fromiter((table[c].scale for c in codes), dtype=np.float64, count=len(codes))
        lower = np.fromiter((table[c].lower for c in codes), dtype=np.float64, count=len(codes))
        return is_log, center, scale, lower

    def _compress(self, z: np.ndarray) -> np.ndarray:
        """Raw robust z-score -> normalised units (float64, same shape)."""
        if self.soft_limit is not None:
            z = self.soft_limit * np.arcsinh(z / self.soft_limit)
        return np.clip(z, -self.clip, self.clip)

    def _expand(self, z: np.ndarray) -> np.ndarray:
        """Normalised units -> raw robust z-score (the inverse of :meth:`_compress` inside the clip)."""
        z = np.clip(np.asarray(z, dtype=np.float64), -self.clip, self.clip)
        if self.soft_limit is not None:
            z = self.soft_limit * np.sinh(z / self.soft_limit)
        return z

    def normalise(self, codes: Sequence[str], values: np.ndarray) -> np.ndarray:
        """Canonical-unit ``values`` of analytes ``codes`` -> normalised float32, shape ``(n,)``."""
        x = np.asarray(values, dtype=np.float64)
        is_log, center, scale, lower = self._columns(codes)
        t = np.where(is_log, np.log(np.maximum(x, np.where(is_log, lower, 1.0))), x)
        return self._compress((t - center) / scale).astype(np.float32)

    def unit_per_normalised(self, codes: Sequence[str], z: np.ndarray) -> np.ndarray:
        """``d value / d z`` at normalised ``z`` (shape ``(n,)``): how many canonical units one
        normalised unit is worth there (the scale; times the value itself on a log scale; times
        the compression's slope beyond the soft limit)."""
        z = np.clip(np.asarray(z, dtype=np.float64), -self.clip, self.clip)
        raw = self._expand(z)
        slope = np.cosh(z / self.soft_limit) if self.soft_limit is not None else 1.0
        is_log, center, scale, _ = self._columns(codes)
        t = np.clip(center + scale * raw, -_MAX_LOG, _MAX_LOG)
        return np.where(is_log, np.exp(np.where(is_log, t, 0.0)) * scale, scale) * slope

    def denormalise(self, codes: Sequence[str], z: np.ndarray) -> np.ndarray:
        """Normalised ``z`` of shape ``(n,)`` or ``(n, k)`` -> canonical units (float64), same shape."""
        raw = self._expand(z)
        is_log, center, scale, _ = self._columns(codes)
        if raw.ndim == 2:
            is_log, center, scale = is_log[:, None], center[:, None], scale[:, None]
        t = center + scale * raw
        return np.where(is_log, np.exp(np.where(is_log, np.clip(t, -_MAX_LOG, _MAX_LOG), 0.0)), t)

    def to_dict(self) -> dict:
        out = {"clip": self.clip, "analytes": {c: vars(s).copy() for c, s in self.stats.items()}}
        if self.soft_limit is not None:  # absent: a scaler saved before compression existed (hard clip)
            out["soft_limit"] = self.soft_limit
        return out

    @classmethod
    def from_dict(cls, d: dict) -> AnalyteScaler:
        return cls({c: AnalyteStats(**s) for c, s in d["analytes"].items()}, clip=d.get("clip", 20.0),
                   soft_limit=d.get("soft_limit"))


# ---------------------------------------------------------------------------------------------
# Input validation (ValueErrors name the column and the offending value)
# ---------------------------------------------------------------------------------------------

_HISTORY_REQUIRED = ("patient_id", "collected_at", "analyte_code", "value", "censor")
_QUERY_REQUIRED = ("patient_id", "analyte_code", "at")


def _show(value: object) -> str:
    """``repr`` of a cell without numpy's type wrapper: 'inf', '2', "'<10'"."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _require_columns(df: pd.DataFrame, required: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; expected at least {list(required)}")


def _parse_times(s: pd.Series, column: str, what: str) -> pd.Series:
    """``s`` as naive datetime64[us]; ValueError naming the first unparseable or missing value."""
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        raise ValueError(
            f"{what} column '{column}' is timezone-aware ({s.dtype.tz}); pass naive times in the store's time base"
        )
    if not pd.api.types.is_datetime64_dtype(s.dtype):
        parsed = pd.to_datetime(s, errors="coerce", format="mixed")
        bad = parsed.isna() & s.notna()
        if bad.any():
            i = bad.to_numpy().nonzero()[0][0]
            raise ValueError(f"{what} column '{column}' has an unparseable time {_show(s.iloc[i])} (row {i})")
        if isinstance(parsed.dtype, pd.DatetimeTZDtype):
            raise ValueError(
                f"{what} column '{column}' has timezone-aware times ({_show(s.iloc[0])}); pass naive times"
            )
        s = parsed
    if s.isna().any():
        i = s.isna().to_numpy().nonzero()[0][0]
        raise ValueError(f"{what} column '{column}' has a missing time (row {i})")
    return s.astype("datetime64[us]")


def _numeric(s: pd.Series, column: str, what: str, frame: pd.DataFrame | None = None) -> np.ndarray:
    """``s`` as finite float64; ValueError naming the first bad value, its row and (with ``frame``) its series."""
    x = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(x)
    if bad.any():
        i = bad.nonzero()[0][0]
        where = f"row {i}"
        if frame is not None:
            where += f": patient {frame['patient_id'].iloc[i]}, analyte {frame['analyte_code'].iloc[i]}"
        raise ValueError(
            f"{what} column '{column}' has a non-finite or non-numeric value {_show(s.iloc[i])} ({where}); "
            "censored results need value=limit and censor=-1/+1, text results do not belong in a history"
        )
    return x


def validate_history(history: pd.DataFrame) -> pd.DataFrame:
    """A checked copy of ``history`` with canonical dtypes and a fresh index.

    Requires ``patient_id, collected_at, analyte_code, value, censor``; ``sex``,
    ``age_years`` and ``unit_canonical`` are optional (unknown when absent).
    """
    _require_columns(history, _HISTORY_REQUIRED, "history")
    h = history.reset_index(drop=True).copy()
    for col in ("patient_id", "analyte_code"):
        if h[col].isna().any():
            i = h[col].isna().to_numpy().nonzero()[0][0]
            raise ValueError(f"history column '{col}' has a missing value (row {i})")
        if not pd.api.types.is_string_dtype(h[col].dtype):
            h[col] = h[col].astype(str)
    h["collected_at"] = _parse_times(h["collected_at"], "collected_at", "history")
    h["value"] = _numeric(h["value"], "value", "history", frame=h)
    censor = _numeric(h["censor"], "censor", "history")
    bad = ~np.isin(censor, (-1.0, 0.0, 1.0))
    if bad.any():
        i = bad.nonzero()[0][0]
        raise ValueError(
            f"history column 'censor' has value {_show(h['censor'].iloc[i])} (row {i}); expected -1, 0 or +1"
        )
    h["censor"] = censor.astype(np.int8)
    if "age_years" in h:
        h["age_years"] = pd.to_numeric(h["age_years"], errors="coerce").astype(np.float64)
    if "sex" in h:
        raw = h["sex"].astype(object).where(h["sex"].notna(), None)
        # one conversion per distinct value, not per row
        norm = {v: ((v.strip().upper() or None) if isinstance(v, str) else v) for v in pd.unique(raw)}
        sex = raw.map(norm) if len(norm) > 1 or any(k is not v for k, v in norm.items()) else raw
        bad = sex.notna() & ~sex.isin(list(SEX_IDS))
        if bad.any():
            i = bad.to_numpy().nonzero()[0][0]
            raise ValueError(
                f"history column 'sex' has value {_show(h['sex'].iloc[i])} (row {i}); expected 'F', 'M' or None"
            )
        h["sex"] = sex
    return h


def validate_queries(queries: pd.DataFrame) -> pd.DataFrame:
    """A checked copy of ``queries`` (``patient_id, analyte_code, at``) with a fresh index.

    Optional ``value`` / ``censor`` columns (the true result at ``at``, canonical unit) are
    checked too; they become training targets.
    """
    _require_columns(queries, _QUERY_REQUIRED, "queries")
    q = queries.reset_index(drop=True).copy()
    for col in ("patient_id", "analyte_code"):
        if q[col].isna().any():
            i = q[col].isna().to_numpy().nonzero()[0][0]
            raise ValueError(f"queries column '{col}' has a missing value (row {i})")
        q[col] = q[col].astype(str)
    q["at"] = _parse_times(q["at"], "at", "queries")
    if "value" in q:
        q["value"] = _numeric(q["value"], "value", "queries", frame=q)
        q["censor"] = _numeric(q["censor"], "censor", "queries").astype(np.int8) if "censor" in q else np.int8(0)
    return q


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@dataclass
class ContextRow:
    """One row of a batch: a patient's events before ``at`` and up to ``max_queries`` queries at ``at``.

    Event arrays have shape ``(events,)``, oldest first; query arrays ``(queries,)``.
    """

    patient_id: str
    at: np.datetime64
    event_analyte: np.ndarray  # int64 vocabulary ids
    event_value: np.ndarray  # float32, normalised units
    event_censor: np.ndarray  # int64 in {-1, 0, +1}
    event_time: np.ndarray  # float32, days from collection to ``at`` (> 0)
    patient_age: float  # years at ``at``; NaN when unknown
    patient_sex: int  # 0 unknown, 1 F, 2 M
    query_analyte: np.ndarray  # int64 vocabulary ids
    query_horizon: np.ndarray  # float32, days from the analyte's last prior result to ``at``
    query_anchor_value: np.ndarray  # float32, that last result, normalised units
    query_anchor_censor: np.ndarray  # int64 in {-1, 0, +1}
    query_summary: np.ndarray  # float32 (queries, len(QUERY_SUMMARY)), the analyte's prior results
    query_index: np.ndarray  # int64, positions of the queries in the caller's queries frame
    target_value: np.ndarray | None = None  # float32, normalised true value at ``at``
    target_censor: np.ndarray | None = None  # int64 censor flag of the true value
    target_weight: np.ndarray | None = None  # float32 loss weight of each target (training only)


@dataclass
class EncodedQueries:
    """Rows to run through the model, plus per-query bookkeeping in the queries' order.

    ``n_history`` (int64, ``(n_queries,)``): prior results of the query's analyte.
    ``status`` (object, ``(n_queries,)``): 'ok' or why there is no forecast; only 'ok'
    queries appear in ``rows``.
    """

    rows: list[ContextRow]
    n_history: np.ndarray
    status: np.ndarray


def _patient_arrays(h: pd.DataFrame, vocab: AnalyteVocab, scaler: AnalyteScaler) -> dict[str, dict]:
    """Per patient: sorted event arrays of in-vocabulary analytes, per-analyte times, demographics.

    Events are ordered by (time, analyte id, analyte code), ties kept in input order; numpy
    only (one sort for the whole frame), since this runs on every forecast call.
    """
    n = len(h)
    if n == 0:
        return {}
    codes = h["analyte_code"].to_numpy(dtype=object)
    pids = h["patient_id"].to_numpy(dtype=object)
    analyte_id = vocab.encode(codes)
    t_us = h["collected_at"].to_numpy().astype("datetime64[us]").astype(np.int64)
    code_names, code_idx = np.unique(codes.astype(str), return_inverse=True)
    pid_names, pid_idx = np.unique(pids.astype(str), return_inverse=True)
    order = np.lexsort((np.arange(n), code_idx, analyte_id, t_us, pid_idx))
    codes, analyte_id, t_us, code_idx, pid_idx = codes[order], analyte_id[order], t_us[order], code_idx[order], pid_idx[order]
    value = h["value"].to_numpy(dtype=np.float64)[order]
    censor = h["censor"].to_numpy(dtype=np.int64)[order]
    known = analyte_id >= N_SPECIAL
    z = np.zeros(n, dtype=np.float32)
    if known.any():
        z[known] = scaler.normalise(codes[known], value[known])
    age = h["age_years"].to_numpy(dtype=np.float64)[order] if "age_years" in h else None
    sex_col = h["sex"].to_numpy(dtype=object)[order] if "sex" in h else None
    bounds = np.r_[0, np.flatnonzero(np.diff(pid_idx)) + 1, n]
    out = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        sl = slice(a, b)
        k = known[sl]
        # per analyte code, its rows in time order (a stable sort by code keeps the time order)
        by_code = np.argsort(code_idx[sl], kind="stable")
        cuts = np.r_[0, np.flatnonzero(np.diff(code_idx[sl][by_code])) + 1, b - a]
        t_p, z_p, c_p = t_us[sl], z[sl], censor[sl]
        by_analyte = {}
        for i, j in zip(cuts[:-1], cuts[1:]):
            rows = by_code[i:j]
            by_analyte[str(code_names[code_idx[a + rows[0]]])] = (t_p[rows], z_p[rows], c_p[rows])
        age_ref = (np.nan, 0)
        if age is not None:
            has_age = np.flatnonzero(~np.isnan(age[sl]))
            if len(has_age):
                age_ref = (float(age[a + has_age[0]]), int(t_us[a + has_age[0]]))
        sex = SEX_UNKNOWN
        if sex_col is not None:
            given = [v for v in sex_col[sl] if v is not None and not (isinstance(v, float) and np.isnan(v))]
            if given:
                sex = SEX_IDS[given[0]]
        out[str(pid_names[pid_idx[a]])] = dict(
            t_us=t_p[k],
            analyte=analyte_id[sl][k],
            z=z_p[k],
            censor=c_p[k],
            by_analyte=by_analyte,
            age_ref=age_ref,
            sex=sex,
        )
    return out


def encode_queries(
    history: pd.DataFrame,
    queries: pd.DataFrame,
    vocab: AnalyteVocab,
    scaler: AnalyteScaler,
    *,
    max_events: int,
    max_queries: int,
    min_history: int = MIN_HISTORY,
    validated: bool = False,
) -> EncodedQueries:
    """Encode ``queries`` against ``history`` (see the module docstring for every rule).

    Queries sharing ``(patient_id, at)`` share one row (split every ``max_queries``). A query
    gets status :data:`STATUS_UNKNOWN_ANALYTE` when its analyte is not in ``vocab``, and
    :func:`status_too_few` when fewer than ``min_history`` results of its analyte precede
    ``at``; such queries get no row. When ``queries`` has a ``value`` column (and optionally
    ``censor``), rows carry normalised ``target_value`` / ``target_censor``.
    ``validated=True`` says both frames already come from :func:`validate_history` /
    :func:`validate_queries` (the pipeline checks them once).
    """
    h = history if validated else validate_history(history)
    q = queries if validated else validate_queries(queries)
    wanted = pd.unique(q["patient_id"])
    if h["patient_id"].nunique() > len(wanted):  # only the queried patients' histories are encoded
        h = h[h["patient_id"].isin(wanted)]
    patients = _patient_arrays(h, vocab, scaler)
    at_us = q["at"].to_numpy().astype("datetime64[us]").astype(np.int64)
    n_history = np.zeros(len(q), dtype=np.int64)
    status = np.full(len(q), STATUS_OK, dtype=object)
    has_target = "value" in q
    target_z = np.zeros(len(q), dtype=np.float32)
    codes = q["analyte_code"].to_numpy(dtype=object)
    query_ids = vocab.encode(codes)
    in_vocab = query_ids >= N_SPECIAL
    target_c = q["censor"].to_numpy(np.int64) if has_target else None
    if has_target and in_vocab.any():
        target_z[in_vocab] = scaler.normalise(codes[in_vocab], q["value"].to_numpy()[in_vocab])

    rows: list[ContextRow] = []
    groups = pd.DataFrame({"pid": q["patient_id"], "at": at_us}).groupby(["pid", "at"], sort=False).indices
    for (pid, t), idx in groups.items():
        p = patients.get(pid)
        ok_idx, horizon, anchor_z, anchor_c, summary = [], [], [], [], []
        for i in idx:
            series = p["by_analyte"].get(codes[i]) if p else None
            n = int(np.searchsorted(series[0], t, side="left")) if series is not None else 0
            n_history[i] = n
            if not in_vocab[i]:
                status[i] = STATUS_UNKNOWN_ANALYTE
            elif n < min_history:
                status[i] = status_too_few(n, min_history)
            else:
                ok_idx.append(i)
                horizon.append((t - series[0][n - 1]) / _US_PER_DAY)
                anchor_z.append(series[1][n - 1])
                anchor_c.append(series[2][n - 1])
                summary.append(_series_summary(series[1], n))
        if not ok_idx:
            continue
        end = int(np.searchsorted(p["t_us"], t, side="left"))  # strictly before ``at``
        sl = slice(max(0, end - max_events), end)
        age, age_t = p["age_ref"]
        ok_idx = np.asarray(ok_idx, dtype=np.int64)
        for s in range(0, len(ok_idx), max_queries):
            qi = ok_idx[s : s + max_queries]
            rows.append(
                ContextRow(
                    patient_id=pid,
                    at=np.datetime64(int(t), "us"),
                    event_analyte=p["analyte"][sl],
                    event_value=p["z"][sl],
                    event_censor=p["censor"][sl],
                    event_time=((t - p["t_us"][sl]) / _US_PER_DAY).astype(np.float32),
                    patient_age=age + (t - age_t) / _US_PER_DAY / 365.25 if np.isfinite(age) else np.nan,
                    patient_sex=p["sex"],
                    query_analyte=query_ids[qi],
                    query_horizon=np.asarray(horizon[s : s + max_queries], dtype=np.float32),
                    query_anchor_value=np.asarray(anchor_z[s : s + max_queries], dtype=np.float32),
                    query_anchor_censor=np.asarray(anchor_c[s : s + max_queries], dtype=np.int64),
                    query_summary=np.concatenate(summary[s : s + max_queries], axis=0),
                    query_index=qi,
                    target_value=target_z[qi] if has_target else None,
                    target_censor=target_c[qi] if has_target else None,
                )
            )
    return EncodedQueries(rows=rows, n_history=n_history, status=status)


def _series_summary(z: np.ndarray, n: int) -> np.ndarray:
    """:data:`QUERY_SUMMARY` of the first ``n`` results of one analyte series ``z``: ``(1, k)``."""
    x = z[:n].astype(np.float64)
    # sequential sums (not numpy's pairwise sum), bit for bit those ExampleBuilder accumulates
    s, ss = np.cumsum(x)[-1:], np.cumsum(x * x)[-1:]
    prev = x[-2:-1] if n >= 2 else np.array([np.nan])
    return summary_from_sums(np.array([n]), s, ss, x.min(keepdims=True), x.max(keepdims=True), x[-1:], prev)


def collate(rows: Sequence[ContextRow]) -> dict[str, np.ndarray]:
    """Right-pad ``rows`` into the model's keyword arguments (numpy; the caller makes tensors).

    Returns ``event_analyte, event_value, event_censor, event_time, event_mask`` of shape
    ``(batch, events)``; ``patient_age, patient_sex`` of shape ``(batch,)``;
    ``query_analyte, query_horizon, query_anchor_value, query_anchor_censor, query_mask`` of
    shape ``(batch, queries)``; ``query_summary`` of shape ``(batch, queries, k)``; ``target_value,
    target_censor`` when every row has targets, and ``target_weight`` when every row also has weights. Masks are int64, 1 = real, 0 = padding. ``events`` and ``queries`` are the
    longest row's counts (at least 1).
    """
    if not rows:
        raise ValueError("collate() needs at least one row")
    b = len(rows)
    e = max(1, max(len(r.event_analyte) for r in rows))
    nq = max(1, max(len(r.query_analyte) for r in rows))
    out = {
        "event_analyte": np.full((b, e), PAD_ID, dtype=np.int64),
        "event_value": np.zeros((b, e), dtype=np.float32),
        "event_censor": np.zeros((b, e), dtype=np.int64),
        "event_time": np.zeros((b, e), dtype=np.float32),
        "event_mask": np.zeros((b, e), dtype=np.int64),
        "patient_age": np.array([r.patient_age for r in rows], dtype=np.float32),
        "patient_sex": np.array([r.patient_sex for r in rows], dtype=np.int64),
        "query_analyte": np.full((b, nq), PAD_ID, dtype=np.int64),
        "query_horizon": np.zeros((b, nq), dtype=np.float32),
        "query_anchor_value": np.zeros((b, nq), dtype=np.float32),
        "query_anchor_censor": np.zeros((b, nq), dtype=np.int64),
        "query_mask": np.zeros((b, nq), dtype=np.int64),
        "query_summary": np.zeros((b, nq, len(QUERY_SUMMARY)), dtype=np.float32),
    }
    with_targets = all(r.target_value is not None for r in rows)
    with_weights = with_targets and all(r.target_weight is not None for r in rows)
    if with_targets:
        out["target_value"] = np.zeros((b, nq), dtype=np.float32)
        out["target_censor"] = np.zeros((b, nq), dtype=np.int64)
    if with_weights:
        out["target_weight"] = np.zeros((b, nq), dtype=np.float32)
    for i, r in enumerate(rows):
        n = len(r.event_analyte)
        out["event_analyte"][i, :n] = r.event_analyte
        out["event_value"][i, :n] = r.event_value
        out["event_censor"][i, :n] = r.event_censor
        out["event_time"][i, :n] = r.event_time
        out["event_mask"][i, :n] = 1
        m = len(r.query_analyte)
        out["query_analyte"][i, :m] = r.query_analyte
        out["query_horizon"][i, :m] = r.query_horizon
        out["query_anchor_value"][i, :m] = r.query_anchor_value
        out["query_anchor_censor"][i, :m] = r.query_anchor_censor
        out["query_mask"][i, :m] = 1
        out["query_summary"][i, :m] = r.query_summary
        if with_targets:
            out["target_value"][i, :m] = r.target_value
            out["target_censor"][i, :m] = r.target_censor
        if with_weights:
            out["target_weight"][i, :m] = r.target_weight
    return out
