"""The honest evaluation of the forecasting task: one task, patient-grouped splits, one scorer.

Every method — the baselines in :mod:`model.baselines` and the fine-tuned transformer —
plugs in through the :class:`Forecaster` protocol and is scored on the same targets by the
same code, so the model card compares like with like.

The task (:func:`build_task`), exactly:

* the ``n_analytes`` (20) most frequent analytes of the cohort, by number of results
  (ties broken by analyte code);
* duplicate (patient, analyte, collection time) values averaged;
* for each patient and analyte, every result after the patient's first result of that
  analyte is a target; its history is every result of that patient (all analytes, not only
  the target's) collected strictly before the target time. A censored result ('<x', '>x';
  12 of about 90,000 in MIMIC-IV demo) is scored at its limit; ``targets.censor`` says which.

The scoring rule (identical for every method): every target has at least one prior result
of its analyte, and the product forecasts from one (:data:`model.MIN_HISTORY`), so every
method is scored on its own forecast of every target. A method whose ``min_history`` is
higher, or that returns no forecast, gets the last-value forecast instead (median = last
value, quantiles from the training fold's changes; see :class:`model.baselines.LastValue`):
:func:`evaluate` says how many targets that was (``fallback_fewer_than_min_history`` for
targets below :data:`model.MIN_HISTORY`, none today), and the card reports failures.

Metrics per analyte: MAE; NMAE = MAE / (p99 - p1 of that analyte's targets, all folds
pooled); median absolute percentage error; mean pinball loss over the 7 quantiles; 80%
(q10..q90) and 90% (q05..q95) coverage and mean width. Overall: count-weighted NMAE (equal to
the mean over targets of ``|y - q50| / range``), and the same by sex, age band and number of
prior results. Whether a method beats last value is counted per analyte.

Side effects live only in :func:`write_model_card` (it writes ``model_card.json`` and the card
``README.md``, whose header holds the Hugging Face metadata: licence, datasets, metrics and a
``model-index`` with the measured results).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, mean_pinball_loss
from sklearn.model_selection import GroupKFold

from model import MIN_HISTORY, QUANTILE_COLUMNS, QUANTILES

__all__ = [
    "AGE_BANDS",
    "PRIOR_BANDS",
    "SUBGROUPS",
    "REFERENCE_FIGURES",
    "Task",
    "Fold",
    "Forecaster",
    "EvaluationResult",
    "LeakageError",
    "average_duplicates",
    "not_enough_status",
    "build_task",
    "grouped_folds",
    "holdout_fold",
    "read_patient_list",
    "evaluate",
    "check_leakage",
    "score",
    "compare",
    "write_model_card",
    "card_metadata",
    "training_warnings",
    "MODEL_CARD_FILE",
    "write_checkpoint_card",
]

AGE_BANDS = ("<40", "40-64", "65-79", "80+", "unknown")
PRIOR_BANDS = ("1", "2-4", "5-19", "20+")
SUBGROUPS = ("sex", "age_band", "prior_band")

# Figures measured by the author on MIMIC-IV demo with this task (issue 3). They are
# shown on the card for comparison only; nothing here is computed from them.
REFERENCE_FIGURES = {
    "dataset": "MIMIC-IV Clinical Database Demo v2.2",
    "source": "reference figures from the issue (not measured by this run)",
    "count_weighted_nmae": {"last value": 0.0698, "LightGBM": 0.0688},
    "targets_for_full_fine_tuning": {"nmae_max": 0.060, "nmae_aim": 0.055, "wins_vs_last_value_min": 16,
                                     "coverage80_range": [0.78, 0.82]},
}

INTERVALS = {"50%": ("q25", "q75", 0.5), "80%": ("q10", "q90", 0.8), "90%": ("q05", "q95", 0.9)}


def not_enough_status(n: int, minimum: int = MIN_HISTORY) -> str:
    """The status of a query with too few prior results of its analyte (FC-12 wording)."""
    return f"Not enough measurements to forecast ({int(n)}; minimum {int(minimum)})"


# ===========================================================================================
# Task
# ===========================================================================================
def average_duplicates(history: pd.DataFrame) -> pd.DataFrame:
    """One row per (patient, analyte, collection time): values averaged, sorted by patient and time.

    ``censor`` keeps its value when all duplicates agree and becomes 0 otherwise;
    ``unit_canonical``, ``sex`` and ``age_years`` take the first row's.
    """
    h = history
    keys = ["patient_id", "analyte_code", "collected_at"]
    if h.duplicated(keys).any():
        agg = {"value": ("value", "mean"), "censor_min": ("censor", "min"), "censor_max": ("censor", "max")}
        for c in ("unit_canonical", "sex", "age_years"):
            if c in h.columns:
                agg[c] = (c, "first")
        h = h.groupby(keys, sort=False, dropna=False).agg(**agg).reset_index()
        h["censor"] = np.where(h["censor_min"] == h["censor_max"], h["censor_min"], 0).astype("int8")
        h = h.drop(columns=["censor_min", "censor_max"])
    else:
        h = h.copy()
    if "censor" not in h.columns:
        h["censor"] = np.int8(0)
    return h.sort_values(["patient_id", "collected_at", "analyte_code"], kind="stable").reset_index(drop=True)


def _age_band(age: pd.Series) -> pd.Series:
    a = pd.to_numeric(age, errors="coerce")
    out = np.select([a < 40, a < 65, a < 80, a >= 80], ["<40", "40-64", "65-79", "80+"], default="unknown")
    return pd.Series(pd.Categorical(out, categories=AGE_BANDS), index=age.index)


def _prior_band(n: pd.Series) -> pd.Series:
    out = np.select([n <= 1, n <= 4, n <= 19], ["1", "2-4", "5-19"], default="20+")
    return pd.Series(pd.Categorical(out, categories=PRIOR_BANDS), index=n.index)


@dataclass
class Task:
    """The evaluation task built by :func:`build_task`.

    Attributes:
        history: the cohort with duplicates averaged (all analytes), the only input a
            forecaster ever sees.
        targets: one row per target: ``patient_id, analyte_code, at, y, n_prior, last_value,
            last_at, sex, age_band, prior_band`` (``last_value``: the analyte's last result
            before ``at``, the reference every method is counted against).
        analytes: the scored analytes, most frequent first.
        ranges: per analyte, ``p1, p99, range`` (= p99 - p1) of its targets' true values.
    """

    history: pd.DataFrame
    targets: pd.DataFrame
    analytes: list[str]
    ranges: pd.DataFrame
    info: dict = field(default_factory=dict)

    @property
    def patients(self) -> np.ndarray:
        """Patients with at least one target, sorted."""
        return np.sort(self.targets["patient_id"].unique())

    def history_before(self, patient_id: str, at) -> pd.DataFrame:
        """The history of one target: every result of the patient collected strictly before ``at``."""
        h = self.history
        return h[(h["patient_id"] == patient_id) & (h["collected_at"] < pd.Timestamp(at))]

    def describe(self) -> dict:
        t = self.targets
        return {
            "analytes": self.analytes,
            "n_analytes": len(self.analytes),
            "n_patients": int(t["patient_id"].nunique()),
            "n_targets": int(len(t)),
            "n_history_results": int(len(self.history)),
            "targets_with_one_prior": int((t["n_prior"] <= 1).sum()),
            **self.info,
        }


def build_task(cohort: pd.DataFrame, n_analytes: int = 20, analytes: list[str] | None = None) -> Task:
    """The forecasting task on a cohort (the ``data.queries.cohort`` frame); see the module doc.

    ``analytes`` overrides the choice of the ``n_analytes`` most frequent ones.
    """
    n_in = len(cohort)
    h = average_duplicates(cohort)
    counts = h.groupby("analyte_code").size().reset_index(name="n")
    counts = counts.sort_values(["n", "analyte_code"], ascending=[False, True], kind="stable")
    if analytes is None:
        analytes = counts["analyte_code"].head(n_analytes).tolist()
    else:
        missing = sorted(set(analytes) - set(counts["analyte_code"]))
        if missing:
            raise ValueError(f"analytes not in the cohort: {', '.join(missing)}")
        analytes = list(analytes)

    r = h[h["analyte_code"].isin(analytes)]
    r = r.sort_values(["patient_id", "analyte_code", "collected_at"], kind="stable")
    g = r.groupby(["patient_id", "analyte_code"], sort=False)
    r = r.assign(n_prior=g.cumcount(), last_value=g["value"].shift(1), last_at=g["collected_at"].shift(1))
    t = r[r["n_prior"] >= 1].rename(columns={"collected_at": "at", "value": "y"})
    t = t.assign(
        sex=t["sex"].where(t["sex"].isin(["F", "M"]), "unknown") if "sex" in t else "unknown",
        age_band=_age_band(t["age_years"] if "age_years" in t else pd.Series(np.nan, index=t.index)),
        prior_band=_prior_band(t["n_prior"]),
    )
    cols = ["patient_id", "analyte_code", "at", "y", "n_prior", "last_value", "last_at", "censor",
            "sex", "age_band", "prior_band"]
    t = t[cols].sort_values(["patient_id", "at", "analyte_code"], kind="stable").reset_index(drop=True)
    t["n_prior"] = t["n_prior"].astype("int64")

    ranges = t.groupby("analyte_code")["y"].quantile([0.01, 0.99]).unstack()
    ranges.columns = ["p1", "p99"]
    ranges["range"] = ranges["p99"] - ranges["p1"]
    # A degenerate (constant) analyte would divide by zero: fall back to its absolute level.
    degenerate = ranges["range"] <= 0
    if degenerate.any():
        ranges.loc[degenerate, "range"] = np.maximum(ranges.loc[degenerate, "p99"].abs(), 1e-9)
    ranges = ranges.reindex(analytes)
    info = {"n_cohort_rows": int(n_in), "duplicates_averaged": int(n_in - len(h)),
            "analyte_counts": {a: int(n) for a, n in zip(counts["analyte_code"], counts["n"]) if a in analytes}}
    return Task(history=h, targets=t, analytes=analytes, ranges=ranges, info=info)


# ===========================================================================================
# Splits
# ===========================================================================================
@dataclass(frozen=True)
class Fold:
    """One split: patients whose results train the method, patients whose targets are scored."""

    name: str
    train_patients: tuple[str, ...]
    test_patients: tuple[str, ...]


def grouped_folds(patient_ids, k: int = 5, seed: int = 0) -> list[Fold]:
    """``k`` patient-grouped folds (sklearn ``GroupKFold`` with a seeded shuffle).

    ``patient_ids`` may repeat (one entry per target): folds are then balanced by number of
    entries. No patient is ever in two test folds or in both halves of one fold.
    """
    ids = pd.Series(pd.Series(patient_ids).astype(str).to_numpy())
    if ids.nunique() < k:
        raise ValueError(f"{ids.nunique()} patients cannot make {k} folds")
    gkf = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for i, (tr, te) in enumerate(gkf.split(np.zeros(len(ids)), groups=ids.to_numpy())):
        folds.append(Fold(f"fold{i + 1}", tuple(sorted(ids.iloc[tr].unique())), tuple(sorted(ids.iloc[te].unique()))))
    return folds


def holdout_fold(patient_ids, test_patients) -> list[Fold]:
    """A single split with an explicit list of test patients; everyone else trains."""
    all_ids = set(pd.Series(patient_ids).astype(str))
    test = {str(p) for p in test_patients}
    unknown = sorted(test - all_ids)
    if unknown:
        raise ValueError(f"test patients not in the task: {', '.join(unknown[:10])}")
    if not test:
        raise ValueError("the test patient list is empty")
    return [Fold("holdout", tuple(sorted(all_ids - test)), tuple(sorted(test)))]


def read_patient_list(path: str | Path) -> list[str]:
    """Patient ids from a file: one per line (or a CSV with a ``patient_id`` column)."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    if lines and lines[0].split(",")[0].strip().lower() == "patient_id":
        lines = [ln.split(",")[0].strip() for ln in lines[1:]]
    return [ln for ln in lines if not ln.startswith("#")]


