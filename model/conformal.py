"""Split-conformal calibration of forecast intervals, per analyte (numpy/pandas only).

For each nominal central interval (50 % = q25..q75, 80 % = q10..q90, 90 % = q05..q95) and
each analyte, the conformity score of a calibration point is the conformalized quantile
regression score ``s = max(lo - y, y - hi)`` (negative inside the interval). The
adjustment is the ``k``-th smallest score with ``k = ceil((n + 1) * level)``, i.e. the
empirical quantile at ``ceil((n + 1)(1 - alpha)) / n``; widening the interval by it on both
sides (``lo - a``, ``hi + a``) gives coverage of at least ``level`` on exchangeable new
points. A negative adjustment narrows an interval that was too wide.

A level wider than the model's outermost quantile pair (95 %, while the head stops at
q05..q95) is calibrated the same way on that outermost pair: CQR's coverage guarantee holds
for any base interval, so ``q05 - a95 .. q95 + a95`` is a 95 % prediction interval. Such
*extended* levels do not move a quantile; :meth:`ConformalCalibration.extended_bounds`
returns their bounds.

Everything is in the model's normalised space (``model.features.AnalyteScaler``), where one
unit is comparable across analytes: an additive adjustment there is additive in canonical
units for raw-scale analytes and multiplicative for log-scale (skewed) ones. Analytes with
fewer than ``min_points`` calibration points use the adjustment pooled over all analytes.

**Strata.** Forecasts that rest on less evidence (one prior result: ``model.history_stratum``)
are calibrated apart: each point may carry a stratum name, and a non-default stratum gets
its own per-analyte adjustments (keys ``'<code>|<stratum>'``) and its own pooled adjustment,
so the interval of a one-result forecast is as wide as one-result forecasts need, not the
average over all histories. A stratum with too few points falls back to the pooled
adjustment over every point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model import QUANTILES

__all__ = ["DEFAULT_LEVELS", "conformal_adjustment", "interval_coverage", "fit_conformal", "ConformalCalibration"]

DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95)


#: Widest interval calibrated on the outermost quantile pair when the head has no pair for it.
MAX_EXTENDED_LEVEL = 0.95


def _interval_columns(quantile_levels: Sequence[float], level: float) -> tuple[int, int]:
    """Indices of the quantiles bounding the central ``level`` interval, e.g. 0.8 -> (q10, q90)."""
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    levels = np.asarray(quantile_levels, dtype=np.float64)
    i, j = np.flatnonzero(np.isclose(levels, lo)), np.flatnonzero(np.isclose(levels, hi))
    if not len(i) or not len(j):
        raise ValueError(f"interval {level:.0%} needs quantiles {lo:g} and {hi:g}; model has {list(quantile_levels)}")
    return int(i[0]), int(j[0])


def _is_extended(quantile_levels: Sequence[float], level: float) -> bool:
    """True when ``level`` has no quantile pair of its own and is calibrated on the outermost pair."""
    try:
        _interval_columns(quantile_levels, level)
        return False
    except ValueError:
        outer = max(quantile_levels) - min(quantile_levels)
        if outer < level <= MAX_EXTENDED_LEVEL + 1e-9:
            return True
        raise


def _base_columns(quantile_levels: Sequence[float], level: float) -> tuple[int, int]:
    """The quantile pair a ``level`` interval is calibrated on: its own, or the outermost for an extended level.

    Raises ``ValueError`` for a level that has no pair and is not an extended level
    (wider than :data:`MAX_EXTENDED_LEVEL`, or narrower than the outermost pair).
    """
    if _is_extended(quantile_levels, level):
        levels = np.asarray(quantile_levels, dtype=np.float64)
        return int(np.argmin(levels)), int(np.argmax(levels))
    return _interval_columns(quantile_levels, level)


def conformal_adjustment(scores: np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) * level)``-th smallest of ``scores`` (finite-sample split conformal).

    Raises ``ValueError`` when ``n`` is too small for that rank to exist (``n < level / (1 - level)``).
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    k = math.ceil((n + 1) * level - 1e-9)  # tolerance: 10 * 0.7 is 7.000000000000001 in floating point
    if k > n:
        needed = math.ceil(level / (1 - level) - 1e-9)
        raise ValueError(f"{n} calibration points cannot certify a {level:.0%} interval; need at least {needed}")
    return float(scores[k - 1])


def interval_coverage(
    quantiles: np.ndarray,
    y: np.ndarray,
    quantile_levels: Sequence[float] = QUANTILES,
    levels: Sequence[float] = DEFAULT_LEVELS,
) -> dict[float, float]:
    """Fraction of ``y`` (shape ``(n,)``) inside each central interval of ``quantiles`` (``(n, n_quantiles)``).

    Extended levels (no quantile pair of their own, e.g. 95 %) are left out: their bounds
    come from :meth:`ConformalCalibration.extended_bounds`.
    """
    out = {}
    for level in levels:
        if _is_extended(quantile_levels, level):
            continue
        i, j = _interval_columns(quantile_levels, level)
        out[level] = float(np.mean((quantiles[:, i] <= y) & (y <= quantiles[:, j])))
    return out


@dataclass
class ConformalCalibration:
    """Per-analyte interval adjustments in normalised units, with a pooled fallback.

    ``per_analyte[code][str(level)]`` and ``pooled[str(level)]`` are additive adjustments;
    ``n_per_analyte[code]`` the calibration points behind each analyte's values.
    """

    quantile_levels: tuple[float, ...]
    levels: tuple[float, ...]
    per_analyte: dict[str, dict[str, float]]
    n_per_analyte: dict[str, int]
    pooled: dict[str, float]
    n_pooled: int
    min_points: int
    meta: dict = field(default_factory=dict)
    pooled_strata: dict[str, dict[str, float]] = field(default_factory=dict)  # stratum -> level -> adjustment

    def adjustments(self, codes: Sequence[str], strata: Sequence[str] | None = None) -> np.ndarray:
        """Adjustments of shape ``(n, n_levels)`` for analytes ``codes`` in ``strata`` (default: all in
        the default stratum ''): the analyte's own in its stratum, else the stratum's pooled one,
        else the pooled one over every point."""
        pooled = [self.pooled[str(lv)] for lv in self.levels]
        by_stratum = {s: [a[str(lv)] for lv in self.levels] for s, a in self.pooled_strata.items()}
        table = {c: [a[str(lv)] for lv in self.levels] for c, a in self.per_analyte.items()}
        strata = [""] * len(codes) if strata is None else [str(s) for s in strata]
        rows = [table.get(_key(c, s), by_stratum.get(s, pooled)) for c, s in zip(codes, strata)]
        return np.array(rows, dtype=np.float64).reshape(len(codes), len(self.levels))

    def apply(self, codes: Sequence[str], quantiles: np.ndarray, strata: Sequence[str] | None = None) -> np.ndarray:
        """Widen (or narrow) each interval of ``quantiles`` (``(n, n_quantiles)``, normalised), keeping them monotone.

        The median is unchanged. After the adjustment, quantiles below the median are made
        non-increasing outward from it and those above non-decreasing, so nested intervals
        stay nested.
        """
        q = np.array(quantiles, dtype=np.float64, copy=True)
        adj = self.adjustments(codes, strata)
        for k, level in enumerate(self.levels):
            if _is_extended(self.quantile_levels, level):
                continue
            i, j = _interval_columns(self.quantile_levels, level)
            q[:, i] -= adj[:, k]
            q[:, j] += adj[:, k]
        mid = int(np.argmin(np.abs(np.asarray(self.quantile_levels) - 0.5)))
        for i in range(mid - 1, -1, -1):
            q[:, i] = np.minimum(q[:, i], q[:, i + 1])
        for j in range(mid + 1, q.shape[1]):
            q[:, j] = np.maximum(q[:, j], q[:, j - 1])
        return q

    @property
    def extended_levels(self) -> tuple[float, ...]:
        """Calibrated levels wider than the model's quantiles (e.g. ``(0.95,)``)."""
        return tuple(lv for lv in self.levels if _is_extended(self.quantile_levels, lv))

    def extended_bounds(self, codes: Sequence[str], raw: np.ndarray, calibrated: np.ndarray | None = None,
                        strata: Sequence[str] | None = None) -> dict[float, np.ndarray]:
        """Bounds of each extended level: ``{level: (n, 2) array of (low, high)}``, normalised units.

        ``raw`` are the model's quantiles before :meth:`apply` (``(n, n_quantiles)``): the
        adjustment was fitted on them. ``calibrated`` (the output of :meth:`apply`), when
        given, keeps the wider interval outside the narrower calibrated ones (nested).
        """
        raw = np.asarray(raw, dtype=np.float64)
        adj = self.adjustments(codes, strata)
        out = {}
        for k, level in enumerate(self.levels):
            if not _is_extended(self.quantile_levels, level):
                continue
            i, j = _base_columns(self.quantile_levels, level)
            lo, hi = raw[:, i] - adj[:, k], raw[:, j] + adj[:, k]
            if calibrated is not None:
                c = np.asarray(calibrated, dtype=np.float64)
                lo, hi = np.minimum(lo, c[:, i]), np.maximum(hi, c[:, j])
            out[level] = np.stack([lo, hi], axis=1)
        return out

    def to_dict(self) -> dict:
        return {
            "method": "split-conformal CQR, additive in normalised units",
            "quantile_levels": list(self.quantile_levels),
            "levels": list(self.levels),
            "per_analyte": self.per_analyte,
            "n_per_analyte": self.n_per_analyte,
            "pooled": self.pooled,
            "n_pooled": self.n_pooled,
            "min_points": self.min_points,
            "meta": self.meta,
            # only when there is one, so a calibration without strata keeps its bytes (and model_version)
            **({"pooled_strata": self.pooled_strata} if self.pooled_strata else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ConformalCalibration:
        return cls(
            quantile_levels=tuple(d["quantile_levels"]),
            levels=tuple(d["levels"]),
            per_analyte={c: {k: float(v) for k, v in a.items()} for c, a in d["per_analyte"].items()},
            n_per_analyte={c: int(n) for c, n in d["n_per_analyte"].items()},
            pooled={k: float(v) for k, v in d["pooled"].items()},
            n_pooled=int(d["n_pooled"]),
            min_points=int(d["min_points"]),
            meta=d.get("meta", {}),
            pooled_strata={s: {k: float(v) for k, v in a.items()} for s, a in d.get("pooled_strata", {}).items()},
        )


def _key(code: object, stratum: str) -> str:
    """The per-analyte key of ``code`` in ``stratum`` ('' is the default stratum: the code itself)."""
    return str(code) if not stratum else f"{code}|{stratum}"


def fit_conformal(
    codes: Sequence[str],
    quantiles: np.ndarray,
    y: np.ndarray,
    *,
    quantile_levels: Sequence[float] = QUANTILES,
    levels: Sequence[float] = DEFAULT_LEVELS,
    min_points: int = 50,
    strata: Sequence[str] | None = None,
) -> ConformalCalibration:
    """Fit adjustments from calibration forecasts.

    Args:
        codes: analyte code of each point, ``(n,)``.
        quantiles: forecast quantiles, ``(n, n_quantiles)``, normalised units, monotone.
        y: true values, ``(n,)``, normalised units (leave censored results out).
        quantile_levels: the levels of ``quantiles``' columns.
        levels: nominal central intervals to calibrate; a level wider than the outermost
            quantile pair (up to 95 %) is calibrated on that pair (an extended level).
        min_points: analytes with fewer points use the pooled adjustment.
        strata: stratum of each point, ``(n,)`` ('' = default; see the module docstring), or None.
    """
    codes = np.asarray([str(c) for c in codes], dtype=object)
    quantiles = np.asarray(quantiles, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if quantiles.shape != (len(y), len(quantile_levels)) or len(codes) != len(y):
        raise ValueError(
            f"shapes disagree: codes {len(codes)}, quantiles {quantiles.shape}, y {y.shape}; "
            f"expected (n,), (n, {len(quantile_levels)}), (n,)"
        )
    if not (np.isfinite(quantiles).all() and np.isfinite(y).all()):
        raise ValueError("calibration quantiles and true values must be finite")
    levels = tuple(float(lv) for lv in levels)
    needed = max(math.ceil(lv / (1 - lv) - 1e-9) for lv in levels)
    if min_points < needed:
        raise ValueError(f"min_points ({min_points}) must be at least {needed} to certify a {max(levels):.0%} interval")
    scores = {}
    for level in levels:
        i, j = _base_columns(quantile_levels, level)
        scores[level] = np.maximum(quantiles[:, i] - y, y - quantiles[:, j])  # [n]
    pooled = {str(lv): conformal_adjustment(scores[lv], lv) for lv in levels}
    strata = np.full(len(y), "", dtype=object) if strata is None else np.asarray([str(s) for s in strata], dtype=object)
    if len(strata) != len(y):
        raise ValueError(f"strata has {len(strata)} entries for {len(y)} points")
    pooled_strata = {}
    for stratum in sorted(set(strata.tolist()) - {""}):
        sel = strata == stratum
        if sel.sum() >= min_points:
            pooled_strata[stratum] = {str(lv): conformal_adjustment(scores[lv][sel], lv) for lv in levels}
    keys = np.array([_key(c, s) for c, s in zip(codes, strata)], dtype=object)
    per_analyte, n_per = {}, {}
    for key in sorted(set(keys.tolist())):
        sel = keys == key
        n_per[key] = int(sel.sum())
        if n_per[key] >= min_points:
            per_analyte[key] = {str(lv): conformal_adjustment(scores[lv][sel], lv) for lv in levels}
    return ConformalCalibration(
        quantile_levels=tuple(float(q) for q in quantile_levels),
        levels=levels,
        per_analyte=per_analyte,
        n_per_analyte=n_per,
        pooled=pooled,
        n_pooled=len(y),
        min_points=min_points,
        pooled_strata=pooled_strata,
    )
