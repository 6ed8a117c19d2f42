"""The dashboard end to end in a real browser: Chromium driven by Playwright, on the MIMIC-IV demo.

The module fixture builds everything a clinic would have, in a temporary folder:

* a fresh DuckDB store with the MIMIC-IV demo imported (read in place from the configured
  data folder, never copied);
* a ``tiny`` forecaster trained for a few steps with the project's own training code
  (:func:`model.training.finetune`) and saved as a :class:`model.inference.ForecastPipeline`;
* the outputs of one patient stored by :func:`clinical.predict.predict_patient`, so the
  Review page has something to review;
* a users file with an expert and a clinician (:func:`dashboard.access.add_user`);

then serves ``streamlit run dashboard/streamlit_app.py`` on a free port with the
environment the app reads, and stops it at the end. The tests sign in through the real
login form, wait for Streamlit to finish each run (``data-test-script-state`` on the app
root, no stale elements), read the drawn Plotly figure from the page, and save a
full-page screenshot of every page each role can open in ``tests/_screenshots/``.

Skipped only when Playwright or the Chromium binary is missing (or, as every MIMIC test,
when the MIMIC-IV demo is not on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python package) is not installed")

CHROMIUM = os.environ.get("LABTREND_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file() and shutil.which(CHROMIUM) is None,
                                reason=f"Chromium not found at {CHROMIUM} (set LABTREND_CHROMIUM)")

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "streamlit_app.py"
SHOTS = Path(__file__).resolve().parent / "_screenshots"
PASSWORD = "a long e2e test password"
USERS = {"expert": ("ed", "Dr Ed Expert"), "clinician": ("carla", "Dr Carla Clinician"),
         "analyst": ("ana", "Dr Ana Analyst")}
POTASSIUM_CODES = ("2823-3", "6298-4")  # serum/plasma; whole blood (blood gas)
TIMEOUT_MS = 60_000  # one wait; the first timeline of a process imports torch and loads the model
WIDTH, HEIGHT = 1440, 900


# ---- the served dashboard ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _potassium(store) -> tuple[str, str]:
    """(the potassium code this store uses most, a patient with at least 8 such results and few results overall)."""
    with store.read() as cur:
        code = cur.execute(
            """SELECT analyte_code FROM lab_results WHERE analyte_code IN (?, ?)
               GROUP BY 1 ORDER BY count(*) DESC LIMIT 1""",
            list(POTASSIUM_CODES)).fetchone()
        assert code, "the MIMIC-IV demo store has no potassium results"
        pid = cur.execute(
            """SELECT patient_id FROM lab_results GROUP BY patient_id
               HAVING count(*) FILTER (WHERE analyte_code = ? AND value_canonical IS NOT NULL) >= 8
               ORDER BY count(*), patient_id LIMIT 1""", [code[0]]).fetchone()
    assert pid, "no MIMIC-IV demo patient with 8 potassium results"
    return code[0], str(pid[0])


def _train_tiny(store, out: Path):
    """A ``tiny`` forecaster trained from scratch for a few steps on the store (seconds), saved as a pipeline."""
    from data import queries
    from model.training import Runtime, TrainSettings, finetune

    settings = TrainSettings(steps=5, eval_every=5, batch_size=8, eval_rows=24, final_eval_rows=300,
                             conformal_min_points=10, warmup_steps=2)
    pipe = finetune(None, queries.cohort(store), "scratch", settings=settings, runtime=Runtime(progress_bar=False),
                    config="tiny")
    pipe.save_pretrained(out)
    return pipe


def _wait_until_served(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"streamlit did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, mimic_dir):
    from clinical.predict import predict_patient
    from dashboard import access
    from data.db import open_store
    from data.importers import run_import

    root = tmp_path_factory.mktemp("e2e")
    db = root / "mimic.duckdb"
    store = open_store(db)
    run_import(store, mimic_dir)
    code, pid = _potassium(store)
    pipe = _train_tiny(store, root / "model")
    stored = predict_patient(store, pipe, pid, top_n=3, explain=False)  # the Review page's outputs
    assert stored["forecasts"], "predict_patient stored no forecast"
    users = root / "users.yaml"
    for role, (username, name) in USERS.items():
        access.add_user(username, name, role, PASSWORD, users)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LABTREND_DB=str(db), LABTREND_USERS=str(users), LABTREND_MODEL=str(root / "model"),
               LABTREND_COOKIE_KEY="e2e-cookie-key-not-a-secret-0123456789abcdef",
               STREAMLIT_SERVER_HEADLESS="true", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    env.pop("LABTREND_MODEL_URL", None)  # the model runs in the dashboard's process
    log = root / "streamlit.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.fileWatcherType", "none", "--server.runOnSave", "false"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_until_served(url, proc, log)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-background-networking",
                                               "--disable-dev-shm-usage"])
            try:
                yield types.SimpleNamespace(url=url, store=store, db=db, potassium=code, patient=pid,
                                            model_version=pipe.model_version, browser=browser, log=log)
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- page helpers --------------------------------------------------------------------------------------------
def settled(page) -> None:
    """Wait until Streamlit has finished the current run and no element on screen is stale (left from a rerun)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', state="attached")
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')")


