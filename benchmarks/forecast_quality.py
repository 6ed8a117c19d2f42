"""Forecast quality of the fine-tuned transformer against last value and LightGBM, in the same run.

    python benchmarks/forecast_quality.py mimic [--folds 5] [--steps 600] [--seeds 1] [--init DIR]
    python benchmarks/forecast_quality.py setc  [--steps 600] [--init DIR]
    python benchmarks/forecast_quality.py extreme --model DIR      # issue 13 (a) on a fine-tuned model

* ``mimic``: MIMIC-IV demo, the task of :mod:`model.evaluation`, ``--folds`` of the 5 patient-grouped
  folds that ``labtrend evaluate`` uses (``grouped_folds(task.patients, 5, seed)``). Last value,
  LightGBM (the change from the last value in units of the analyte's range, l1 loss: its strongest
  honest form) and full fine-tuning from the pretrained checkpoint are scored on the same targets;
  per fold and pooled: count-weighted NMAE, 80 % coverage, analytes better than last value, and
  whether full fine-tuning is below LightGBM. Fine-tuning runs a fixed ``--steps`` (no time budget)
  so that the figure does not depend on how busy the machine is; 600 steps is about what the default
  3.5-minute CPU budget of ``labtrend train`` runs on 2 quiet cores (``benchmarks/model.py``
  measures the step rate). ``--seeds K`` fine-tunes K seeds and averages their quantiles.
* ``setc``: PhysioNet/CinC 2012 set C (3,977 ICU stays, hour-binned; never in the pretraining corpus,
  which has set A) as a site with hundreds of patients: 80 % of the stays fine-tune, 20 % are scored.
  The checkpoint as it is (zero-shot, calibrated on its pretraining validation patients) against
  the same checkpoint fully fine-tuned: fine-tuning must be at least as good.
* ``extreme``: issue 13 (a). A WBC series at 240-375 x10^3/uL (last 342) appended to a MIMIC-IV
  demo patient, forecast one day after the last result by a fine-tuned model.

Prints a summary and saves JSON to ``benchmarks/results/forecast_quality_<what>.json``; ``mimic`` also
writes the model card (``README.md`` + ``model_card.json``) to ``--card``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.common import RESULTS, machine, mimic_store  # noqa: E402
from labtrend import settings  # noqa: E402

SETC_FOLDER = "physionet-challenge-2012-setc-hourly"
SETC_ANCHOR = pd.Timestamp("2000-01-01 00:00:00")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_setc() -> pd.DataFrame:
    """Set C as a history frame, mapped exactly as set A is in the corpus (``source_codes.csv``,
    source 'physionet2012': the same parameter names and units). A minimal loader for this
    benchmark; the corpus module gets the tested one. No demographics in this derived copy."""
    from model.corpus import _finish  # the corpus's own mapping, conversion and plausibility filter

    folder = settings.dataset_dir(SETC_FOLDER)
    if folder is None:
        raise SystemExit(f"{SETC_FOLDER} not found under the data folder (LABTREND_DATA_DIR)")
    raw = pd.read_csv(folder / "labs_long_hourly.csv.gz", usecols=["record_id", "time_minutes", "parameter", "value"])
    long = pd.DataFrame({
        "patient_id": "physionet2012c:" + raw["record_id"].astype(str),
        "collected_at": SETC_ANCHOR + pd.to_timedelta(raw["time_minutes"], unit="min"),
        "source_name": raw["parameter"], "value": raw["value"].astype(float),
        "censor": np.zeros(len(raw), dtype="int8"), "sex": None, "age_years": np.nan,
    })
    return _finish(long, "physionet2012", {"source": "physionet2012 set C", "file": "labs_long_hourly.csv.gz"})


def mimic_cohort(tmp: Path) -> tuple[pd.DataFrame, dict]:
    from data import queries

    store = mimic_store(tmp)
    names = queries.top_analytes(store, 60).set_index("analyte_code")["analyte_name"].to_dict()
    return queries.cohort(store), names


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
class SeedEnsemble:
    """K fine-tuned seeds; the forecast averages the members' calibrated quantiles (then sorted).
    Averaging calibrated quantiles keeps their levels only approximately: the coverage is
    measured and reported like any other method's."""

    def __init__(self, members: list):
        self.members = members
        self.name = members[0].name + (f" ({len(members)} seeds)" if len(members) > 1 else "")
        self.reports = []

    def fit(self, train_history):
        for m in self.members:
            m.fit(train_history)
            self.reports.append(m.reports[-1])

    def predict(self, history, queries):
        from model import QUANTILE_COLUMNS

        outs = [m.predict(history, queries) for m in self.members]
        if len(outs) == 1:
            return outs[0]
        out = outs[0].copy()
        q = np.mean([o[list(QUANTILE_COLUMNS)].to_numpy(float) for o in outs], axis=0)
        out[list(QUANTILE_COLUMNS)] = np.sort(q, axis=1)
        return out