# ===========================================================================================
# Forecaster protocol and evaluation
# ===========================================================================================
@runtime_checkable
class Forecaster(Protocol):
    """What every evaluated method provides.

    ``predict`` receives the history of the patients being forecast (possibly with results
    after each query's ``at``) and must use, for each query, only results collected strictly
    before its ``at``; :func:`evaluate` checks this. It returns the forecasts contract
    (``model`` package doc): the queries' columns plus ``q05..q95``, ``unit``, ``n_history``,
    ``status`` and ``model_version``, one row per query, in the queries' order.
    """

    name: str

    def fit(self, train_history: pd.DataFrame) -> None: ...

    def predict(self, history: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame: ...


class LeakageError(AssertionError):
    """A forecaster's output changed when results at or after a query's time changed."""


@dataclass
class EvaluationResult:
    """One method's evaluation: the pooled out-of-fold forecasts and their metrics."""

    name: str
    predictions: pd.DataFrame
    per_analyte: pd.DataFrame
    overall: dict
    subgroups: dict[str, pd.DataFrame]
    calibration: pd.DataFrame
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "overall": self.overall,
            "per_analyte": _records(self.per_analyte.reset_index()),
            "subgroups": {k: _records(v.reset_index()) for k, v in self.subgroups.items()},
            "calibration": _records(self.calibration),
            "info": self.info,
        }