def heading(page, text: str) -> None:
    page.get_by_role("heading", name=text, exact=True).first.wait_for()  # the old page's may linger a moment
    settled(page)
    assert page.get_by_role("heading", name=text, exact=True).count() == 1


def screenshot(page, name: str) -> Path:
    """A full-page PNG in tests/_screenshots/: the viewport is grown to the scroll height of the main area and
    the sidebar, then restored."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("""() => Math.max(...[...document.querySelectorAll(
        '[data-testid="stMain"], [data-testid="stSidebarContent"]')].map(e => e.scrollHeight))""")
    page.set_viewport_size({"width": WIDTH, "height": max(HEIGHT, int(height) + 40)})
    settled(page)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": WIDTH, "height": HEIGHT})
    return path


def sign_in(served, role: str):
    """A fresh browser context signed in through the login form; returns the page (on the role's first page)."""
    ctx = served.browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    page.goto(served.url)
    page.get_by_role("textbox", name="Username").fill(USERS[role][0])
    page.get_by_role("textbox", name="Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(USERS[role][1], exact=True).wait_for()  # the sidebar names the signed-in user
    settled(page)
    # the re-login cookie is written by a component of the run after the login: a URL opened later needs it
    page.wait_for_function("() => document.cookie.split('; ').some(c => c.startsWith('labtrend_auth='))")
    return page


def nav_links(page) -> dict[str, str]:
    """Sidebar navigation: page title -> URL path ('' for the default page)."""
    links = page.locator('[data-testid="stSidebarNav"] a[data-testid="stSidebarNavLink"]')
    links.first.wait_for()
    return {a.locator("span[label]").get_attribute("label"): urlparse(a.get_attribute("href") or "").path.strip("/")
            for a in links.all()}


def open_nav(page, title: str, heading_text: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a[data-testid="stSidebarNavLink"]').filter(has_text=title).click()
    heading(page, heading_text)


def open_patient(page, pid: str) -> None:
    """On the Patients page: search the id (the table filters to that one row, which is chosen), open its timeline."""
    search = page.get_by_role("textbox", name="Patient id contains")
    search.fill(pid)
    search.press("Enter")
    page.get_by_role("button", name=f"Open timeline of {pid}").click()
    heading(page, "Patient timeline")


def grid_texts(page, key: str) -> list[list[str]]:
    """The rows of the ``st.dataframe`` in the container ``key`` (its accessible grid) as lists of cell texts."""
    grid = page.locator(f".st-key-{key} table[role='grid']")
    grid.wait_for(state="attached")
    return grid.evaluate("""t => [...t.querySelectorAll('tbody tr')].map(
        r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()))""")


TIMELINE_FIGURE = """(pid) => {
    const el = document.querySelector('.st-key-timeline_chart .js-plotly-plot');
    if (!el || !el._fullLayout || !el.data || !el.querySelector('.main-svg .scatterlayer .trace')) return null;
    const name = ((el._context || {}).toImageButtonOptions || {}).filename || '';
    if (!name.includes(pid)) return null;  // still the previous patient's figure
    const axes = {};
    for (const [k, v] of Object.entries(el.layout)) {
        if (k.startsWith('yaxis')) axes['y' + k.slice(5)] = ((v.title || {}).text || '');
    }
    return {
        filename: name, axes: axes,
        traces: el.data.map(t => ({name: t.name || '', yaxis: t.yaxis || 'y', fill: t.fill || null,
                                   x: (t.x || []).map(String), y: Array.from(t.y || [])})),
        drawn: el.querySelectorAll('.main-svg .scatterlayer .trace').length,
    };
}"""


def timeline_figure(page, pid: str) -> dict:
    handle = page.wait_for_function(TIMELINE_FIGURE, arg=pid)
    settled(page)
    return handle.json_value()


# ---- (a) expert: login, potassium chart with reference and forecast bands, review; (c) every page's screenshot -----
def test_expert_sees_the_potassium_forecast_and_reviews_an_output(served):
    from dashboard import access

    page = sign_in(served, "expert")
    try:
        heading(page, "Patients")
        links = nav_links(page)
        assert list(links) == [p.title for p in access.pages_for_roles(["expert"])]
        assert list(links) == ["Patients", "Patient timeline", "Review"]
        shots = {"Patients": screenshot(page, "expert_patients")}

        open_patient(page, served.patient)
        assert page.url.rstrip("/").endswith("/timeline")
        assert page.get_by_role("combobox", name="Patient").input_value() == served.patient
        fig = timeline_figure(page, served.patient)
        k_axis = next((ax for ax, title in fig["axes"].items() if title.startswith("Potassium<br>")), None)
        assert k_axis, f"no potassium chart: {fig['axes']}"
        assert "(mmol/L)" in fig["axes"][k_axis]
        on_k = [t for t in fig["traces"] if t["yaxis"] == k_axis]
        names = {t["name"] for t in on_k}
        # the reference band: a filled step band at the potassium reference interval (mmol/L, about 3.5-5.1)
        band = next(t for t in on_k if t["name"] == "Reference interval")
        low = next(t for t in on_k if t["name"] == "Reference interval (low)")
        assert band["fill"] == "tonexty"
        assert 3.0 <= min(v for v in low["y"] if v is not None) <= 4.0
        assert 4.5 <= max(v for v in band["y"] if v is not None) <= 5.6
        # the forecast: filled interval bands and the median, in the same unit, after the last result
        assert f"Forecast median (model {served.model_version})" in names, names
        f80 = next(t for t in on_k if t["name"] == "Forecast 80% interval (q10–q90)")
        assert f80["fill"] == "tonexty"
        assert any(t["name"].startswith("Forecast ") and "interval" in t["name"] and t["name"] != f80["name"]
                   and t["fill"] == "tonexty" for t in on_k), f"no outer forecast band: {names}"
        median = next(t for t in on_k if t["name"].startswith("Forecast median"))
        assert len(median["y"]) >= 2 and all(1.5 < v < 9.0 for v in median["y"]), median["y"]
        results = [t for t in on_k if t["name"] in ("Result", "Result outside reference (H/L label)")]
        assert max(x for t in results for x in t["x"]) < max(median["x"])  # forecasts lie after the last result
        assert fig["drawn"] >= len(fig["traces"]) // 2  # the SVG is drawn, not only the data attached
        shots["Patient timeline"] = screenshot(page, "expert_timeline")

        # review: the output on screen gets a verdict and a comment
        open_nav(page, "Review", "Expert review")
        shots["Review"] = screenshot(page, "expert_review")
        oid = page.locator('[data-testid="stMain"] code').first.inner_text().strip()
        comment = f"e2e {uuid.uuid4().hex[:8]}: plausible given the trend"
        page.locator('[data-testid="stRadio"]').get_by_text("invalid", exact=True).click()
        page.get_by_role("textbox", name="Comment (optional)").fill(comment)
        page.get_by_role("button", name="Save verdict").click()
        page.get_by_text(f"Saved: {oid} is invalid.").wait_for()
        settled(page)

        rows = [r for r in grid_texts(page, "review_mine_box") if comment in r]
        assert len(rows) == 1, rows
        assert oid in rows[0] and "invalid" in rows[0]
        with served.store.read() as cur:
            saved = cur.execute("SELECT output_id, annotator, role, verdict FROM annotations WHERE comment = ?",
                                [comment]).fetchall()
        assert saved == [(oid, "ed", "expert", "invalid")]
        assert page.locator('[data-testid="stMain"] code').first.inner_text().strip() != oid  # the next output
        screenshot(page, "expert_review_saved")

        # a reload (a new session of the same browser: the re-login cookie) lists the verdict once, from the store
        page.goto(f"{served.url}/review")
        heading(page, "Expert review")
        assert len([r for r in grid_texts(page, "review_mine_box") if comment in r]) == 1
        with served.store.read() as cur:
            assert cur.execute("SELECT count(*) FROM annotations WHERE comment = ?", [comment]).fetchone()[0] == 1
        assert set(shots) == set(links) and all(p.stat().st_size > 20_000 for p in shots.values())
    finally:
        page.context.close()


# ---- (b) clinician: no upload page, not even by URL; (c) every page's screenshot ------------------------------------
def test_clinician_is_refused_the_upload_page(served):
    from dashboard import access

    page = sign_in(served, "clinician")
    try:
        heading(page, "Patients")
        links = nav_links(page)
        assert list(links) == [p.title for p in access.pages_for_roles(["clinician"])]
        assert list(links) == ["Patients", "Patient timeline"]
        assert "upload" not in links.values() and "Upload" not in page.locator('[data-testid="stSidebar"]').inner_text()
        shots = {"Patients": screenshot(page, "clinician_patients")}
        open_patient(page, served.patient)
        fig = timeline_figure(page, served.patient)
        assert any(t["name"].startswith("Forecast median") for t in fig["traces"])
        shots["Patient timeline"] = screenshot(page, "clinician_timeline")

        page.goto(f"{served.url}/upload")  # signed in again by the cookie, on a page the role may not open
        page.get_by_text("Page not found").wait_for()
        heading(page, "Patients")  # the app's main page runs instead
        assert page.get_by_role("heading", name="Upload lab results").count() == 0
        assert page.locator('[data-testid="stFileUploader"]').count() == 0
        assert not page.url.rstrip("/").endswith("/upload")
        screenshot(page, "clinician_upload_refused")
        assert set(shots) == set(links) and all(p.stat().st_size > 20_000 for p in shots.values())
    finally:
        page.context.close()


# ---- analyst: the local test codes of the MIMIC-IV demo, unmapped first --------------------------------------------
def test_analyst_sees_the_unmapped_local_codes(served):
    from dashboard import access

    page = sign_in(served, "analyst")
    try:
        links = nav_links(page)
        assert list(links) == [p.title for p in access.pages_for_roles(["analyst"])]
        assert "Local codes" in links
        open_nav(page, "Local codes", "Local test codes")
        shot = screenshot(page, "analyst_local_codes")
        assert shot.stat().st_size > 20_000
        rows = grid_texts(page, "codes_table_box")
        assert rows and all(r[0].startswith("mimic:") for r in rows)  # MIMIC items without a LOINC mapping
        assert page.get_by_role("button", name="Map and re-key the results").count() == 1
    finally:
        page.context.close()
