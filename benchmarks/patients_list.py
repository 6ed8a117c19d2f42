"""Patients list benchmark: abnormal and critical counts from the flag rule, on the 10M-row store.

The Patients page lists every patient with ``n_abnormal`` / ``n_critical`` counted by
:mod:`clinical.flags` (the file's flag, else its reference limits, else the catalogue's interval
for the patient's sex and age; the critical list always), computed in DuckDB at query time
(:func:`data.queries.patients`). The baseline, measured in the same run on the same store, is
the earlier query that counted only the flags as reported (it missed every file without a flag
column). Also: the same comparison on MIMIC-IV demo, and the Python rule against the SQL rule
on every MIMIC-IV demo patient (counts must be equal).

    python benchmarks/patients_list.py [--rows 10000000] [--runs 5] [--store PATH]

``--store`` reuses a store built by an earlier run (the CSV is built with
``benchmarks/ingest.py``'s generator: ~500 results per patient, 20 analytes, no demographics).
Prints JSON and saves it to benchmarks/results/patients_list.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import load_average, median, mimic_store, save  # noqa: E402

BASELINE_SQL = """
    SELECT p.patient_id, p.sex, p.age_at_ref, p.ref_date, p.birth_date,
           count(r.result_id) AS n_results,
           count(r.result_id) FILTER (WHERE r.flag IS NOT NULL AND lower(r.flag) NOT IN ('n', 'normal', '')) AS n_abnormal,
           count(r.result_id) FILTER (WHERE r.implausible) AS n_implausible,
           min(r.collected_at) AS first_result, max(r.collected_at) AS last_result
    FROM patients p LEFT JOIN lab_results r ON r.patient_id = p.patient_id
    GROUP BY ALL ORDER BY p.patient_id LIMIT 1000000
"""


def _time(fn, runs: int) -> dict:
    secs, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        secs.append(time.perf_counter() - t0)
    return {"median_s": round(median(secs), 3), "min_s": round(min(secs), 3), "runs": [round(s, 3) for s in secs],
            "rows": len(out)}


def measure(store, runs: int) -> dict:
    from data import queries

    def baseline():
        with store.read() as cur:
            return cur.execute(BASELINE_SQL).df()

    baseline()  # warm the file cache for both
    new = _time(lambda: queries.patients(store, limit=1_000_000), runs)
    base = _time(baseline, runs)
    df = queries.patients(store, limit=1_000_000)
    with store.read() as cur:
        n = cur.execute("SELECT count(*) FROM results").fetchone()[0]
    return {"results": int(n), "patients": len(df), "flag_rule": new, "baseline_reported_flags_only": base,
            "ratio_new_over_baseline": round(new["median_s"] / base["median_s"], 2),
            "n_abnormal_total": int(df["n_abnormal"].sum()), "n_critical_total": int(df["n_critical"].sum()),
            "baseline_n_abnormal_total": int(baseline()["n_abnormal"].sum())}


def python_vs_sql(store) -> dict:
    from clinical.flags import ABNORMAL_FLAGS, CRITICAL_FLAGS, result_flags
    from data import queries

    df = queries.patients(store, limit=1_000_000).set_index("patient_id")
    mismatches = []
    for pid in df.index:
        f = result_flags(queries.timeline(store, pid), queries.patient_info(store, pid))
        got = (int(f["flag"].isin(ABNORMAL_FLAGS).sum()), int(f["flag"].isin(CRITICAL_FLAGS).sum()))
        if got != (int(df.loc[pid, "n_abnormal"]), int(df.loc[pid, "n_critical"])):
            mismatches.append(pid)
    return {"patients": len(df), "mismatches": mismatches}


def build_store(path: Path, rows: int) -> float:
    from benchmarks.ingest import build_csv
    from data.db import open_store
    from data.importers import run_import

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "bench.csv"
        build_csv(csv, rows)
        store = open_store(path)
        t0 = time.perf_counter()
        run_import(store, csv)
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--store", help="reuse (or create) the benchmark store at this path")
    args = ap.parse_args(argv)
    from data.db import open_store

    payload = {"command": "python benchmarks/patients_list.py" + (f" --rows {args.rows}" if args.rows != 10_000_000 else ""),
               "load_average_1min": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.store) if args.store else Path(tmp) / "bench.duckdb"
        if not path.exists():
            payload["import_s"] = round(build_store(path, args.rows), 1)
        payload["benchmark_store"] = measure(open_store(path), args.runs)
        mimic = mimic_store(Path(tmp))
        payload["mimic_iv_demo"] = measure(mimic, args.runs)
        payload["mimic_iv_demo"]["python_vs_sql"] = python_vs_sql(mimic)
    save("patients_list", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