def _check_forecasts(fc: pd.DataFrame, queries: pd.DataFrame, name: str) -> None:
    missing = [c for c in (*QUANTILE_COLUMNS, "status") if c not in fc.columns]
    if missing:
        raise ValueError(f"{name}: forecasts lack columns {missing}")
    if len(fc) != len(queries):
        raise ValueError(f"{name}: {len(fc)} forecasts for {len(queries)} queries")
    same = (fc["patient_id"].to_numpy() == queries["patient_id"].to_numpy()).all() and (
        fc["analyte_code"].to_numpy() == queries["analyte_code"].to_numpy()).all()
    if not same:
        raise ValueError(f"{name}: forecasts are not in the queries' order")


def check_leakage(
    forecaster: Forecaster,
    history: pd.DataFrame,
    queries: pd.DataFrame,
    reference: pd.DataFrame,
    n: int = 40,
    seed: int = 0,
) -> int:
    """Assert that forecasts depend only on results strictly before each query's ``at``.

    Samples one query for each of up to ``n`` patients, then predicts them twice more:
    (a) with every result of that patient at or after ``at`` perturbed (values scaled by a
    random factor, plus a wild extra result of the query's analyte exactly at ``at``), and
    (b) from the results strictly before ``at`` only. Both must reproduce ``reference`` (the
    forecasts made from the full history). Returns the number of queries checked.
    """
    rng = np.random.default_rng(seed)
    ok = (reference["status"] == "ok").to_numpy()
    cand = queries.loc[ok].reset_index().rename(columns={"index": "_row"})
    if cand.empty:
        return 0
    cand = cand.sample(frac=1.0, random_state=seed).drop_duplicates("patient_id").head(n)
    cand = cand.sort_values("_row")
    q = cand[list(queries.columns)].reset_index(drop=True)
    ref = reference.iloc[cand["_row"].to_numpy()].reset_index(drop=True)

    h = history[history["patient_id"].isin(set(q["patient_id"]))]
    at = h["patient_id"].map(dict(zip(q["patient_id"], q["at"])))
    future = (h["collected_at"] >= at).to_numpy()

    perturbed = h.copy()
    perturbed.loc[future, "value"] = perturbed.loc[future, "value"] * rng.uniform(0.3, 3.0, future.sum()) + 1.0
    extra = q.rename(columns={"at": "collected_at"}).copy()
    extra["value"] = 1e4
    extra["censor"] = np.int8(0)
    template = h.drop_duplicates("patient_id").set_index("patient_id")
    if "unit_canonical" in h.columns:  # the extra result is of the query's analyte: its unit
        units = h.drop_duplicates("analyte_code").set_index("analyte_code")["unit_canonical"]
        extra["unit_canonical"] = extra["analyte_code"].map(units)
    for c in h.columns:
        if c not in extra.columns:
            extra[c] = extra["patient_id"].map(template[c])
    perturbed = pd.concat([perturbed, extra[h.columns]], ignore_index=True)
    past_only = h.loc[~future]

    for label, hist in (("future results perturbed", perturbed), ("only past results given", past_only)):
        fc = forecaster.predict(hist, q)
        _check_forecasts(fc, q, forecaster.name)
        a = fc[list(QUANTILE_COLUMNS)].to_numpy(float)
        b = ref[list(QUANTILE_COLUMNS)].to_numpy(float)
        # float32 networks differ in the last bits when the batch (hence the padding) differs; a
        # real leak (future values scaled x0.3..3 plus a wild 1e4 result) moves forecasts far more.
        bad = ~np.isclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise LeakageError(
                f"{forecaster.name}: forecasts changed with {label} for {int(bad.sum())} of {len(q)} queries "
                f"(first: patient {q['patient_id'][i]}, {q['analyte_code'][i]} at {q['at'][i]}: "
                f"{b[i].round(4).tolist()} -> {a[i].round(4).tolist()})"
            )
    return len(q)


