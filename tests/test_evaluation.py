"""The evaluation task, metrics, splits, baselines' leakage and the model card (fast, CPU, no store)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from model import QUANTILE_COLUMNS, QUANTILES
from model.baselines import HistoricalMean, LastValue, LightGBMForecaster, LinearTrend
from model.evaluation import (
    EvaluationResult,
    LeakageError,
    Task,
    average_duplicates,
    build_task,
    check_leakage,
    compare,
    evaluate,
    grouped_folds,
    holdout_fold,
    not_enough_status,
    score,
    write_model_card,
)

D0 = pd.Timestamp("2024-01-01 08:00")


def _day(d: float) -> pd.Timestamp:
    return D0 + pd.Timedelta(days=d)


def _cohort(rows) -> pd.DataFrame:
    """(patient, day, analyte, value, sex, age) tuples -> a cohort frame (history contract)."""
    df = pd.DataFrame(rows, columns=["patient_id", "day", "analyte_code", "value", "sex", "age_years"])
    df["collected_at"] = df["day"].map(_day)
    df["censor"] = np.int8(0)
    df["unit_canonical"] = "mmol/L"
    return df[["patient_id", "collected_at", "analyte_code", "value", "censor", "unit_canonical", "sex", "age_years"]]


def _synthetic_cohort(n_patients=30, n_visits=14, seed=1) -> pd.DataFrame:
    """Panels of three analytes drawn at the same times (so same-time results exist), AR(1) values."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        pid = f"P{i:02d}"
        sex = "F" if i % 2 else "M"
        age = 30 + 2.0 * i
        days = np.cumsum(rng.uniform(0.2, 20, n_visits))
        level = {"NA": 140 + rng.normal(0, 3), "K": 4.2 + rng.normal(0, 0.3), "CR": 1.0 * np.exp(rng.normal(0, 0.4))}
        for d in days:
            for code, sd in (("NA", 2.0), ("K", 0.3), ("CR", 0.1)):
                level[code] = level[code] + rng.normal(0, sd)
                if code == "CR" and rng.random() < 0.3:
                    continue  # not every panel has creatinine
                rows.append((pid, float(d), code, round(float(abs(level[code])), 2), sex, age + d / 365.25))
    return _cohort(rows)


# -- task -------------------------------------------------------------------------------------
@pytest.fixture
def tiny():
    rows = [
        ("A", 0, "X", 10.0, "F", 50.0),
        ("A", 0, "X", 12.0, "F", 50.0),  # duplicate (patient, analyte, time): averaged to 11
        ("A", 0, "Y", 5.0, "F", 50.0),
        ("A", 1, "X", 13.0, "F", 50.0),
        ("A", 2, "Y", 6.0, "F", 50.0),
        ("A", 3, "X", 15.0, "F", 50.0),
        ("A", 3, "Y", 7.0, "F", 50.0),  # same time as a target of X: never in X's history
        ("B", 0, "X", 20.0, "M", 85.0),
        ("B", 1, "Z", 7.0, "M", 85.0),
        ("B", 5, "X", 22.0, "M", 85.0),
    ]
    return _cohort(rows)


def test_task_targets_exact(tiny):
    task = build_task(tiny, n_analytes=2)
    assert task.analytes == ["X", "Y"]  # 5 and 3 results; Z has 1
    t = task.targets
    got = {(r.patient_id, r.analyte_code, (r.at - D0).days): (r.y, r.n_prior, r.last_value) for r in t.itertuples()}
    assert got == {
        ("A", "X", 1): (13.0, 1, 11.0),  # last value = the average of the two duplicates
        ("A", "X", 3): (15.0, 2, 13.0),
        ("A", "Y", 2): (6.0, 1, 5.0),
        ("A", "Y", 3): (7.0, 2, 6.0),
        ("B", "X", 5): (22.0, 1, 20.0),
    }
    assert task.info["duplicates_averaged"] == 1
    dup = task.history[(task.history["patient_id"] == "A") & (task.history["collected_at"] == D0)
                       & (task.history["analyte_code"] == "X")]
    assert dup["value"].tolist() == [11.0]
    a = t.set_index(["patient_id", "analyte_code", "at"])
    assert a.loc[("A", "X", _day(1)), "sex"] == "F" and a.loc[("A", "X", _day(1)), "age_band"] == "40-64"
    assert a.loc[("B", "X", _day(5)), "sex"] == "M" and a.loc[("B", "X", _day(5)), "age_band"] == "80+"
    assert a.loc[("A", "X", _day(3)), "prior_band"] == "2-4" and a.loc[("A", "X", _day(1)), "prior_band"] == "1"


