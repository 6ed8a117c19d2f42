"""Streamlit-side resources: the cached store and model, cached queries, the busy notice.

* The :class:`data.db.Store` and the forecasting pipeline are ``st.cache_resource`` (one per
  process, shared by every session; never mutated). The pipeline runs in this process, or
  is the client of a ``labtrend serve-model`` server when ``$LABTREND_MODEL_URL`` is set;
  then :func:`model_status` asks the server (cached :data:`VERSION_TTL_S` seconds), and an
  answer spoiled by an unreachable server is shown but not cached.
* Query results are ``st.cache_data`` keyed by their inputs plus the store's
  :func:`data_version` (number and last id of import batches), so an import from this
  dashboard or from the CLI is visible within :data:`VERSION_TTL_S` seconds.
* While another process holds the DuckDB file, the Store retries and, after 2 s, calls
  :func:`_notify_busy`, which writes "Database busy, retrying" into the slot the entry
  point reserved (UI-18) instead of a traceback.
"""

from __future__ import annotations

import contextvars
import os
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import streamlit as st

from dashboard import services
from data import queries
from data.db import Store, StoreSettings
from data import settings

__all__ = [
    "db_path", "model_dir", "get_store", "data_version", "set_busy_slot", "clear_busy_slot",
    "patients", "timeline", "patient_info", "results_with_limits", "batches", "model_url", "model_status",
    "torch_threads", "get_pipeline", "forecasts", "prepared", "anomalies", "explanation", "timeline_figure",
    "recommendations", "reporting_decimals", "admissions",
]

# pandas keeps text columns in Arrow. Arrow's default allocator (mimalloc) keeps what it frees for reuse, so
# each long series analysed left the server larger (a year of 5-minute results: about 70 MB after the anomaly
# check alone); the C allocator hands large buffers back when they are freed (benchmarks/long_series.py).
# An explicit ARROW_DEFAULT_MEMORY_POOL is left as it is.
if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
    pa.set_memory_pool(pa.system_memory_pool())


def _tune_c_allocator() -> None:
    """glibc malloc (Linux): large blocks (>= 128 KiB: array buffers) always from mmap, so a freed one goes back to
    the system at once, and at most 2 arenas (Streamlit runs each script run on a new thread; each arena keeps
    what its threads freed). glibc raises its mmap threshold after each large free, so the buffers of a long
    series analysed once stayed in the heap. Nothing is changed where ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_ARENA_MAX`` is set, or where the C library is not glibc."""
    import ctypes
    import ctypes.util

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    mallopt(-8, 2)  # M_ARENA_MAX


_tune_c_allocator()


VERSION_TTL_S = 5
QUERY_TTL_S = 15 * 60
MODEL_RULES_WINDOW_DAYS = 30.0  # model surprise runs on the last 30 days of results (as `labtrend predict`)
BUSY_MESSAGE = "Database busy, retrying…"

_local = threading.local()  # the busy slot of the script run on this thread


def db_path() -> str:
    """The DuckDB file (``$LABTREND_DB``, else ``var/labtrend.duckdb``)."""
    return str(settings.db_path())


def model_dir() -> str:
    """The model folder (``$LABTREND_MODEL``, else ``var/model``)."""
    return str(settings.model_dir())


def model_url() -> str | None:
    """The model server (``$LABTREND_MODEL_URL``), or None: the model runs in this process."""
    return settings.model_url()


# -- database busy notice ----------------------------------------------------------------------
def set_busy_slot(slot) -> None:
    """Reserve ``slot`` (an ``st.empty()``) for this run's busy notice."""
    _local.slot = slot


def clear_busy_slot() -> None:
    slot = getattr(_local, "slot", None)
    if slot is not None:
        slot.empty()
    _local.slot = None


def _notify_busy(waited_s: float) -> None:
    """Store's ``on_busy``: runs on the waiting script thread, possibly inside a cached query.

    The notice is drawn in a fresh ``contextvars`` context so that ``st.cache_data`` does not
    record it with the query's result and replay it on later cache hits.
    """
    slot = getattr(_local, "slot", None)
    if slot is None:
        return
    _outside_cache_capture(slot.warning, f"{BUSY_MESSAGE} (another process is writing; waited {waited_s:.0f} s)",
                           icon=":material/hourglass_top:")


