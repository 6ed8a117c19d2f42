"""Model benchmark on CPU: training throughput, forecast latency and batch throughput,
and (unless --skip-eval) the evaluation table of ``labtrend evaluate``.

    python benchmarks/model.py [--config small] [--steps 40] [--repeats 30] [--skip-eval]

Uses MIMIC-IV demo (imported into a temporary store) and the pretrained checkpoint
(``var/pretrained``, built by ``labtrend train --stage pretrain`` when missing). Prints JSON
and saves it to benchmarks/results/model.json. Figures:
* training events/s: history events processed per second of fine-tuning steps (batch
  construction, forward, backward and optimizer step; evaluation excluded), full mode;
* forecast latency for one patient x 20 analytes (p50/p95 of --repeats calls; target p95 <= 20 ms),
  with 1 torch thread (the dashboard's setting) and torch's default;
* batch forecast throughput in queries/s (target >= 5,000 on CPU);
* last-value forecasting of the same queries in the same run, as the baseline ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.common import load_average, median, mimic_store, percentile, save  # noqa: E402
from data import settings  # noqa: E402


def mimic_cohort(tmp: Path):
    """The MIMIC-IV demo store and its model cohort."""
    from data import queries

    store = mimic_store(tmp)
    return store, queries.cohort(store)


def ensure_pretrained(config: str) -> Path:
    init = settings.pretrained_dir()
    if not (init / "config.json").is_file():
        import train

        rc = train.main(["--stage", "pretrain", "--config", config, "--init", str(init)])
        if rc != 0:
            raise SystemExit(f"pretraining failed (exit {rc})")
    return init


def measure_finetune(init: Path | None, history: pd.DataFrame, *, mode: str = "full", steps: int = 40,
                     batch_size: int = 32, runtime=None, config: str = "small") -> dict:
    """Fine-tune for ``steps`` steps and return events/s of the training steps and wall time."""
    from model.training import Runtime, TrainSettings, finetune

    records = []
    runtime = runtime or Runtime(progress_bar=False)
    runtime.log = records.append
    s = TrainSettings(steps=steps, batch_size=batch_size, eval_every=steps, eval_rows=64, final_eval_rows=512,
                      patience=10**6, timing_steps=steps)
    t0 = time.perf_counter()
    pipe = finetune(init, history, mode, settings=s, runtime=runtime, config=config)
    wall = time.perf_counter() - t0
    val0 = next(r for r in records if r["split"] == "val" and r["step"] == 0)
    tr = next(r for r in records if r["split"] == "train")
    train_s = tr["elapsed"] - val0["elapsed"]
    events = tr["step"] * batch_size * tr["metrics"].get("mean_events", float("nan"))
    return {"mode": mode, "steps": tr["step"], "batch_size": batch_size,
            "mean_events_per_row": round(tr["metrics"].get("mean_events", float("nan")), 1),
            "train_seconds": round(train_s, 2), "events_per_s": round(events / train_s),
            "steps_per_s": round(tr["step"] / train_s, 2), "wall_s": round(wall, 1), "pipeline": pipe}


def latency(pipe, history: pd.DataFrame, analytes: list[str], repeats: int) -> dict:
    """One patient x len(analytes) queries, the day after the patient's last result."""
    rng = np.random.default_rng(0)
    pids = history["patient_id"].unique()
    lat = []
    for _ in range(repeats):
        pid = pids[rng.integers(len(pids))]
        h = history[history["patient_id"] == pid]
        at = h["collected_at"].max() + pd.Timedelta(days=1)
        q = pd.DataFrame({"patient_id": pid, "analyte_code": analytes, "at": at})
        t = time.perf_counter()
        pipe.forecast(h, q)
        lat.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2), "repeats": repeats,
            "queries_per_call": len(analytes)}


def latency_by_threads(pipe, history: pd.DataFrame, analytes: list[str], repeats: int) -> dict:
    """:func:`latency` with 1 intra-op thread (what the dashboard uses: one small batch per patient)
    and with torch's default; torch's setting is restored afterwards."""
    import torch

    default = torch.get_num_threads()
    out = {}
    try:
        for n in sorted({1, default}):
            torch.set_num_threads(n)
            latency(pipe, history, analytes, 3)  # warm-up at this thread count
            out[f"threads_{n}"] = latency(pipe, history, analytes, repeats)
    finally:
        torch.set_num_threads(default)
    out["load_average_1min"] = load_average()
    return out


def throughput(pipe, history: pd.DataFrame, analytes: list[str], n_queries: int, runs: int = 3) -> dict:
    """Queries/s forecasting ``n_queries`` (patient, analyte, day after last result) at once."""
    from model.baselines import LastValue

    last = history.groupby("patient_id")["collected_at"].max() + pd.Timedelta(days=1)
    pairs = [(p, a) for p in last.index for a in analytes]
    reps = int(np.ceil(n_queries / len(pairs)))
    q = pd.DataFrame([(p, a, last[p]) for p, a in pairs] * reps, columns=["patient_id", "analyte_code", "at"])[:n_queries]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fc = pipe.forecast(history, q, batch_size=512)
        times.append(time.perf_counter() - t)
    lv = LastValue()
    lv.fit(history)
    lv_times = []
    for _ in range(runs):
        t = time.perf_counter()
        lv.predict(history, q)
        lv_times.append(time.perf_counter() - t)
    qps = len(q) / median(times)
    return {"queries": len(q), "median_s": round(median(times), 3), "queries_per_s": round(qps),
            "ok": int((fc["status"] == "ok").sum()),
            "last_value_queries_per_s": round(len(q) / median(lv_times)),
            "ratio_vs_last_value": round(median(lv_times) / median(times), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--minutes-per-mode", type=float, default=3.0)
    args = ap.parse_args()
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="labtrend-model-bench-"))
    store, history = mimic_cohort(tmp)
    init = ensure_pretrained(args.config)
    from data import queries

    top = queries.top_analytes(store, 20)["analyte_code"].tolist()
    train = measure_finetune(init, history, steps=args.steps)
    pipe = train.pop("pipeline")
    out = {
        "device": "cpu", "torch_threads": torch.get_num_threads(), "config": args.config,
        "training": train,
        "forecast_latency_one_patient_20_analytes": latency_by_threads(pipe, history, top, args.repeats),
        "batch_forecast": throughput(pipe, history, top, args.queries),
        "targets": {"latency_p95_ms": "<= 20", "batch_queries_per_s": ">= 5000"},
    }
    if not args.skip_eval:
        from labtrend.evaluate import run_evaluation

        card = run_evaluation(str(tmp / "bench.duckdb"), tmp / "card", init_dir=init,
                              minutes_per_mode=args.minutes_per_mode, config=args.config)
        out["evaluation"] = {"statement": card.get("statement"), "winner": card.get("winner"),
                             "overall": card.get("overall"), "card": str(tmp / "card" / "model_card.md")}
    save("model", out)


if __name__ == "__main__":
    main()