def test_task_histories_strictly_before_and_all_analytes(tiny):
    task = build_task(tiny, n_analytes=2)
    h = task.history_before("A", _day(3))
    got = sorted(zip(h["analyte_code"], (h["collected_at"] - D0).dt.days, h["value"]))
    # X's and Y's results before day 3, nothing at day 3 itself (neither X=15 nor Y=7).
    assert got == [("X", 0, 11.0), ("X", 1, 13.0), ("Y", 0, 5.0), ("Y", 2, 6.0)]
    hb = task.history_before("B", _day(5))
    assert set(hb["analyte_code"]) == {"X", "Z"}  # Z is not scored but is history
    assert build_task(tiny, analytes=["Y"]).targets["analyte_code"].unique().tolist() == ["Y"]
    with pytest.raises(ValueError, match="not in the cohort"):
        build_task(tiny, analytes=["Q"])


# -- metrics ----------------------------------------------------------------------------------
def _manual_task(targets: pd.DataFrame, ranges: dict[str, float]) -> Task:
    r = pd.DataFrame({"p1": 0.0, "p99": pd.Series(ranges), "range": pd.Series(ranges)})
    return Task(history=pd.DataFrame(), targets=targets, analytes=list(ranges), ranges=r)


def _targets(analyte, y, last, sex="F"):
    n = len(y)
    t = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "analyte_code": analyte, "at": D0,
                      "y": np.asarray(y, float), "n_prior": 3, "last_value": np.asarray(last, float), "sex": sex})
    t["age_band"] = pd.Categorical(["40-64"] * n, categories=("<40", "40-64", "65-79", "80+", "unknown"))
    t["prior_band"] = pd.Categorical(["2-4"] * n, categories=("1", "2-4", "5-19", "20+"))
    return t


def _with_quantiles(t, med, half=None):
    t = t.copy()
    med = np.asarray(med, float)
    for c in QUANTILE_COLUMNS:
        t[c] = med
    if half:
        for lo, hi, h in (("q10", "q90", half[0]), ("q05", "q95", half[1])):
            t[lo], t[hi] = med - h, med + h
        t["q25"], t["q75"] = med - 0.1, med + 0.1
    return t


def test_metrics_known_values():
    t = _targets("X", [10, 12, 14, 16], last=[10, 10, 10, 10])
    task = _manual_task(t, {"X": 10.0})
    per, overall, _, cal = score(_with_quantiles(t, [11, 12, 12, 20]), task)
    x = per.loc["X"]
    assert x["mae"] == pytest.approx(1.75)  # |e| = 1, 0, 2, 4
    assert x["nmae"] == pytest.approx(0.175)
    assert x["mdape"] == pytest.approx((0.1 + 2 / 14) / 2 * 100)  # median of 10%, 0%, 14.3%, 25%
    # All quantiles equal: pinball at level a = (a*2 + (1-a)*5) / 4; the 7 levels average to a = 0.5.
    assert x["pinball"] == pytest.approx(np.mean([(2 * a + 5 * (1 - a)) / 4 for a in QUANTILES]))
    assert x["pinball"] == pytest.approx(0.875)
    assert x["last_value_mae"] == pytest.approx(3.0) and bool(x["beats_last_value"])

    per, _, _, cal = score(_with_quantiles(t, [11, 12, 12, 20], half=(1.5, 2.5)), task)
    x = per.loc["X"]
    assert x["coverage80"] == pytest.approx(0.5)  # 10 in [9.5,12.5], 12 in [10.5,13.5]; 14 and 16 out
    assert x["coverage90"] == pytest.approx(0.75)  # only 16 outside [17.5, 22.5]
    assert x["width80"] == pytest.approx(3.0) and x["width90"] == pytest.approx(5.0)
    row = cal.set_index("kind").loc["interval 80% (q10..q90)"]
    assert row["nominal"] == 0.8 and row["empirical"] == pytest.approx(0.5)


def test_overall_nmae_is_count_weighted_and_subgroups():
    t = pd.concat([_targets("X", [10, 12, 14, 16], [0, 0, 0, 0]), _targets("Y", [1.0], [1.5], sex="M")],
                  ignore_index=True)
    task = _manual_task(t, {"X": 10.0, "Y": 1.0})
    preds = _with_quantiles(t, [11, 12, 12, 20, 1.5])
    per, overall, sub, _ = score(preds, task)
    assert per.loc["Y", "nmae"] == pytest.approx(0.5)
    assert overall["nmae"] == pytest.approx((4 * 0.175 + 1 * 0.5) / 5)
    assert overall["wins_vs_last_value"] == 1  # X beats its last value, Y equals it (no win)
    assert sub["sex"].loc["F", "nmae"] == pytest.approx(0.175)
    assert sub["sex"].loc["M", "nmae"] == pytest.approx(0.5)


