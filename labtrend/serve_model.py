"""``labtrend serve-model``: the forecasting pipeline over HTTP, for a GPU machine.

The dashboard (``$LABTREND_MODEL_URL``) and any other client send the history they would
give :meth:`model.inference.ForecastPipeline.forecast` and get back the same forecasts frame
(:class:`labtrend.remote.RemoteForecastPipeline` is the client). Endpoints:

=====================  ========================================================================
``GET /health``        ``model_version``, ``device`` ('cuda:0', 'cpu'), ``dtype`` (compute dtype:
                       'bfloat16' under CUDA autocast, else 'float32'), ``calibrated``.
``GET /calibration``   the conformal interval adjustments (``ConformalCalibration.to_dict``) or null.
``POST /forecast``     ``{history: [record], queries: [{patient_id, analyte_code, at}], batch_size}``
                       -> ``{model_version, columns, dtypes, forecasts: [record]}``, one forecast
                       per query in order (:func:`labtrend.remote.forecast_payload`).
``POST /explain``      ``{history, patient_id, analyte_code, at, forecast_median}`` -> the fields
                       of :class:`model.explain.ForecastExplanation` (``at`` as ISO 8601).
``GET /docs``          the OpenAPI documentation.
=====================  ========================================================================

History records have the model's history columns (``model.HISTORY_COLUMNS``): times are
ISO 8601 strings (naive, the store's time base), numbers are JSON numbers, missing values
null. Invalid input is HTTP 422 with ``detail`` a sentence naming the bad value: pydantic's
type errors (``history[3].value: Input should be a valid number ... (got '<10')``) and the
pipeline's own ``ValueError`` for values it refuses (an unparseable time, a non-finite value,
a wrong unit); nothing is forecast then. Quantiles are float32 widened to Python floats, so
they cross JSON exactly.

Why FastAPI + uvicorn: both are well kept and widely deployed; FastAPI validates request
bodies against typed pydantic models (already a LabTrend dependency) and answers with 422
and the offending field, and documents the API (OpenAPI, ``/docs``) for free; uvicorn is
its standard ASGI server. Endpoints are plain functions, run in FastAPI's thread pool, so a
slow explanation does not block health checks.

The device is chosen once when the pipeline is loaded (``--device auto``: CUDA when present);
on CUDA the pipeline runs under bf16 autocast, as it does in-process, and returns float32.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from labtrend.remote import forecast_payload, json_value
from data.settings import MODEL_SERVER_HOST, MODEL_SERVER_PORT

__all__ = ["create_app", "serve", "compute_dtype", "validation_message"]

log = logging.getLogger(__name__)


# --- request and response bodies -------------------------------------------------------------------
class HistoryRecord(BaseModel):
    """One prior result (``model.HISTORY_COLUMNS``). Values the pipeline refuses come back as 422."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str | None
    collected_at: str | None = Field(description="ISO 8601 date-time, naive (the store's time base)")
    analyte_code: str | None = Field(description="LOINC or local code")
    value: float | None = Field(description="canonical unit; the limit for a censored result")
    censor: float | None = Field(description="-1 for '<', 0 exact, +1 for '>'")
    unit_canonical: str | None = Field(None, description="UCUM unit; must be the one the model was trained in")
    sex: str | None = Field(None, description="'F', 'M' or null")
    age_years: float | None = Field(None, description="age at collection in years; null when unknown")


