"""A long series in the dashboard: a year of 5-minute point-of-care glucose (105,120 results) drawn in Chromium.

Run from the repository root::

    .venv/bin/python benchmarks/long_series.py                 # 3 long-series patients, no model
    .venv/bin/python benchmarks/long_series.py --runs 5 --model var/demo-model

Writes ``benchmarks/results/long_series.json`` and prints it.

**Setup.** A fresh store holds ``--runs`` patients with one glucose result every 5 minutes for
365 days (105,120 results each, values with a daily cycle and noise, 30 of them ``HEMOLYZED``)
and as many baseline patients with a typical inpatient history (one glucose every 6 hours for
50 days: 200 results). ``streamlit run dashboard/streamlit_app.py`` is served on a free port
(with ``--model``, the model runs in it; without, the page says no model is loaded) and driven
by Playwright (headless Chromium), signed in as a clinician.

**What is timed**, for each patient, each not opened before in the running server:

* ``open``: on the Patients page the id is typed (untimed), then from the click on "Open
  timeline of <id>" until the timeline chart is this patient's and its SVG traces are drawn
  (``chart_drawn``), and until the script run is over with no stale element (``page_done``:
  the results table, flags and recommendations are there too). The page opens on the latest
  episode: the last 90 days (25,920 results of a long series).
* ``all``: then from the click on the period "All" until the chart has been redrawn over the
  whole year (105,120 results; its x-axis starts earlier) and drawn, and until the run is over.

**Memory.** The server process's resident set size (RSS, psutil, with its children) is sampled
every 50 ms: ``idle`` after sign-in, ``peak_first_long_patient`` while the first long series is
opened and shown whole, ``peak_all_long_patients`` over every long series (its caches stay).

**Baseline in the same run:** the baseline patients (200 results), timed the same way; the
ratios are long / baseline of the medians.

Targets (issue 11): the 105,120-point series draws in <= 2 s (median ``all.chart_drawn``) and
the server stays under 500 MB for it (``peak_first_long_patient``). Timings on a shared 2-core
machine are noisy; the load average is saved with them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import load_average, median, save  # noqa: E402
from benchmarks.page_load import _serve  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench", "long series benchmark password"
GLUCOSE = "2345-7"
N_LONG = 365 * 288  # a year of 5-minute results: 105,120
TARGET_S, TARGET_MB = 2.0, 500.0

DRAWN = """(pid) => {
    const tl = document.querySelector('.st-key-timeline_chart .js-plotly-plot');
    if (!tl || !(((tl._context || {}).toImageButtonOptions || {}).filename || '').includes(pid)) return false;
    return !!(tl._fullLayout && tl.querySelector('.main-svg .scatterlayer .trace'));
}"""
DONE = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return !!app && app.dataset.testScriptState === 'notRunning' && !document.querySelector('[data-stale="true"]');
}"""


def _series_csv(path: Path, patients: list[str], n: int, step_min: int, seed: int) -> None:
    import numpy as np
    import pandas as pd

    frames = []
    for k, pid in enumerate(patients):
        rng = np.random.default_rng(seed + k)
        t = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(n) * step_min, unit="min")
        day = np.arange(n) * step_min / 1440
        v = np.clip(140 + 40 * np.sin(day * 2 * np.pi) + rng.normal(0, 12, n), 40, 450).round()
        f = pd.DataFrame({"patient_id": pid, "collected_at": t.strftime("%Y-%m-%d %H:%M"), "loinc": GLUCOSE,
                          "test_name": "Glucose (POC)", "value": v.astype(int).astype(str), "unit": "mg/dL"})
        if n > 1000:
            f.loc[rng.choice(n, 30, replace=False), "value"] = "HEMOLYZED"
        frames.append(f)
    pd.concat(frames).to_csv(path, index=False)