# -- splits -----------------------------------------------------------------------------------
def test_grouped_folds_never_share_patients():
    ids = np.repeat([f"P{i}" for i in range(23)], np.arange(1, 24))  # uneven patient sizes
    folds = grouped_folds(ids, k=5, seed=7)
    assert len(folds) == 5
    tests = [set(f.test_patients) for f in folds]
    for f in folds:
        assert not set(f.train_patients) & set(f.test_patients)
        assert set(f.train_patients) | set(f.test_patients) == set(ids)
    assert set().union(*tests) == set(ids) and sum(map(len, tests)) == 23
    assert [f.test_patients for f in grouped_folds(ids, k=5, seed=7)] == [f.test_patients for f in folds]
    (h,) = holdout_fold(ids, ["P1", "P2"])
    assert h.test_patients == ("P1", "P2") and "P1" not in h.train_patients
    with pytest.raises(ValueError, match="not in the task"):
        holdout_fold(ids, ["nobody"])


# -- baselines --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth():
    task = build_task(_synthetic_cohort(), n_analytes=3)
    folds = grouped_folds(task.targets["patient_id"], k=3, seed=0)
    return task, folds


def _small_lgbm(task):
    return LightGBMForecaster(analytes=task.analytes, n_estimators=15, min_child_samples=5, num_leaves=7)


@pytest.mark.parametrize("make", [LastValue, HistoricalMean, LinearTrend, "lgbm"])
def test_baselines_do_not_look_at_or_after_at(synth, make):
    task, folds = synth
    fold = folds[0]
    f = _small_lgbm(task) if make == "lgbm" else make()
    f.fit(task.history[task.history["patient_id"].isin(fold.train_patients)])
    test_h = task.history[task.history["patient_id"].isin(fold.test_patients)]
    q = task.targets[task.targets["patient_id"].isin(fold.test_patients)][["patient_id", "analyte_code", "at"]]
    q = q.reset_index(drop=True)
    full = f.predict(test_h, q)
    assert list(full[["patient_id", "analyte_code"]].itertuples(index=False)) == list(
        q[["patient_id", "analyte_code"]].itertuples(index=False))
    ok = full["status"] == "ok"
    assert ok.sum() > 20
    assert np.isfinite(full.loc[ok, list(QUANTILE_COLUMNS)].to_numpy()).all()
    assert (np.diff(full.loc[ok, list(QUANTILE_COLUMNS)].to_numpy(), axis=1) >= 0).all()

    # Every later value changed (and a wild extra result at the query time): same forecasts.
    for i in np.flatnonzero(ok.to_numpy())[::7]:
        pid, at = q.loc[i, "patient_id"], q.loc[i, "at"]
        h2 = test_h.copy()
        later = (h2["patient_id"] == pid) & (h2["collected_at"] >= at)
        h2.loc[later, "value"] = h2.loc[later, "value"] * 3 + 50
        past = test_h[(test_h["patient_id"] == pid) & (test_h["collected_at"] < at)]
        for hist in (h2, past):
            one = f.predict(hist, q.iloc[[i]])
            np.testing.assert_allclose(one[list(QUANTILE_COLUMNS)].to_numpy()[0],
                                       full.loc[i, list(QUANTILE_COLUMNS)].to_numpy(float), rtol=1e-9)
    assert check_leakage(f, test_h, q, full, n=10) == 10


def test_not_enough_history_status(synth):
    task, folds = synth
    f = LastValue(min_history=2)  # stricter than the product's MIN_HISTORY = 1
    f.fit(task.history)
    t = task.targets[task.targets["n_prior"] == 1].head(3)
    out = f.predict(task.history, t[["patient_id", "analyte_code", "at"]])
    assert (out["status"] == not_enough_status(1, 2)).all()
    assert not_enough_status(1, 2) == "Not enough measurements to forecast (1; minimum 2)"
    assert not_enough_status(0) == "Not enough measurements to forecast (0; minimum 1)"
    assert out[list(QUANTILE_COLUMNS)].isna().all().all()
    fb = LastValue()  # the default forecasts from one prior result, like the product
    fb.fit(task.history)
    one = fb.predict(task.history, t[["patient_id", "analyte_code", "at"]])
    np.testing.assert_allclose(one["q50"], t["last_value"])  # the median is the last value