def finetuned(init: Path, steps: int, seeds: int, corpus, extra: dict):
    from model.finetuned import FineTunedForecaster
    from model.training import Runtime, TrainSettings

    base = TrainSettings(steps=steps, max_minutes=None, **extra)
    members = [FineTunedForecaster("full", init, settings=replace(base, seed=s), runtime=Runtime(progress_bar=False),
                                   corpus_history=corpus) for s in range(seeds)]
    return SeedEnsemble(members)


def per_fold(result, ranges: pd.Series) -> dict:
    """Count-weighted NMAE (the mean over targets of |y - q50| / range), last value's, 80 % coverage, per fold."""
    p = result.predictions
    out = {}
    for fold, d in p.groupby("fold", sort=True):
        rng = d["analyte_code"].map(ranges).to_numpy(float)
        e = np.abs(d["y"].to_numpy(float) - d["q50"].to_numpy(float)) / rng
        lv = np.abs(d["y"].to_numpy(float) - d["last_value"].to_numpy(float)) / rng
        cov = ((d["q10"] <= d["y"]) & (d["y"] <= d["q90"])).mean()
        out[fold] = {"n": int(len(d)), "nmae": float(e.mean()), "last_value_nmae": float(lv.mean()),
                     "coverage80": float(cov)}
    return out


def summarise(results: dict, primary: str, ranges: pd.Series) -> dict:
    folds = {n: per_fold(r, ranges) for n, r in results.items()}
    s = {"pooled": {n: {k: r.overall[k] for k in ("nmae", "last_value_nmae", "coverage80", "coverage90",
                                                    "wins_vs_last_value", "n_targets")}
                    for n, r in results.items()},
         "per_fold": folds}
    if "LightGBM" in results and primary in results:
        below = [f for f in folds[primary] if folds[primary][f]["nmae"] < folds["LightGBM"][f]["nmae"]]
        s["folds_below_lightgbm"] = f"{len(below)} of {len(folds[primary])}"
    if primary in results:
        o = results[primary].overall
        s["ratio_to_last_value"] = o["nmae"] / o["last_value_nmae"]
    return s


def _print(results: dict) -> None:
    for n, r in results.items():
        o = r.overall
        print(f"{n:34s} NMAE {o['nmae']:.4f} (last value {o['last_value_nmae']:.4f}, ratio "
              f"{o['nmae'] / o['last_value_nmae']:.3f})  cov80 {o['coverage80']:.3f}  wins {o['wins_vs_last_value']}/"
              f"{o['n_analytes']}  [{r.info['wall_s']:.0f} s]", flush=True)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def run_mimic(args) -> dict:
    from model.baselines import LastValue, LightGBMForecaster
    from model.evaluation import build_task, evaluate, grouped_folds, write_model_card

    with tempfile.TemporaryDirectory() as tmp:
        cohort, names = mimic_cohort(Path(tmp))
    task = build_task(cohort)
    folds = grouped_folds(task.patients, k=5, seed=args.seed)[: args.folds]
    corpus = _corpus(args)
    ft = finetuned(Path(args.init), args.steps, args.seeds, corpus, _extra(args))
    methods = [LastValue(), LightGBMForecaster(analytes=task.analytes, seed=args.seed), ft]
    results = {}
    for m in methods:
        results[m.name] = evaluate(m, task, folds, seed=args.seed, leakage_check=args.leakage_check)
        _print({m.name: results[m.name]})
    summary = summarise(results, ft.name, task.ranges["range"])
    meta = {"dataset": "MIMIC-IV Clinical Database Demo v2.2", "dataset_id": "mimic-iv-demo",
            "split": f"{len(folds)} of 5 patient-grouped folds (seed {args.seed})", "task": task.describe(),
            "analyte_names": {a: names.get(a, "") for a in task.analytes}, "primary_method": ft.name,
            "command": "python benchmarks/forecast_quality.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "pretrained_checkpoint": _relative(args.init),
            "finetune_steps": args.steps, "seeds": args.seeds, "training_reports": {ft.name: ft.reports},
            "datasets": ["mimic-iv-demo", "physionet-challenge-2012", "eicu-crd-demo", "nhanes"]}
    if args.card:
        write_model_card(results, args.card, meta)
    return {"summary": summary, "meta": {k: v for k, v in meta.items() if k != "training_reports"},
            "training": [{k: r.get(k) for k in ("steps", "best_step", "stop_reason", "fit_seconds", "warnings",
                                                 "val_initial", "val", "forgetting")} for r in ft.reports]}


