"""Agreement between experts (clinical/agreement.py) checked against irrCAC, statsmodels and scikit-learn.

``irrCAC`` (the Python port of Gwet's R package) is a test tool only: ``scripts/run.sh setup``
installs it without its dependencies (its release pins scipy 1.12 and pandas < 3).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from clinical import agreement as A

try:
    from irrCAC import raw as irr
except ImportError as exc:  # a missing reference must fail the suite, not skip the check
    raise ImportError("irrCAC is missing: `bash scripts/run.sh setup` installs it (test tool)") from exc
VERDICTS = ["valid", "invalid", "unsure"]

# Gwet, Handbook of Inter-Rater Reliability, 4th ed. (2014), p. 120: 4 raters, 12 subjects, gaps.
RAW_4RATERS = {
    "r1": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "r2": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, None],
    "r3": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, 3],
    "r4": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}


def _long(wide: pd.DataFrame) -> pd.DataFrame:
    out = wide.rename_axis("item").reset_index().melt(id_vars="item", var_name="rater", value_name="category")
    return out.dropna(subset=["category"])


def _close(ours: A.Estimate, theirs: dict, tol=1e-5):
    est = theirs["est"]
    assert ours.value == pytest.approx(float(est["coefficient_value"]), abs=tol)
    lo, hi = est["confidence_interval"]
    assert ours.low == pytest.approx(float(lo), abs=tol) and ours.high == pytest.approx(float(hi), abs=tol)
    assert ours.pa == pytest.approx(float(est["pa"]), abs=tol) and ours.pe == pytest.approx(float(est["pe"]), abs=tol)


def test_ac1_and_fleiss_with_intervals_match_irrcac_on_the_handbook_example():
    wide = pd.DataFrame(RAW_4RATERS)
    counts = A.count_table(_long(wide), [1, 2, 3, 4, 5])
    ac1, fk = A.gwet_ac1(counts), A.fleiss_kappa(counts)
    _close(ac1, irr.CAC(wide, categories=[1, 2, 3, 4, 5]).gwet())
    _close(fk, irr.CAC(wide, categories=[1, 2, 3, 4, 5]).fleiss())
    assert (round(ac1.value, 3), round(ac1.low, 3), ac1.high) == (0.775, 0.461, 1.0)  # as published by Gwet


@pytest.mark.parametrize("seed,n_items,n_raters,p_missing,p_valid", [
    (1, 40, 2, 0.0, 0.8), (2, 60, 3, 0.3, 0.9), (3, 25, 5, 0.5, 0.5), (4, 200, 4, 0.2, 0.97)])
def test_every_coefficient_matches_irrcac_on_verdict_tables_with_gaps(seed, n_items, n_raters, p_missing, p_valid):
    """Experts who often agree (a 'true' verdict copied with noise), judging some outputs and not others."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(VERDICTS, size=n_items, p=[p_valid, (1 - p_valid) * 0.7, (1 - p_valid) * 0.3])
    wide = pd.DataFrame({
        f"e{k}": [t if rng.random() > 0.15 else rng.choice(VERDICTS) for t in truth] for k in range(n_raters)})
    wide = wide.mask(rng.random(wide.shape) < p_missing)
    wide = wide[wide.notna().sum(axis=1) >= 1]
    stats = A.agreement_stats(_long(wide), VERDICTS)
    cac = irr.CAC(wide.copy(), categories=VERDICTS)
    for name, theirs in (("gwet_ac1", cac.gwet()), ("fleiss_kappa", irr.CAC(wide.copy(), categories=VERDICTS).fleiss())):
        est = theirs["est"]
        assert stats[name] == pytest.approx(float(est["coefficient_value"]), abs=1e-5), name
        lo, hi = est["confidence_interval"]
        assert (stats[f"{name}_low"], stats[f"{name}_high"]) == pytest.approx((float(lo), float(hi)), abs=1e-5), name
    assert stats["raw_agreement"] == pytest.approx(float(cac.gwet()["est"]["pa"]), abs=1e-5)
    assert stats["raw_agreement_low"] <= stats["raw_agreement"] <= stats["raw_agreement_high"] <= 1
    if n_raters == 2:  # Cohen's kappa: the value as irrCAC's Conger kappa (= Cohen for two raters) and sklearn
        from sklearn.metrics import cohen_kappa_score

        both = wide.dropna()
        assert stats["cohen_kappa"] == pytest.approx(float(irr.CAC(both.copy(), categories=VERDICTS).conger()["est"]
                                                           ["coefficient_value"]), abs=1e-5)
        assert stats["cohen_kappa"] == pytest.approx(cohen_kappa_score(both["e0"], both["e1"], labels=VERDICTS))
        assert stats["cohen_kappa_low"] < stats["cohen_kappa"] < stats["cohen_kappa_high"]
    else:
        assert math.isnan(stats["cohen_kappa"])


def test_fleiss_kappa_on_a_complete_table_is_statsmodels():
    from statsmodels.stats.inter_rater import fleiss_kappa

    rng = np.random.default_rng(7)
    counts = rng.multinomial(4, [0.7, 0.2, 0.1], size=50).astype(float)
    assert A.fleiss_kappa(counts).value == pytest.approx(fleiss_kappa(counts, method="fleiss"))


def test_undefined_agreement_is_nan_not_a_number_that_looks_fine():
    """Every verdict 'valid' from two experts: agreement 1, kappa undefined (NaN), AC1 1."""
    ratings = pd.DataFrame([(i, r, "valid") for i in range(10) for r in ("a", "b")], columns=["item", "rater", "category"])
    s = A.agreement_stats(ratings, VERDICTS)
    assert s["raw_agreement"] == 1.0 and math.isnan(s["cohen_kappa"]) and math.isnan(s["fleiss_kappa"])
    assert s["gwet_ac1"] == pytest.approx(1.0)
    one = pd.DataFrame([(0, "a", "valid")], columns=["item", "rater", "category"])
    assert math.isnan(A.agreement_stats(one, VERDICTS)["gwet_ac1"])
