"""Dashboard page load: selecting a patient until the patient page is fully drawn, in Chromium.

Run from the repository root::

    .venv/bin/python benchmarks/page_load.py                      # var/demo.duckdb + var/demo-model when present
    .venv/bin/python benchmarks/page_load.py --db X.duckdb --model DIR --runs 10

Writes ``benchmarks/results/page_load.json`` and prints it.

**Setup.** The store is a *copy* of ``--db`` (default ``var/demo.duckdb``) in a temporary
folder, so the audit rows the dashboard writes never land in the original; the model is
``--model`` (default ``var/demo-model``). When either is missing, a fresh store is built
from the MIMIC-IV demo and a ``tiny`` model is trained for a few steps, as the browser
test does. ``streamlit run dashboard/streamlit_app.py`` is served on a free port and
driven by Playwright (headless Chromium), signed in through the login form as a clinician.

**What is timed.** One *selection*: on the Patients page the patient id is typed into the
search box (not timed; the table filters to that patient), then the clock starts at the
click on "Open timeline of <id>" and stops when the timeline is **fully drawn**, i.e. all of:

1. Streamlit's script run is over (``data-test-script-state="notRunning"`` on the app root:
   the running indicator is gone) and no element on screen is stale (left from the previous
   page or patient);
2. every Plotly chart on the page has its layout computed and its SVG traces drawn, and the
   timeline chart is this patient's (its export file name carries the patient id);
3. the timeline chart holds the forecast: a ``Forecast median`` trace and its interval band.

The patients are those with at least 3 serum potassium results (so every timeline has a
forecast), in id order. Series:

* ``cold_first``: the first selection in a fresh dashboard process (imports torch, loads
  the model, fills every cache);
* ``warm_new_patient``: the next ``--runs`` selections, each a patient not opened before
  in this process (per-patient queries, forecasts and anomaly checks are computed; the
  model and the patient list are loaded): the case the target is about;
* ``warm_reselect``: the same patients selected again (every cached result hits).

**Baseline, measured in the same run:** the Patients list page, from the click on its
navigation link until its table is drawn and the run is over (median of ``--runs``).

Target: median of ``warm_new_patient`` <= 1.5 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import load_average, median, percentile, save  # noqa: E402
from labtrend.cli import dashboard_command  # noqa: E402  (as 'labtrend dashboard' serves it)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LABTREND_CHROMIUM", "/usr/bin/chromium")
USER, PASSWORD = "bench", "page load benchmark password"
TARGET_S = 1.5
POTASSIUM = "2823-3"

DRAWN = """(pid) => {
    const app = document.querySelector('[data-testid="stApp"]');
    if (!app || app.dataset.testScriptState !== 'notRunning') return false;
    if (document.querySelector('[data-stale="true"]')) return false;
    const charts = [...document.querySelectorAll('.js-plotly-plot')];
    const drawn = c => c._fullLayout && c.querySelector('.main-svg .scatterlayer .trace');
    if (!charts.length || !charts.every(drawn)) return false;
    const tl = document.querySelector('.st-key-timeline_chart .js-plotly-plot');
    if (!tl || !(((tl._context || {}).toImageButtonOptions || {}).filename || '').includes(pid)) return false;
    const names = tl.data.map(t => t.name || '');
    return names.some(n => n.startsWith('Forecast median')) && names.some(n => n.startsWith('Forecast 80% interval'));
}"""

PATIENTS_DRAWN = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return app && app.dataset.testScriptState === 'notRunning' && !document.querySelector('[data-stale="true"]')
        && !!document.querySelector('.st-key-patients_table table[role="grid"] tbody tr');
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(work: Path) -> tuple[Path, Path, str]:
    """A fresh MIMIC-IV demo store and a tiny model trained for a few steps (as tests/test_e2e_browser.py)."""
    from benchmarks.common import mimic_store
    from data import queries
    from model.training import Runtime, TrainSettings, finetune

    store = mimic_store(work)
    settings = TrainSettings(steps=5, eval_every=5, batch_size=8, eval_rows=24, final_eval_rows=300,
                             conformal_min_points=10, warmup_steps=2)
    pipe = finetune(None, queries.cohort(store), "scratch", settings=settings, runtime=Runtime(progress_bar=False),
                    config="tiny")
    pipe.save_pretrained(work / "model")
    return work / "mimic.duckdb", work / "model", "fresh MIMIC-IV demo store, tiny model trained 5 steps"


def _inputs(args, work: Path) -> tuple[Path, Path, str]:
    db = Path(args.db) if args.db else ROOT / "var" / "demo.duckdb"
    model = Path(args.model) if args.model else ROOT / "var" / "demo-model"
    if db.is_file() and (model / "config.json").is_file():
        copy = work / "store.duckdb"
        shutil.copyfile(db, copy)  # the dashboard writes audit rows: never into the original
        wal = Path(str(db) + ".wal")
        if wal.is_file():
            shutil.copyfile(wal, Path(str(copy) + ".wal"))
        return copy, model, f"copy of {db.name}, model {model.name}"
    if args.db or args.model:
        raise SystemExit(f"--db {db} or --model {model} not found")
    return _build(work)


def _patients(db: Path, n: int) -> list[tuple[str, int]]:
    """(patient id, number of results) of the first ``n`` patients with >= 3 potassium results, by id."""
    from data.db import open_store

    with open_store(db).read() as cur:
        rows = cur.execute(
            """SELECT patient_id, count(*) FROM lab_results GROUP BY patient_id
               HAVING count(*) FILTER (WHERE analyte_code = ? AND value_canonical IS NOT NULL) >= 3
               ORDER BY patient_id""", [POTASSIUM]).fetchall()
    if len(rows) < n + 2:
        raise SystemExit(f"only {len(rows)} patients with potassium results; need {n + 2}")
    # the list's first patient is left out: the timeline would open on it by default
    return [(str(p), int(c)) for p, c in rows[1:n + 2]]


def _serve(db: Path, model: Path, log: Path, torch_threads: int | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, LABTREND_DB=str(db), LABTREND_MODEL=str(model))
    env.pop("LABTREND_MODEL_URL", None)
    env.pop("LABTREND_TORCH_THREADS", None)
    if torch_threads:
        env["LABTREND_TORCH_THREADS"] = str(torch_threads)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(dashboard_command(["--server.port", str(port), "--server.fileWatcherType", "none"]),
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"streamlit exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"streamlit did not answer:\n{log.read_text()[-2000:]}")


def _settled(page) -> None:
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', state="attached")
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')")


def _to_patients_page(page) -> float:
    """Click the Patients link; seconds until the patients table is drawn and the run is over."""
    link = page.locator('[data-testid="stSidebarNav"] a[data-testid="stSidebarNavLink"]').filter(has_text="Patients")
    t0 = time.perf_counter()
    link.first.click()
    page.get_by_role("heading", name="Patients", exact=True).first.wait_for()
    page.wait_for_function(PATIENTS_DRAWN, polling="raf")
    return time.perf_counter() - t0


def _select(page, pid: str) -> float:
    """From the Patients page: search the id (untimed), click 'Open timeline of <id>'; seconds until fully drawn."""
    search = page.get_by_role("textbox", name="Patient id contains")
    search.fill(pid)
    search.press("Enter")
    button = page.get_by_role("button", name=f"Open timeline of {pid}")
    button.wait_for()
    _settled(page)
    t0 = time.perf_counter()
    button.click()
    page.wait_for_function(DRAWN, arg=pid, polling="raf")
    return time.perf_counter() - t0


def _stats(xs: list[float]) -> dict:
    return {"median_s": round(median(xs), 3), "p90_s": round(percentile(xs, 90), 3), "min_s": round(min(xs), 3),
            "max_s": round(max(xs), 3), "n": len(xs), "runs_s": [round(x, 3) for x in xs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", help="store to copy (default var/demo.duckdb; built from MIMIC-IV demo when absent)")
    ap.add_argument("--model", help="model folder (default var/demo-model; a tiny one is trained when absent)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--timeout-s", type=float, default=120)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="LABTREND_TORCH_THREADS for the dashboard (default: the dashboard's own default, 1)")
    ap.add_argument("--out", default="page_load", help="results file name (benchmarks/results/OUT.json)")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from data import users
    from data.db import open_store

    work = Path(tempfile.mkdtemp(prefix="labtrend-page-load-"))
    proc = None
    try:
        db, model, source = _inputs(args, work)
        version_file = model / "model_version"
        version = version_file.read_text().strip() if version_file.is_file() else None
        patients = _patients(db, args.runs)
        store = open_store(db)  # a copy (or built here): the benchmark's account never reaches the original
        if users.get_user(store, USER) is None:
            users.add_user(store, USER, "Page load benchmark", "clinician", PASSWORD, by=users.Actor.cli())
        load_before = load_average()
        proc, url = _serve(db, model, work / "streamlit.log", args.torch_threads)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-background-networking",
                                               "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(args.timeout_s * 1000)
            page.goto(url)
            page.get_by_role("textbox", name="Username").fill(USER)
            page.get_by_role("textbox", name="Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", name="Patients", exact=True).first.wait_for()
            page.wait_for_function(PATIENTS_DRAWN)

            first, rest = patients[0], patients[1:]
            cold = _select(page, first[0])
            new, again, listing = [], [], []
            for pid, _ in rest:
                listing.append(_to_patients_page(page))
                new.append(_select(page, pid))
            for pid, _ in rest:
                _to_patients_page(page)
                again.append(_select(page, pid))
            browser.close()
        load_after = load_average()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    warm = _stats(new)
    payload = {
        "source": source,
        "model_version": version,
        "dashboard_torch_threads": args.torch_threads or 1,
        "load_average_1min": {"before": load_before, "after": load_after, "cpu_count": os.cpu_count()},
        "browser": "Chromium (headless, Playwright)",
        "selection": "Patients page: the id typed into the search box (untimed), then a click on 'Open timeline "
                     "of <id>'; the clock stops when the timeline is fully drawn (see the script's docstring)",
        "fully_drawn": "script run over (running indicator gone), no stale element, every Plotly chart laid out and "
                       "its SVG traces drawn, the timeline chart is this patient's and holds the forecast median "
                       "and 80% band",
        "patients": {"cold": first[0], "warm": [p for p, _ in rest],
                     "results_per_patient_median": median([c for _, c in rest])},
        "cold_first": round(cold, 3),
        "warm_new_patient": warm,
        "warm_reselect": _stats(again),
        "baseline_patients_list_page": _stats(listing),
        "target": f"median warm_new_patient <= {TARGET_S} s",
        "target_met": warm["median_s"] <= TARGET_S,
    }
    save(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
