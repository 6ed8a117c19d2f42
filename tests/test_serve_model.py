"""``labtrend serve-model`` and its client: the served pipeline gives what the in-process one gives.

A real uvicorn server runs in a background thread on a free port and serves a tiny
ForecastPipeline fitted on MIMIC-IV demo plus the FC-12 case file (CPU, seconds). The
client's forecasts are compared with the in-process ones bit for bit, explanations field by
field; invalid input, an unreachable server and the dashboard (AppTest) are checked too.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import types

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import uvicorn
from streamlit.testing.v1 import AppTest

from app_helpers import signed_in
from dashboard import services
from data import queries
from data.db import open_store
from data.importers import run_import
from labtrend.remote import ModelServerError, RemoteForecastPipeline, json_records
from labtrend.serve_model import create_app
from model import HISTORY_COLUMNS, QUANTILE_COLUMNS, QUERY_COLUMNS
from model.configuration import config_preset
from model.features import AnalyteScaler, AnalyteVocab
from model.inference import ForecastPipeline
from model.modeling import LabTrendForForecasting

HBA1C = "4548-4"
TOO_FEW = "Not enough measurements to forecast (0; minimum 1)"


# --- fixtures ---------------------------------------------------------------------------------------
class Recording:
    """The pipeline, counting the forecast calls that reach it (proof that the server did the work)."""

    def __init__(self, pipeline: ForecastPipeline):
        self._pipeline = pipeline
        self.forecast_calls = 0

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def forecast(self, history, queries, batch_size=256):
        self.forecast_calls += 1
        return self._pipeline.forecast(history, queries, batch_size=batch_size)


class Server:
    """uvicorn serving ``app`` on 127.0.0.1, a free port, in a daemon thread (``with Server(app) as url``)."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 600  # a hang guard: the wait is on the server's state
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def closed_port_url() -> str:
    """A URL on which nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def case_store(tmp_path_factory, cases):
    """A fresh store with the FC-12 case (P0014: one HbA1c; P0015: 7.0 x 3) and LAB-01; written by the app test."""
    store = open_store(tmp_path_factory.mktemp("serve") / "cases.duckdb")
    for name in ("FC-12", "LAB-01"):
        run_import(store, cases / f"{name}.csv")
    return store


@pytest.fixture(scope="module")
def pipeline(mimic_store, case_store) -> ForecastPipeline:
    """Tiny network fitted (vocabulary, scaler) on MIMIC-IV demo + the cases, heads off persistence."""
    history = pd.concat([queries.cohort(mimic_store), queries.cohort(case_store)], ignore_index=True)
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(history)
    model = LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # heads start at zero weight (persistence): make the outputs depend on the history
        for name, p in model.named_parameters():
            if "head" in name and name.endswith("weight") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ForecastPipeline(model, vocab, AnalyteScaler.fit(history))


@pytest.fixture(scope="module")
def served(pipeline):
    recording = Recording(pipeline)
    with Server(create_app(recording)) as url:
        with RemoteForecastPipeline(url) as client:
            yield types.SimpleNamespace(url=url, client=client, recording=recording)


def patient_inputs(store, patient_id: str):
    """(timeline, patient info, history) of one patient, built as the dashboard builds them."""
    results = queries.timeline(store, patient_id)
    info = queries.patient_info(store, patient_id)
    return results, info, services.patient_history(results, info)


def mimic_patients(store, n: int = 3) -> list[str]:
    pats = queries.patients(store).sort_values(["n_results", "patient_id"], ascending=[False, True])
    return pats["patient_id"].head(n).tolist()


def assert_bitwise_equal(remote: pd.DataFrame, local: pd.DataFrame) -> None:
    assert list(remote.columns) == list(local.columns)
    assert remote.dtypes.to_dict() == local.dtypes.to_dict()
    pd.testing.assert_frame_equal(remote, local, check_exact=True)
    for c in QUANTILE_COLUMNS:  # NaN in the same places and the same bits elsewhere
        assert remote[c].to_numpy().tobytes() == local[c].to_numpy().tobytes(), c


# --- forecasts ----------------------------------------------------------------------------------------
def test_health_reports_version_device_dtype_and_calibration(served, pipeline):
    h = httpx.get(f"{served.url}/health").json()
    assert h == {"status": "ok", "model_version": pipeline.model_version, "device": "cpu", "dtype": "float32",
                 "calibrated": False}
    assert served.client.model_version == pipeline.model_version and served.client.conformal is None
    assert "/forecast" in httpx.get(f"{served.url}/openapi.json").json()["paths"]


def test_remote_forecasts_equal_in_process_bit_for_bit(served, pipeline, mimic_store, case_store):
    """Several MIMIC-IV patients and analytes at the dashboard's horizons, and FC-12, in one call and alone."""
    histories, qs = [], []
    for pid in mimic_patients(mimic_store):
        _, _, h = patient_inputs(mimic_store, pid)
        top = h["analyte_code"].value_counts().index[:4].tolist()
        once = h.groupby("analyte_code").size()
        top += once[once == 1].index[:1].tolist()  # one prior result: FC-12 on real data, when the patient has one
        histories.append(h)
        qs.append(services.forecast_queries(h, top))
    _, _, h_case = patient_inputs(case_store, "P0014")
    _, _, h_case15 = patient_inputs(case_store, "P0015")
    histories += [h_case, h_case15]
    qs.append(pd.DataFrame({"patient_id": ["P0014", "P0015"], "analyte_code": HBA1C,
                            "at": pd.Timestamp("2024-12-01")}))
    history = pd.concat(histories, ignore_index=True)
    q = pd.concat(qs, ignore_index=True)
    assert q["patient_id"].nunique() == 5 and len(q) >= 20

    calls = served.recording.forecast_calls
    local = pipeline.forecast(history, q)
    remote = served.client.forecast(history, q)
    assert served.recording.forecast_calls == calls + 1
    assert_bitwise_equal(remote, local)
    assert (remote["status"] == "ok").sum() >= 12
    fc12 = remote[(remote["patient_id"] == "P0014")].iloc[0]  # one prior result: a forecast (issue 13)
    assert fc12["status"] == "ok" and fc12["n_history"] == 1
    assert remote[(remote["patient_id"] == "P0015")]["status"].iloc[0] == "ok"

    # one patient at a time, as the dashboard asks; the queries' own index and extra columns are kept
    for pid, h in zip(q["patient_id"].unique(), histories):
        qq = q[q["patient_id"] == pid].assign(note="kept")
        assert_bitwise_equal(served.client.forecast(h, qq), pipeline.forecast(h, qq))