class _Peeking:
    """Uses the result at the query time if there is one: exactly the leak evaluate must catch."""

    name = "peeking"

    def fit(self, train_history):
        self.lv = LastValue()
        self.lv.fit(train_history)

    def predict(self, history, queries):
        out = self.lv.predict(history, queries)
        peek = queries.merge(average_duplicates(history), left_on=["patient_id", "analyte_code", "at"],
                             right_on=["patient_id", "analyte_code", "collected_at"], how="left")["value"]
        for c in QUANTILE_COLUMNS:
            out[c] = np.where(peek.notna() & (out["status"] == "ok"), peek, out[c])
        return out


def test_evaluate_is_fair_and_catches_leakage(synth):
    task, folds = synth
    results = {f.name: evaluate(f, task, folds) for f in (LastValue(), _small_lgbm(task))}
    lv, gbm = results["last value"], results["LightGBM"]
    assert lv.info["leakage_checked_queries"] > 0
    assert lv.overall["nmae"] == pytest.approx(lv.overall["last_value_nmae"])
    # Single-prior targets are scored with each method's own forecast (the product forecasts from one result)
    one = lv.predictions["n_prior"] == 1
    assert one.any()
    assert (gbm.predictions.loc[one, "source"] == "method").all()
    assert gbm.overall["fallback_fewer_than_min_history"] == 0
    # a method that declines them (min_history 2) gets the last-value fallback there, counted as failures
    strict = evaluate(LastValue(min_history=2), task, folds[:1])
    sone = strict.predictions["n_prior"] == 1
    assert (strict.predictions.loc[sone, "source"] == "fallback: failed").all()
    assert strict.overall["failed_forecasts"] == int(sone.sum()) > 0
    assert len(gbm.predictions) == len(task.targets)
    with pytest.raises(LeakageError, match="peeking"):
        evaluate(_Peeking(), task, folds[:1])


# -- model card -------------------------------------------------------------------------------
def _result(name, t, task, med):
    per, overall, sub, cal = score(_with_quantiles(t, med, half=(1.0, 2.0)), task)
    return EvaluationResult(name, t, per, overall, sub, cal, {"fit_s": 0, "predict_s": 0})


def test_card_states_the_winner_from_the_numbers(tmp_path):
    t = _targets("X", [10, 12, 14, 16], last=[11, 11, 13, 15])
    task = _manual_task(t, {"X": 10.0})
    good, bad = [10, 12, 14, 16.5], [12, 13, 15, 18]
    results = {"full fine-tuning": _result("full fine-tuning", t, task, good),
               "last value": _result("last value", t, task, t["last_value"]),
               "LightGBM": _result("LightGBM", t, task, bad)}
    card = write_model_card(results, tmp_path / "a", {"dataset": "hand-made", "split": "none"})
    assert card["winner"] == "full fine-tuning"
    assert card["statement"].startswith("Full fine-tuning beats last value (0.1000), LightGBM (0.1500)")
    md = (tmp_path / "a" / "README.md").read_text()
    assert card["statement"] in md and "0.0698" in md and "reference figures from the issue" in md.lower()
    assert json.loads((tmp_path / "a" / "model_card.json").read_text())["winner"] == "full fine-tuning"
    # the card is a Hugging Face model card: metadata with the measured results of the primary method
    import yaml

    head = yaml.safe_load(md.split("---")[1])
    assert head["license"] == "odbl" and head["library_name"] == "transformers" and head["datasets"] == ["hand-made"]
    metrics = {m["name"]: m["value"] for m in head["model-index"][0]["results"][0]["metrics"]}
    assert metrics["count-weighted NMAE"] == pytest.approx(results["full fine-tuning"].overall["nmae"], abs=1e-5)
    assert metrics["LightGBM NMAE (baseline, same targets)"] == pytest.approx(0.15, abs=1e-5)
    assert "Training warnings" not in md
    warned = write_model_card(results, tmp_path / "w", {"training_reports": {"full fine-tuning": [
        {"warnings": ["UNDERTRAINED: training stopped after 13 optimizer steps"]}]}})
    assert warned["training_warnings"] == ["full fine-tuning, fold 1: UNDERTRAINED: training stopped after 13 "
                                           "optimizer steps"]
    assert "⚠ Training warnings" in (tmp_path / "w" / "README.md").read_text()

    results["full fine-tuning"] = _result("full fine-tuning", t, task, bad)
    results["LightGBM"] = _result("LightGBM", t, task, good)
    card = write_model_card(results, tmp_path / "b", {})
    assert card["winner"] == "LightGBM"
    assert card["statement"].startswith("Full fine-tuning does not beat LightGBM (0.0125), last value (0.1000)")
    assert compare({"last value": results["last value"]})["statement"].startswith(
        "Full fine-tuning was not evaluated")