def evaluate(
    forecaster: Forecaster,
    task: Task,
    folds: list[Fold],
    fallback_factory=None,
    leakage_check: int = 40,
    seed: int = 0,
) -> EvaluationResult:
    """Fit on each fold's training patients, forecast its test patients' targets, score pooled.

    For each fold the forecaster is fitted on the training patients' results only; the test
    patients' full history is passed once with all their targets as queries (forecasters
    must themselves look only strictly before each ``at``, which :func:`check_leakage`
    verifies on a sample of ``leakage_check`` queries per fold; 0 turns it off). Targets with
    fewer than ``MIN_HISTORY`` prior results, and failed forecasts, get the last-value
    fallback (module doc). ``fallback_factory`` builds the fallback forecaster (default:
    ``LastValue(min_history=1)``).
    """
    if fallback_factory is None:
        from model.baselines import LastValue

        def fallback_factory():
            return LastValue(min_history=1)

    t0 = time.perf_counter()
    parts, fit_s, predict_s, checked = [], 0.0, 0.0, 0
    n_fallback_rule, n_failed, failed_reasons = 0, 0, {}
    qcols = list(QUANTILE_COLUMNS)
    for fold in folds:
        train_h = task.history[task.history["patient_id"].isin(set(fold.train_patients))]
        test_set = set(fold.test_patients)
        test_h = task.history[task.history["patient_id"].isin(test_set)]
        tg = task.targets[task.targets["patient_id"].isin(test_set)].reset_index(drop=True)
        if tg.empty:
            continue
        queries = tg[["patient_id", "analyte_code", "at"]]

        t1 = time.perf_counter()
        forecaster.fit(train_h)
        t2 = time.perf_counter()
        fc = forecaster.predict(test_h, queries)
        t3 = time.perf_counter()
        fit_s += t2 - t1
        predict_s += t3 - t2
        _check_forecasts(fc, queries, forecaster.name)
        if leakage_check:
            checked += check_leakage(forecaster, test_h, queries, fc.reset_index(drop=True), n=leakage_check, seed=seed)

        fb = fallback_factory()
        fb.fit(train_h)
        fb_fc = fb.predict(test_h, queries)
        _check_forecasts(fb_fc, queries, "fallback")

        out = tg.copy()
        vals = fc[qcols].to_numpy(float).copy()
        status = fc["status"].to_numpy(object).copy()
        rule = (tg["n_prior"] < MIN_HISTORY).to_numpy()
        failed = ~rule & ((status != "ok") | ~np.isfinite(vals).all(axis=1))
        for s in status[failed]:
            failed_reasons[str(s)] = failed_reasons.get(str(s), 0) + 1
        use_fb = rule | failed
        vals[use_fb] = fb_fc[qcols].to_numpy(float)[use_fb]
        vals = np.sort(vals, axis=1)  # monotone (a no-op for a well-behaved forecaster)
        out[qcols] = vals
        out["status"] = status
        out["source"] = np.where(rule, "fallback: fewer than MIN_HISTORY prior", np.where(failed, "fallback: failed", "method"))
        out["fold"] = fold.name
        parts.append(out)
        n_fallback_rule += int(rule.sum())
        n_failed += int(failed.sum())

    preds = pd.concat(parts, ignore_index=True)
    per_analyte, overall, subgroups, calibration = score(preds, task)
    info = {
        "folds": len(folds),
        "fit_s": round(fit_s, 2),
        "predict_s": round(predict_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "leakage_checked_queries": checked,
        "fallback_fewer_than_min_history": n_fallback_rule,
        "failed_forecasts": n_failed,
        "failed_reasons": failed_reasons,
    }
    overall = {**overall, "fallback_fewer_than_min_history": n_fallback_rule, "failed_forecasts": n_failed}
    return EvaluationResult(forecaster.name, preds, per_analyte, overall, subgroups, calibration, info)


# ===========================================================================================
# Metrics
# ===========================================================================================
def _mdape(y: np.ndarray, p: np.ndarray) -> float:
    """Median absolute percentage error (%) over targets with y != 0."""
    nz = y != 0
    return float(np.median(np.abs(y[nz] - p[nz]) / np.abs(y[nz])) * 100) if nz.any() else float("nan")


def _pinball(y: np.ndarray, q: np.ndarray) -> float:
    """Mean pinball loss averaged over the 7 quantiles (q: n x 7)."""
    return float(np.mean([mean_pinball_loss(y, q[:, j], alpha=a) for j, a in enumerate(QUANTILES)]))


def _group_metrics(d: pd.DataFrame) -> dict:
    """Metrics of a set of targets from any analytes (errors already normalised per analyte)."""
    return {
        "n": int(len(d)),
        "nmae": float(d["_ne"].mean()),
        "last_value_nmae": float(d["_ne_lv"].mean()),
        "npinball": float(d["_npb"].mean()),
        "coverage80": float(d["_in80"].mean()),
        "coverage90": float(d["_in90"].mean()),
        "nwidth80": float(d["_nw80"].mean()),
    }


def score(predictions: pd.DataFrame, task: Task):
    """Per-analyte, overall, subgroup and calibration tables of pooled out-of-fold forecasts.

    ``predictions`` holds the task's target columns plus ``q05..q95``. Returns
    ``(per_analyte, overall, subgroups, calibration)``.
    """
    p = predictions
    rng = p["analyte_code"].map(task.ranges["range"]).to_numpy(float)
    y = p["y"].to_numpy(float)
    q = p[list(QUANTILE_COLUMNS)].to_numpy(float)
    med = q[:, 3]
    lv = p["last_value"].to_numpy(float)
    pb = np.mean([np.maximum(a * (y - q[:, j]), (a - 1) * (y - q[:, j])) for j, a in enumerate(QUANTILES)], axis=0)
    p = p.assign(
        _ne=np.abs(y - med) / rng,
        _ne_lv=np.abs(y - lv) / rng,
        _npb=pb / rng,
        _in80=(q[:, 1] <= y) & (y <= q[:, 5]),
        _in90=(q[:, 0] <= y) & (y <= q[:, 6]),
        _nw80=(q[:, 5] - q[:, 1]) / rng,
    )

    rows = []
    for a in task.analytes:
        m = (p["analyte_code"] == a).to_numpy()
        if not m.any():
            continue
        ya, qa, lva = y[m], q[m], lv[m]
        r = task.ranges.loc[a]
        mae = mean_absolute_error(ya, qa[:, 3])
        lv_mae = mean_absolute_error(ya, lva)
        inside = (ya >= r["p1"]) & (ya <= r["p99"])  # LabTOP's variant: targets outside [p1, p99] dropped
        rows.append({
            "analyte_code": a,
            "n": int(m.sum()),
            "p1": float(r["p1"]),
            "p99": float(r["p99"]),
            "mae": float(mae),
            "nmae": float(mae / r["range"]),
            "nmae_trimmed": float(np.mean(np.abs(ya[inside] - qa[inside, 3])) / r["range"]),
            "mdape": _mdape(ya, qa[:, 3]),
            "pinball": _pinball(ya, qa),
            "coverage80": float(np.mean((qa[:, 1] <= ya) & (ya <= qa[:, 5]))),
            "coverage90": float(np.mean((qa[:, 0] <= ya) & (ya <= qa[:, 6]))),
            "width80": float(np.mean(qa[:, 5] - qa[:, 1])),
            "width90": float(np.mean(qa[:, 6] - qa[:, 0])),
            "last_value_mae": float(lv_mae),
            "last_value_nmae": float(lv_mae / r["range"]),
            "beats_last_value": bool(mae < lv_mae),
        })
    per = pd.DataFrame(rows).set_index("analyte_code")

    w = per["n"] / per["n"].sum()
    overall = {
        "n_targets": int(per["n"].sum()),
        "n_analytes": int(len(per)),
        "nmae": float((w * per["nmae"]).sum()),
        "nmae_trimmed": float((w * per["nmae_trimmed"]).sum()),
        "last_value_nmae": float((w * per["last_value_nmae"]).sum()),
        "mdape": float((w * per["mdape"]).sum()),
        "npinball": float(p["_npb"].mean()),
        "coverage80": float(p["_in80"].mean()),
        "coverage90": float(p["_in90"].mean()),
        "nwidth80": float(p["_nw80"].mean()),
        "wins_vs_last_value": int(per["beats_last_value"].sum()),
    }

    subgroups = {}
    for col in SUBGROUPS:
        levels = p[col].cat.categories if isinstance(p[col].dtype, pd.CategoricalDtype) else sorted(p[col].unique())
        recs = []
        for lev in levels:
            d = p[p[col] == lev]
            if len(d):
                recs.append({col: str(lev), **_group_metrics(d)})
        subgroups[col] = pd.DataFrame(recs).set_index(col)

    cal = [{"kind": "quantile", "nominal": a, "empirical": float(np.mean(y <= q[:, j]))} for j, a in enumerate(QUANTILES)]
    for label, (lo, hi, nominal) in INTERVALS.items():
        j, k = QUANTILE_COLUMNS.index(lo), QUANTILE_COLUMNS.index(hi)
        cal.append({"kind": f"interval {label} ({lo}..{hi})", "nominal": nominal,
                    "empirical": float(np.mean((q[:, j] <= y) & (y <= q[:, k])))})
    return per, overall, subgroups, pd.DataFrame(cal)


# ===========================================================================================
# Comparison and model card
# ===========================================================================================
def _primary_name(names: list[str], meta: dict) -> str | None:
    if meta.get("primary_method") in names:
        return meta["primary_method"]
    for n in names:
        if "full" in n.lower():
            return n
    return None


def compare(results: dict[str, EvaluationResult], meta: dict | None = None) -> dict:
    """Which method wins, computed from the numbers; and the card's plain statement."""
    meta = meta or {}
    names = list(results)
    nmae = {n: results[n].overall["nmae"] for n in names}
    ranking = sorted(names, key=lambda n: (nmae[n], n))
    winner = ranking[0]
    wins = {n: results[n].overall["wins_vs_last_value"] for n in names}
    n_an = results[winner].overall["n_analytes"]
    primary = _primary_name(names, meta)

    def fmt(n):
        return f"{n} ({nmae[n]:.4f})"

    lines = []
    if primary is None:
        lines.append("Full fine-tuning was not evaluated in this card.")
    elif winner == primary:
        others = [n for n in ranking if n != primary]
        lines.append(
            f"Full fine-tuning beats {', '.join(fmt(n) for n in others) if others else 'no other method (it is the only one)'}: "
            f"count-weighted NMAE {nmae[primary]:.4f}."
        )
    else:
        better = [n for n in ranking if nmae[n] < nmae[primary]]
        lines.append(
            f"Full fine-tuning does not beat {', '.join(fmt(n) for n in better)}: "
            f"its count-weighted NMAE is {nmae[primary]:.4f}."
        )
    runner = ranking[1] if len(ranking) > 1 else None
    lines.append(
        f"Winner: {winner}, count-weighted NMAE {nmae[winner]:.4f}"
        + (f" (next: {fmt(runner)})" if runner else "")
        + f"; it beats last value on {wins[winner]} of {n_an} analytes."
    )
    return {"winner": winner, "ranking": ranking, "nmae": nmae, "wins_vs_last_value": wins,
            "primary": primary, "statement": " ".join(lines)}


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records", double_precision=6))


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(out)


MODEL_CARD_FILE = "README.md"  # the Hugging Face convention: the model folder's README is its card
CARD_LICENSE = "odbl"  # the most restrictive licence among the corpus and MIMIC-IV demo data (see the card text)


def training_warnings(meta: dict) -> list[str]:
    """Every training warning in ``meta['training_reports']`` (method -> one report per fold), as
    '<method>, fold <i>: <warning>' lines: undertrained runs, budget overruns, models worse than
    their starting checkpoint."""
    out = []
    for method, reports in (meta.get("training_reports") or {}).items():
        for i, r in enumerate(reports or [], start=1):
            for w in (r or {}).get("warnings") or []:
                out.append(f"{method}, fold {i}: {w}")
    return out


def card_metadata(results: dict[str, EvaluationResult], meta: dict):
    """The card's Hugging Face metadata (``huggingface_hub.ModelCardData``): licence, datasets,
    metrics and a ``model-index`` with the results measured in this run (the primary method,
    and the same targets' last-value and best-baseline NMAE for context)."""
    from huggingface_hub import EvalResult, ModelCardData

    cmp = compare(results, meta)
    primary = cmp["primary"] or cmp["winner"]
    dataset = str(meta.get("dataset", "unknown"))
    dataset_id = str(meta.get("dataset_id") or re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "unknown")
    o = results[primary].overall
    common = dict(task_type="time-series-forecasting", task_name="Laboratory value forecasting (quantiles)",
                  dataset_type=dataset_id, dataset_name=dataset, dataset_split=str(meta.get("split", "")) or None)
    evals = [
        EvalResult(metric_type="nmae", metric_name="count-weighted NMAE", metric_value=round(o["nmae"], 5), **common),
        EvalResult(metric_type="nmae_ratio_to_last_value", metric_name="NMAE / last value's NMAE (same targets)",
                   metric_value=round(o["nmae"] / o["last_value_nmae"], 4) if o.get("last_value_nmae") else None,
                   **common),
        EvalResult(metric_type="coverage", metric_name="80% interval coverage", metric_value=round(o["coverage80"], 4),
                   **common),
        EvalResult(metric_type="wins_vs_last_value", metric_name="analytes better than last value",
                   metric_value=int(o["wins_vs_last_value"]), **common),
    ]
    for other in ("last value", "LightGBM"):
        if other in results and other != primary:
            evals.append(EvalResult(metric_type="nmae", metric_name=f"{other} NMAE (baseline, same targets)",
                                    metric_value=round(results[other].overall["nmae"], 5), **common))
    evals = [e for e in evals if e.metric_value is not None]
    datasets = list(meta.get("datasets") or [dataset_id])
    return ModelCardData(
        model_name=str(meta.get("model_name", f"labtrend {primary}")), license=CARD_LICENSE,
        library_name="transformers", pipeline_tag="time-series-forecasting", datasets=datasets,
        metrics=["mae", "nmae", "pinball", "coverage"],
        tags=["labtrend", "laboratory", "clinical-decision-support", "time-series", "quantile-regression",
              "conformal-prediction"],
        eval_results=evals,
    )


def write_model_card(results: dict[str, EvaluationResult], out_dir: str | Path, meta: dict | None = None) -> dict:
    """Write ``model_card.json`` and the card ``README.md`` (Hugging Face metadata header) into ``out_dir``.

    ``meta`` describes the run: ``dataset``, ``split``, ``task`` (``Task.describe()``),
    ``analyte_names`` (code -> name), optional ``primary_method`` (the full fine-tuning
    result's name; by default the first name containing 'full'), ``training_reports``
    (their ``warnings`` are shown first, loudly), and anything else worth recording (it is
    copied into the JSON). Returns the JSON dict.
    """
    meta = dict(meta or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmp = compare(results, meta)
    names = cmp["ranking"]
    an_names = meta.get("analyte_names", {})
    warnings = training_warnings(meta)

    card = {
        "statement": cmp["statement"],
        "winner": cmp["winner"],
        "ranking": names,
        "training_warnings": warnings,
        "meta": meta,
        "reference_figures": REFERENCE_FIGURES,
        "methods": {n: results[n].to_dict() for n in names},
    }
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2, default=str), encoding="utf-8")

    md = ["# LabTrend forecasting — model card", "", f"**{cmp['statement']}**", ""]
    if warnings:
        md += ["## ⚠ Training warnings", "", *[f"- **{w}**" for w in warnings], ""]
    md += ["## Model", "",
           "A transformer over irregular laboratory histories (one token per prior result: analyte, value "
           "normalised per analyte, censor flag, days before the forecast time; one patient token with age and sex), "
           "pretrained on an open laboratory corpus and then **fully fine-tuned** on the site's patients (every "
           "parameter trains, with L2-SP and replay against forgetting). It forecasts the quantiles 0.05 ... 0.95 "
           "of an analyte's next value at a given time, with split-conformal intervals calibrated per analyte on "
           "held-out patients (forecasts from a single prior result are calibrated apart).", "",
           "**Intended use:** decision support for clinicians browsing a patient's laboratory timeline, reviewed by "
           "experts; never a diagnosis, never a substitute for the measured result. **Out of scope:** paediatric "
           "reference populations not in the training data, units other than the canonical ones the model was "
           "trained in (refused), analytes outside its vocabulary (no forecast).", "",
           "**Licence:** the weights derive from the open datasets named below (ODbL 1.0, ODC-BY 1.0, public "
           "domain); ODbL's share-alike terms are the most restrictive, hence `odbl`. Keep each dataset's "
           "attribution with the model.", ""]
    md += ["## Data and split", ""]
    for key in ("dataset", "split", "command", "date"):
        if key in meta:
            md.append(f"- {key.capitalize()}: {meta[key]}")
    task = meta.get("task", {})
    if task:
        md.append(f"- Task: {task.get('n_targets')} targets of {task.get('n_analytes')} analytes, "
                  f"{task.get('n_patients')} patients; history = every result of the patient collected strictly "
                  f"before the target time; duplicate (patient, analyte, time) values averaged "
                  f"({task.get('duplicates_averaged', 0)} rows merged).")
        md.append(f"- Targets with a single prior result of their analyte ({task.get('targets_with_one_prior')}) are "
                  f"scored like the others: the product forecasts from MIN_HISTORY = {MIN_HISTORY} prior result "
                  "(an interval calibrated on single-result forecasts), and so do the baselines.")
    md.append("- NMAE = MAE / (p99 - p1 of the analyte's targets); overall figures are count-weighted over analytes. "
              "`nmae_trimmed` drops targets outside [p1, p99] first (LabTOP's metric).")
    md.append("")

    md += ["## Overall", ""]
    ov = pd.DataFrame([{"method": n, **{k: results[n].overall.get(k, float("nan")) for k in (
        "n_targets", "nmae", "nmae_trimmed", "mdape", "npinball", "coverage80", "coverage90", "nwidth80",
        "wins_vs_last_value", "failed_forecasts")}} for n in names])
    md += [_md_table(ov), ""]
    ref = REFERENCE_FIGURES["count_weighted_nmae"]
    md += [f"Reference figures from the issue (measured there on {REFERENCE_FIGURES['dataset']}, not by this run): "
           + ", ".join(f"{k} {v:.4f}" for k, v in ref.items()) + ".", ""]
    tg = REFERENCE_FIGURES["targets_for_full_fine_tuning"]
    md += [f"Targets for full fine-tuning (issue): NMAE <= {tg['nmae_max']} (aim {tg['nmae_aim']}), better than last "
           f"value on >= {tg['wins_vs_last_value_min']} of 20 analytes, 80% coverage in "
           f"{tg['coverage80_range'][0]}-{tg['coverage80_range'][1]}.", ""]

    md += ["## Calibration (nominal vs empirical)", ""]
    cal = results[names[0]].calibration[["kind", "nominal"]].copy()
    for n in names:
        cal[n] = results[n].calibration["empirical"].to_numpy()
    md += [_md_table(cal), ""]

    md += ["## NMAE per analyte", ""]
    first = results[names[0]].per_analyte
    tab = pd.DataFrame({"analyte": [f"{a} {an_names.get(a, '')}".strip() for a in first.index], "n": first["n"].to_numpy()})
    for n in names:
        tab[n] = results[n].per_analyte["nmae"].reindex(first.index).to_numpy()
    tab["best"] = [min(names, key=lambda n, a=a: results[n].per_analyte.loc[a, "nmae"]) for a in first.index]
    md += [_md_table(tab), ""]

    for n in names:
        per = results[n].per_analyte.reset_index()
        per.insert(1, "name", [an_names.get(a, "") for a in per["analyte_code"]])
        md += [f"### {n}", "", _md_table(per[["analyte_code", "name", "n", "mae", "nmae", "mdape", "pinball",
                                                 "coverage80", "coverage90", "width80", "width90",
                                                 "last_value_nmae", "beats_last_value"]]), ""]

    md += ["## Subgroups (count-weighted NMAE; last value's in the same subgroup for comparison)", ""]
    for col in SUBGROUPS:
        base = results[names[0]].subgroups[col]
        t = pd.DataFrame({col: base.index, "n": base["n"].to_numpy(), "last value (reference)": base["last_value_nmae"].to_numpy()})
        for n in names:
            t[n] = results[n].subgroups[col]["nmae"].reindex(base.index).to_numpy()
        for n in names:
            t[f"{n} cov80"] = results[n].subgroups[col]["coverage80"].reindex(base.index).to_numpy()
        md += [f"### By {col}", "", _md_table(t), ""]

    md += ["## Run details", ""]
    for n in names:
        i = results[n].info
        md.append(f"- {n}: fit {i.get('fit_s')} s, predict {i.get('predict_s')} s, leakage check on "
                  f"{i.get('leakage_checked_queries')} queries passed, {i.get('failed_forecasts')} failed forecasts.")
    md.append("")
    from huggingface_hub import ModelCard

    data = card_metadata(results, meta)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(md)).save(out_dir / MODEL_CARD_FILE)
    return card


