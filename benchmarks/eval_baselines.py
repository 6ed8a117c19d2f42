"""Evaluate the baselines on MIMIC-IV demo: 5-fold patient-grouped CV on the task of model.evaluation.

    .venv/bin/python benchmarks/eval_baselines.py [--folds 5] [--seed 0] [--card DIR] [--diagnostics]

Imports the MIMIC-IV demo (``data.settings.mimic_demo_dir()``) into a store in a temporary
folder (or uses ``--db``), builds the task, runs last value, historical mean, linear trend and
LightGBM through :func:`model.evaluation.evaluate`, prints the overall table and writes
per-analyte and overall figures, the subgroup tables and the wall time as JSON to
``benchmarks/results/eval_baselines.json``. ``--card DIR`` also writes the model card there.
``--diagnostics`` adds a LightGBM regressing raw values (for comparison with the issue's
reference figures) and the last-value NMAE under other normalisation choices.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.common import RESULTS, machine  # noqa: E402
from data import settings  # noqa: E402
from model.baselines import HistoricalMean, LastValue, LightGBMForecaster, LinearTrend  # noqa: E402
from model.evaluation import (  # noqa: E402
    REFERENCE_FIGURES,
    build_task,
    compare,
    evaluate,
    grouped_folds,
    holdout_fold,
    read_patient_list,
    write_model_card,
)


def _last_value_variants(task) -> dict:
    """Count-weighted last-value NMAE under the normalisation choices that could differ elsewhere."""
    t = task.targets
    out = {}
    for label, method, trim in (("p99-p1 linear (this task)", "linear", False),
                                ("LabTOP: targets outside [p1, p99] dropped", "linear", True),
                                ("p99-p1 'lower' percentiles", "lower", False),
                                ("p99-p1 'higher' percentiles", "higher", False)):
        num = den = 0.0
        for _, d in t.groupby("analyte_code"):
            p1, p99 = np.percentile(d["y"], [1, 99], method=method)
            dd = d[(d["y"] >= p1) & (d["y"] <= p99)] if trim else d
            num += len(dd) * np.mean(np.abs(dd["y"] - dd["last_value"])) / (p99 - p1)
            den += len(dd)
        out[label] = round(float(num / den), 5)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", help="use this store instead of importing MIMIC-IV demo into a temporary one")
    ap.add_argument("--data", help="MIMIC-IV demo folder (default: data.settings.mimic_demo_dir())")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patients", help="file of test patient ids (one split instead of k folds)")
    ap.add_argument("--n-jobs", type=int, default=1, help="LightGBM threads")
    ap.add_argument("--out", default=str(RESULTS / "eval_baselines.json"))
    ap.add_argument("--card", help="also write model_card.json / model_card.md into this folder")
    ap.add_argument("--diagnostics", action="store_true", help="add the raw-value LightGBM and normalisation variants")
    args = ap.parse_args(argv)

    from data.db import open_store
    from data.importers import run_import
    from data.queries import cohort, top_analytes

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.db:
            store, data_desc, import_s = open_store(args.db), f"store {Path(args.db).name}", 0.0
        else:
            data = Path(args.data) if args.data else settings.mimic_demo_dir()
            if data is None:
                print("MIMIC-IV demo not found: set LABTREND_DEMO_DATA or LABTREND_DATA_DIR, or pass --data", file=sys.stderr)
                return 2
            store = open_store(Path(tmp) / "eval.duckdb")
            t0 = time.perf_counter()
            run_import(store, data)
            import_s = time.perf_counter() - t0
            data_desc = REFERENCE_FIGURES["dataset"] + " (hosp/labevents, imported with labtrend's MIMIC importer)"
        coh = cohort(store)
        names = top_analytes(store, 60).set_index("analyte_code")["analyte_name"].to_dict()

    task = build_task(coh)
    if args.patients:
        folds = holdout_fold(task.patients, read_patient_list(args.patients))
        split = f"explicit test patients ({len(folds[0].test_patients)}) from {Path(args.patients).name}"
    else:
        folds = grouped_folds(task.targets["patient_id"], k=args.folds, seed=args.seed)
        split = f"{args.folds}-fold patient-grouped cross-validation (GroupKFold, shuffle seed {args.seed}); pooled out-of-fold forecasts"

    methods = [LastValue(), HistoricalMean(), LinearTrend(),
               LightGBMForecaster(analytes=task.analytes, seed=args.seed, n_jobs=args.n_jobs)]
    if args.diagnostics:
        methods.append(LightGBMForecaster(analytes=task.analytes, seed=args.seed, n_jobs=args.n_jobs, target="value"))

    results = {}
    for m in methods:
        r = evaluate(m, task, folds, seed=args.seed)
        results[m.name] = r
        o = r.overall
        print(f"{m.name:28s} NMAE {o['nmae']:.4f}  (trimmed {o['nmae_trimmed']:.4f})  MdAPE {o['mdape']:.2f}%  "
              f"cov80 {o['coverage80']:.3f}  cov90 {o['coverage90']:.3f}  wins vs last {o['wins_vs_last_value']}/"
              f"{o['n_analytes']}  [{r.info['wall_s']:.1f} s]", flush=True)

    meta = {
        "dataset": data_desc,
        "split": split,
        "task": task.describe(),
        "analyte_names": {a: names.get(a, "") for a in task.analytes},
        "command": "python benchmarks/eval_baselines.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    cmp = compare(results, meta)
    print(cmp["statement"])
    ref = REFERENCE_FIGURES["count_weighted_nmae"]
    print(f"reference figures from the issue: last value {ref['last value']}, LightGBM {ref['LightGBM']}")

    out = {
        **{k: meta[k] for k in ("dataset", "split", "command", "date")},
        "task": meta["task"],
        "analyte_names": meta["analyte_names"],
        "ranges": json.loads(task.ranges.reset_index().to_json(orient="records", double_precision=6)),
        "reference_figures": REFERENCE_FIGURES,
        "comparison": cmp,
        "methods": {n: r.to_dict() for n, r in results.items()},
        "import_s": round(import_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "machine": machine(),
        "versions": {"python": platform.python_version(), "pandas": pd.__version__, "numpy": np.__version__,
                     "lightgbm": __import__("lightgbm").__version__, "sklearn": __import__("sklearn").__version__},
    }
    if args.diagnostics:
        out["last_value_nmae_variants"] = _last_value_variants(task)
        print("last-value NMAE under other normalisations:", out["last_value_nmae_variants"])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    if args.card:
        write_model_card(results, args.card, meta)
    print(f"wrote {path} (wall time {out['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
