"""Baseline forecasters for the evaluation (:mod:`model.evaluation`): the bar the network must clear.

* :class:`LastValue` — median = the analyte's last result; quantiles from the training
  patients' changes between consecutive results of that analyte, per horizon bucket.
* :class:`HistoricalMean` — median = mean of the analyte's previous results.
* :class:`LinearTrend` — per-patient least-squares line over the analyte's previous results,
  extrapolated to ``at`` (last value below 3 points), clipped to the training range.
* :class:`LightGBMForecaster` — LightGBM quantile regression, one model per quantile, pooled
  over analytes (analyte as a categorical feature), on history features.

Every forecaster reads, for each query, only results collected strictly before its ``at``
(all lookups are ``merge_asof`` with ``allow_exact_matches=False`` on cumulative statistics
computed in time order), and returns the status
``'Not enough measurements to forecast (n; minimum 2)'`` with NaN quantiles when the
analyte has fewer than ``min_history`` (default :data:`model.MIN_HISTORY`) prior results.

The three point baselines share :class:`ResidualQuantiles`: the interval around their
median comes from the empirical distribution of their own errors on the training patients
(absolute or log-ratio, whichever fits the analyte better), per analyte and horizon bucket.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from model import MIN_HISTORY, QUANTILE_COLUMNS, QUANTILES
from model.evaluation import average_duplicates, not_enough_status

__all__ = [
    "HORIZON_EDGES_H",
    "query_features",
    "ResidualQuantiles",
    "LastValue",
    "HistoricalMean",
    "LinearTrend",
    "LightGBMForecaster",
    "top_analytes_of",
]

# Horizon buckets (hours from the analyte's last result to ``at``): within a shift, within
# 1.5 days, within a week, within a quarter, longer.
HORIZON_EDGES_H = (0.0, 12.0, 36.0, 24.0 * 7, 24.0 * 90, np.inf)
_US_PER_DAY = 86_400_000_000
_MEDIAN = QUANTILES.index(0.5)


def _us(s: pd.Series) -> np.ndarray:
    """Times as int64 microseconds (exact, for strictly-before comparisons)."""
    return pd.to_datetime(s).astype("datetime64[us]").astype("int64").to_numpy()


def top_analytes_of(history: pd.DataFrame, n: int = 20) -> list[str]:
    """The ``n`` analytes with most results in ``history`` (ties by code)."""
    c = history.groupby("analyte_code").size().reset_index(name="n")
    return c.sort_values(["n", "analyte_code"], ascending=[False, True])["analyte_code"].head(n).tolist()


def _cumulative(history: pd.DataFrame) -> pd.DataFrame:
    """Per (patient, analyte), in time order, the statistics of results up to and including each row."""
    h = history[["patient_id", "analyte_code", "collected_at", "value", "unit_canonical"]].copy()
    h["t"] = _us(h["collected_at"])
    h = h.sort_values(["patient_id", "analyte_code", "t"], kind="stable").reset_index(drop=True)
    g = h.groupby(["patient_id", "analyte_code"], sort=False)
    v = h["value"].to_numpy(float)
    td = (h["t"] - g["t"].transform("first")).to_numpy() / _US_PER_DAY  # days since the group's first result
    n = g.cumcount().to_numpy() + 1.0
    tmp = pd.DataFrame({"k": g.ngroup().to_numpy(), "v": v, "v2": v * v, "t": td, "t2": td * td, "tv": td * v})
    cs = tmp.groupby("k").cumsum()
    sv, sv2, st, st2, stv = (cs[c].to_numpy() for c in ("v", "v2", "t", "t2", "tv"))
    mean = sv / n
    var = np.where(n > 1, np.maximum(sv2 - sv * sv / n, 0.0) / np.maximum(n - 1, 1), np.nan)
    den = n * st2 - st * st
    slope = np.where((n >= 2) & (den > 1e-12), (n * stv - st * sv) / np.where(den > 1e-12, den, 1.0), np.nan)
    intercept = (sv - slope * st) / n
    return pd.DataFrame({
        "patient_id": h["patient_id"].to_numpy(),
        "analyte_code": h["analyte_code"].to_numpy(),
        "t": h["t"].to_numpy(),
        "n_prior": n.astype("int64"),
        "last": v,
        "prev": g["value"].shift(1).to_numpy(float),
        "mean": mean,
        "std": np.sqrt(var),
        "min": g["value"].cummin().to_numpy(float),
        "max": g["value"].cummax().to_numpy(float),
        "slope": slope,  # per day
        "t0": (g["t"].transform("first")).to_numpy(),
        "intercept": intercept,  # value at the group's first time, on the fitted line
        "unit": h["unit_canonical"].to_numpy(object),
    })


def query_features(history: pd.DataFrame, queries: pd.DataFrame, context: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """History features of each query, from results collected strictly before its ``at``.

    Returns a frame aligned with ``queries`` (same order and index length) with: ``n_prior``
    (prior results of the analyte, 0 when none), ``last, prev, mean, std, min, max, slope``
    (per day), ``trend`` (the least-squares line at ``at``), ``horizon_d`` (days since the
    analyte's last result), ``since_any_d`` (days since the patient's last result of any
    analyte), ``age`` (at ``at``), ``sex`` (1 F, 0 M, NaN unknown), ``unit``, and
    ``ctx_<code>`` (last value of each ``context`` analyte before ``at``).
    """
    h = average_duplicates(history)
    q = pd.DataFrame({
        "patient_id": queries["patient_id"].astype(str).to_numpy(),
        "analyte_code": queries["analyte_code"].astype(str).to_numpy(),
        "t_at": _us(queries["at"]),
        "_row": np.arange(len(queries)),
    })
    h = h.assign(patient_id=h["patient_id"].astype(str), analyte_code=h["analyte_code"].astype(str))
    cum = _cumulative(h)
    qs = q.sort_values("t_at", kind="stable")
    m = pd.merge_asof(qs, cum.sort_values("t", kind="stable"), left_on="t_at", right_on="t",
                      by=["patient_id", "analyte_code"], allow_exact_matches=False, direction="backward")
    m["n_prior"] = m["n_prior"].fillna(0).astype("int64")
    m["horizon_d"] = (m["t_at"] - m["t"]) / _US_PER_DAY
    m["trend"] = m["intercept"] + m["slope"] * (m["t_at"] - m["t0"]) / _US_PER_DAY

    # Patient-level: last result of any analyte (time, age then), sex.
    anyr = h[["patient_id", "collected_at", "age_years"]].copy()
    anyr["t_any"] = _us(anyr["collected_at"])
    anyr = anyr.drop(columns="collected_at").sort_values("t_any", kind="stable")
    m = pd.merge_asof(m.sort_values("t_at", kind="stable"), anyr, left_on="t_at", right_on="t_any",
                      by="patient_id", allow_exact_matches=False, direction="backward")
    m["since_any_d"] = (m["t_at"] - m["t_any"]) / _US_PER_DAY
    m["age"] = m["age_years"] + m["since_any_d"] / 365.25
    sex = h.dropna(subset=["sex"]).drop_duplicates("patient_id").set_index("patient_id")["sex"] if "sex" in h else pd.Series(dtype=object)
    m["sex"] = m["patient_id"].map(sex).map({"F": 1.0, "M": 0.0}).astype(float)

    for code in context:
        c = h.loc[h["analyte_code"] == code, ["patient_id", "collected_at", "value"]]
        c = pd.DataFrame({"patient_id": c["patient_id"].to_numpy(), "t_c": _us(c["collected_at"]),
                          f"ctx_{code}": c["value"].to_numpy(float)}).sort_values("t_c", kind="stable")
        m = pd.merge_asof(m.sort_values("t_at", kind="stable"), c, left_on="t_at", right_on="t_c",
                          by="patient_id", allow_exact_matches=False, direction="backward").drop(columns="t_c")

    m = m.sort_values("_row").reset_index(drop=True)
    keep = ["n_prior", "last", "prev", "mean", "std", "min", "max", "slope", "trend", "horizon_d", "since_any_d",
            "age", "sex", "unit"] + [f"ctx_{c}" for c in context]
    return m[keep]


def _horizon_bucket(horizon_d: np.ndarray) -> np.ndarray:
    hours = np.nan_to_num(np.asarray(horizon_d, float) * 24.0, nan=0.0)
    return np.clip(np.searchsorted(HORIZON_EDGES_H, hours, side="right") - 1, 0, len(HORIZON_EDGES_H) - 2)


def _quantiles_of(r: np.ndarray) -> np.ndarray:
    return np.quantile(r, QUANTILES)


class ResidualQuantiles:
    """Empirical error quantiles of a point forecast, per analyte and horizon bucket.

    Per analyte the error scale is the log ratio ``log(y / point)`` when every training value
    and point is positive and that gives the lower in-sample pinball loss, else the absolute
    error ``y - point``. A bucket with fewer than ``min_bucket`` errors uses the analyte's
    pooled errors; an analyte with fewer than ``min_analyte`` errors (or never seen) uses the
    log ratios pooled over all analytes (a zero-width interval for a non-positive point).
    The median of the errors is dropped: the median forecast is the point forecast itself.
    """

    N_BUCKETS = len(HORIZON_EDGES_H) - 1

    def __init__(self, min_bucket: int = 50, min_analyte: int = 20):
        self.min_bucket = min_bucket
        self.min_analyte = min_analyte
        self.table: dict[str, np.ndarray] = {}  # analyte -> (N_BUCKETS, 7) error quantiles
        self.scale: dict[str, str] = {}  # analyte -> 'abs' or 'log'
        self.pooled_log = np.zeros(len(QUANTILES))

    def fit(self, analyte, horizon_d, point, y) -> "ResidualQuantiles":
        analyte = np.asarray(analyte, object)
        bucket = _horizon_bucket(horizon_d)
        point, y = np.asarray(point, float), np.asarray(y, float)
        ok = np.isfinite(point) & np.isfinite(y)
        pos = ok & (point > 0) & (y > 0)
        if pos.any():
            self.pooled_log = _quantiles_of(np.log(y[pos] / point[pos]))
        for a in pd.unique(analyte[ok]):
            m = ok & (analyte == a)
            if m.sum() < self.min_analyte:
                continue
            cands = {"abs": y[m] - point[m]}
            if pos[m].all():
                cands["log"] = np.log(y[m] / point[m])
            best_loss = np.inf
            for kind, r in cands.items():
                tab = self._table(r, bucket[m])
                qv = self._apply(kind, tab, bucket[m], point[m])
                loss = _pinball_loss(y[m], qv)
                if loss < best_loss:
                    best_loss, self.scale[a], self.table[a] = loss, kind, tab
        return self

    def _table(self, r: np.ndarray, bucket: np.ndarray) -> np.ndarray:
        pooled = _quantiles_of(r)
        tab = np.tile(pooled, (self.N_BUCKETS, 1))
        for b in range(self.N_BUCKETS):
            rb = r[bucket == b]
            if len(rb) >= self.min_bucket:
                tab[b] = _quantiles_of(rb)
        return tab - tab[:, [_MEDIAN]]

    @staticmethod
    def _apply(kind: str, tab: np.ndarray, bucket: np.ndarray, point: np.ndarray) -> np.ndarray:
        r = tab[bucket]
        out = point[:, None] * np.exp(r) if kind == "log" else point[:, None] + r
        return np.sort(out, axis=1)

    def predict(self, analyte, horizon_d, point) -> np.ndarray:
        """Quantiles (n x 7) around ``point``; the median column equals ``point``."""
        analyte = np.asarray(analyte, object)
        point = np.asarray(point, float)
        bucket = _horizon_bucket(horizon_d)
        out = np.full((len(point), len(QUANTILES)), np.nan)
        for a in pd.unique(analyte):
            m = analyte == a
            if a in self.scale:
                out[m] = self._apply(self.scale[a], self.table[a], bucket[m], point[m])
            else:
                r = self.pooled_log - self.pooled_log[_MEDIAN]
                p = point[m][:, None]
                out[m] = np.sort(np.where(p > 0, p * np.exp(r), p + 0 * r), axis=1)
        return out


def _pinball_loss(y: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean([np.mean(np.maximum(a * (y - q[:, j]), (a - 1) * (y - q[:, j]))) for j, a in enumerate(QUANTILES)]))


def _training_queries(history: pd.DataFrame, analytes: list[str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Every result after a patient's first of its analyte, as a query, with its true value."""
    h = average_duplicates(history)
    if analytes is not None:
        h = h[h["analyte_code"].isin(analytes)]
    h = h.sort_values(["patient_id", "analyte_code", "collected_at"], kind="stable")
    first = h.groupby(["patient_id", "analyte_code"], sort=False).cumcount() == 0
    t = h[~first]
    q = t[["patient_id", "analyte_code", "collected_at"]].rename(columns={"collected_at": "at"}).reset_index(drop=True)
    return q, t["value"].to_numpy(float)