def _outside_cache_capture(draw, *args, **kwargs) -> None:
    """Call ``draw`` so that an enclosing ``st.cache_data`` function does not record it.

    Streamlit records elements drawn inside a cached function (a context variable marks
    "inside a cached function") and replays them on every cache hit. The notice runs in a
    copy of the current context with that mark cleared. The test
    ``test_busy_notice_is_shown_and_not_replayed_from_the_cache`` guards this on upgrades.
    """
    try:
        from streamlit.runtime.caching.cached_message_replay import in_cached_function
    except ImportError:  # layout changed in a Streamlit upgrade: draw anyway
        in_cached_function = None

    def run():
        if in_cached_function is not None:
            in_cached_function.set(False)
        draw(*args, **kwargs)

    contextvars.copy_context().run(run)


# -- resources ------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=4)
def get_store(path: str) -> Store:
    """The process's Store on ``path`` (migrations applied)."""
    store = Store(StoreSettings(path=path), on_busy=_notify_busy)
    store.migrate()
    return store


@st.cache_data(ttl=VERSION_TTL_S, show_spinner=False, max_entries=8)
def data_version(path: str) -> str:
    """Changes whenever an import batch is added or results are re-keyed by a local code
    mapping: part of every query cache key."""
    with get_store(path).read() as cur:
        n, last, rekeyed = cur.execute(
            "SELECT count(*), max(batch_id), (SELECT count(*) FROM code_map_events) FROM import_batches").fetchone()
    return f"{n}:{last}:{rekeyed}"


# -- cached queries ------------------------------------------------------------------------------
@st.cache_data(ttl=QUERY_TTL_S, max_entries=16, show_spinner="Loading patients…")
def patients(path: str, version: str) -> pd.DataFrame:
    return queries.patients(get_store(path), limit=1_000_000)


# One patient's frames are kept as shared objects (cache_resource), not pickled copies (cache_data): a year
# of 5-minute results is 105,120 rows, and a pickled copy in the cache plus a fresh copy on every rerun cost
# hundreds of MB and a third of a second per run. Nothing in the dashboard changes them in place
# (tests/test_dashboard.py::test_cached_patient_frames_are_not_changed_by_a_page_run).
@st.cache_resource(ttl=QUERY_TTL_S, max_entries=64, show_spinner="Loading results…")
def timeline(path: str, version: str, patient_id: str) -> pd.DataFrame:
    return queries.timeline(get_store(path), patient_id)


@st.cache_data(ttl=QUERY_TTL_S, max_entries=256, show_spinner=False)
def patient_info(path: str, version: str, patient_id: str) -> dict | None:
    return queries.patient_info(get_store(path), patient_id)


@st.cache_resource(ttl=QUERY_TTL_S, max_entries=64, show_spinner=False)
def results_with_limits(path: str, version: str, patient_id: str, sex: str | None, age_years: float | None
                        ) -> pd.DataFrame:
    """One patient's timeline with the catalogue's reference and critical limits for this sex and age, and each
    result's flag label and drawing category (:func:`dashboard.figures.with_display_columns`: once per patient)."""
    from dashboard import figures

    return figures.with_display_columns(services.with_reference_limits(timeline(path, version, patient_id), sex,
                                                                       age_years))


@st.cache_data(ttl=QUERY_TTL_S, max_entries=256, show_spinner=False)
def reporting_decimals(path: str, version: str, patient_id: str) -> dict[str, int]:
    """``{analyte_code: decimals}`` of one patient's results (:func:`dashboard.precision.reporting_decimals`)."""
    from dashboard.precision import reporting_decimals as decimals_of

    return decimals_of(timeline(path, version, patient_id))


@st.cache_data(ttl=QUERY_TTL_S, max_entries=256, show_spinner=False)
def admissions(path: str, version: str, patient_id: str) -> pd.DataFrame:
    """One patient's admissions (empty when the source had none): the timeline's latest episode."""
    return queries.admissions(get_store(path), patient_id)


@st.cache_data(ttl=60, max_entries=8, show_spinner=False)
def batches(path: str, version: str) -> pd.DataFrame:
    return queries.batches(get_store(path))


