"""Agreement between experts' verdicts, with 95 % confidence intervals.

For one kind of output (forecast, anomaly, ...), the experts' current verdicts (valid /
invalid / unsure) form an items x raters table with gaps (not every expert judges every
output). Four figures are reported, each with a 95 % confidence interval:

* **raw agreement**: mean over outputs judged by >= 2 experts of the share of agreeing expert pairs;
* **Cohen's kappa** (exactly two experts, outputs both judged): ``statsmodels.stats.inter_rater.cohens_kappa``
  (asymptotic standard error, normal interval);
* **Fleiss' kappa** (two or more experts, gaps allowed: Fleiss' generalised kappa);
* **Gwet's AC1** (two or more experts, gaps allowed).

Fleiss' kappa and AC1 (and the raw agreement's interval) follow Gwet's formulas for ratings
with gaps and their linearised variance, conditional on the experts, with a Student t interval
on ``n - 1`` degrees of freedom (the upper limit capped at 1): Gwet KL, *Handbook of
Inter-Rater Reliability*, 4th ed., Advanced Analytics 2014, chapters 2 and 5; Gwet KL, Br J
Math Stat Psychol 2008;61(1):29-48, doi:10.1348/000711006X126600. ``tests/test_agreement.py``
checks every figure against the ``irrCAC`` package (Python port of Gwet's R package) and
Fleiss' kappa on complete tables against ``statsmodels``. ``irrCAC`` is not a runtime
dependency: its release pins scipy 1.12 and pandas < 3, which this project cannot install.

Kappa is misleading when nearly every output is valid (the "kappa paradox": 94 % agreement,
kappa near 0); AC1 is not, which is why both are shown.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Estimate", "count_table", "raw_agreement", "gwet_ac1", "fleiss_kappa", "cohen_kappa", "agreement_stats",
           "CONFIDENCE"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A coefficient with its ``CONFIDENCE`` interval; NaN where undefined (e.g. every verdict 'valid')."""

    value: float
    low: float
    high: float
    n_items: int  # items rated at least twice
    pa: float = math.nan  # observed agreement
    pe: float = math.nan  # chance agreement of the coefficient

    @classmethod
    def undefined(cls, n_items: int = 0) -> "Estimate":
        return cls(math.nan, math.nan, math.nan, n_items)


def count_table(ratings: pd.DataFrame, categories) -> np.ndarray:
    """Items x categories counts of a long frame ``item, rater, category`` (categories outside the list dropped)."""
    cats = list(categories)
    r = ratings[ratings["category"].isin(cats)]
    if r.empty:
        return np.zeros((0, len(cats)))
    table = pd.crosstab(r["item"], pd.Categorical(r["category"], categories=cats), dropna=False)
    return table.reindex(columns=cats, fill_value=0).to_numpy(float)


def _t_interval(value: float, variance: float, n: int, lo_cap: float) -> tuple[float, float]:
    from scipy import stats

    if not math.isfinite(value) or n < 2:
        return math.nan, math.nan
    se = math.sqrt(max(variance, 0.0))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * se
    return max(lo_cap, value - half), min(1.0, value + half)


def _pieces(counts: np.ndarray):
    r = np.asarray(counts, dtype=float)
    r = r[r.sum(axis=1) > 0]  # items nobody rated say nothing
    ri = r.sum(axis=1)
    multi = ri >= 2
    n, n2 = len(r), int(multi.sum())
    den = np.where(multi, ri * (ri - 1), 1.0)
    pa_i = np.where(multi, (r * (r - 1)).sum(axis=1) / den, 0.0)
    pa = float(pa_i[multi].mean()) if n2 else math.nan
    pi = (r / ri[:, None]).mean(axis=0) if n else np.zeros(r.shape[1])
    return r, ri, multi, n, n2, pa_i, pa, pi


def raw_agreement(counts: np.ndarray) -> Estimate:
    """Share of agreeing rater pairs, averaged over items rated >= 2 times, with Gwet's interval."""
    r, ri, multi, n, n2, pa_i, pa, _ = _pieces(counts)
    if not n2:
        return Estimate.undefined()
    pa_ix = (n / n2) * pa_i  # zero for items rated once
    var = float(((pa_ix - pa) ** 2).sum() / (n * (n - 1))) if n > 1 else math.nan
    lo, hi = _t_interval(pa, var, n, 0.0)
    return Estimate(pa, lo, hi, n2, pa)


