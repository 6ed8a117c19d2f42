"""FC-12 regression: a committed tiny checkpoint must keep giving its saved reference forecasts.

The case (sktime #10626): a wrapper padded short histories differently from the reference
pipeline and its forecasts drifted by up to 54 units. Here the reference output was saved
by ``tests/fixtures/fc12/build.py``; a change in how padding, masks, normalisation or time
encoding are handled shows up as a difference, whether P0016 is forecast alone or padded
next to P0014 (one value: since issue 13 a forecast of its own) and P0015 (three identical values).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from model.inference import ForecastPipeline  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fc12"
COLS = ["q05", "q10", "q25", "q50", "q75", "q90", "q95"]


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fc12_build", FIXTURE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_checkpoint_reproduces_the_saved_reference(reference, build, cases):
    pipe = ForecastPipeline.from_pretrained(FIXTURE / "model")
    assert pipe.model_version == reference["model_version"]
    history = build.fc12_history(cases)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or NaN warnings on the constant series
        alone = pipe.forecast(history, build.queries(["P0016"]))
        batch = pipe.forecast(history, build.queries(["P0014", "P0015", "P0016"]))
    np.testing.assert_allclose(alone.loc[0, COLS].to_numpy(float), reference["P0016_alone"], rtol=1e-5)
    for r in batch.to_dict("records"):
        ref = reference["batch"][r["patient_id"]]
        assert r["status"] == ref["status"]
        got = np.array([r[c] for c in COLS], dtype=float)
        want = np.array([np.nan if v is None else v for v in ref["quantiles"]], dtype=float)
        np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)
    # padded next to shorter histories or alone: the same forecast
    np.testing.assert_allclose(batch.loc[2, COLS].to_numpy(float), alone.loc[0, COLS].to_numpy(float), rtol=1e-6)
    # FC-12 as reconciled with issue 13: P0014's one value is enough for a forecast ("based on 1 measurement")
    assert batch.loc[0, "status"] == "ok" and batch.loc[0, "n_history"] == 1
    assert abs(batch.loc[1, "q50"] - 7.0) < 0.5  # P0015's constant 7.0 stays near 7.0
    # no prior result of the analyte: still no forecast, and the message says so
    none = pipe.forecast(history, build.queries(["P9999"])).iloc[0]
    assert none["status"] == "Not enough measurements to forecast (0; minimum 1)" and np.isnan(none["q50"])


def test_one_measurement_gets_a_wide_calibrated_forecast_that_says_so(build, cases):
    """FC-12 as reconciled with issue 13 (b), on the shipped checkpoint: P0014's single HbA1c gets a forecast
    whose interval is calibrated on single-result forecasts apart and is wider than that of a patient at the
    same level with four results; it is worded "based on 1 measurement" wherever it is shown."""
    import pandas as pd

    from clinical.outputs import forecast_outputs
    from labtrend import settings
    from model import history_basis

    pipe = ForecastPipeline.from_pretrained(settings.SHIPPED_PRETRAINED)
    report = json.loads((settings.SHIPPED_PRETRAINED / "pretraining.json").read_text())
    single = report["calibration"]["crossfit_coverage_single"]  # measured on held-out corpus patients
    assert abs(single["0.8"] - 0.8) < 0.03 and abs(single["0.95"] - 0.95) < 0.03
    assert "single" in pipe.conformal.pooled_strata

    history = build.fc12_history(cases)
    v14 = float(history.loc[history["patient_id"] == "P0014", "value"].iloc[0])
    four = history[history["patient_id"] == "P0016"].assign(patient_id="PX", value=[v14 + 0.1, v14 - 0.1,
                                                                                      v14 + 0.05, v14])
    history = pd.concat([history, four], ignore_index=True)
    f = pipe.forecast(history, build.queries(["P0014", "PX"]))
    p14, px = f.iloc[0], f.iloc[1]
    assert p14["status"] == "ok" and p14["n_history"] == 1 and px["n_history"] == 4
    assert p14["q10"] < v14 < p14["q90"]
    assert p14["hi95"] - p14["lo95"] > px["hi95"] - px["lo95"]  # less evidence, a wider interval
    assert p14["q90"] - p14["q10"] > px["q90"] - px["q10"]

    # the single-result stratum is what calibrates P0014 (without it, P0014's interval changes; PX's does not)
    plain = ForecastPipeline(pipe.model, pipe.vocab, pipe.scaler, type(pipe.conformal).from_dict(
        {**pipe.conformal.to_dict(), "pooled_strata": {},
         "per_analyte": {k: v for k, v in pipe.conformal.per_analyte.items() if "|" not in k}}))
    g = plain.forecast(history, build.queries(["P0014", "PX"]))
    assert not np.allclose(g.loc[0, COLS].to_numpy(float), f.loc[0, COLS].to_numpy(float))
    np.testing.assert_allclose(g.loc[1, COLS].to_numpy(float), f.loc[1, COLS].to_numpy(float))

    assert history_basis(p14["n_history"]) == "based on 1 measurement"
    payload = forecast_outputs(f.iloc[:1], history)[0]["payload"]
    assert payload["based_on"]["text"] == "based on 1 measurement"