# -- model ---------------------------------------------------------------------------------------
class _NotCached(Exception):
    """Carries a result out of a cached function without caching it (the model server was unreachable)."""

    def __init__(self, result: services.ServiceResult):
        super().__init__(result.message)
        self.result = result


def _keep_unless_retry(result: services.ServiceResult) -> services.ServiceResult:
    if result.extra.get("retry"):
        raise _NotCached(result)
    return result


@st.cache_data(ttl=VERSION_TTL_S, show_spinner=False, max_entries=4)
def _remote_status(url: str) -> services.ModelStatus:
    return services.remote_model_status(url)


def _status_for(model_path: str) -> services.ModelStatus:
    """The status of a model folder or of a model server URL."""
    return _remote_status(model_path) if services.is_model_url(model_path) else services.model_status(model_path)


def model_status() -> services.ModelStatus:
    """The model the pages use: the server at :func:`model_url` when set, else the folder :func:`model_dir`.

    ``path`` and ``stamp`` of the result are what :func:`forecasts` and :func:`explanation` take.
    """
    url = model_url()
    return _remote_status(url) if url else services.model_status(model_dir())


def torch_threads() -> int:
    """Intra-op threads torch uses in this process: ``$LABTREND_TORCH_THREADS``, else 1.

    A page asks the model for small batches (one patient's forecasts and model-surprise
    checks). On a CPU, torch's intra-op threads then cost more in synchronisation than they
    gain, and far more when the cores are shared with other sessions or processes (one
    patient's forecasts: 0.06 s with 1 thread, 0.7 s with 2 on a busy 2-core machine;
    ``benchmarks/page_load.py --torch-threads``). Many sessions still use many cores: each
    session runs in its own thread.
    """
    value = os.environ.get("LABTREND_TORCH_THREADS", "").strip()
    return max(1, int(value)) if value.isdigit() else 1


@st.cache_resource(show_spinner="Loading the forecasting model…", max_entries=2)
def get_pipeline(path: str, stamp: float):
    """The pipeline for ``path``: a model folder (loaded here) or a server URL (its client).

    ``stamp``: file times or the served version, so a retrained model reloads. A model
    loaded here runs with :func:`torch_threads` intra-op threads.
    """
    status = _status_for(path)
    if status.available and not status.remote:
        import torch

        torch.set_num_threads(torch_threads())
    pipeline = services.load_pipeline(status)
    services.warm_explainer(pipeline)  # the first explanation asked for then does not wait for shap's import
    return pipeline


@st.cache_data(ttl=QUERY_TTL_S, max_entries=128, show_spinner="Forecasting…")
def _forecasts(path: str, version: str, model_path: str, stamp: float, patient_id: str,
               analytes: tuple[str, ...]) -> services.ServiceResult:
    status = _status_for(model_path)
    pipe = get_pipeline(model_path, stamp) if status.available else None
    results = timeline(path, version, patient_id)
    info = patient_info(path, version, patient_id)
    return _keep_unless_retry(services.load_forecasts(pipe, results, info, list(analytes), status))


def forecasts(path: str, version: str, model_path: str, stamp: float, patient_id: str,
              analytes: tuple[str, ...]) -> services.ServiceResult:
    """Forecasts of ``analytes`` (cached; not when the model server could not be reached)."""
    try:
        return _forecasts(path, version, model_path, stamp, patient_id, analytes)
    except _NotCached as exc:
        return exc.result


# The rows the clinical rules read, prepared once for the anomalies and the recommendations (a year of
# 5-minute results: about 1 s and 100 MB each time). One patient kept, until its recommendations are cached
# (:func:`_recommendations` frees them): both are cached per patient for longer, so the rows are needed again
# only when a new model or another choice of analytes asks for them.
@st.cache_resource(ttl=QUERY_TTL_S, max_entries=1, show_spinner=False)
def prepared(path: str, version: str, patient_id: str) -> pd.DataFrame:
    return services.prepare_results(timeline(path, version, patient_id), patient_info(path, version, patient_id))