class _RSS:
    """Peak resident set size of a process and its children, sampled every 50 ms on a thread."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(0.05)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


X0 = """() => {
    const el = document.querySelector('.st-key-timeline_chart .js-plotly-plot');
    return el && el._fullLayout ? String(el._fullLayout.xaxis.range[0]) : null;
}"""
REDRAWN = """([pid, before]) => {
    const el = document.querySelector('.st-key-timeline_chart .js-plotly-plot');
    if (!el || !el._fullLayout || !el.querySelector('.main-svg .scatterlayer .trace')) return false;
    if (!(((el._context || {}).toImageButtonOptions || {}).filename || '').includes(pid)) return false;
    return String(el._fullLayout.xaxis.range[0]) !== before;
}"""


def _timeline(page, pid: str) -> tuple[float, float, float, float]:
    """From the Patients page: open ``pid``'s timeline, then show All. Seconds: (open drawn, open done, all drawn,
    all done)."""
    link = page.locator('[data-testid="stSidebarNav"] a[data-testid="stSidebarNavLink"]').filter(has_text="Patients")
    link.first.click()
    page.get_by_role("heading", name="Patients", exact=True).first.wait_for()
    page.wait_for_function(DONE, polling="raf")
    search = page.get_by_role("textbox", name="Patient id contains")
    search.fill(pid)
    search.press("Enter")
    button = page.get_by_role("button", name=f"Open timeline of {pid}")
    button.wait_for()
    page.wait_for_function(DONE, polling="raf")
    t0 = time.perf_counter()
    button.click()
    page.wait_for_function(DRAWN, arg=pid, polling="raf")
    open_drawn = time.perf_counter() - t0
    page.wait_for_function(DONE, polling="raf")
    open_done = time.perf_counter() - t0
    before = page.evaluate(X0)
    all_button = page.locator('[data-testid="stButtonGroup"] button').filter(has_text=re.compile(r"^All$"))
    t0 = time.perf_counter()
    all_button.click()
    page.wait_for_function(REDRAWN, arg=[pid, before], polling="raf")
    all_drawn = time.perf_counter() - t0
    page.wait_for_function(DONE, polling="raf")
    return open_drawn, open_done, all_drawn, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="long-series patients (and baseline patients) opened")
    ap.add_argument("--model", help="model folder served in the dashboard (default: none)")
    ap.add_argument("--timeout-s", type=float, default=900, help="hang guard per page")
    ap.add_argument("--out", default="long_series", help="results file name (benchmarks/results/OUT.json)")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from data import users
    from data.db import open_store
    from data.importers import run_import

    work = Path(tempfile.mkdtemp(prefix="labtrend-long-series-"))
    proc = None
    try:
        long_ids = [f"POC-{k + 1}" for k in range(args.runs)]
        base_ids = [f"BASE-{k + 1}" for k in range(args.runs)]
        store = open_store(work / "long.duckdb")
        _series_csv(work / "long.csv", long_ids, N_LONG, 5, 0)
        _series_csv(work / "base.csv", base_ids, 200, 360, 100)
        t0 = time.perf_counter()
        run_import(store, work / "long.csv")
        import_s = time.perf_counter() - t0
        run_import(store, work / "base.csv")
        users.add_user(store, USER, "Long series benchmark", "clinician", PASSWORD, by=users.Actor.cli())
        del store
        model = Path(args.model) if args.model else work / "no-model"
        load_before = load_average()
        proc, url = _serve(work / "long.duckdb", model, work / "streamlit.log", None)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=os.environ.get("LABTREND_CHROMIUM", "/usr/bin/chromium"),
                                         headless=True, args=["--no-sandbox", "--disable-background-networking",
                                                              "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(args.timeout_s * 1000)
            page.goto(url)
            page.get_by_role("textbox", name="Username").fill(USER)
            page.get_by_role("textbox", name="Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", name="Patients", exact=True).first.wait_for()
            page.wait_for_function(DONE, polling="raf")
            rss = _RSS(proc.pid)
            idle_mb = rss.now() / 2**20
            base = [_timeline(page, pid) for pid in base_ids]
            after_base_mb = rss.now() / 2**20
            with rss:
                long = [_timeline(page, long_ids[0])]
            first_peak_mb = rss.peak / 2**20
            rss = _RSS(proc.pid)
            with rss:
                long += [_timeline(page, pid) for pid in long_ids[1:]]
            all_peak_mb = max(first_peak_mb, rss.peak / 2**20)
            thinned = page.evaluate("""() => {
                const el = document.querySelector('.st-key-timeline_chart .js-plotly-plot');
                return el.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0);
            }""")
            browser.close()
        load_after = load_average()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except Exception:  # noqa: BLE001
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    def stats(xs):
        return {"median_s": round(median(xs), 3), "min_s": round(min(xs), 3), "max_s": round(max(xs), 3),
                "runs_s": [round(x, 3) for x in xs]}

    def series(rows, k):
        return [r[k] for r in rows]

    timed = {}
    for name, rows in (("long_105120_results", long), ("baseline_200_results", base)):
        timed[name] = {"open": {"chart_drawn": stats(series(rows, 0)), "page_done": stats(series(rows, 1))},
                       "all": {"chart_drawn": stats(series(rows, 2)), "page_done": stats(series(rows, 3))}}
    ratios = {f"{view}_{what}": round(median(series(long, k)) / median(series(base, k)), 2)
              for k, (view, what) in enumerate([("open", "chart_drawn"), ("open", "page_done"),
                                                ("all", "chart_drawn"), ("all", "page_done")])}
    payload = {
        "series": f"{N_LONG:,} glucose results per patient (one every 5 min for 365 days, 30 HEMOLYZED); "
                  "baseline: 200 results per patient (one every 6 h for 50 days)",
        "model": str(args.model or "none (the page says no model is loaded)"),
        "load_average_1min": {"before": load_before, "after": load_after, "cpu_count": os.cpu_count()},
        "import_s": round(import_s, 2),
        **timed,
        "ratio_long_over_baseline": ratios,
        "points_in_the_last_chart": thinned,
        "server_rss_mb": {"idle": round(idle_mb, 1), "after_baseline_patients": round(after_base_mb, 1),
                          "peak_first_long_patient": round(first_peak_mb, 1),
                          "peak_all_long_patients": round(all_peak_mb, 1)},
        "targets": f"median all.chart_drawn of the long series <= {TARGET_S} s; server RSS peak for the first long "
                   f"series < {TARGET_MB:.0f} MB",
        "target_time_met": median(series(long, 2)) <= TARGET_S,
        "target_memory_met": first_peak_mb < TARGET_MB,
    }
    save(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
