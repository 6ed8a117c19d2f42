"""``labtrend score``: every patient's outputs, computed in workers and stored by one writer.

The batch job behind the review queue. For each selected patient it computes what
``labtrend predict`` computes (:func:`clinical.predict.patient_outputs`: forecasts, anomalies,
SHAP explanations, recommendations) and stores the records in ``model_outputs``.

**Selection** (:func:`select_patients`). A patient is scored when it has results and no
``scoring_state`` row for the current *scoring key*, or when its results changed since that
row was written (a newer import batch, or a different number of results), or when its last
attempt failed. The scoring key is a hash of the model version and of every setting that
changes the outputs (number of forecasts, explanations on/off, model-rule window, clinical
reference and rule-file versions, the multivariate model); a new model therefore scores every
patient again, and a re-run with nothing new selects nobody. ``--all`` selects every patient
with results; ``--patients FILE`` and ``--since TIME`` (patients with a result collected at or
after TIME) narrow the candidates.

**Engines.** Workers compute, one process writes. ``process`` (default): a local pool of
``workers`` processes (default: the machine's cores); ``dask``: Dask distributed, on the
cluster at ``scheduler`` or on a ``LocalCluster`` of ``workers`` processes
(``pip install labtrend[distributed]``); ``serial``: in this process. Each worker loads the
model **once** (:func:`_worker`, kept per process) and reads each patient from the store
itself; the driver writes. Every worker runs torch with ``torch_threads`` intra-op threads
(1 by default: a patient's batches are small, and one thread per worker process keeps the
results bit for bit the same whatever the engine). On a remote Dask cluster the workers need
this package, the model folder and the database file at the same paths (a shared file
system).

**Writes** respect DuckDB's single writer: the driver opens the file only for one short
transaction per batch of ``write_batch`` patients (or every ``write_every_s`` seconds), holding
the patients' outputs, their ``scoring_state`` rows and the run's counters, so a killed run
loses at most the unwritten batch and the next run goes on from there. Between two writes the
file is free for the dashboard, an import, or the workers' reads (each is a few milliseconds;
:class:`data.db.Store` retries while another process holds the file).

**Idempotent**: outputs have deterministic ids and an unchanged payload is not rewritten
(:func:`clinical.outputs.upsert_outputs`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

__all__ = ["ENGINES", "ScoreConfig", "scoring_key", "select_patients", "run_scoring", "scoring_status",
           "read_patient_ids"]

ENGINES = ("process", "dask", "serial")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class ScoreConfig:
    """What every worker needs to compute a patient's outputs (picklable, sent to each worker)."""

    # DuckDB file (workers read it; only the driver writes)
    db_path: str
    # ForecastPipeline folder
    model_dir: str
    # forecasts per patient: its most measured analytes the model knows
    top_n: int = 5
    # SHAP explanation of every forecast
    explain: bool = True
    # the model-based anomaly rules run on the last N days before the forecast time (None: all)
    model_window_days: float | None = 30.0
    # pretraining folder for the multivariate-inconsistency rule (None: that rule is off)
    pretrained: str | None = None
    # site critical value list (None: data/reference/critical_values.csv)
    critical_values: str | None = None
    # torch intra-op threads per worker
    torch_threads: int = 1
    # 'cpu', 'cuda' or 'auto'
    device: str = "cpu"


# -- workers ----------------------------------------------------------------------------------------
class _Worker:
    """Everything loaded once per worker process: the store handle, the model, the reference tables."""

    def __init__(self, config: ScoreConfig):
        import torch

        from clinical.anomalies import MaskedValuePredictor, default_reference, load_reference
        from clinical.recommendations import load_rules
        from data.db import Store, StoreSettings
        from model.inference import ForecastPipeline

        import multiprocessing

        torch.set_num_threads(max(1, int(config.torch_threads)))
        self.config = config
        # A worker process opens the file read-only, so the workers read side by side (a read-write
        # opening excludes every other process: two workers and the writer then queue for the file,
        # which made a 2-worker pool slower than one process). The serial engine runs in the
        # driver, which also writes: one process opens a file in one mode only.
        in_worker_process = multiprocessing.parent_process() is not None
        self.store = Store(StoreSettings(path=config.db_path, busy_timeout_s=300.0, read_only=in_worker_process))
        self.pipeline = ForecastPipeline.from_pretrained(config.model_dir, device=config.device)
        self.masked = MaskedValuePredictor.from_pretrained(config.pretrained, device=config.device) \
            if config.pretrained else None
        self.reference = load_reference(config.critical_values) if config.critical_values else default_reference()
        self.rules = load_rules()
        if config.explain:
            from model.explain import warm_up

            warm_up(self.pipeline)  # shap's import and numba compilation: once per worker, not in a patient's time
        self.loaded_at = time.time()