@st.cache_resource(ttl=QUERY_TTL_S, max_entries=64, show_spinner="Checking for anomalies…")
def _anomalies(path: str, version: str, patient_id: str, model_path: str | None, stamp: float
               ) -> services.ServiceResult:
    pipe = get_pipeline(model_path, stamp) if model_path else None
    results = prepared(path, version, patient_id)
    since = None
    if pipe is not None and len(results):
        since = pd.Timestamp(results["collected_at"].max()) - pd.Timedelta(days=MODEL_RULES_WINDOW_DAYS)
    return _keep_unless_retry(services.load_anomalies(results, patient_info(path, version, patient_id),
                                                      forecaster=pipe, model_rules_since=since,
                                                      rules=services.flag_rules()))


def anomalies(path: str, version: str, patient_id: str) -> services.ServiceResult:
    """Anomaly flags of one patient (``clinical.anomalies``): the rule-based rules but the reference interval
    (``services.flag_rules``: that one is the H/L flag on each result), and model surprise over the last
    :data:`MODEL_RULES_WINDOW_DAYS` days when a model (in-process or served) is available.
    """
    status = model_status()
    try:
        if status.available:
            return _anomalies(path, version, patient_id, status.path, status.stamp)
        return _anomalies(path, version, patient_id, None, 0.0)
    except _NotCached as exc:
        return exc.result


@st.cache_data(ttl=QUERY_TTL_S, max_entries=64, show_spinner=False)
def _explanation(path: str, version: str, model_path: str, stamp: float, patient_id: str, analyte_code: str,
                 at: str, forecast_median: float) -> services.ServiceResult:
    status = _status_for(model_path)
    pipe = get_pipeline(model_path, stamp) if status.available else None
    query = {"patient_id": patient_id, "analyte_code": analyte_code, "at": pd.Timestamp(at)}
    return _keep_unless_retry(services.load_explanation(
        pipe, timeline(path, version, patient_id), patient_info(path, version, patient_id), query,
        forecast_median=forecast_median))


def explanation(path: str, version: str, model_path: str, stamp: float, patient_id: str, analyte_code: str,
                at: str, forecast_median: float) -> services.ServiceResult:
    """SHAP attribution of one forecast (seconds of model calls: cached; not when the server was unreachable)."""
    try:
        return _explanation(path, version, model_path, stamp, patient_id, analyte_code, at, forecast_median)
    except _NotCached as exc:
        return exc.result


# -- what the timeline page draws (pure builders, cached) ---------------------------------------------
# The cache key names what the frames are derived from (store and its data version, patient,
# sex and age, chosen analytes, model path and stamp), so a rerun of the page or a patient opened
# again takes the figure and the recommendations from the cache without hashing the frames
# (they carry dicts, which Streamlit would pickle to hash). A forecast or anomaly answer that
# was not cached (model server unreachable) is drawn afresh and not cached either. The figure is
# shared by the sessions that show it: the page only passes it to st.plotly_chart, never changes it.
def _model_key() -> tuple[str, float]:
    status = model_status()
    return (status.path, status.stamp) if status.available else ("", 0.0)


@st.cache_resource(ttl=QUERY_TTL_S, max_entries=32, show_spinner=False)
def _timeline_figure(path: str, version: str, patient_id: str, sex: str | None, age_years: float | None,
                     analytes: tuple[str, ...], date_range: tuple | None, model_key: tuple[str, float], rings: bool,
                     _results: pd.DataFrame, _forecasts: pd.DataFrame, _anomalies: pd.DataFrame, _decimals: dict):
    # cache_resource: the figure object itself comes back, where cache_data would unpickle a copy
    # (a Figure rebuilds and revalidates itself: 0.2 s on a busy 2-core machine)
    from dashboard import figures

    return figures.make_timeline_figure(_results, list(analytes), forecasts=_forecasts, anomalies=_anomalies,
                                        date_range=date_range, decimals=_decimals)