def _chance_corrected(counts: np.ndarray, pe_of, pe_i_of) -> Estimate:
    r, ri, multi, n, n2, pa_i, pa, pi = _pieces(counts)
    if not n2:
        return Estimate.undefined()
    pe = pe_of(pi)
    if not pe < 1:
        return Estimate.undefined(n2)
    coef = (pa - pe) / (1 - pe)
    coef_i = (n / n2) * (pa_i - pe * multi) / (1 - pe)
    pe_i = pe_i_of(r, ri, pi)
    coef_ix = coef_i - 2 * (1 - coef) * (pe_i - pe) / (1 - pe)
    var = float(((coef_ix - coef) ** 2).sum() / (n * (n - 1))) if n > 1 else math.nan
    lo, hi = _t_interval(coef, var, n, -1.0)
    return Estimate(float(coef), lo, hi, n2, pa, pe)


def gwet_ac1(counts: np.ndarray, n_categories: int | None = None) -> Estimate:
    """Gwet's AC1 of an items x categories table of rating counts (raters may vary per item).

    ``p_a`` as :func:`raw_agreement`; ``pi_k`` = mean over rated items of ``r_ik / r_i``;
    ``p_e = sum_k pi_k (1 - pi_k) / (q - 1)``; ``AC1 = (p_a - p_e) / (1 - p_e)``; ``q`` is
    ``n_categories`` (default: the table's columns, including categories nobody chose).
    """
    q = int(n_categories or np.asarray(counts).shape[1])
    if q < 2:
        return Estimate.undefined()
    return _chance_corrected(
        counts,
        lambda pi: float((pi * (1 - pi)).sum() / (q - 1)),
        lambda r, ri, pi: (r @ (1 - pi)) / ri / (q - 1),
    )


def fleiss_kappa(counts: np.ndarray) -> Estimate:
    """Fleiss' (generalised) kappa: ``p_e = sum_k pi_k^2``; gaps allowed; equals Fleiss (1971) on complete tables."""
    return _chance_corrected(counts, lambda pi: float((pi ** 2).sum()), lambda r, ri, pi: (r @ pi) / ri)


def cohen_kappa(first, second, categories) -> Estimate:
    """Cohen's kappa of two raters on the same items (``statsmodels``), asymptotic 95 % interval."""
    from statsmodels.stats.inter_rater import cohens_kappa, to_table

    cats = list(categories)
    a = pd.Categorical(first, categories=cats).codes
    b = pd.Categorical(second, categories=cats).codes
    keep = (a >= 0) & (b >= 0)
    if keep.sum() < 2:
        return Estimate.undefined(int(keep.sum()))
    table, _ = to_table(np.column_stack([a[keep], b[keep]]), bins=np.arange(len(cats) + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = cohens_kappa(table)  # kappa_low / kappa_upp: the two-sided 95 % interval (alpha 0.025 per tail)
    k = float(res.kappa)
    if not math.isfinite(k):
        return Estimate.undefined(int(keep.sum()))
    lo, hi = float(res.kappa_low), float(res.kappa_upp)
    return Estimate(k, max(-1.0, lo) if math.isfinite(lo) else math.nan,
                    min(1.0, hi) if math.isfinite(hi) else math.nan, int(keep.sum()))


def agreement_stats(ratings: pd.DataFrame, categories=("valid", "invalid", "unsure")) -> dict:
    """Agreement of a long frame ``item, rater, category`` (one current rating per item and rater).

    Returns ``n_items``, ``n_items_multi`` (items with >= 2 ratings), ``n_raters``,
    ``share_valid`` (share of ratings in the first category), and for each of
    ``raw_agreement``, ``cohen_kappa`` (only with exactly 2 raters), ``fleiss_kappa`` and
    ``gwet_ac1``: the value and ``<name>_low`` / ``<name>_high``, its 95 % interval (NaN
    where undefined).
    """
    cats = list(categories)
    r = ratings[ratings["category"].isin(cats)]
    raters = sorted(r["rater"].unique())
    counts = count_table(r, cats)
    out = {"n_items": int(len(counts)), "n_items_multi": int((counts.sum(axis=1) >= 2).sum()), "n_raters": len(raters),
           "share_valid": float((r["category"] == cats[0]).mean()) if len(r) else math.nan}
    kappa = Estimate.undefined()
    if len(raters) == 2:
        wide = r.pivot_table(index="item", columns="rater", values="category", aggfunc="last").dropna()
        if len(wide):
            kappa = cohen_kappa(wide[raters[0]], wide[raters[1]], cats)
    for name, est in (("raw_agreement", raw_agreement(counts)), ("cohen_kappa", kappa),
                      ("fleiss_kappa", fleiss_kappa(counts)), ("gwet_ac1", gwet_ac1(counts, len(cats)))):
        out[name], out[f"{name}_low"], out[f"{name}_high"] = est.value, est.low, est.high
    return out