class QueryRecord(BaseModel):
    """Forecast ``analyte_code`` of ``patient_id`` at ``at`` from results collected strictly before it."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str | None
    analyte_code: str | None
    at: str | None = Field(description="ISO 8601 date-time, naive")


class ForecastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[HistoryRecord]
    queries: list[QueryRecord]
    batch_size: int = Field(256, description="rows per model call (does not change the forecasts)")


class ForecastResponse(BaseModel):
    model_version: str
    columns: list[str] = Field(description="the forecast columns after the queries' ones, in order: q05 .. q95, "
                                           "unit, n_history, status, model_version (as the pipeline returns them)")
    dtypes: dict[str, str] = Field(description="pandas dtype of each of those columns (float32 for the quantiles)")
    forecasts: list[dict[str, Any]] = Field(
        description="one record per query, in the queries' order: patient_id, analyte_code, at, then the columns; "
                    "quantiles in the canonical unit (float32 values, exact), null where there is no forecast")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[HistoryRecord]
    patient_id: str
    analyte_code: str
    at: str = Field(description="ISO 8601 date-time, naive")
    forecast_median: float | None = Field(None, description="the median shown to the user (canonical unit)")


class ExplanationResponse(BaseModel):
    """The fields of :class:`model.explain.ForecastExplanation`."""

    status: str
    message: str | None
    patient_id: str
    analyte_code: str
    at: str | None
    unit: str | None
    model_version: str
    method: str | None = None
    median: float | None = None
    base_value: float | None = None
    groups: list[dict[str, Any]] = []
    additivity_gap: float | None = None
    tolerance: float | None = None
    n_evaluations: int | None = None
    elapsed_s: float | None = None


class HealthResponse(BaseModel):
    status: str
    model_version: str
    device: str
    dtype: str
    calibrated: bool


# --- the app ------------------------------------------------------------------------------------------
def compute_dtype(device) -> str:
    """The dtype the pipeline computes in on ``device``: 'bfloat16' (CUDA autocast) or 'float32'.

    The rule is the one in ``ForecastPipeline._predict_normalised`` and ``model.explain``.
    """
    return "bfloat16" if getattr(device, "type", str(device).split(":")[0]) == "cuda" else "float32"


def _loc(loc) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def validation_message(errors: list[dict], limit: int = 3) -> str:
    """pydantic errors as one sentence: ``history[3].value: Input should be ... (got '<10')``; at most ``limit``."""
    parts = []
    for e in errors[:limit]:
        text = f"{_loc(e.get('loc', ()))}: {e.get('msg', 'invalid')}"
        if e.get("type") != "missing" and "input" in e and not isinstance(e["input"], (dict, list)):
            text += f" (got {e['input']!r})"
        parts.append(text)
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


def _frame(records: list[BaseModel], columns):
    import pandas as pd

    return pd.DataFrame([r.model_dump() for r in records], columns=list(columns))


def create_app(pipeline) -> FastAPI:
    """A FastAPI app serving ``pipeline`` (a loaded :class:`model.inference.ForecastPipeline`).

    Pure: nothing is loaded, bound or started here; run it with uvicorn (:func:`serve`).
    """
    from model import HISTORY_COLUMNS, QUERY_COLUMNS

    app = FastAPI(title="LabTrend model server",
                  description="Forecasts and explanations of LabTrend's forecasting pipeline. "
                              "Decision support for clinicians, never a diagnosis.",
                  version=str(pipeline.model_version))
    app.state.pipeline = pipeline

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        brief = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]  # inputs may hold Infinity
        return JSONResponse(status_code=422, content={"detail": validation_message(errors),
                                                      "errors": jsonable_encoder(brief)})

    @app.get("/health", response_model=HealthResponse)
    def health() -> dict:
        return {"status": "ok", "model_version": pipeline.model_version, "device": str(pipeline.device),
                "dtype": compute_dtype(pipeline.device), "calibrated": pipeline.conformal is not None}

    @app.get("/calibration")
    def calibration() -> dict:
        conformal = pipeline.conformal
        return {"model_version": pipeline.model_version,
                "calibration": None if conformal is None else json_value(conformal.to_dict())}

    @app.post("/forecast", response_model=ForecastResponse)
    def forecast(body: ForecastRequest) -> dict:
        history = _frame(body.history, HISTORY_COLUMNS)
        queries = _frame(body.queries, QUERY_COLUMNS)
        try:
            fc = pipeline.forecast(history, queries, batch_size=body.batch_size)
        except ValueError as exc:  # the pipeline's input checks name the bad value
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return forecast_payload(fc, pipeline.model_version)

    @app.post("/explain", response_model=ExplanationResponse)
    def explain(body: ExplainRequest) -> dict:
        from model.explain import explain_forecast

        import pandas as pd

        history = _frame(body.history, HISTORY_COLUMNS)
        try:
            at = pd.Timestamp(body.at)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=f"'at' has an unparseable time {body.at!r} ({exc})") from exc
        try:
            ex = explain_forecast(pipeline, history, body.patient_id, body.analyte_code, at,
                                  forecast_median=body.forecast_median)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        payload = ex.to_payload()
        payload["groups"] = json_value(payload["groups"])
        return payload

    return app


def serve(model_dir, *, host: str = MODEL_SERVER_HOST, port: int = MODEL_SERVER_PORT, device: str = "auto",
          log_level: str = "info") -> None:
    """Load the pipeline in ``model_dir`` on ``device`` ('auto', 'cpu', 'cuda') and serve it until stopped.

    Raises:
        FileNotFoundError: ``model_dir`` is not a saved ForecastPipeline.
        ValueError: 'cuda' was asked for and CUDA is not available.
    """
    import uvicorn

    from model.inference import ForecastPipeline

    pipeline = ForecastPipeline.from_pretrained(model_dir, device=device)
    from model.explain import warm_up

    warm_up(pipeline)  # shap's import and numba compilation now, not in the first /explain request
    print(f"labtrend serve-model: model {pipeline.model_version} on {pipeline.device} "
          f"({compute_dtype(pipeline.device)}), http://{host}:{port} (API docs at /docs)", flush=True)
    uvicorn.run(create_app(pipeline), host=host, port=port, log_level=log_level)
