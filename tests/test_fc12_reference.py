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