# Corpus sources -> (Hugging Face style dataset id, licence, citation) for the checkpoint card.
CORPUS_DATASETS = {
    "physionet2012": ("physionet-challenge-2012", "ODC-BY-1.0",
                      "Silva I et al. Predicting In-Hospital Mortality of ICU Patients: The PhysioNet/Computing in "
                      "Cardiology Challenge 2012. Comput Cardiol 2012;39:245-248"),
    "eicu": ("eicu-crd-demo", "ODbL-1.0", "Pollard TJ et al. The eICU Collaborative Research Database. Sci Data "
                                          "2018;5:180178 (demo v2.0.1, YAIB/ricu hourly processing)"),
    "nhanes": ("nhanes-2017-2020", "public domain", "CDC/NCHS National Health and Nutrition Examination Survey "
                                                    "2017-March 2020 pre-pandemic files"),
    "synthetic": ("labtrend-synthetic", "Apache-2.0", "LabTrend's own simulated cohort (model/synthetic.py)"),
    "physionet2019": ("physionet-challenge-2019", "PhysioNet open access, attribution",
                      "Reyna MA et al. Early Prediction of Sepsis From Clinical Data: The PhysioNet/Computing in "
                      "Cardiology Challenge 2019. Crit Care Med 2020;48(2):210-217"),
    "physionet2012c": ("physionet-challenge-2012", "ODC-BY-1.0",
                       "Silva I et al. Comput Cardiol 2012;39:245-248 (set C)"),
    "mimic3": ("mimic-iii-demo", "ODbL-1.0", "Johnson AEW et al. MIMIC-III, a freely accessible critical care "
                                             "database. Sci Data 2016;3:160035 (demo 1.4)"),
    "cdisc": ("cdisc-pilot01", "public example data, attribution to CDISC and pharmaverse",
              "CDISC SDTM/ADaM pilot submission CDISCPILOT01, LB domain (pharmaversesdtm)"),
}