_WORKERS: dict[ScoreConfig, _Worker] = {}


def _worker(config: ScoreConfig) -> _Worker:
    """This process's :class:`_Worker` for ``config``: the model is loaded on the first patient only."""
    w = _WORKERS.get(config)
    if w is None:
        _WORKERS.clear()  # one model per worker process
        w = _WORKERS[config] = _Worker(config)
    return w


def _read_patient(store, patient_id: str):
    """(info, timeline, last_batch_id, n_results) in one opening of the file (a consistent snapshot)."""
    from data import queries

    with store.read() as cur:  # the nested reads share this connection: no writer can come in between
        info = queries.patient_info(store, patient_id)
        timeline = queries.timeline(store, patient_id)
        last_batch, n = cur.execute("SELECT max(batch_id), count(*) FROM results WHERE patient_id = ?",
                                    [patient_id]).fetchone()
    return info, timeline, last_batch, int(n)


def _score_patient(config: ScoreConfig, patient_id: str, expected_version: str) -> dict:
    """One patient's outputs as records (runs in a worker; never raises for the patient's own failure)."""
    from clinical.predict import patient_outputs

    w = _worker(config)  # the first patient of a worker loads the model (not counted in its times)
    t0, c0 = time.perf_counter(), time.process_time()
    base = {"patient_id": patient_id, "records": [], "last_batch_id": None, "n_results": 0, "forecast_at": None,
            "worker_host": socket.gethostname(), "worker_pid": os.getpid()}
    if w.pipeline.model_version != expected_version:
        return base | {"status": f"failed: the model in {config.model_dir} changed during the run "
                                 f"({w.pipeline.model_version}, expected {expected_version})",
                       "elapsed_s": time.perf_counter() - t0}
    try:
        info, timeline, last_batch, n = _read_patient(w.store, patient_id)
        base.update(last_batch_id=last_batch, n_results=n, read_s=time.perf_counter() - t0)
        if info is None or n == 0:
            return base | {"status": "failed: no results for this patient in the store",
                           "elapsed_s": time.perf_counter() - t0}
        out = patient_outputs(w.pipeline, info, timeline, top_n=config.top_n, explain=config.explain,
                              masked_predictor=w.masked, reference=w.reference, rules=w.rules,
                              model_window_days=config.model_window_days)
    except Exception as exc:  # noqa: BLE001 - one patient's failure is reported and retried, the run goes on
        return base | {"status": f"failed: {type(exc).__name__}: {exc}"[:500], "elapsed_s": time.perf_counter() - t0}
    return base | {"status": "ok", "records": out["records"], "supersede": out["supersede"],
                   "forecast_at": pd.Timestamp(out["at"]),
                   "notes": out["notes"], "elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                   "model_loaded_at": w.loaded_at}


# -- engines ----------------------------------------------------------------------------------------
class _SerialEngine:
    name = "serial"

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        self.workers = 1

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered by result(), as the other engines do
            f.set_exception(exc)
        return f

    def wait_first(self, futures):
        return [next(iter(futures))]

    def close(self):
        pass


class _ProcessEngine:
    """``concurrent.futures.ProcessPoolExecutor`` (spawned processes: no state forked from the driver)."""

    name = "process"

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def wait_first(self, futures):
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return list(done)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


class _DaskEngine:
    """Dask distributed: the cluster at ``scheduler``, else a ``LocalCluster`` of ``workers`` processes."""

    name = "dask"

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:  # the optional extra
            raise RuntimeError("the dask engine needs Dask distributed: pip install 'labtrend[distributed]'") from exc
        import logging

        self.cluster = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            n = max(1, int(workers or os.cpu_count() or 1))
            self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                        silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
        info = self.client.scheduler_info()
        self.workers = max(1, sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values()))

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def wait_first(self, futures):
        from distributed import wait

        done, _ = wait(list(futures), return_when="FIRST_COMPLETED")
        return list(done)

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