def timeline_figure(path: str, version: str, patient_id: str, sex: str | None, age_years: float | None,
                    analytes: tuple[str, ...], date_range: tuple | None, results: pd.DataFrame,
                    forecasts: services.ServiceResult, anomalies: services.ServiceResult, decimals: dict | None = None):
    """:func:`dashboard.figures.make_timeline_figure` of ``results_with_limits(path, version, patient_id, sex,
    age_years)`` with this patient's :func:`forecasts` of ``analytes``, :func:`anomalies` and
    :func:`reporting_decimals` (the cache key names all of them). ``anomalies`` with ``extra['pending']``:
    the values drawn before the anomalies are computed (cached apart from the figure with rings)."""
    decimals = reporting_decimals(path, version, patient_id) if decimals is None else decimals
    if forecasts.extra.get("retry") or anomalies.extra.get("retry"):
        from dashboard import figures

        return figures.make_timeline_figure(results, list(analytes), forecasts=forecasts.frame,
                                            anomalies=anomalies.frame, date_range=date_range, decimals=decimals)
    # ``rings`` is in the key: the values-only figure a long series is drawn with first (anomalies
    # marked ``pending``) is another figure than the one with its anomaly rings
    return _timeline_figure(path, version, patient_id, sex, age_years, analytes, date_range, _model_key(),
                            not anomalies.extra.get("pending"), results, forecasts.frame, anomalies.frame, decimals)


@st.cache_data(ttl=QUERY_TTL_S, max_entries=64, show_spinner=False)
def _recommendations(path: str, version: str, patient_id: str, sex: str | None, age_years: float | None,
                     analytes: tuple[str, ...], model_key: tuple[str, float], _results: pd.DataFrame,
                     _forecasts: pd.DataFrame, _anomalies: pd.DataFrame, _patient: dict | None
                     ) -> services.ServiceResult:
    # the rows the anomalies were found in, prepared once (``_results`` names the same patient's results)
    out = services.load_recommendations(prepared(path, version, patient_id), _forecasts, _anomalies, _patient)
    # the anomalies and these are cached now: the prepared rows (a year of 5-minute results: some 70 MB) are not
    # kept for the rest of the page's life; another model or choice of analytes prepares them again (about 1 s)
    prepared.clear()
    return out


def recommendations(path: str, version: str, patient_id: str, sex: str | None, age_years: float | None,
                    analytes: tuple[str, ...], results: pd.DataFrame, forecasts: services.ServiceResult,
                    anomalies: services.ServiceResult, patient: dict | None) -> services.ServiceResult:
    """:func:`dashboard.services.load_recommendations` (the site's rule file) for the same inputs as
    :func:`timeline_figure`."""
    if forecasts.extra.get("retry") or anomalies.extra.get("retry"):
        return services.load_recommendations(results, forecasts.frame, anomalies.frame, patient)
    return _recommendations(path, version, patient_id, sex, age_years, analytes, _model_key(), results,
                            forecasts.frame, anomalies.frame, patient)


# -- monitoring ------------------------------------------------------------------------------------
def _outputs_version(path: str) -> str:
    """Changes whenever an output or a verdict is stored (cheap: two aggregates)."""
    with get_store(path).read() as cur:
        a = cur.execute("SELECT count(*), max(updated_at) FROM model_outputs").fetchone()
        b = cur.execute("SELECT count(*), max(annotation_id) FROM annotations").fetchone()
    return f"{a[0]}:{a[1]}:{b[0]}:{b[1]}"


@st.cache_data(ttl=QUERY_TTL_S, max_entries=16, show_spinner="Computing the monitoring figures…")
def _monitoring(path: str, version: str, outputs_version: str, model_path: str, stamp: float, period: str):
    from dashboard import monitor

    return monitor.load_monitoring(get_store(path), model_path or None, period)


def monitoring_data(period: str):
    """:class:`dashboard.monitor.MonitoringData` for the Model page, recomputed only when results,
    outputs, verdicts or the model change."""
    path = db_path()
    status = model_status()
    local = status.path if status.available and Path(status.path).is_dir() else model_dir()
    return _monitoring(path, data_version(path), _outputs_version(path), local, status.stamp, period)


@st.cache_data(ttl=QUERY_TTL_S, max_entries=16, show_spinner=False)
def _agreement(path: str, outputs_version: str) -> pd.DataFrame:
    from clinical import outputs

    return outputs.agreement(get_store(path))


def agreement() -> pd.DataFrame:
    """``clinical.outputs.agreement`` of the store (per output kind, with 95 % intervals), recomputed only
    when an output or a verdict is stored."""
    path = db_path()
    return _agreement(path, _outputs_version(path))


# -- the batch job -----------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def scoring_jobs() -> dict:
    """The ``labtrend score`` process (``Popen``) this dashboard started, per database path: one at a time."""
    return {}