def _forecast_frame(queries: pd.DataFrame, qvals: np.ndarray, f: pd.DataFrame, min_history: int, version: str,
                    extra_fail: np.ndarray | None = None, fail_status: str = "") -> pd.DataFrame:
    out = queries[["patient_id", "analyte_code", "at"]].reset_index(drop=True).copy()
    n = f["n_prior"].to_numpy()
    status = np.array(["ok"] * len(out), dtype=object)
    few = n < min_history
    status[few] = [not_enough_status(k, min_history) for k in n[few]]
    if extra_fail is not None:
        status[extra_fail & ~few] = fail_status
    qvals = np.array(qvals, float)
    qvals[status != "ok"] = np.nan
    bad = (status == "ok") & ~np.isfinite(qvals).all(axis=1)
    status[bad] = "no forecast: non-finite history features"
    qvals[bad] = np.nan
    for j, c in enumerate(QUANTILE_COLUMNS):
        out[c] = qvals[:, j]
    out["unit"] = f["unit"].to_numpy(object)
    out["n_history"] = n
    out["status"] = status
    out["model_version"] = version
    return out


class _PointBaseline:
    """A point forecast from history features, with :class:`ResidualQuantiles` intervals."""

    name = "point"
    version = "baseline-point-1"

    def __init__(self, min_history: int = MIN_HISTORY):
        self.min_history = min_history
        self.residuals: ResidualQuantiles | None = None
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}

    def _point(self, f: pd.DataFrame, analyte: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fit(self, train_history: pd.DataFrame) -> None:
        h = average_duplicates(train_history)
        rng = h.groupby("analyte_code")["value"].agg(["min", "max"])
        self.lo, self.hi = rng["min"].to_dict(), rng["max"].to_dict()
        q, y = _training_queries(h)
        f = query_features(h, q)
        a = q["analyte_code"].to_numpy(object)
        self.residuals = ResidualQuantiles().fit(a, f["horizon_d"].to_numpy(), self._point(f, a), y)

    def predict(self, history: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
        if self.residuals is None:
            raise RuntimeError(f"{self.name}: fit() before predict()")
        f = query_features(history, queries)
        a = queries["analyte_code"].astype(str).to_numpy(object)
        point = self._point(f, a)
        qv = self.residuals.predict(a, f["horizon_d"].to_numpy(), point)
        return _forecast_frame(queries, qv, f, self.min_history, self.version)


class LastValue(_PointBaseline):
    """Median = the analyte's last result before ``at``; intervals from training changes."""

    name = "last value"
    version = "baseline-last-value-1"

    def _point(self, f, analyte):
        return f["last"].to_numpy(float)


class HistoricalMean(_PointBaseline):
    """Median = the mean of the analyte's results before ``at``."""

    name = "historical mean"
    version = "baseline-historical-mean-1"

    def _point(self, f, analyte):
        return f["mean"].to_numpy(float)


class LinearTrend(_PointBaseline):
    """Median = the patient's least-squares line over the analyte's results, at ``at``.

    With fewer than 3 prior points the last value is used; the extrapolation is clipped to
    the range of the analyte's values in the training patients.
    """

    name = "linear trend"
    version = "baseline-linear-trend-1"

    def _point(self, f, analyte):
        trend = f["trend"].to_numpy(float)
        p = np.where((f["n_prior"].to_numpy() >= 3) & np.isfinite(trend), trend, f["last"].to_numpy(float))
        lo = pd.Series(analyte).map(self.lo).to_numpy(float)
        hi = pd.Series(analyte).map(self.hi).to_numpy(float)
        return np.clip(p, np.where(np.isfinite(lo), lo, -np.inf), np.where(np.isfinite(hi), hi, np.inf))


class LightGBMForecaster:
    """LightGBM quantile regression on history features, one model per quantile, pooled over analytes.

    The target is the change from the last value in units of the analyte's training range
    (p99 - p1), so one pooled model serves analytes of any scale and its L1 loss is the
    NMAE. Features: analyte (categorical), last value (scaled), mean/min/max/previous value
    relative to the last, std, number of prior results, slope, days since the patient's last
    result, horizon (days since the analyte's last result), the last values of the other
    modelled analytes before ``at``, age, sex. Quantiles are sorted to be monotone. Trained
    only on targets built from the training patients.

    ``target='value'`` instead regresses the raw value with raw (unscaled) history features, one
    pooled model for analytes of every scale (its loss is then dominated by the analytes
    with the widest ranges); it is kept only as a diagnostic for comparisons with figures
    measured that way.

    ``n_jobs`` defaults to 1: on a small shared machine LightGBM's OpenMP threads can be
    ten times slower than one thread, and one thread gives the same model every run.
    """

    name = "LightGBM"
    version = "baseline-lightgbm-1"

    def __init__(self, analytes: list[str] | None = None, n_analytes: int = 20, min_history: int = MIN_HISTORY,
                 n_estimators: int = 300, learning_rate: float = 0.05, num_leaves: int = 31,
                 min_child_samples: int = 50, seed: int = 0, n_jobs: int = 1, target: str = "change"):
        if target not in ("change", "value"):
            raise ValueError(f"target must be 'change' or 'value', not {target!r}")
        self.target = target
        if target == "value":
            self.name = "LightGBM (raw value target)"
        self.analytes = list(analytes) if analytes is not None else None
        self.n_analytes = n_analytes
        self.min_history = min_history
        self.params = dict(n_estimators=n_estimators, learning_rate=learning_rate, num_leaves=num_leaves,
                           min_child_samples=min_child_samples, subsample=0.8, subsample_freq=1,
                           colsample_bytree=0.8, reg_lambda=1.0, random_state=seed, verbose=-1,
                           n_jobs=n_jobs)
        self.models: list = []
        self.codes: list[str] = []
        self.center: dict[str, float] = {}
        self.scale: dict[str, float] = {}

    def _design(self, f: pd.DataFrame, analyte: np.ndarray) -> pd.DataFrame:
        s = pd.Series(analyte).map(self.scale).to_numpy(float)
        c = pd.Series(analyte).map(self.center).to_numpy(float)
        last = f["last"].to_numpy(float)
        x = pd.DataFrame({
            "analyte": pd.Categorical(analyte, categories=self.codes),
            "n_prior": f["n_prior"].to_numpy(float),
            "last_z": (last - c) / s,
            "prev_d": (f["prev"].to_numpy(float) - last) / s,
            "mean_d": (f["mean"].to_numpy(float) - last) / s,
            "std_z": f["std"].to_numpy(float) / s,
            "min_d": (f["min"].to_numpy(float) - last) / s,
            "max_d": (f["max"].to_numpy(float) - last) / s,
            "slope_z": f["slope"].to_numpy(float) / s,
            "horizon_d": f["horizon_d"].to_numpy(float),
            "since_any_d": f["since_any_d"].to_numpy(float),
            "age": f["age"].to_numpy(float),
            "sex": f["sex"].to_numpy(float),
        })
        if self.target == "value":
            x = x.drop(columns=["last_z", "prev_d", "mean_d", "std_z", "min_d", "max_d", "slope_z"])
            for c in ("last", "prev", "mean", "std", "min", "max", "slope"):
                x[c] = f[c].to_numpy(float)
        for code in self.codes:
            x[f"ctx_{code}"] = f[f"ctx_{code}"].to_numpy(float)
        return x

    def fit(self, train_history: pd.DataFrame) -> None:
        import lightgbm as lgb

        h = average_duplicates(train_history)
        self.codes = self.analytes or top_analytes_of(h, self.n_analytes)
        vals = h[h["analyte_code"].isin(self.codes)].groupby("analyte_code")["value"]
        p1, p50, p99 = vals.quantile(0.01), vals.quantile(0.5), vals.quantile(0.99)
        self.center = p50.to_dict()
        self.scale = {a: float(max(p99.get(a, 1.0) - p1.get(a, 0.0), 1e-6)) for a in self.codes}
        q, y = _training_queries(h, self.codes)
        f = query_features(h, q, context=self.codes)
        a = q["analyte_code"].to_numpy(object)
        x = self._design(f, a)
        if self.target == "value":
            z = y
        else:
            z = (y - f["last"].to_numpy(float)) / pd.Series(a).map(self.scale).to_numpy(float)
        self.models = []
        for alpha in QUANTILES:
            m = lgb.LGBMRegressor(objective="quantile", alpha=alpha, **self.params)
            m.fit(x, z, categorical_feature=["analyte"])
            self.models.append(m)

    def predict(self, history: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
        if not self.models:
            raise RuntimeError("LightGBM: fit() before predict()")
        f = query_features(history, queries, context=self.codes)
        a = queries["analyte_code"].astype(str).to_numpy(object)
        known = np.isin(a, self.codes)
        x = self._design(f, a)
        z = np.column_stack([m.predict(x) for m in self.models]) if len(x) else np.zeros((0, len(QUANTILES)))
        z = np.sort(z, axis=1)
        s = pd.Series(a).map(self.scale).to_numpy(float)
        qv = z if self.target == "value" else f["last"].to_numpy(float)[:, None] + z * s[:, None]
        return _forecast_frame(queries, qv, f, self.min_history, self.version,
                               extra_fail=~known, fail_status="no forecast: analyte not modelled by this baseline")