_ENGINE_CLASSES = {"process": _ProcessEngine, "dask": _DaskEngine, "serial": _SerialEngine}


# -- selection --------------------------------------------------------------------------------------
def scoring_key(model_version: str, config: ScoreConfig) -> str:
    """'sk-' + 16 hex digits over the model version and every setting that changes the outputs."""
    from clinical.anomalies import default_reference, load_reference
    from clinical.recommendations import load_rules

    reference = load_reference(config.critical_values) if config.critical_values else default_reference()
    masked = None
    if config.pretrained:
        f = Path(config.pretrained) / "model_version"
        masked = f.read_text().strip() if f.is_file() else f"pretraining:{Path(config.pretrained).name}"
    parts = {"model_version": model_version, "top_n": config.top_n, "explain": config.explain,
             "model_window_days": config.model_window_days, "reference": reference.version,
             "rules": load_rules().version, "multivariate_model": masked}
    return "sk-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_patient_ids(path: str | Path) -> list[str]:
    """Patient ids of a file, one per line (blank lines and lines starting with '#' skipped), cleaned
    as the importers clean ids. Raises ``ValueError`` naming the file when it cannot be read."""
    from data.identifiers import patient_key

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the patient list ({exc})") from exc
    ids = []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            key = patient_key(line)
            if key:
                ids.append(key)
    return list(dict.fromkeys(ids))


def select_patients(store, key: str, *, everyone: bool = False, patients: Iterable[str] | None = None,
                    since=None) -> pd.DataFrame:
    """Patients to score, largest first (``patient_id, last_batch_id, n_results, reason``).

    ``reason``: 'new' (never scored with this key), 'new results', 'retry' (the last attempt
    failed) or 'requested' (``everyone``). ``patients`` and ``since`` narrow the candidates
    (see the module docstring). Patients without results are never selected.
    """
    sql = """
        WITH r AS (SELECT patient_id, max(batch_id) AS last_batch_id, count(*) AS n_results FROM results
                   WHERE (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], patient_id))
                   GROUP BY patient_id
                   HAVING ?::TIMESTAMP IS NULL OR max(collected_at) >= ?::TIMESTAMP)
        SELECT r.patient_id, r.last_batch_id, r.n_results,
               CASE WHEN s.patient_id IS NULL THEN 'new'
                    WHEN s.status <> 'ok' THEN 'retry'
                    WHEN s.last_batch_id <> r.last_batch_id OR s.n_results <> r.n_results THEN 'new results'
                    ELSE 'requested' END AS reason
        FROM r LEFT JOIN scoring_state s ON s.patient_id = r.patient_id AND s.scoring_key = ?
        WHERE ? OR s.patient_id IS NULL OR s.status <> 'ok' OR s.last_batch_id <> r.last_batch_id
              OR s.n_results <> r.n_results
        ORDER BY r.n_results DESC, r.patient_id
    """
    ids = None if patients is None else list(patients)
    since = None if since is None else pd.Timestamp(since).to_pydatetime()
    with store.read() as cur:
        return cur.execute(sql, [ids, ids, since, since, key, bool(everyone)]).df()


def scoring_status(store, key: str | None = None) -> dict:
    """For the review page: the last run, and how many patients have results newer than their outputs.

    ``key`` is the current scoring key (None: the key of the last run). Returns
    ``{"last_run": dict | None, "waiting": int | None, "scored": int}``.
    """
    with store.read() as cur:
        run = cur.execute("SELECT * EXCLUDE (summary), summary::VARCHAR AS summary FROM scoring_runs "
                          "ORDER BY started_at DESC LIMIT 1").df()
    last = None if run.empty else run.iloc[0].to_dict()
    key = key or (last["scoring_key"] if last else None)
    if key is None:
        return {"last_run": None, "waiting": None, "scored": 0}
    waiting = len(select_patients(store, key))
    with store.read() as cur:
        scored = cur.execute("SELECT count(*) FROM scoring_state WHERE scoring_key = ? AND status = 'ok'",
                             [key]).fetchone()[0]
    return {"last_run": last, "waiting": waiting, "scored": int(scored)}


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class _Tally:
    scored: int = 0
    failed: int = 0
    outputs: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    worker_pids: set = field(default_factory=set)
    model_loads: set = field(default_factory=set)
    patient_s: list = field(default_factory=list)
    patient_cpu_s: list = field(default_factory=list)


