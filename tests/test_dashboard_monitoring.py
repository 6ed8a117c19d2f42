"""The Model page's monitoring section through AppTest, on stored forecasts whose targets arrived."""

from __future__ import annotations

import pandas as pd
import pytest

from app_helpers import signed_in
from clinical import outputs as out_mod
from clinical.predict import replay_forecasts
from data import queries
from data.db import open_store
from data.importers import run_import
from model import MIN_HISTORY

N_REPLAYED = 8 - MIN_HISTORY  # XAI-15 has 8 potassium results for P0020


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, cases):
    """P0020's potassium (XAI-15, 8 results): forecasts at the time of every result after the first MIN_HISTORY
    (a forecast needs MIN_HISTORY prior results), stored; two verdicts."""
    torch = pytest.importorskip("torch")
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    root = tmp_path_factory.mktemp("monitor")
    store = open_store(root / "lab.duckdb")
    run_import(store, cases / "XAI-15.csv")
    history = queries.cohort(store)
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(history)
    pipe = ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab,
                            AnalyteScaler.fit(history))
    pipe.save_pretrained(root / "model")
    recs = replay_forecasts(store, pipe, "P0020")
    times = history["collected_at"].sort_values().iloc[MIN_HISTORY:]
    fc = pipe.forecast(history, pd.DataFrame({"patient_id": "P0020", "analyte_code": "2823-3", "at": times.to_numpy()}))
    out_mod.record_verdict(store, recs[0]["output_id"], "ed", "expert", "valid")
    out_mod.record_verdict(store, recs[1]["output_id"], "ed", "expert", "invalid", comment="too low")
    mp = pytest.MonkeyPatch()
    mp.setenv("LABTREND_DB", str(root / "lab.duckdb"))  # signed_in() adds the analyst's account there
    mp.setenv("LABTREND_MODEL", str(root / "model"))
    mp.delenv("LABTREND_MODEL_URL", raising=False)
    yield fc, history
    mp.undo()


def test_replayed_forecasts_are_made_at_past_collection_times_from_earlier_results(monitored):
    """Each replayed forecast's time is a potassium collection time; its history ends strictly before it."""
    fc, history = monitored
    stored = out_mod.load_outputs(_store(), kind="forecast")
    assert len(stored) == N_REPLAYED and all(p["retrospective"] for p in stored["payload"])
    k_times = sorted(history.loc[history["analyte_code"] == "2823-3", "collected_at"])
    assert len(k_times) == 8
    stored = stored.sort_values("output_time")
    for (at, p), prev in zip(zip(stored["output_time"], stored["payload"]), k_times[MIN_HISTORY - 1:-1], strict=True):
        assert at in k_times
        assert pd.Timestamp(p["based_on"]["last_result_at"]) == prev < at
        assert p["median"] == pytest.approx(float(fc.loc[fc["at"] == at, "q50"].iloc[0]), rel=1e-6)


def _store():
    import os

    return open_store(os.environ["LABTREND_DB"])


def test_model_page_scores_arrived_forecasts_against_last_value(monitored):
    fc, history = monitored
    at = signed_in("ana", "analyst")
    at.switch_page("app_pages/model.py").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Forecasts scored"] == f"{N_REPLAYED} of {N_REPLAYED}"
    # the page's skill is the one computed by hand from the same forecasts and results
    k = history[history["analyte_code"] == "2823-3"].sort_values("collected_at")["value"].to_numpy()
    err_model = abs(k[MIN_HISTORY:] - fc["q50"].to_numpy()).sum()
    err_last = abs(k[MIN_HISTORY:] - k[MIN_HISTORY - 1:-1]).sum()
    assert metrics["Skill vs last value"] == f"{1 - err_model / err_last:+.2f}"
    errors = next(d.value for d in at.dataframe if "mae_last_value" in d.value.columns)
    assert errors["n"].sum() == N_REPLAYED and errors["analyte"].iloc[0].startswith("Potassium")
    verdicts = next(d.value for d in at.dataframe if "valid_rate" in d.value.columns)
    row = verdicts.set_index("kind").loc["forecast"]
    assert row["n"] == 2 and row["valid_rate"] == 0.5 and row["invalid_rate"] == 0.5
    assert any("Realised forecast skill" in str(c.proto.spec) for c in at.get("plotly_chart"))
    # too few results per period to judge drift: said, not drawn
    assert any("enough results in a period" in c.value for c in at.caption)