def test_float32_quantiles_survive_json_exactly(served, pipeline, case_store):
    """Every float32 quantile widened to a Python float is written and read back to the same bits."""
    _, _, h = patient_inputs(case_store, "P0015")
    q = pd.DataFrame({"patient_id": "P0015", "analyte_code": HBA1C,
                      "at": pd.date_range("2024-09-02", periods=40, freq="37h")})
    body = {"history": json_records(h, HISTORY_COLUMNS), "queries": json_records(q, QUERY_COLUMNS)}
    raw = httpx.post(f"{served.url}/forecast", json=body).json()["forecasts"]
    local = pipeline.forecast(h, q)
    for c in QUANTILE_COLUMNS:
        sent = np.array([r[c] for r in raw], dtype=np.float64)
        assert np.array_equal(sent, local[c].to_numpy(np.float64))  # widened exactly, not rounded in JSON
        assert np.array_equal(sent.astype(np.float32), local[c].to_numpy())
    assert len({r["q50"] for r in raw}) > 1


# --- explanations ----------------------------------------------------------------------------------
def _fields(ex) -> dict:
    d = dict(vars(ex))
    d.pop("elapsed_s")  # wall time of the computation
    return d


def _same_explanation(a, b, rel: float = 1e-6) -> None:
    """Equal field by field; numbers to ``rel``: an explanation is hundreds of batched model calls,
    and the float summation order of a batched matrix product can differ between the server's
    thread and the caller's (seen in the 9th significant digit when the whole suite runs)."""
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()

    def close(x, y, where):
        if isinstance(x, float) or isinstance(y, float):
            assert x == pytest.approx(y, rel=rel, abs=1e-9), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                close(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                close(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    for k in fa:
        close(fa[k], fb[k], k)


def test_remote_explanation_equals_in_process(served, pipeline, mimic_store, case_store):
    from model.explain import ForecastExplanation, explain_forecast

    pid = mimic_patients(mimic_store, 1)[0]
    _, _, h = patient_inputs(mimic_store, pid)
    code = h["analyte_code"].value_counts().index[0]
    at = pd.Timestamp(h["collected_at"].max()) + pd.Timedelta(days=1)
    local = explain_forecast(pipeline, h, pid, code, at)
    remote = served.client.explain(h, pid, code, at)
    assert isinstance(remote, ForecastExplanation)
    assert local.status == "ok" and len(local.groups) >= 3
    _same_explanation(remote, local)

    median = float(pipeline.forecast(h, pd.DataFrame({"patient_id": [pid], "analyte_code": [code],
                                                      "at": [at]}))["q50"].iloc[0])
    _same_explanation(served.client.explain(h, pid, code, at, forecast_median=median),
                      explain_forecast(pipeline, h, pid, code, at, forecast_median=median))

    _, _, h14 = patient_inputs(case_store, "P0014")  # before P0014's only HbA1c: nothing to explain
    local14 = explain_forecast(pipeline, h14, "P0014", HBA1C, "2024-06-01")
    remote14 = served.client.explain(h14, "P0014", HBA1C, "2024-06-01")
    assert remote14.status == "unavailable" and remote14.message == f"No forecast to explain: {TOO_FEW}"
    _same_explanation(remote14, local14)


# --- invalid input and an unreachable server ----------------------------------------------------------
def test_invalid_input_is_422_naming_the_value_and_a_value_error_in_the_client(served, pipeline, case_store):
    _, _, h = patient_inputs(case_store, "P0015")
    q = pd.DataFrame({"patient_id": ["P0015"], "analyte_code": [HBA1C], "at": [pd.Timestamp("2024-12-01")]})

    # the pipeline's own checks: the same ValueError text in-process and through the server
    bad_at = q.assign(at="tomorrow")
    with pytest.raises(ValueError) as local:
        pipeline.forecast(h, bad_at)
    with pytest.raises(ValueError) as remote:
        served.client.forecast(h, bad_at)
    assert str(remote.value) == str(local.value)
    assert "queries column 'at' has an unparseable time 'tomorrow'" in str(remote.value)
    not_finite = h.copy()
    not_finite.loc[1, "value"] = np.inf
    with pytest.raises(ValueError) as local:
        pipeline.forecast(not_finite, q)
    with pytest.raises(ValueError) as remote:
        served.client.forecast(not_finite, q)
    assert str(remote.value) == str(local.value) and "non-numeric value inf (row 1: patient P0015" in str(local.value)
    wrong_unit = h.assign(unit_canonical="mmol/mol")
    with pytest.raises(ValueError, match="analyte '4548-4' has unit 'mmol/mol' in the history but"):
        served.client.forecast(wrong_unit, q)
    with pytest.raises(ValueError, match="history column 'censor' has value 5.0"):
        served.client.forecast(h.assign(censor=5), q)

    # what pydantic refuses: the field and the value are named
    text_value = h.astype({"value": object})
    text_value.loc[1, "value"] = "<10"
    with pytest.raises(ValueError, match=r"history\[1\]\.value: Input should be a valid number.*\(got '<10'\)"):
        served.client.forecast(text_value, q)

    body = {"history": [{"patient_id": "P0015", "collected_at": "2024-03-01T08:00:00", "analyte_code": HBA1C,
                         "value": "seven", "censor": 0}],
            "queries": [{"patient_id": "P0015", "analyte_code": HBA1C, "at": "2024-12-01"}]}
    r = httpx.post(f"{served.url}/forecast", json=body)
    assert r.status_code == 422 and "history[0].value" in r.json()["detail"] and "'seven'" in r.json()["detail"]
    body["history"][0]["value"] = math.inf  # sent as Infinity: parsed, then refused by the pipeline
    r = httpx.post(f"{served.url}/forecast", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "non-numeric value inf (row 0: patient P0015" in r.json()["detail"]
    r = httpx.post(f"{served.url}/explain", json={"history": body["history"][:0], "patient_id": "P0015",
                                                  "analyte_code": HBA1C, "at": "not a time"})
    assert r.status_code == 422 and "not a time" in r.json()["detail"]
    del body["queries"]  # a record with Infinity and a missing field: still a 422 naming the field
    r = httpx.post(f"{served.url}/forecast", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "queries: Field required" in r.json()["detail"]


def test_unreachable_server_is_a_clear_error_naming_the_url(case_store):
    url = closed_port_url()
    results, info, h = patient_inputs(case_store, "P0015")
    q = pd.DataFrame({"patient_id": ["P0015"], "analyte_code": [HBA1C], "at": [pd.Timestamp("2024-12-01")]})
    with RemoteForecastPipeline(url, connect_timeout=2) as client:
        with pytest.raises(ModelServerError, match=f"the model server at {url} is unreachable"):
            client.forecast(h, q)
        with pytest.raises(ModelServerError, match=url):
            client.explain(h, "P0015", HBA1C, "2024-12-01")
        fc = services.load_forecasts(client, results, info, [HBA1C])
        assert not fc.available and fc.frame.empty and url in fc.message and fc.extra["retry"]
        an = services.load_anomalies(results, info, forecaster=client)
        assert an.available and any(url in n for n in an.extra["notes"])  # the other rules still ran
    status = services.remote_model_status(url)
    assert not status.available and status.remote and url in status.message
    assert status.message.startswith(services.NO_MODEL_MESSAGE)
    with pytest.raises(ValueError, match="must start with http"):
        RemoteForecastPipeline("gpu-host:8700")


# --- calibration and the model-surprise rule --------------------------------------------------------
def test_calibrated_server_and_model_surprise_match_in_process(pipeline, mimic_store):
    pids = mimic_patients(mimic_store, 6)
    cal_history = queries.cohort(mimic_store, patients=pids[1:])
    targets = cal_history.groupby(["patient_id", "analyte_code"]).tail(3)
    cal_q = targets.rename(columns={"collected_at": "at"})[["patient_id", "analyte_code", "at", "value", "censor"]]
    calibrated = pipeline.calibrate(cal_history, cal_q, min_points=20)
    assert calibrated.conformal is not None
    with Server(create_app(calibrated)) as url, RemoteForecastPipeline(url) as client:
        assert client.calibrated and client.model_version == calibrated.model_version
        assert client.conformal.to_dict() == calibrated.conformal.to_dict()
        results, info, _ = patient_inputs(mimic_store, pids[0])
        since = results["collected_at"].max() - pd.Timedelta(days=365)  # a year: model surprise on core analytes only
        local = services.load_anomalies(results, info, forecaster=calibrated, model_rules_since=since)
        remote = services.load_anomalies(results, info, forecaster=client, model_rules_since=since)
    assert (local.frame["rule"] == "model_surprise").any()
    pd.testing.assert_frame_equal(remote.frame, local.frame, check_exact=True)
    assert remote.extra == local.extra


# --- the commands ------------------------------------------------------------------------------------
def test_serve_model_command_loads_the_folder_and_runs_uvicorn(pipeline, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from labtrend import cli

    pipeline.save_pretrained(tmp_path / "model")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert cli.main(["serve-model", "--model", str(tmp_path / "model"), "--port", "8765", "--device", "cpu"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8765)
    with TestClient(seen["app"]) as tc:
        assert tc.get("/health").json()["model_version"] == pipeline.model_version
    assert cli.main(["serve-model", "--model", str(tmp_path / "nothing")]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["serve-model", "--model", str(tmp_path / "model"), "--device", "cuda"]) == 2


def test_dashboard_command_passes_the_model_url(tmp_path, monkeypatch):
    import subprocess

    from labtrend import cli

    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: seen.update(env=env) or 0)
    monkeypatch.delenv("LABTREND_MODEL_URL", raising=False)
    args = ["dashboard", "--db", str(tmp_path / "x.duckdb")]
    assert cli.main(args) == 0 and "LABTREND_MODEL_URL" not in seen["env"]
    assert cli.main([*args, "--model-url", "http://gpu-host:8700/"]) == 0
    assert seen["env"]["LABTREND_MODEL_URL"] == "http://gpu-host:8700"
    monkeypatch.setenv("LABTREND_MODEL_URL", "http://other:8700")
    assert cli.main(args) == 0 and seen["env"]["LABTREND_MODEL_URL"] == "http://other:8700"


# --- the dashboard --------------------------------------------------------------------------------------
@pytest.fixture
def dashboard_env(case_store, tmp_path, monkeypatch):
    monkeypatch.setenv("LABTREND_DB", str(case_store.settings.path))  # signed_in() adds carla's account there
    monkeypatch.setenv("LABTREND_MODEL", str(tmp_path / "no-model"))  # nothing to run in-process
    return monkeypatch


def timeline_of(patient_id: str) -> AppTest:
    at = signed_in("carla", "clinician")
    at.session_state["timeline_patient"] = patient_id
    return at.switch_page("app_pages/timeline.py").run()


def test_timeline_draws_the_forecast_band_from_the_model_server(served, pipeline, case_store, dashboard_env):
    dashboard_env.setenv("LABTREND_MODEL_URL", served.url)
    calls = served.recording.forecast_calls
    at = timeline_of("P0015")
    assert not at.exception
    assert served.recording.forecast_calls > calls
    traces = {t.get("name", ""): t for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]}
    median = traces[f"Forecast median (model {pipeline.model_version})"]
    assert "Forecast 80% interval (q10–q90)" in traces
    results, info, h = patient_inputs(case_store, "P0015")
    local = pipeline.forecast(h, services.forecast_queries(h, [HBA1C]))
    assert median["y"][1:] == [float(v) for v in local["q50"]]  # after the anchor (the last result)
    assert "No trained model loaded" not in " ".join(str(e.value) for e in at.info)


def test_timeline_says_so_when_the_model_server_is_unreachable(case_store, dashboard_env):
    url = closed_port_url()
    dashboard_env.setenv("LABTREND_MODEL_URL", url)
    at = timeline_of("P0015")
    assert not at.exception
    shown = " ".join(str(e.value) for kind in ("info", "warning", "caption") for e in getattr(at, kind))
    assert url in shown and "unreachable" in shown
    assert not [t for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
                if t.get("name", "").startswith("Forecast")]