def _write_batch(store, results: list[dict], key: str, model_version: str, run_id: str, tally: _Tally,
                 selected: int) -> None:
    """One transaction: the batch's outputs, its patients' state rows, the run's counters."""
    from clinical.outputs import upsert_outputs

    records = [r for res in results for r in res["records"]]
    now = _utcnow()
    state = []
    for res in results:
        if res["last_batch_id"] is None:  # the patient was not found: nothing to record against
            continue
        state.append((res["patient_id"], key, model_version, int(res["last_batch_id"]), int(res["n_results"]),
                      None if res["forecast_at"] is None else pd.Timestamp(res["forecast_at"]).to_pydatetime(),
                      len(res["records"]), res["status"], now, run_id))
    from clinical.predict import prune_patient

    with store.write() as cur:
        counts = upsert_outputs(cur, records)
        counts["superseded"] = sum(prune_patient(cur, res["patient_id"], res["supersede"])
                                   for res in results if res.get("supersede"))
        if state:
            cur.executemany("INSERT OR REPLACE INTO scoring_state VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", state)
        tally.outputs.update(counts)
        for res in results:
            if res["status"] == "ok":
                tally.scored += 1
            else:
                tally.failed += 1
                tally.failures.append({"patient_id": res["patient_id"], "error": res["status"]})
        cur.execute("UPDATE scoring_runs SET scored = ?, failed = ? WHERE run_id = ?",
                    [tally.scored, tally.failed, run_id])
    for res in results:
        tally.by_kind.update(r["kind"] for r in res["records"])
        tally.worker_pids.add((res.get("worker_host"), res["worker_pid"]))
        if res.get("model_loaded_at") is not None:
            tally.model_loads.add((res.get("worker_host"), res["worker_pid"], res["model_loaded_at"]))
        tally.patient_s.append(res["elapsed_s"])
        if res.get("cpu_s") is not None:
            tally.patient_cpu_s.append(res["cpu_s"])


def _model_version(model_dir: str) -> str:
    f = Path(model_dir) / "model_version"
    if f.is_file():
        return f.read_text().strip()
    from model.inference import ForecastPipeline  # older folders: load it to know

    return ForecastPipeline.from_pretrained(model_dir).model_version