def run_setc(args) -> dict:
    from model.baselines import LastValue, LightGBMForecaster
    from model.evaluation import build_task, evaluate, holdout_fold
    from model.finetuned import PipelineForecaster
    from model.inference import ForecastPipeline
    from model.training import split_patients

    cohort = load_setc()
    task = build_task(cohort)
    _, test = split_patients(task.history, 0.2, args.seed)
    folds = holdout_fold(task.patients, sorted(set(test) & set(task.patients)))
    zero = PipelineForecaster(ForecastPipeline.from_pretrained(args.init), name="checkpoint zero-shot")
    ft = finetuned(Path(args.init), args.steps, args.seeds, _corpus(args), _extra(args))
    results = {}
    for m in (LastValue(), LightGBMForecaster(analytes=task.analytes, seed=args.seed), zero, ft):
        results[m.name] = evaluate(m, task, folds, seed=args.seed, leakage_check=args.leakage_check)
        _print({m.name: results[m.name]})
    s = summarise(results, ft.name, task.ranges["range"])
    s["finetuned_minus_zero_shot"] = results[ft.name].overall["nmae"] - results[zero.name].overall["nmae"]
    return {"summary": s, "task": task.describe(), "cohort_report": cohort.attrs.get("report"),
            "training": [{k: r.get(k) for k in ("steps", "best_step", "stop_reason", "fit_seconds", "warnings",
                                                 "val_initial", "val", "scaler")} for r in ft.reports]}


def extreme_case(history: pd.DataFrame, patient: str, code: str = "6690-2",
                 values=(240, 275, 310, 290, 375, 330, 300, 342)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``patient``'s history with its ``code`` results replaced by a daily series of ``values`` ending at
    the patient's last collection, and the query one day later."""
    h = history[history["patient_id"] == patient].copy()
    h = h[h["analyte_code"] != code]
    end = h["collected_at"].max()
    row = h.iloc[0].to_dict()
    rows = [{**row, "analyte_code": code, "value": float(v), "censor": 0, "unit_canonical": "10*3/uL",
             "collected_at": end - pd.Timedelta(days=len(values) - 1 - i)} for i, v in enumerate(values)]
    h = pd.concat([h, pd.DataFrame(rows)], ignore_index=True)
    q = pd.DataFrame({"patient_id": [patient], "analyte_code": [code], "at": [end + pd.Timedelta(days=1)]})
    return h, q


def run_extreme(args) -> dict:
    from model.inference import ForecastPipeline

    pipe = ForecastPipeline.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        cohort, _ = mimic_cohort(Path(tmp))
    pid = cohort["patient_id"].value_counts().index[0]
    h, q = extreme_case(cohort, pid)
    f = pipe.forecast(h, q).iloc[0]
    out = {c: float(f[c]) for c in ("q05", "q10", "q25", "q50", "q75", "q90", "q95", "lo95", "hi95")}
    out["last"] = 342.0
    out["last_in_80"] = bool(f["q10"] <= 342 <= f["q90"])
    print(json.dumps(out))
    return out


def _relative(path) -> str:
    """``path`` relative to the project root when it is inside it (results name no machine's folders)."""
    p = Path(path).resolve()
    return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else p.name


def _corpus(args):
    if not args.replay_corpus:
        return None
    from model.corpus import load_pretraining_corpus

    return load_pretraining_corpus(max_rows=300_000, seed=args.seed)


def _extra(args) -> dict:
    """``--set k=v`` as TrainSettings overrides, each converted to the field's type."""
    from model.training import TrainSettings

    defaults, extra = TrainSettings(), {}
    for item in args.set or []:
        k, v = item.split("=", 1)
        d = getattr(defaults, k)
        extra[k] = v if isinstance(d, str) else float(v) if d is None else type(d)(v)
    return extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["mimic", "setc", "extreme"])
    ap.add_argument("--init", default=str(settings.pretrained_dir()), help="pretrained checkpoint")
    ap.add_argument("--model", help="fine-tuned pipeline (extreme)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay-corpus", action="store_true", help="replay and forgetting against the corpus")
    ap.add_argument("--leakage-check", type=int, default=40)
    ap.add_argument("--set", nargs="*", help="TrainSettings overrides, e.g. --set ema_decay=0.99 lr=3e-4")
    ap.add_argument("--card", help="mimic: write the model card (README.md + model_card.json) here")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/forecast_quality_<what>.json)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    payload = {"mimic": run_mimic, "setc": run_setc, "extreme": run_extreme}[args.what](args)
    payload = {"benchmark": f"forecast_quality_{args.what}", "command": "python benchmarks/forecast_quality.py "
               + " ".join(sys.argv[1:] if argv is None else argv), "wall_s": round(time.perf_counter() - t0, 1),
               "machine": machine(), **payload}
    out = Path(args.out) if args.out else RESULTS / f"forecast_quality_{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(json.dumps(payload.get("summary", payload), indent=1, default=str)[:4000])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