def write_checkpoint_card(path: str | Path) -> Path:
    """Write ``README.md`` (the Hugging Face model card) of a pretraining checkpoint from its
    ``pretraining.json``: corpus sources and counts, size, steps, the held-out corpus patients'
    NMAE against last value on the same rows, interval calibration, the training warnings and
    the report's ``notes`` (a list of sentences, when present). Returns the card's path.
    Sources this table does not know are listed with their own key."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    path = Path(path)
    report = json.loads((path / "pretraining.json").read_text())
    config = report.get("config", {})
    corpus = {k: v for k, v in (report.get("corpus") or {}).items() if isinstance(v, dict)}
    val = report.get("val") or {}
    datasets = [CORPUS_DATASETS.get(k, (k,))[0] for k in corpus]
    common = dict(task_type="time-series-forecasting", task_name="Next laboratory value (quantiles)",
                  dataset_type="labtrend-pretraining-corpus", dataset_name="held-out corpus patients",
                  dataset_split="pretraining validation")
    evals = []
    if val.get("nmae") is not None:
        evals.append(EvalResult(metric_type="nmae", metric_name="NMAE", metric_value=round(val["nmae"], 5), **common))
        if val.get("nmae_last_value"):
            evals.append(EvalResult(metric_type="nmae", metric_name="last value NMAE (same rows)",
                                    metric_value=round(val["nmae_last_value"], 5), **common))
            evals.append(EvalResult(metric_type="nmae_ratio_to_last_value", metric_name="NMAE / last value's",
                                    metric_value=round(val["nmae"] / val["nmae_last_value"], 4), **common))
    if val.get("coverage80") is not None:
        evals.append(EvalResult(metric_type="coverage", metric_name="80% coverage before calibration",
                                metric_value=round(val["coverage80"], 4), **common))
    zero_shot = [z for z in report.get("zero_shot") or [] if z.get("nmae") is not None]
    for z in zero_shot:  # sources the corpus did not contain (benchmarks/heldout_sources.py zero-shot)
        where = dict(task_type="time-series-forecasting", task_name="Next laboratory value (quantiles)",
                     dataset_type=CORPUS_DATASETS.get(z["source"], (z["source"],))[0],
                     dataset_name=f"{z['source']} (never in the pretraining corpus)", dataset_split="zero-shot")
        evals.append(EvalResult(metric_type="nmae", metric_name="NMAE", metric_value=round(z["nmae"], 5), **where))
        evals.append(EvalResult(metric_type="nmae_ratio_to_last_value", metric_name="NMAE / last value's",
                                metric_value=round(z["nmae"] / z["last_value_nmae"], 4), **where))
    data = ModelCardData(model_name=f"labtrend-{path.name}", license=CARD_LICENSE,
                         library_name="transformers", pipeline_tag="time-series-forecasting", datasets=datasets,
                         metrics=["nmae", "pinball", "coverage"],
                         tags=["labtrend", "laboratory", "time-series", "quantile-regression", "pretrained"],
                         eval_results=evals or None)
    n_par = config.get("d_model")
    md = [f"# LabTrend pretrained checkpoint `{path.name}`", "",
          "The starting point of every site's model: a transformer over irregular laboratory histories "
          "pretrained with masked-value and next-value (quantile) objectives on an open corpus. It is meant to be "
          "**fully fine-tuned** on a site's patients (`labtrend train`); used as it is (`ForecastPipeline."
          "from_pretrained`) it forecasts zero-shot with intervals calibrated on its held-out corpus patients. "
          "Decision support for clinicians, never a diagnosis.", ""]
    if report.get("warnings"):
        md += ["## ⚠ Training warnings", "", *[f"- **{w}**" for w in report["warnings"]], ""]
    if report.get("notes"):  # what the people who shipped it must say about it (pretraining.json 'notes')
        md += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    md += ["## Architecture", "",
           f"- d_model {n_par}, {config.get('n_layers')} encoder layers, {config.get('n_decoder_layers')} query "
           f"decoder layers, {config.get('n_heads')} heads, up to {config.get('max_events')} events per forecast; "
           f"{config.get('n_analytes', 3) - 3} analytes in the vocabulary.",
           f"- Event context (recency rank, change and gap from the analyte's previous result): "
           f"{bool(config.get('event_context'))}; query context (counts in the last day/week, time since any "
           f"result, last gap): {bool(config.get('query_context'))}; input soft limit: "
           f"{config.get('input_soft_limit', 0.0)}.", "",
           "## Training data", "", "| source | rows | patients | licence | citation |", "|---|---|---|---|---|"]
    for key, rep in corpus.items():
        ds = CORPUS_DATASETS.get(key, (key, "see PROVENANCE.md", ""))
        md.append(f"| {key} | {rep.get('rows_loaded', '')} | {rep.get('patients', '')} | {ds[1]} | {ds[2]} |")
    md += ["", "Values outside the catalogue's cited plausible limits were dropped (counts in `pretraining.json`).",
           "", "## Training", "",
           f"- {report.get('steps')} optimizer steps (best {report.get('best_step')}, stop: {report.get('stop_reason')}), "
           f"{report.get('seconds')} s on {report.get('device', 'cpu')}; {report.get('patients_train')} training "
           f"patients, {len(report.get('validation_patients') or [])} held out.", "",
           "## Evaluation (held-out corpus patients)", ""]
    if val:
        md.append(f"- NMAE {val.get('nmae', float('nan')):.4f} vs last value {val.get('nmae_last_value', float('nan')):.4f} "
                  f"on the same {val.get('n_targets')} targets; 80% coverage before calibration "
                  f"{val.get('coverage80', float('nan')):.3f}.")
    cal = report.get("calibration") or {}
    if cal.get("crossfit_coverage"):
        cov = cal["crossfit_coverage"]
        md.append(f"- Conformal calibration on {cal.get('n_points')} held-out points (`calibration.json`); cross-fitted "
                  f"coverage " + ", ".join(f"{float(k):.0%}: {v:.3f}" for k, v in cov.items()) + ".")
    if cal.get("crossfit_coverage_single"):
        cov = cal["crossfit_coverage_single"]
        md.append(f"- Forecasts from a single prior result are calibrated apart ({cal.get('crossfit_points_single')} "
                  f"points); their cross-fitted coverage " + ", ".join(f"{float(k):.0%}: {v:.3f}" for k, v in cov.items())
                  + ".")
    if zero_shot:
        md += ["", "## Zero-shot on sources it never saw", "",
               "Each cohort scored as the model card's task (NMAE = MAE / (p99 - p1) per analyte, count-weighted, "
               "every target scored for the model and for the last value; the 20 most frequent analytes), with no "
               "patient of its source in the pretraining corpus: the honest test of pretraining on other data.", "",
               "| cohort | patients | targets | NMAE | last value | ratio | analytes better than last value | "
               "80% coverage |", "|---|---|---|---|---|---|---|---|"]
        for z in zero_shot:
            md.append(f"| {z['source']} | {z.get('patients', '')} | {z.get('n_targets', '')} | {z['nmae']:.4f} | "
                      f"{z['last_value_nmae']:.4f} | {z['nmae'] / z['last_value_nmae']:.3f} | "
                      f"{z.get('wins_vs_last_value', '')} of {z.get('n_analytes', '')} | {z.get('coverage80', float('nan')):.3f} |")
        md += ["", "Command: `python benchmarks/heldout_sources.py zero-shot --checkpoint <this folder> --source <key>` "
               "(`benchmarks/results/zero_shot_<key>_<folder>.json`)."]
    md += ["", "## Licence and attribution", "",
           "The weights derive from the datasets above; ODbL's share-alike terms are the most restrictive, hence "
           "`odbl`. Keep each dataset's attribution with the checkpoint.", ""]
    out = path / MODEL_CARD_FILE
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(md)).save(out)
    return out
