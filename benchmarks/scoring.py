"""Scoring benchmark: ``labtrend score`` throughput per engine, one patient's cost, one explanation's latency.

Run from the repository root (a trained model is needed: ``bash scripts/run.sh demo`` makes
``var/demo-model``)::

    .venv/bin/python benchmarks/scoring.py                 # everything, 3 runs per engine
    .venv/bin/python benchmarks/scoring.py --runs 1        # one run per engine

Writes ``benchmarks/results/scoring.json`` and prints it. On the 100 MIMIC-IV demo patients
(a fresh store each run, outputs stored; explanations of the top 5 forecasts of each patient):

* **Throughput** on ``--workers`` (2) cores: the process pool and the Dask engine (a
  ``LocalCluster`` of as many workers), median of ``--runs`` runs each, against the baseline
  measured in the same run: the serial engine (one process, one core). Patients per hour from
  the wall time, and from the workers' CPU time (``2 cores x 3600 / CPU seconds per patient``:
  what two dedicated cores would give; on a shared machine the wall time also measures the
  others' load, so both are reported with the 1-minute load average).
* **Incremental**: after a run, one new file is imported (new results for 3 patients and a new
  patient); the next incremental run must select exactly those 4 patients.
* **One patient** (the busiest 20), one core, all outputs, explanations included
  (:func:`clinical.predict.patient_outputs` plus the store write), p50 / p95 of wall and CPU
  time; baseline in the same run: the same without explanations.
* **One explanation** (the top 5 forecasts of the busiest 20 patients), one core, each as the
  dashboard asks for it (:func:`model.explain.explain_forecast`, history prepared included):
  p50 / p95 / max, the largest additivity gap as a share of its tolerance (XAI-15: at most
  ``0.01 x max(1, |median|)``); baseline in the same run: the forecast alone.
* **Demo outputs**: the README demo's output step (3 held-out patients scored, 10 patients'
  forecasts replayed) on a fresh store.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import load_average, median, mimic_store, percentile, save  # noqa: E402


def _fresh(base: Path, tmp: Path, name: str) -> Path:
    dst = tmp / f"{name}.duckdb"
    for suffix in ("", ".wal"):
        Path(str(dst) + suffix).unlink(missing_ok=True)
        if Path(str(base) + suffix).exists():
            shutil.copy(str(base) + suffix, str(dst) + suffix)
    return dst


def throughput(base: Path, tmp: Path, model: str, engines: list[str], workers: int, runs: int) -> dict:
    from labtrend.scoring import ScoreConfig, run_scoring

    out = {}
    for engine in engines:
        rows = []
        for r in range(runs):
            db = _fresh(base, tmp, f"tp-{engine}-{r}")
            load = load_average()
            s = run_scoring(ScoreConfig(db_path=str(db), model_dir=model), engine=engine,
                            workers=1 if engine == "serial" else workers, progress=False)
            cores = 1 if engine == "serial" else workers
            cpu_per_patient = s["patient_cpu_s"]["total"] / max(1, s["scored"])
            rows.append({"load_1min_at_start": load, "elapsed_s": s["elapsed_s"], "scored": s["scored"],
                         "failed": s["failed"], "workers": s["workers"], "model_loads": s["model_loads"],
                         "patients_per_hour_wall": s["patients_per_hour"],
                         "cpu_s_per_patient": round(cpu_per_patient, 3),
                         "patients_per_hour_cpu_bound": round(cores * 3600 / cpu_per_patient, 1),
                         "patient_s": s["patient_s"], "patient_cpu_s": s["patient_cpu_s"], "by_kind": s["by_kind"]})
            print(f"{engine} run {r}: {s['elapsed_s']:.1f} s, {s['patients_per_hour']} patients/h (wall), "
                  f"{rows[-1]['patients_per_hour_cpu_bound']} patients/h (CPU-bound), load {load}", file=sys.stderr)
        out[engine] = {
            "runs": rows,
            "patients_per_hour_wall": median([x["patients_per_hour_wall"] for x in rows]),
            "patients_per_hour_cpu_bound": median([x["patients_per_hour_cpu_bound"] for x in rows]),
            "elapsed_s": median([x["elapsed_s"] for x in rows]),
        }
    if "serial" in out:
        for engine in out:
            for k in ("patients_per_hour_wall", "patients_per_hour_cpu_bound"):
                out[engine][f"ratio_{k}_vs_serial"] = round(out[engine][k] / out["serial"][k], 3)
    if "process" in out and "dask" in out:
        out["dask_vs_process"] = {k: round(out["dask"][k] / out["process"][k], 3)
                                  for k in ("patients_per_hour_wall", "patients_per_hour_cpu_bound")}
    return out


def incremental(base: Path, tmp: Path, model: str, workers: int) -> dict:
    """After a full run (the process engine's throughput run, else one here), import one new file and
    score again: only that file's patients are touched."""
    import pandas as pd

    from data import queries
    from data.db import Store, StoreSettings
    from data.importers import run_import
    from labtrend.scoring import ScoreConfig, run_scoring

    db = tmp / "tp-process-0.duckdb"  # the store the process engine's first throughput run scored
    config = ScoreConfig(db_path=str(db), model_dir=model)
    if not db.is_file():
        db = _fresh(base, tmp, "incremental")
        config = ScoreConfig(db_path=str(db), model_dir=model)
    first = run_scoring(config, engine="process", workers=workers, progress=False)  # nothing left, or everyone
    store = Store(StoreSettings(path=str(db)))
    pats = queries.patients(store).sort_values("patient_id")
    chosen = pats["patient_id"].iloc[[5, 40, 75]].tolist()
    lines = ["patient_id,collected_at,loinc,test_name,value,unit"]
    for pid in chosen:
        t = pd.Timestamp(queries.timeline(store, pid)["collected_at"].max()) + pd.Timedelta(hours=8)
        lines.append(f"{pid},{t:%Y-%m-%d %H:%M},2823-3,Potassium,4.6,mmol/L")
        lines.append(f"{pid},{t:%Y-%m-%d %H:%M},2951-2,Sodium,138,mmol/L")
    for d in range(1, 4):
        lines.append(f"BENCH-NEW,2180-01-0{d} 08:00,2823-3,Potassium,{4 + d / 10},mmol/L")
    f = tmp / "new_results.csv"
    f.write_text("\n".join(lines) + "\n")
    run_import(store, f)
    t0 = time.perf_counter()
    again = run_scoring(config, engine="process", workers=workers, progress=False)
    with store.read() as cur:
        touched = sorted(r[0] for r in cur.execute(
            "SELECT DISTINCT patient_id FROM scoring_state WHERE run_id = ?", [again["run_id"]]).fetchall())
    want = sorted(chosen + ["BENCH-NEW"])
    return {"first_run_selected": first["selected"], "file_patients": want, "rerun_selected": again["selected"],
            "rerun_touched": touched, "only_the_file_patients": touched == want and again["selected"] == len(want),
            "rerun_elapsed_s": round(time.perf_counter() - t0, 2), "rerun_outputs": again["outputs"]}


def per_patient(base: Path, tmp: Path, model: str, n: int) -> dict:
    import torch

    from clinical.outputs import store_outputs
    from clinical.predict import patient_outputs
    from data import queries
    from data.db import Store, StoreSettings
    from model.explain import _shap
    from model.inference import ForecastPipeline

    torch.set_num_threads(1)
    _shap()
    db = _fresh(base, tmp, "per-patient")
    store = Store(StoreSettings(path=str(db)))
    pipe = ForecastPipeline.from_pretrained(model)
    busiest = queries.patients(store).sort_values(["n_results", "patient_id"], ascending=[False, True]).head(n)
    out = {"load_1min_at_start": load_average(), "patients": int(len(busiest)),
           "n_results": {"max": int(busiest["n_results"].max()), "min": int(busiest["n_results"].min())}}
    warm = busiest["patient_id"].iloc[-1]
    patient_outputs(pipe, queries.patient_info(store, warm), queries.timeline(store, warm))
    for label, explain in (("with_explanations", True), ("without_explanations_baseline", False)):
        wall, cpu = [], []
        for pid in busiest["patient_id"]:
            t0, c0 = time.perf_counter(), time.process_time()
            info, tl = queries.patient_info(store, pid), queries.timeline(store, pid)
            res = patient_outputs(pipe, info, tl, explain=explain)
            store_outputs(store, res["records"])
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out[label] = {"wall_s": {"p50": round(median(wall), 3), "p95": round(percentile(wall, 95), 3),
                                 "max": round(max(wall), 3)},
                      "cpu_s": {"p50": round(median(cpu), 3), "p95": round(percentile(cpu, 95), 3),
                                "max": round(max(cpu), 3)}}
    out["ratio_p95_wall_with_vs_without"] = round(out["with_explanations"]["wall_s"]["p95"]
                                                  / out["without_explanations_baseline"]["wall_s"]["p95"], 3)
    return out


def explanations(base: Path, tmp: Path, model: str, n: int) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from clinical.anomalies import history_from_timeline
    from clinical.predict import default_at, top_analytes_for
    from data import queries
    from data.db import Store, StoreSettings
    from model.explain import _shap, explain_forecast
    from model.inference import ForecastPipeline

    torch.set_num_threads(1)
    _shap()
    store = Store(StoreSettings(path=str(_fresh(base, tmp, "explain"))))
    pipe = ForecastPipeline.from_pretrained(model)
    busiest = queries.patients(store).sort_values(["n_results", "patient_id"], ascending=[False, True]).head(n)
    load = load_average()
    wall, cpu, fc_wall, gaps, evals, groups, statuses = [], [], [], [], [], [], []
    first = True
    for pid in busiest["patient_id"]:
        info, tl = queries.patient_info(store, pid), queries.timeline(store, pid)
        at = default_at(tl)
        h = history_from_timeline(tl[tl["collected_at"] < at], info)
        for code in top_analytes_for(h, pipe.vocab, 5):
            q = pd.DataFrame({"patient_id": [pid], "analyte_code": [code], "at": [at]})
            t0 = time.perf_counter()
            median_ = float(pipe.forecast(h, q)["q50"].iloc[0])
            fc_wall.append(time.perf_counter() - t0)
            if first:  # the first explanation of a process also warms shap's code paths
                explain_forecast(pipe, h, pid, code, at, forecast_median=median_)
                first = False
            t0, c0 = time.perf_counter(), time.process_time()
            e = explain_forecast(pipe, h, pid, code, at, forecast_median=median_)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            statuses.append(e.status)
            if e.tolerance:
                gaps.append(e.additivity_gap / e.tolerance)
            evals.append(e.n_evaluations or 0)
            groups.append(len(e.groups))
    return {"load_1min_at_start": load, "explanations": len(wall), "statuses": dict(pd.Series(statuses).value_counts()),
            "wall_s": {"p50": round(median(wall), 4), "p95": round(percentile(wall, 95), 4), "max": round(max(wall), 4)},
            "cpu_s": {"p50": round(median(cpu), 4), "p95": round(percentile(cpu, 95), 4), "max": round(max(cpu), 4)},
            "forecast_baseline_wall_s": {"p50": round(median(fc_wall), 4), "p95": round(percentile(fc_wall, 95), 4)},
            "ratio_p50_explanation_vs_forecast": round(median(wall) / median(fc_wall), 2),
            "max_additivity_gap_share_of_tolerance": float(np.max(gaps)) if gaps else None,
            "model_evaluations": {"p50": median(evals), "max": int(max(evals))},
            "groups": {"p50": median(groups), "max": int(max(groups))}}


def demo_outputs(base: Path, tmp: Path, model: str) -> dict:
    """The README demo's step 3 on a fresh store: 3 held-out patients scored, 10 patients' forecasts replayed."""
    from clinical.predict import replay_forecasts
    from data import queries
    from data.db import Store, StoreSettings
    from labtrend.cli import _demo_holdout
    from labtrend.scoring import ScoreConfig, run_scoring
    from model.inference import ForecastPipeline

    db = _fresh(base, tmp, "demo")
    store = Store(StoreSettings(path=str(db)))
    pats = queries.patients(store)
    held = pats[pats["patient_id"].isin(_demo_holdout(pats, 10))].sort_values(["n_results", "patient_id"],
                                                                            ascending=[False, True])
    load = load_average()
    t0 = time.perf_counter()
    review = held["patient_id"].head(3).astype(str).tolist()
    s = run_scoring(ScoreConfig(db_path=str(db), model_dir=model), patients=review, engine="serial", progress=False)
    pipe = ForecastPipeline.from_pretrained(model)
    n = sum(len(replay_forecasts(store, pipe, p)) for p in held["patient_id"])
    return {"load_1min_at_start": load, "patients_scored": s["scored"], "forecasts_replayed": n,
            "outputs_s": round(time.perf_counter() - t0, 2), "scoring_s": s["elapsed_s"],
            "note": "scored with --model (the demo's own model is trained without these patients)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="var/demo-model", help="a trained ForecastPipeline folder")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="runs per engine (the median is reported)")
    ap.add_argument("--engines", default="process,dask,serial")
    ap.add_argument("--busiest", type=int, default=20, help="patients for the per-patient and explanation figures")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: "
                                               "throughput,incremental,patient,explanation,demo")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"no trained model in {args.model}: run `bash scripts/run.sh demo` first")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    result = {"settings": {"model": args.model, "workers": args.workers, "runs": args.runs, "engines": engines,
                           "busiest": args.busiest, "top_forecasts_explained": 5},
              "note": "shared 2-core machine: wall times include other sessions' load (1-minute load average "
                      "recorded per section); CPU times are this work's own"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = mimic_store(tmp)
        base = Path(store.settings.path)
        del store
        if "explanation" not in skip:
            result["explanation"] = explanations(base, tmp, args.model, args.busiest)
        if "patient" not in skip:
            result["per_patient"] = per_patient(base, tmp, args.model, args.busiest)
        if "demo" not in skip:
            result["demo_outputs"] = demo_outputs(base, tmp, args.model)
        if "throughput" not in skip:
            result["throughput"] = throughput(base, tmp, args.model, engines, args.workers, args.runs)
        if "incremental" not in skip:
            result["incremental"] = incremental(base, tmp, args.model, args.workers)
    previous = Path(__file__).resolve().parent / "results" / "scoring.json"
    if skip and previous.is_file():  # sections not run now: kept from the last run, and marked so
        import json

        old = json.loads(previous.read_text())
        for section in ("explanation", "per_patient", "demo_outputs", "throughput", "incremental"):
            if section not in result and section in old:
                result[section] = dict(old[section], carried_from_previous_run=True)
    save("scoring", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
