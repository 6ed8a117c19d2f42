"""Split-conformal interval calibration: finite-sample rank, coverage, pooling, monotonicity."""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest

from model import QUANTILES
from model.conformal import (
    DEFAULT_LEVELS,
    ConformalCalibration,
    conformal_adjustment,
    fit_conformal,
    interval_coverage,
)

LEVELS = (0.5, 0.8, 0.9)
Z = np.array([NormalDist().inv_cdf(p) for p in QUANTILES])


def gaussian_quantiles(mu: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Quantiles (n, 7) of N(mu, sigma) at the contract's levels."""
    return mu[:, None] + np.atleast_1d(sigma)[:, None] * Z[None, :]


def synthetic(rng, n_per: dict[str, int], true_sigma: dict[str, float], model_sigma: float = 1.0):
    """Points of several analytes whose truth is wider (or narrower) than the model thinks."""
    codes, q, y = [], [], []
    for code, n in n_per.items():
        mu = rng.normal(0, 2, n)
        codes += [code] * n
        q.append(gaussian_quantiles(mu, model_sigma))
        y.append(mu + rng.normal(0, true_sigma[code], n))
    return np.array(codes, dtype=object), np.concatenate(q), np.concatenate(y)


def test_finite_sample_rank():
    """The adjustment is the ceil((n+1)(1-alpha))-th smallest score."""
    scores = np.arange(1.0, 20.0)  # n = 19
    assert conformal_adjustment(scores, 0.9) == 18.0  # ceil(20 * 0.9) = 18
    assert conformal_adjustment(scores, 0.5) == 10.0  # ceil(20 * 0.5) = 10
    assert conformal_adjustment(np.arange(1.0, 10.0), 0.7) == 7.0  # 10 * 0.7 = 7 exactly, not 8
    with pytest.raises(ValueError, match="5 calibration points cannot certify a 90% interval; need at least 9"):
        conformal_adjustment(np.arange(5.0), 0.9)


def test_reaches_nominal_coverage_per_analyte():
    """A model too narrow for 'WIDE' and too wide for 'NARROW' is fixed per analyte."""
    rng = np.random.default_rng(0)
    sig = {"WIDE": 2.0, "NARROW": 0.4}
    codes, q, y = synthetic(rng, {"WIDE": 1500, "NARROW": 1500}, sig)
    before = interval_coverage(q[codes == "WIDE"], y[codes == "WIDE"])
    assert before[0.8] < 0.5  # badly under-covered
    cal = fit_conformal(codes, q, y)
    adjusted = cal.apply(codes, q)
    assert cal.per_analyte["WIDE"]["0.8"] > 0 > cal.per_analyte["NARROW"]["0.8"]
    for code in sig:
        cov = interval_coverage(adjusted[codes == code], y[codes == code])
        for level in LEVELS:
            assert cov[level] >= level  # guaranteed on the calibration set itself
    # and on fresh points from the same distribution
    codes2, q2, y2 = synthetic(rng, {"WIDE": 4000, "NARROW": 4000}, sig)
    adjusted2 = cal.apply(codes2, q2)
    for code in sig:
        cov = interval_coverage(adjusted2[codes2 == code], y2[codes2 == code])
        for level in LEVELS:
            assert abs(cov[level] - level) < 0.03, (code, level, cov[level])


def test_small_and_unseen_analytes_use_the_pooled_adjustment():
    rng = np.random.default_rng(1)
    codes, q, y = synthetic(rng, {"A": 400, "B": 400, "RARE": 10}, {"A": 1.5, "B": 1.5, "RARE": 1.5})
    cal = fit_conformal(codes, q, y, min_points=50)
    assert "RARE" not in cal.per_analyte and cal.n_per_analyte["RARE"] == 10
    pooled = [cal.pooled[str(lv)] for lv in DEFAULT_LEVELS]
    np.testing.assert_array_equal(cal.adjustments(["RARE", "NEVER_SEEN"]), [pooled, pooled])
    assert cal.n_pooled == 810


def test_apply_keeps_quantiles_monotone_and_median():
    """Even a strongly narrowing adjustment cannot cross quantiles or move the median."""
    rng = np.random.default_rng(2)
    codes, q, y = synthetic(rng, {"A": 500}, {"A": 0.05}, model_sigma=3.0)  # far too wide
    cal = fit_conformal(codes, q, y)
    assert all(v < 0 for v in cal.per_analyte["A"].values())
    # also mix in an analyte that gets widened, with arbitrary quantiles
    out = cal.apply(codes, q)
    assert (np.diff(out, axis=1) >= 0).all()
    np.testing.assert_array_equal(out[:, 3], q[:, 3])
    weird = ConformalCalibration(
        quantile_levels=QUANTILES, levels=LEVELS, per_analyte={"X": {"0.5": 2.0, "0.8": -3.0, "0.9": 0.0}},
        n_per_analyte={"X": 100}, pooled={"0.5": 0.0, "0.8": 0.0, "0.9": 0.0}, n_pooled=100, min_points=50,
    )
    out = weird.apply(["X"], gaussian_quantiles(np.zeros(1), 1.0))
    assert (np.diff(out, axis=1) >= 0).all()


def test_json_round_trip_gives_identical_adjustments():
    rng = np.random.default_rng(3)
    codes, q, y = synthetic(rng, {"A": 200, "B": 30}, {"A": 1.3, "B": 0.7})
    cal = fit_conformal(codes, q, y)
    again = ConformalCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(again.apply(codes, q), cal.apply(codes, q))


def test_input_errors_are_named():
    rng = np.random.default_rng(4)
    codes, q, y = synthetic(rng, {"A": 100}, {"A": 1.0})
    with pytest.raises(ValueError, match=r"min_points \(5\) must be at least 19 to certify a 95% interval"):
        fit_conformal(codes, q, y, min_points=5)
    with pytest.raises(ValueError, match="shapes disagree"):
        fit_conformal(codes, q[:, :5], y)
    with pytest.raises(ValueError, match=r"interval 98% needs quantiles 0.01 and 0.99"):
        fit_conformal(codes, q, y, levels=(0.98,))
    y_bad = y.copy()
    y_bad[0] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        fit_conformal(codes, q, y_bad)


def test_95_interval_is_calibrated_on_the_outermost_pair_and_nested():
    """The head stops at q05..q95; the 95 % interval is CQR on that pair, outside the calibrated 90 %."""
    rng = np.random.default_rng(5)
    sig = {"WIDE": 2.0, "NARROW": 0.4}
    codes, q, y = synthetic(rng, {"WIDE": 2000, "NARROW": 2000}, sig)
    cal = fit_conformal(codes, q, y)
    assert cal.extended_levels == (0.95,)
    adjusted = cal.apply(codes, q)
    b = cal.extended_bounds(codes, q, adjusted)[0.95]
    assert b.shape == (len(y), 2)
    assert (b[:, 0] <= adjusted[:, 0]).all() and (b[:, 1] >= adjusted[:, 6]).all()
    for code in sig:
        m = codes == code
        assert np.mean((b[m, 0] <= y[m]) & (y[m] <= b[m, 1])) >= 0.95
    codes2, q2, y2 = synthetic(rng, {"WIDE": 4000, "NARROW": 4000}, sig)
    b2 = cal.extended_bounds(codes2, q2, cal.apply(codes2, q2))[0.95]
    for code in sig:
        m = codes2 == code
        assert abs(np.mean((b2[m, 0] <= y2[m]) & (y2[m] <= b2[m, 1])) - 0.95) < 0.02
    # the 95 % adjustment moves no quantile: apply() is what it was without the 95 % level
    only90 = fit_conformal(codes, q, y, levels=(0.5, 0.8, 0.9))
    np.testing.assert_allclose(only90.apply(codes, q), adjusted)
    assert only90.extended_bounds(codes, q) == {}


def test_single_result_forecasts_are_calibrated_apart():
    """Issue 13 (b): forecasts from one prior result miss more; their stratum gets its own (wider)
    adjustments, per analyte and pooled, and the others keep theirs; a calibration without strata
    serialises as before (its model_version does not move)."""
    rng = np.random.default_rng(3)
    codes, q, y = synthetic(rng, {"A": 3000, "B": 3000}, {"A": 1.0, "B": 1.0})
    single = rng.random(len(y)) < 0.2
    y = np.where(single, q[:, 3] + (y - q[:, 3]) * 3.0, y)  # three times the error with one prior result
    strata = np.where(single, "single", "")
    cal = fit_conformal(codes, q, y, strata=strata)
    assert cal.per_analyte["A|single"]["0.8"] > cal.per_analyte["A"]["0.8"] + 1.0
    assert set(cal.pooled_strata) == {"single"}
    adjusted = cal.apply(codes, q, strata)
    for s in (True, False):
        cov = interval_coverage(adjusted[single == s], y[single == s])
        assert abs(cov[0.8] - 0.8) < 0.03, (s, cov)
    # a stratum unseen for an analyte uses the stratum's pooled adjustment
    assert cal.adjustments(["C"], ["single"])[0, 1] == cal.pooled_strata["single"]["0.8"]
    round_trip = ConformalCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(round_trip.apply(codes, q, strata), adjusted)
    assert "pooled_strata" not in fit_conformal(codes, q, y).to_dict()
