"""Time and memory to load the pretraining corpus, per source and whole, cold and from the parquet cache.

    python benchmarks/corpus_load.py [--runs 3]

Each measurement runs in a fresh Python process (so the peak resident memory is that of the load
alone) and is repeated ``--runs`` times; medians are reported. Measured in the same run:

* ``today``: the corpus before issue 13 (PhysioNet 2012 set A, eICU, NHANES, 1,000 synthetic
  patients) read from the compressed files: the baseline;
* ``all_cold``: all eight sources from the compressed files (``LABTREND_CORPUS_CACHE=off``);
* ``all_cached``: all eight sources from the parquet cache (a temporary cache folder, filled by
  one untimed load first);
* per source, cold and cached.

Ratios are against ``today`` and ``all_cold``. Prints JSON and saves
``benchmarks/results/corpus_load.json``. Timings on a shared machine are noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import median, save  # noqa: E402

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from model.corpus import load_pretraining_corpus, load_source
t1 = time.perf_counter()
what = sys.argv[1]
if what.startswith("source:"):
    frame = load_source(what.split(":", 1)[1])
    patients = frame["patient_id"].nunique()
else:
    frame = load_pretraining_corpus(sources=what, include_synthetic_patients=1000)
    patients = frame["patient_id"].nunique()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "rows": len(frame), "patients": int(patients),
                  "frame_mb": frame.memory_usage(deep=True).sum() / 2**20,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(what: str, cache: str) -> dict:
    env = dict(os.environ, LABTREND_CORPUS_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", _CHILD, what], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(what: str, cache: str, runs: int) -> dict:
    rs = [_run(what, cache) for _ in range(runs)]
    return {
        "load_s": round(median([r["load_s"] for r in rs]), 2),
        "load_s_runs": [round(r["load_s"], 2) for r in rs],
        "import_s": round(median([r["import_s"] for r in rs]), 2),
        "rows": rs[0]["rows"], "patients": rs[0]["patients"],
        "frame_mb": round(rs[0]["frame_mb"], 1),
        "peak_rss_mb": round(median([r["peak_rss_mb"] for r in rs]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from model.corpus import ALL_SOURCES

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "corpus-cache")
        _run("all", cache)  # fill the cache (untimed)
        today = _measure("today", "off", args.runs)
        cold = _measure("all", "off", args.runs)
        cached = _measure("all", cache, args.runs)
        per_source = {}
        for key in ALL_SOURCES:
            if key == "synthetic":
                continue
            per_source[key] = {"cold": _measure(f"source:{key}", "off", args.runs),
                               "cached": _measure(f"source:{key}", cache, args.runs)}
    save("corpus_load", {
        "runs": args.runs,
        "today": today,
        "all_cold": cold,
        "all_cached": cached,
        "ratios": {
            "rows_all_vs_today": round(cold["rows"] / today["rows"], 2),
            "all_cold_vs_today_time": round(cold["load_s"] / today["load_s"], 2),
            "all_cached_vs_today_time": round(cached["load_s"] / today["load_s"], 2),
            "all_cached_vs_all_cold_time": round(cached["load_s"] / cold["load_s"], 2),
        },
        "per_source": per_source,
        "note": "medians of fresh processes; this machine is shared (2 cores, several engineers): compare ratios",
    })


if __name__ == "__main__":
    main()