def run_scoring(
    config: ScoreConfig,
    *,
    engine: str = "process",
    workers: int | None = None,
    scheduler: str | None = None,
    everyone: bool = False,
    patients: Iterable[str] | None = None,
    since=None,
    write_batch: int = 16,
    write_every_s: float = 5.0,
    progress: bool = True,
    on_written: Callable[[int], None] | None = None,
) -> dict:
    """Select, compute and store; returns the JSON summary (see the module docstring).

    Summary keys: ``run_id, engine, workers, model_version, scoring_key, selected, scored,
    failed, outputs`` (inserted / updated / unchanged), ``by_kind``, ``worker_processes``,
    ``model_loads`` (times a worker loaded the model: once per worker process), ``elapsed_s``,
    ``patients_per_hour``, ``patient_s`` (p50 / p95 / max of one patient's wall time in its
    worker, reading included), ``patient_cpu_s`` (p50 / p95 / total CPU seconds of one patient in
    its worker process: what the work costs whatever else the machine runs), ``failures`` (the
    first 20). Raises ``ValueError`` for an
    unknown engine or a model folder that cannot be read, ``RuntimeError`` when the dask
    engine is asked for without Dask installed.
    """
    from data.db import Store, StoreSettings

    if engine not in _ENGINE_CLASSES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    t0 = time.perf_counter()
    if not (Path(config.model_dir) / "config.json").is_file():
        raise ValueError(f"no trained model in {config.model_dir} (run `labtrend train`)")
    version = _model_version(config.model_dir)
    key = scoring_key(version, config)
    store = Store(StoreSettings(path=config.db_path, busy_timeout_s=300.0))
    store.migrate()
    todo = select_patients(store, key, everyone=everyone, patients=patients, since=since)
    ids = todo["patient_id"].astype(str).tolist()
    run_id = f"run-{_utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    tally = _Tally()
    summary = {"run_id": run_id, "engine": engine, "workers": 0, "model_version": version, "scoring_key": key,
               "selected": len(ids), "reasons": dict(Counter(todo["reason"]))}
    eng = None
    if ids:
        eng = _ENGINE_CLASSES[engine](workers=1 if engine == "serial" else workers, scheduler=scheduler)
    summary["workers"] = eng.workers if eng else 0
    with store.write() as cur:
        cur.execute("INSERT INTO scoring_runs VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?, 0, 0, NULL)",
                    [run_id, _user(), _utcnow(), engine, summary["workers"], version, key, len(ids)])
    bar = None
    if ids and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), unit="patient", desc="scoring", smoothing=0.05, dynamic_ncols=True)
    try:
        if ids:
            _drive(eng, config, ids, version, store, key, run_id, tally, len(ids), write_batch, write_every_s, bar,
                   on_written)
    finally:
        if eng is not None:
            eng.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    ps, pc = sorted(tally.patient_s), sorted(tally.patient_cpu_s)
    summary.update(
        scored=tally.scored, failed=tally.failed,
        outputs={k: int(tally.outputs.get(k, 0)) for k in ("inserted", "updated", "unchanged", "superseded")},
        by_kind=dict(sorted(tally.by_kind.items())), worker_processes=len(tally.worker_pids),
        model_loads=len(tally.model_loads),
        elapsed_s=round(elapsed, 3),
        patients_per_hour=round(3600 * (tally.scored + tally.failed) / elapsed, 1) if ids and elapsed > 0 else None,
        patient_s={"p50": _pct(ps, 50), "p95": _pct(ps, 95), "max": round(ps[-1], 3) if ps else None},
        patient_cpu_s={"p50": _pct(pc, 50), "p95": _pct(pc, 95), "total": round(sum(pc), 3)},
        failures=tally.failures[:20],
    )
    with store.write() as cur:
        cur.execute("UPDATE scoring_runs SET finished_at = ?, scored = ?, failed = ?, summary = ? WHERE run_id = ?",
                    [_utcnow(), tally.scored, tally.failed, json.dumps(summary), run_id])
    return summary


def _drive(eng, config, ids, version, store, key, run_id, tally, selected, write_batch, write_every_s, bar,
           on_written) -> None:
    """Keep every worker busy (a few tasks queued each), write finished patients in batches."""
    pending_ids = list(ids)
    in_flight = set()
    buffer: list[dict] = []
    last_write = time.monotonic()
    depth = 2 * eng.workers

    def flush():
        nonlocal buffer, last_write
        if buffer:
            _write_batch(store, buffer, key, version, run_id, tally, selected)
            if on_written is not None:
                on_written(tally.scored + tally.failed)
            buffer = []
        last_write = time.monotonic()

    try:
        while pending_ids or in_flight:
            while pending_ids and len(in_flight) < depth:
                in_flight.add(eng.submit(_score_patient, config, pending_ids.pop(0), version))
            for fut in eng.wait_first(in_flight):
                in_flight.discard(fut)
                buffer.append(fut.result())
                if bar is not None:
                    bar.update(1)
            if len(buffer) >= write_batch or time.monotonic() - last_write >= write_every_s:
                flush()
    finally:
        flush()  # what is finished is kept, also when the run stops on an error or Ctrl+C


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    k = (len(values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return round(values[lo] + (values[hi] - values[lo]) * (k - lo), 3)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container): still a run
        return "unknown"


def config_dict(config: ScoreConfig) -> dict:
    """The config as a JSON-safe dict (for the summary and logs)."""
    return asdict(config)
