"""SHAP explanations over event groups: additivity, the XAI-15 case, failures as messages."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from model.configuration import config_preset
from model.explain import GROUP_AGE, GROUP_SEX, GROUP_TIME, explain_forecast
from model.features import AnalyteScaler, AnalyteVocab
from model.inference import ForecastPipeline
from model.modeling import LabTrendForForecasting

K, NA, CREA = "2823-3", "2951-2", "2160-0"


def xai15_history(cases) -> pd.DataFrame:
    raw = pd.read_csv(cases / "XAI-15.csv", dtype={"loinc": str})
    return pd.DataFrame({
        "patient_id": raw["patient_id"], "collected_at": pd.to_datetime(raw["collected_at"]),
        "analyte_code": raw["loinc"], "value": raw["value"].astype(float), "censor": np.int8(0),
        "unit_canonical": raw["unit"], "sex": "F", "age_years": 67.0,
    })


def other_patients(n=12, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n):
        t = pd.Timestamp("2024-01-01")
        for _ in range(6):
            t += pd.Timedelta(hours=float(rng.uniform(12, 200)))
            base = dict(patient_id=f"S{p:02d}", collected_at=t, censor=0, sex="FM"[p % 2], age_years=40.0 + p)
            recs.append(dict(base, analyte_code=K, value=round(rng.normal(4.3, 0.4), 1), unit_canonical="mmol/L"))
            recs.append(dict(base, analyte_code=NA, value=round(rng.normal(139, 3), 0), unit_canonical="mmol/L"))
            recs.append(dict(base, analyte_code=CREA, value=round(float(np.exp(rng.normal(0, 0.3))), 2),
                             unit_canonical="mg/dL"))
    h = pd.DataFrame(recs)
    h["censor"] = h["censor"].astype(np.int8)
    return h


@pytest.fixture(scope="module")
def history(cases) -> pd.DataFrame:
    return pd.concat([xai15_history(cases), other_patients()], ignore_index=True)


@pytest.fixture(scope="module")
def pipeline(history) -> ForecastPipeline:
    """A tiny pipeline whose head is off persistence, so every group can matter."""
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(history)
    model = LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head" in name and name.endswith("weight") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ForecastPipeline(model, vocab, AnalyteScaler.fit(history))


AT = pd.Timestamp("2024-04-09 06:00")


@pytest.mark.parametrize("method", ["exact", "permutation"])
def test_base_plus_values_equals_the_forecast_median(pipeline, history, method):
    e = explain_forecast(pipeline, history, "S03", K, "2024-03-01", method=method)
    assert e.ok and e.method == method
    fc = pipeline.forecast(history, pd.DataFrame({"patient_id": ["S03"], "analyte_code": [K], "at": [pd.Timestamp("2024-03-01")]}))
    median = float(fc["q50"].iloc[0])
    total = e.base_value + sum(g["value"] for g in e.groups)
    assert abs(total - median) <= 0.01 * max(1.0, abs(median))
    assert e.median == pytest.approx(median) and e.unit == "mmol/L"
    names = {g["group"] for g in e.groups}
    assert {f"results:{K}", f"results:{NA}", f"results:{CREA}", GROUP_TIME, GROUP_AGE, GROUP_SEX} == names
    assert any(abs(g["value"]) > 1e-6 for g in e.groups)
    payload = e.to_payload()
    assert payload["status"] == "ok" and isinstance(payload["at"], str)


def test_exact_and_permutation_agree_with_three_groups(pipeline, history):
    # with few groups the permutation estimate is close to the exact Shapley values
    ex = explain_forecast(pipeline, history, "P0020", K, AT, method="exact")
    pe = explain_forecast(pipeline, history, "P0020", K, AT, method="permutation", permutations=20)
    ve = {g["group"]: g["value"] for g in ex.groups}
    vp = {g["group"]: g["value"] for g in pe.groups}
    assert ve.keys() == vp.keys()
    for k in ve:
        assert vp[k] == pytest.approx(ve[k], abs=0.05 * max(1e-3, max(abs(v) for v in ve.values())))


def test_xai15_explanation_only_when_it_adds_up(pipeline, history, caplog, monkeypatch):
    """The forecast is shown; its explanation only if |sum + base - output| <= 0.01 max(1, |output|)."""
    import shap

    # never a gradient explainer (DeepExplainer stops with an additivity error on LayerNorm transformers)
    def forbidden(*a, **k):
        raise AssertionError("gradient explainers must not be used")

    monkeypatch.setattr(shap, "DeepExplainer", forbidden)
    monkeypatch.setattr(shap, "GradientExplainer", forbidden)
    fc = pipeline.forecast(history, pd.DataFrame({"patient_id": ["P0020"], "analyte_code": [K], "at": [AT]}))
    assert fc["status"].iloc[0] == "ok"
    median = float(fc["q50"].iloc[0])
    good = explain_forecast(pipeline, history, "P0020", K, AT, forecast_median=median)
    assert good.ok and good.additivity_gap <= good.tolerance
    assert [g["group"] for g in good.groups if g["group"].startswith("results:")] == [f"results:{K}"]

    # forced: the median on screen came from another model state -> a message, no exception
    with caplog.at_level(logging.WARNING, logger="model.explain"):
        bad = explain_forecast(pipeline, history, "P0020", K, AT, forecast_median=median + 1.0)
    assert bad.status == "not_additive" and not bad.ok
    assert bad.message.startswith("Explanation not available for this model version (attributions do not add up; "
                                  "difference = 1")
    assert all(g["value"] is None for g in bad.groups)
    assert pipeline.model_version in caplog.text


def test_explainer_failure_is_a_message_not_an_exception(pipeline, history, monkeypatch, caplog):
    import shap

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            raise AssertionError("The SHAP explanations do not sum up to the model's output!")

    monkeypatch.setattr(shap.explainers, "Exact", Broken)
    with caplog.at_level(logging.ERROR, logger="model.explain"):
        e = explain_forecast(pipeline, history, "P0020", K, AT, method="exact")
    assert e.status == "failed" and "Explanation not available for this model version" in e.message
    assert "AssertionError" in e.message and pipeline.model_version in caplog.text


def test_no_forecast_nothing_to_explain(pipeline, history):
    first = history.loc[(history["patient_id"] == "P0020") & (history["analyte_code"] == K), "collected_at"].min()
    e = explain_forecast(pipeline, history, "P0020", K, first)  # no prior value: no forecast
    assert e.status == "unavailable" and "Not enough measurements" in e.message
    with pytest.raises(ValueError, match="method must be"):
        explain_forecast(pipeline, history, "P0020", K, AT, method="deep")


def test_many_analytes_share_an_other_group(pipeline, history):
    e = explain_forecast(pipeline, history, "S03", K, "2024-03-01", max_analyte_groups=1, method="exact")
    names = [g["group"] for g in e.groups]
    assert "results:other" in names and f"results:{K}" in names and e.ok


def test_several_forecasts_explained_at_once_are_each_explained_alone(pipeline, history):
    """explain_forecasts prepares the history once; each explanation is the one explain_forecast gives."""
    from model.explain import explain_forecasts

    at = pd.Timestamp("2024-03-01")
    q = pd.DataFrame({"patient_id": ["S03", "S03", "S05"], "analyte_code": [K, NA, CREA], "at": [at, at, at]})
    many = explain_forecasts(pipeline, history, q, method="permutation", permutations=3)
    for (_, r), e in zip(q.iterrows(), many):
        one = explain_forecast(pipeline, history, r["patient_id"], r["analyte_code"], at, method="permutation",
                               permutations=3)
        assert e.ok and one.ok and (e.patient_id, e.analyte_code) == (one.patient_id, one.analyte_code)
        assert e.base_value == pytest.approx(one.base_value, abs=1e-9)
        assert {g["group"]: g["value"] for g in e.groups} == pytest.approx({g["group"]: g["value"] for g in one.groups},
                                                                           abs=1e-9)
        # each distinct coalition is run once: fewer model rows than shap's permutations * (2G + 1) requests
        assert e.n_evaluations < 3 * (2 * len(e.groups) + 1)
