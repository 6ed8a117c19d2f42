"""Client of ``labtrend serve-model``: the forecasting model behind an HTTP URL.

:class:`RemoteForecastPipeline` has the interface the dashboard and the clinical rules use
of a :class:`model.inference.ForecastPipeline` (``forecast``, ``model_version``,
``conformal``) plus ``explain`` (what :func:`model.explain.explain_forecast` returns), so a
dashboard on a laptop can use a model served from a GPU machine (``$LABTREND_MODEL_URL``).
The answers are the ones the in-process pipeline gives on the server's device (bit for bit
on CPU, tested): quantiles travel as JSON numbers (a float32 widened to a Python float is
printed with ``repr`` and read back exactly) and times as ISO 8601 strings.

The wire format is defined here once (:func:`json_records`, :func:`forecast_payload`,
:func:`forecast_frame`); the server in :mod:`labtrend.serve_model` uses the same functions.

HTTP is done with ``httpx`` (typed timeouts, connection pooling, already installed with
FastAPI's test client). Errors:

* the server refuses the input (HTTP 422): :class:`ValueError` with the server's message,
  which names the bad value, as the in-process pipeline's ``ValueError`` does;
* the server cannot be reached, times out or fails (5xx): :class:`ModelServerError`,
  whose message names the URL.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable

import httpx
import numpy as np
import pandas as pd

from model import HISTORY_COLUMNS, QUERY_COLUMNS

__all__ = [
    "RemoteForecastPipeline",
    "ModelServerError",
    "DEFAULT_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "json_value",
    "json_records",
    "forecast_payload",
    "forecast_frame",
]

DEFAULT_TIMEOUT_S = 120.0  # reading a response: an explanation is a few hundred model calls
CONNECT_TIMEOUT_S = 5.0  # an unreachable server is reported quickly


class ModelServerError(RuntimeError):
    """The model server at a URL could not be reached, timed out or failed (the message names the URL)."""


# --- wire format --------------------------------------------------------------------------------
def json_value(v):
    """One cell as a JSON value: None for NaN/NaT/None, ISO 8601 for times, Python numbers, lists and
    dicts element by element, str otherwise.

    A float32 becomes the Python float of the same value, so it survives JSON exactly.
    """
    if v is None or v is pd.NaT:
        return None
    if isinstance(v, (pd.Timestamp, dt.datetime, dt.date, np.datetime64)):
        t = pd.Timestamp(v)
        return None if pd.isna(t) else t.isoformat()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


_ID_COLUMNS = ("patient_id", "analyte_code")


def json_records(frame: pd.DataFrame, columns: Iterable[str]) -> list[dict]:
    """``frame``'s ``columns`` that it has, as JSON-safe records (one dict per row, in order).

    ``patient_id`` and ``analyte_code`` are sent as strings (as the pipeline reads them);
    a missing one stays None, for the server to name.
    """
    cols = [c for c in columns if c in frame.columns]
    data = {c: [(_id if c in _ID_COLUMNS else json_value)(v) for v in frame[c].tolist()] for c in cols}
    return [{c: data[c][i] for c in cols} for i in range(len(frame))]


def forecast_payload(forecasts: pd.DataFrame, model_version: str) -> dict:
    """A forecasts frame (``model/__init__.py`` contract) as the JSON body ``POST /forecast`` answers.

    ``{"model_version", "columns", "dtypes", "forecasts"}``: ``columns`` are the frame's
    columns after the queries' ones (``q05 .. q95``, ``unit``, ``n_history``, ``status``,
    ``model_version`` and whatever the contract adds), ``dtypes`` their pandas dtypes, and
    ``forecasts`` one record per query (the query columns, then ``columns``). Float32
    quantiles are Python floats of exactly the same value; missing ones are None.
    """
    columns = [c for c in forecasts.columns if c not in QUERY_COLUMNS]
    return {"model_version": model_version, "columns": columns,
            "dtypes": {c: str(forecasts[c].dtype) for c in columns},
            "forecasts": json_records(forecasts, (*QUERY_COLUMNS, *columns))}


def _column(values: list, dtype: str):
    """One column of the forecasts frame, rebuilt with its pandas ``dtype`` from JSON values."""
    dt_ = pd.api.types.pandas_dtype(dtype)
    if pd.api.types.is_float_dtype(dt_):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64).astype(dt_)
    if dt_ == object:
        return pd.Series(values, dtype=object)
    if pd.api.types.is_datetime64_dtype(dt_):
        return pd.to_datetime(pd.Series(values, dtype=object)).astype(dt_)
    if isinstance(dt_, np.dtype):
        return np.array(values, dtype=dt_)
    return pd.Series(values, dtype=dt_)


def forecast_frame(queries: pd.DataFrame, payload: dict) -> pd.DataFrame:
    """The frame that ``ForecastPipeline.forecast(history, queries)`` returns, from :func:`forecast_payload`.

    Like the in-process pipeline it starts from a copy of ``queries`` (fresh index, every
    column and dtype kept) and adds the payload's columns in order, each with its dtype
    (``q05 .. q95`` float32, NaN where there is no forecast).

    Raises:
        ModelServerError: the payload does not answer these queries (count or order differs).
    """
    out = queries.reset_index(drop=True).copy()
    records = payload["forecasts"]
    if len(records) != len(out):
        raise ModelServerError(f"the model server answered {len(records)} forecasts for {len(out)} queries")
    for i, (rec, pid, code) in enumerate(zip(records, out["patient_id"].tolist(), out["analyte_code"].tolist())):
        if rec.get("patient_id") != _id(pid) or rec.get("analyte_code") != _id(code):
            raise ModelServerError(f"the model server's forecast {i} is for {rec.get('patient_id')!r}/"
                                   f"{rec.get('analyte_code')!r}, not the query {pid!r}/{code!r}")
    for c in payload["columns"]:
        out[c] = _column([r.get(c) for r in records], payload["dtypes"][c])
    return out


# --- client --------------------------------------------------------------------------------------
class RemoteForecastPipeline:
    """A ForecastPipeline served by ``labtrend serve-model`` at ``url``.

    Args:
        url: the server's base URL, e.g. ``http://gpu-host:8700``.
        timeout: seconds to wait for a response (explanations take longest).
        connect_timeout: seconds to wait for the connection.
        transport: an ``httpx`` transport (tests); None for the network.

    Nothing is sent until the first call; :meth:`health` checks the server.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None):
        self.url = str(url).strip().rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"model server URL {url!r} must start with http:// or https://")
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                    transport=transport)
        self._health: dict | None = None
        self._conformal = None
        self._conformal_loaded = False

    def __repr__(self) -> str:
        return f"RemoteForecastPipeline({self.url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteForecastPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- HTTP ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer of ``method path``; ValueError for 422, ModelServerError otherwise."""
        where = f"{self.url}{path}"
        # json.dumps writes inf as Infinity (not strict JSON; the server reads it), so that a
        # non-finite value reaches the pipeline's check and is refused with its own message
        content = None if body is None else json.dumps(body).encode()
        try:
            r = self._client.request(method, path, content=content,
                                     headers=None if body is None else {"content-type": "application/json"})
        except httpx.TimeoutException as exc:
            raise ModelServerError(f"the model server at {self.url} did not answer {path} in time "
                                   f"({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise ModelServerError(f"the model server at {self.url} is unreachable ({type(exc).__name__}: {exc}); "
                                   "start it with 'labtrend serve-model --model DIR' or unset LABTREND_MODEL_URL"
                                   ) from exc
        if r.status_code == 422:
            raise ValueError(_detail(r))
        if r.status_code != 200:
            raise ModelServerError(f"the model server at {where} answered HTTP {r.status_code}: {_detail(r)}")
        try:
            return r.json()
        except ValueError as exc:
            raise ModelServerError(f"the model server at {where} answered something that is not JSON") from exc

    def health(self, refresh: bool = False) -> dict:
        """``GET /health``: ``model_version``, ``device``, ``dtype``, ``calibrated`` (cached; ``refresh`` asks again).

        Raises:
            ModelServerError: the server is unreachable or failed.
        """
        if self._health is None or refresh:
            self._health = self._request("GET", "/health")
        return self._health

    @property
    def model_version(self) -> str:
        """The served pipeline's version ('lt-' + 12 hex digits)."""
        return str(self.health()["model_version"])

    @property
    def device(self) -> str:
        """The server's device, e.g. 'cuda:0' or 'cpu' (a string: it is not this process's device)."""
        return str(self.health()["device"])

    @property
    def calibrated(self) -> bool:
        """Whether the served intervals are conformal-calibrated."""
        return bool(self.health()["calibrated"])

    @property
    def conformal(self):
        """The served pipeline's :class:`model.conformal.ConformalCalibration`, or None when not calibrated.

        Fetched once from ``GET /calibration``; the clinical rules read it to say whether an
        interval is calibrated.
        """
        if not self._conformal_loaded:
            payload = self._request("GET", "/calibration")["calibration"]
            if payload is not None:
                from model.conformal import ConformalCalibration

                self._conformal = ConformalCalibration.from_dict(payload)
            self._conformal_loaded = True
        return self._conformal

    # --- the pipeline interface -----------------------------------------------------------------
    def forecast(self, history: pd.DataFrame, queries: pd.DataFrame, batch_size: int = 256) -> pd.DataFrame:
        """Quantile forecasts for ``queries`` from ``history``, computed by the server.

        Same contract as :meth:`model.inference.ForecastPipeline.forecast`: ``history`` and
        ``queries`` frames in, one row per query out (the queries' columns, ``q05 .. q95``
        float32 in the canonical unit, ``unit``, ``n_history``, ``status``, ``model_version``).

        Raises:
            ValueError: the server refused the input (its message names the bad value), or
                ``history``/``queries`` is not a DataFrame.
            ModelServerError: the server is unreachable, timed out or failed.
        """
        for name, frame in (("history", history), ("queries", queries)):
            if not isinstance(frame, pd.DataFrame):
                raise ValueError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
        q = queries.reset_index(drop=True)
        body = {"history": json_records(history, HISTORY_COLUMNS),
                "queries": json_records(q, QUERY_COLUMNS),
                "batch_size": json_value(batch_size)}
        return forecast_frame(q, self._request("POST", "/forecast", body))

    def explain(self, history: pd.DataFrame, patient_id: str, analyte_code: str, at, *,
                forecast_median: float | None = None):
        """The server's :func:`model.explain.explain_forecast` of one forecast median.

        Args:
            history: the history frame the forecast was made from.
            patient_id, analyte_code, at: the forecast (``at``: anything ``pd.Timestamp`` reads).
            forecast_median: the median shown to the user (canonical unit), or None.

        Returns the same :class:`model.explain.ForecastExplanation` the in-process call gives
        (``elapsed_s`` is the server's time).

        Raises:
            ValueError: the server refused the input (its message names the bad value).
            ModelServerError: the server is unreachable, timed out or failed.
        """
        from model.explain import ForecastExplanation

        if not isinstance(history, pd.DataFrame):
            raise ValueError(f"history must be a pandas DataFrame, got {type(history).__name__}")
        body = {"history": json_records(history, HISTORY_COLUMNS),
                "patient_id": json_value(_id(patient_id)), "analyte_code": json_value(_id(analyte_code)),
                "at": json_value(at), "forecast_median": json_value(forecast_median)}
        payload = self._request("POST", "/explain", body)
        payload["at"] = pd.Timestamp(payload["at"]) if payload.get("at") is not None else None
        return ForecastExplanation(**payload)


def _id(v):
    """Ids are strings in every contract; a missing one stays missing (the server says which)."""
    v = json_value(v)
    return v if v is None else str(v)


def _detail(r: httpx.Response) -> str:
    """The server's message: FastAPI's ``detail`` (a string here), else the body's start."""
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, str):
        return detail
    return str(detail) if detail is not None else (r.text[:300] or r.reason_phrase)
