"""Helpers shared by the benchmark scripts: timing, medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import psutil

    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }


def load_average() -> float | None:
    """The 1-minute load average (rounded to 0.01), or None where the platform has none: every benchmark
    records it beside its timings, since the machines they run on are shared."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs) -> float:
    return float(statistics.median(xs))


def percentile(xs, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q))


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(json.dumps(payload, indent=2, default=str))
    return path


def mimic_store(tmp: Path):
    """A store in ``tmp`` with MIMIC-IV demo imported; exits with a message when the data is absent."""
    from data.db import open_store
    from data.importers import run_import
    from data import settings

    src = settings.mimic_demo_dir()
    if src is None:
        raise SystemExit("MIMIC-IV demo not found (set LABTREND_DEMO_DATA or LABTREND_DATA_DIR)")
    store = open_store(tmp / "mimic.duckdb")
    run_import(store, src)
    return store
