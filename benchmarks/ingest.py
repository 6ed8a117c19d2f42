"""Ingest benchmark: LabTrend's canonical-CSV import vs DuckDB's raw read_csv, same file, same run.

Builds a deterministic N-row canonical long CSV (default 10 million rows), then reports:
* import rows/s (median of --runs fresh imports) and peak RSS of the importing process;
* DuckDB's raw ``read_csv`` into a table of the same file (median of --runs) — the ratio
  import/raw is the figure that matters (target >= 0.5);
* one patient's timeline latency p50/p95 over 200 random patients: the DataFrame that
  ``data.queries.timeline`` returns (first read of each patient, then the same patients
  again), and the same rows fetched through the ``lab_results`` view by SQL alone.

Memory: every import runs under DuckDB's ``memory_limit`` (``--memory-limit``, default the
product's 2GB, data.settings.DUCKDB_MEMORY_LIMIT) and spills to a temp folder; each run
reports its peak RSS and the most it spilled (the temp folder polled every 0.1 s).
``--compare-unlimited`` also imports the same file without a limit (DuckDB's default, 80 % of
RAM) in the same run, so the speed cost of the limit is a ratio measured on the same machine
at the same time. ``--skip-raw`` and ``--skip-timeline`` leave out those parts (a 30-million-row
memory check on a shared machine).

    python benchmarks/ingest.py [--rows 10000000] [--runs 3] [--memory-limit 2GB] [--compare-unlimited]
                                [--timezone Europe/Berlin] [--out ingest]

Prints JSON and saves it to benchmarks/results/<out>.json (default ingest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb  # noqa: E402

from benchmarks.common import median, percentile, save  # noqa: E402

ANALYTES = [
    ("2823-3", "Potassium", "mmol/L", 4.2, 0.5), ("2951-2", "Sodium", "mmol/L", 139, 3),
    ("2160-0", "Creatinine", "mg/dL", 1.0, 0.3), ("2075-0", "Chloride", "mmol/L", 102, 3),
    ("3094-0", "Urea nitrogen", "mg/dL", 15, 5), ("4544-3", "Hematocrit", "%", 40, 4),
    ("1963-8", "Bicarbonate", "mmol/L", 25, 3), ("777-3", "Platelets", "10*3/uL", 250, 60),
    ("718-7", "Hemoglobin", "g/dL", 13.5, 1.5), ("787-2", "MCV", "fL", 90, 5),
    ("2345-7", "Glucose", "mg/dL", 100, 20), ("2601-3", "Magnesium", "mg/dL", 2.0, 0.2),
    ("17861-6", "Calcium", "mg/dL", 9.4, 0.4), ("2777-1", "Phosphate", "mg/dL", 3.5, 0.5),
    ("1920-8", "AST", "U/L", 25, 8), ("1742-6", "ALT", "U/L", 25, 10),
    ("6768-6", "Alkaline phosphatase", "U/L", 80, 20), ("1751-7", "Albumin", "g/dL", 4.0, 0.4),
    ("1975-2", "Bilirubin", "mg/dL", 0.8, 0.3), ("6690-2", "WBC", "10*3/uL", 7, 2),
]


def build_csv(path: Path, rows: int) -> None:
    """Deterministic canonical CSV: ~500 results per patient, 20 analytes, 0.1% text, 0.1% censored."""
    con = duckdb.connect()
    con.execute("CREATE TABLE a AS SELECT * FROM (VALUES " + ", ".join(
        f"({i}, '{c}', '{n}', '{u}', {m}, {s})" for i, (c, n, u, m, s) in enumerate(ANALYTES)) +
        ") t(i, code, name, unit, mu, sd)")
    con.execute(
        f"""
        COPY (
            SELECT 'P' || lpad(((r // 500))::VARCHAR, 6, '0') AS patient_id,
                   strftime(TIMESTAMP '2020-01-01' + to_minutes(((r % 500) // 20) * 1440 + (r % 20)), '%Y-%m-%d %H:%M:%S') AS collected_at,
                   a.code AS loinc, a.name AS test_name,
                   CASE WHEN hash(r) % 1000 = 0 THEN 'HEMOLYZED'
                        WHEN hash(r) % 1000 = 1 THEN '<' || round(a.mu * 0.2, 2)::VARCHAR
                        ELSE round(a.mu + a.sd * ((hash(r * 7) % 2000) / 1000.0 - 1.0), 2)::VARCHAR END AS value,
                   a.unit AS unit
            FROM range({rows}) t(r) JOIN a ON a.i = r % 20
            ORDER BY r
        ) TO '{path}' (HEADER, DELIMITER ',')
        """
    )
    con.close()


_IMPORT = """
import json, os, resource, sys, threading, time
from data.db import open_store
from data.importers import ImportOptions, run_import
limit, temp, zone = sys.argv[3], sys.argv[4], sys.argv[5] or None
store = open_store(sys.argv[1], memory_limit=limit, temp_directory=temp)
peak = {"spill": 0}
done = threading.Event()

def spilled():  # bytes in DuckDB's temp folder, polled while the import runs
    while not done.wait(0.1):
        total = 0
        for root, _, files in os.walk(temp):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        peak["spill"] = max(peak["spill"], total)

threading.Thread(target=spilled, daemon=True).start()
with store.read() as cur:
    setting = cur.execute("SELECT current_setting('memory_limit')").fetchone()[0]
t0 = time.perf_counter()
s = run_import(store, sys.argv[2], options=ImportOptions(timezone=zone or ""))
dt = time.perf_counter() - t0
done.set()
print(json.dumps({"seconds": dt, "rows_loaded": s.rows_loaded, "rows_read": s.rows_read,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "memory_limit": setting, "peak_spill_mb": round(peak["spill"] / 2**20, 1)}))
"""

_RAW = """
import duckdb, json, resource, sys, time
con = duckdb.connect(sys.argv[1])
t0 = time.perf_counter()
con.execute("CREATE TABLE t AS SELECT * FROM read_csv(?)", [sys.argv[2]])
n = con.execute("SELECT count(*) FROM t").fetchone()[0]
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rows": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "LABTREND_CODE_MAP": os.devnull})
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timeline_latency(path: Path, n_pat: int, n_queries: int, passes: int) -> dict:
    """Timeline latency (ms): ``passes`` passes of ``n_queries`` random patients, each pass on
    a newly opened database (DuckDB's buffer pool empty, as after the dashboard's connection
    closed), then the same patients again (warm), and the same rows through the view by SQL.
    Each figure is the median over the passes of that pass's p50 / p95."""
    from data import queries
    from data.db import open_store

    store = open_store(path)
    sql = (f"SELECT {', '.join(queries.TIMELINE_COLUMNS)} FROM lab_results WHERE patient_id = ? "
           "ORDER BY collected_at, analyte_code, result_id")
    cold, warm, via_view = [], [], []
    for k in range(passes):
        rng = random.Random(k)
        pids = [f"P{rng.randrange(n_pat):06d}" for _ in range(n_queries)]
        lat, lat_warm, lat_sql = [], [], []
        with store.read() as cur:  # one connection per pass, kept open as the dashboard does while serving
            for pid in pids:
                t = time.perf_counter()
                df = queries.timeline(store, pid)
                lat.append((time.perf_counter() - t) * 1000)
                assert len(df) > 0
                t = time.perf_counter()
                rows = cur.execute(sql, [pid]).fetchnumpy()
                lat_sql.append((time.perf_counter() - t) * 1000)
                assert len(rows["result_id"]) == len(df)
            for pid in pids:
                t = time.perf_counter()
                queries.timeline(store, pid)
                lat_warm.append((time.perf_counter() - t) * 1000)
        for dest, xs in ((cold, lat), (warm, lat_warm), (via_view, lat_sql)):
            dest.append((percentile(xs, 50), percentile(xs, 95)))

    def fig(pairs: list[tuple[float, float]], what: str) -> dict:
        return {"p50": round(median([p[0] for p in pairs]), 2), "p95": round(median([p[1] for p in pairs]), 2),
                "each_pass_p95": [round(p[1], 2) for p in pairs], "queries": n_queries, "passes": passes,
                "what": what}

    return {
        "timeline_ms": fig(cold, "data.queries.timeline: one patient's DataFrame, first read of each patient"),
        "timeline_warm_ms": fig(warm, "the same patients again (their blocks already in DuckDB's buffer pool)"),
        "timeline_sql_ms": fig(via_view, "the same rows through the lab_results view (all schema columns, "
                                         "ordered) fetched as numpy, right after the DataFrame call"),
    }


def _imports(work: Path, csv: Path, i: int, tag: str, limit: str, zone: str, keep: bool) -> dict:
    db, temp = work / f"{tag}{i}.duckdb", work / f"{tag}{i}.tmp"
    r = _run(_IMPORT, db, csv, limit, temp, zone)
    if not keep:
        db.unlink()
    return r


def _summary(runs: list[dict], rows: int) -> dict:
    s = median([r["seconds"] for r in runs])
    out = {"median_s": round(s, 3), "rows_per_s": round(rows / s),
           "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)), "each": runs}
    if "peak_spill_mb" in runs[0]:
        out["peak_spill_mb"] = max(r["peak_spill_mb"] for r in runs)
        out["memory_limit"] = runs[0]["memory_limit"]
    return out


def main() -> None:
    from data.settings import DUCKDB_MEMORY_LIMIT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--memory-limit", default=DUCKDB_MEMORY_LIMIT, help="DuckDB memory_limit of the imports")
    ap.add_argument("--compare-unlimited", action="store_true",
                    help="also import without a limit (DuckDB's default) in the same run: the limit's speed cost")
    ap.add_argument("--timezone", default="", help="import the file's times in this IANA zone (DST flags on)")
    ap.add_argument("--skip-raw", action="store_true", help="leave out DuckDB's raw read_csv")
    ap.add_argument("--skip-timeline", action="store_true", help="leave out the timeline latency")
    ap.add_argument("--out", default="ingest", help="results file name (benchmarks/results/<out>.json)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labtrend-bench-"))
    csv = work / "canonical.csv"
    t0 = time.perf_counter()
    build_csv(csv, args.rows)
    build_s = time.perf_counter() - t0

    imports, raws, unlimited = [], [], []
    for i in range(args.runs):
        if not args.skip_raw:
            raws.append(_run(_RAW, work / f"raw{i}.duckdb", csv))
            (work / f"raw{i}.duckdb").unlink()
        if args.compare_unlimited:  # DuckDB's own default limit (80 % of RAM)
            unlimited.append(_imports(work, csv, i, "free", "80%", args.timezone, keep=False))
        keep = i == args.runs - 1 and not args.skip_timeline
        imports.append(_imports(work, csv, i, "imp", args.memory_limit, args.timezone, keep=keep))
    payload = {
        "rows": args.rows,
        "csv_mb": round(csv.stat().st_size / 2**20, 1),
        "build_csv_s": round(build_s, 2),
        "runs": args.runs,
        "timezone": args.timezone or None,
        "import": _summary(imports, args.rows),
    }
    if raws:
        raw_s = median([r["seconds"] for r in raws])
        payload["raw_read_csv"] = {"median_s": round(raw_s, 3), "rows_per_s": round(args.rows / raw_s),
                                   "peak_rss_mb": round(max(r["peak_rss_mb"] for r in raws)), "each": raws}
        payload["import_vs_raw_ratio"] = round(raw_s / payload["import"]["median_s"], 3)
    if unlimited:
        payload["import_unlimited"] = _summary(unlimited, args.rows)
        payload["memory_limit_speed_cost"] = round(payload["import"]["median_s"] / payload["import_unlimited"]["median_s"], 3)
    if not args.skip_timeline:
        payload.update(_timeline_latency(work / f"imp{args.runs - 1}.duckdb", args.rows // 500, args.queries, args.runs))
    payload["targets"] = {"import_vs_raw_ratio": ">= 0.5", "timeline_p95_ms": "<= 5", "peak_rss_mb": "<= 4096",
                          "memory": f"peak RSS near the DuckDB memory_limit ({args.memory_limit}), not growing with the file"}
    save(args.out, payload)


if __name__ == "__main__":
    main()
