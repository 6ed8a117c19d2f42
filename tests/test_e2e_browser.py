"""The dashboard end to end in a real browser: Chromium driven by Playwright, on the MIMIC-IV demo.

The module fixture builds everything a clinic would have, in a temporary folder:

* a fresh DuckDB store with the MIMIC-IV demo imported (read in place from the configured
  data folder, never copied);
* a ``tiny`` forecaster trained for a few steps with the project's own training code
  (:func:`model.training.finetune`) and saved as a :class:`model.inference.ForecastPipeline`;
* the outputs of one patient stored by :func:`clinical.predict.predict_patient`, so the
  Review page has something to review;
* an account per role in the store (:func:`data.users.add_user`);

then serves the dashboard as ``labtrend dashboard`` does (:func:`labtrend.cli.dashboard_command`,
from a folder outside the checkout) on a free port with the environment the app reads, and
stops it at the end. The tests sign in through the real
login form, wait for Streamlit to finish each run (``data-test-script-state`` on the app
root, no stale elements), read the drawn Plotly figure from the page, and save a
full-page screenshot of every page each role can open in ``tests/_screenshots/``.

Skipped only when Playwright or the Chromium binary is missing (or, as every MIMIC test,
when the MIMIC-IV demo is not on the machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

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
         "analyst": ("ana", "Ana Analyst"), "admin": ("ada", "Dr Ada Admin")}
SESSION_COOKIE = "labtrend_session"
POTASSIUM_CODES = ("2823-3", "6298-4")  # serum/plasma; whole blood (blood gas)
# Every wait is on a state of the page (Streamlit's run over, an element drawn), never a fixed time. On a busy
# machine a state can take minutes to come (the first timeline of a process imports torch and loads the model), so
# a wait lasts as long as the app is alive and shows no error: it fails at once when the served app has exited or
# the page shows an exception. GUARD_S only stops a hung test; it is not a pacing assumption.
GUARD_S = 600
STEP_MS = 2_000  # how often a long wait checks that the app is still alive
IDLE_FAIL_S = 60  # the app done and idle this long without the awaited state: the state is not coming
WIDTH, HEIGHT = 1440, 900
_SERVER: dict = {}  # port -> (process, log) of each served app, for the waits' liveness checks


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


def _wait_until_served(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = GUARD_S) -> None:
    """Until the health endpoint answers (polled while the process is alive; it fails at once if it exits)."""
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
def browser():
    """One headless Chromium for the module (one Playwright per thread: the served apps share it)."""
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def _serving(root: Path, db: Path, model: Path):
    """The dashboard served as ``labtrend dashboard`` serves it (from ``root``, outside the checkout) on a free port
    with this store (accounts included) and model folder; yields its URL and stops it at the end."""
    from labtrend.cli import dashboard_command

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LABTREND_DB=str(db), LABTREND_MODEL=str(model))
    for var in ("LABTREND_MODEL_URL", "LABTREND_SESSION_IDLE_MINUTES", "LABTREND_SESSION_MAX_HOURS"):
        env.pop(var, None)  # the model runs in the dashboard's process; the default session policy
    log = root / "streamlit.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(dashboard_command(["--server.port", str(port), "--server.fileWatcherType", "none"]),
                                cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
    _SERVER[port] = (proc, log)
    try:
        _wait_until_served(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _SERVER.pop(port, None)


@pytest.fixture(scope="module")
def served(tmp_path_factory, mimic_dir, browser):
    from clinical.predict import predict_patient
    from data import users
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
    for role, (username, name) in USERS.items():
        users.add_user(store, username, name, role, PASSWORD, by=users.Actor("e2e", ("cli",)))
    with _serving(root, db, root / "model") as url:
        yield types.SimpleNamespace(url=url, store=store, db=db, potassium=code, patient=pid,
                                    model_version=pipe.model_version, browser=browser)


@pytest.fixture(scope="module")
def served_ui17(tmp_path_factory, cases, browser):
    """The UI-17 case: a store holding only its queue of three pending forecasts, an expert, no model."""
    import pandas as pd

    from clinical import outputs
    from data import users
    from data.db import open_store

    root = tmp_path_factory.mktemp("e2e_ui17")
    store = open_store(root / "ui17.duckdb")
    q = pd.read_csv(cases / "UI-17.csv")
    frame = pd.DataFrame({
        "patient_id": q["patient_id"], "analyte_code": q["loinc"], "at": pd.to_datetime(q["forecast_for"]),
        **{c: q["predicted_value"].astype(float) for c in ("q05", "q10", "q25", "q50", "q75", "q90", "q95")},
        "unit": q["unit"], "n_history": 3, "status": "ok", "model_version": "lt-ui17",
    })
    records = outputs.forecast_outputs(frame)
    outputs.store_outputs(store, records)
    users.add_user(store, USERS["expert"][0], USERS["expert"][1], "expert", PASSWORD, by=users.Actor("e2e", ("cli",)))
    with _serving(root, root / "ui17.duckdb", root / "no-model") as url:
        yield types.SimpleNamespace(url=url, store=store, browser=browser,
                                    ids={r["patient_id"]: r["output_id"] for r in records})


# ---- page helpers --------------------------------------------------------------------------------------------
def _alive(page) -> None:
    """Fail at once (not after a timeout) when the served app has exited or the page shows an exception."""
    proc, log = _SERVER.get(urlparse(page.url).port, (None, None))
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    exc = page.locator('[data-testid="stException"]')
    if exc.count():
        raise AssertionError(f"the page shows an exception: {exc.first.inner_text()[:2000]}")


IDLE = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return !!app && app.dataset.testScriptState === 'notRunning' && !document.querySelector('[data-stale="true"]');
}"""


def until(page, wait) -> object:
    """``wait(timeout_ms)`` (a Playwright wait on a page state) repeated until it succeeds, checking between
    tries that the app is alive and error-free. A slow app (a loaded machine) is waited for as long as it is
    running; it fails when the app has been done and idle for :data:`IDLE_FAIL_S` without the state, and
    at the :data:`GUARD_S` hang guard."""
    deadline = time.monotonic() + GUARD_S
    idle_since = None
    while True:
        try:
            return wait(STEP_MS)
        except sync_api.TimeoutError:
            _alive(page)
            now = time.monotonic()
            idle_since = (idle_since or now) if page.evaluate(IDLE) else None
            if now > deadline or (idle_since is not None and now - idle_since > IDLE_FAIL_S):
                raise


def settled(page) -> None:
    """Wait until Streamlit has finished the current run and no element on screen is stale (left from a rerun)."""
    until(page, lambda ms: page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]',
                                                  state="attached", timeout=ms))
    until(page, lambda ms: page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')",
                                                  timeout=ms))
    _alive(page)


def shown(locator) -> None:
    """Wait until ``locator`` is visible (a state), failing at once on an app error."""
    until(locator.page, lambda ms: locator.first.wait_for(timeout=ms))


def heading(page, text: str) -> None:
    shown(page.get_by_role("heading", name=text, exact=True))  # the old page's may linger a moment
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


def sign_in(served, role: str, url: str | None = None):
    """A fresh browser context signed in through the login form (at ``url``, default the app's root); returns
    the page."""
    ctx = served.browser.new_context(viewport={"width": WIDTH, "height": HEIGHT}, accept_downloads=True)
    ctx.set_default_timeout(GUARD_S * 1000)  # the hang guard; the waits below are on states
    page = ctx.new_page()
    page.goto(url or served.url)
    shown(page.get_by_role("textbox", name="Username"))
    page.get_by_role("textbox", name="Username").fill(USERS[role][0])
    page.get_by_role("textbox", name="Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    shown(page.get_by_text(USERS[role][1], exact=True))  # the sidebar names the signed-in user
    settled(page)
    # the page exchanges its one-time grant for the HttpOnly session cookie: a URL opened later needs it
    until(page, lambda ms: page.wait_for_function(
        "() => document.documentElement.dataset.labtrendSession === 'set'", timeout=ms))
    return page


def verdict_button(card, verdict: str):
    """The review card's button for ``verdict`` ('valid' must not match 'Invalid'); its name also holds its icon
    and its key."""
    return card.get_by_role("button", name=re.compile(rf"\b{verdict.capitalize()}\b"))


def nav_links(page) -> dict[str, str]:
    """Sidebar navigation: page title -> URL path ('' for the default page)."""
    links = page.locator('[data-testid="stSidebarNav"] a[data-testid="stSidebarNavLink"]')
    shown(links)
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
    button = page.get_by_role("button", name=f"Open timeline of {pid}")
    shown(button)
    button.click()
    heading(page, "Patient timeline")


def grid_texts(page, key: str) -> list[list[str]]:
    """The rows of the ``st.dataframe`` in the container ``key`` (its accessible grid) as lists of cell texts."""
    grid = page.locator(f".st-key-{key} table[role='grid']")
    until(page, lambda ms: grid.wait_for(state="attached", timeout=ms))
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
    handle = until(page, lambda ms: page.wait_for_function(TIMELINE_FIGURE, arg=pid, timeout=ms))
    settled(page)
    return handle.json_value()


# ---- (a) expert: potassium chart, latest episode, review with one click, one key, a double click --------------------
def test_expert_sees_the_potassium_forecast_and_reviews_with_one_click_or_one_key(served):
    from dashboard import access

    page = sign_in(served, "expert")
    try:
        heading(page, "Patients")
        links = nav_links(page)
        assert list(links) == [p.title for p in access.pages_for_roles(["expert"])]
        assert list(links) == ["Patients", "Patient timeline", "Review"]
        shots = {"Patients": screenshot(page, "expert_patients")}

        open_patient(page, served.patient)
        assert urlparse(page.url).path.rstrip("/").endswith("/timeline")
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
        # it opens on the latest episode, and the address bar carries the view (a bookmark, a shared link)
        main = page.locator('[data-testid="stMain"]')
        assert "Showing the latest episode" in main.inner_text()
        query = parse_qs(urlparse(page.url).query)
        assert query["patient"] == [served.patient] and query["period"] == ["episode"], page.url
        shots["Patient timeline"] = screenshot(page, "expert_timeline")

        # review: the card holds the chart around the output; a double click on a verdict stores one verdict
        open_nav(page, "Review", "Expert review")
        card = page.locator(".st-key-review_card")
        shown(card.locator(".js-plotly-plot .main-svg .scatterlayer .trace"))
        shots["Review"] = screenshot(page, "expert_review")
        oid = card.locator("code").first.inner_text().strip()
        comment = f"e2e {uuid.uuid4().hex[:8]}: plausible given the trend"
        card.get_by_role("textbox").fill(comment)
        shown(verdict_button(card, "invalid"))
        verdict_button(card, "invalid").dblclick()
        shown(page.get_by_text(re.compile(rf"Saved( once)?: {oid} is invalid")))
        settled(page)
        with served.store.read() as cur:
            saved = cur.execute("SELECT annotator, role, verdict, comment FROM annotations WHERE output_id = ?",
                                [oid]).fetchall()
        assert saved == [("ed", "expert", "invalid", comment)]  # a double click: exactly one verdict
        rows = [r for r in grid_texts(page, "review_mine_box") if comment in r]
        assert len(rows) == 1 and oid in rows[0] and "invalid" in rows[0]
        nxt = card.locator("code").first.inner_text().strip()
        assert nxt != oid  # the next output at once
        screenshot(page, "expert_review_saved")

        # one key: U saves "unsure" for the output on screen
        page.get_by_role("heading", name="Expert review").click()  # the cursor out of the comment box
        page.keyboard.press("u")
        shown(page.get_by_text(f"Saved: {nxt} is unsure."))
        settled(page)
        with served.store.read() as cur:
            assert cur.execute("SELECT verdict FROM annotations WHERE output_id = ? AND annotator = 'ed'",
                               [nxt]).fetchall() == [("unsure",)]

        # the card's link opens the timeline around the output
        third = card.locator("code").first.inner_text().strip()
        with served.store.read() as cur:
            pid, code = cur.execute("SELECT patient_id, analyte_code FROM model_outputs WHERE output_id = ?",
                                    [third]).fetchone()
        page.get_by_role("link", name="Open the timeline around this output").click()
        heading(page, "Patient timeline")
        fig = timeline_figure(page, pid)
        query = parse_qs(urlparse(page.url).query)
        assert query["patient"] == [pid] and re.fullmatch(r"\d{4}-\d\d-\d\d\.\.\d{4}-\d\d-\d\d", query["period"][0])
        if code:
            assert query["analyte"] == [code]
        screenshot(page, "expert_timeline_from_review")

        # a reload (a new session of the same browser: the re-login cookie) lists the verdict once, from the store
        page.goto(f"{served.url}/review")
        heading(page, "Expert review")
        assert len([r for r in grid_texts(page, "review_mine_box") if comment in r]) == 1
        with served.store.read() as cur:
            assert cur.execute("SELECT count(*) FROM annotations WHERE comment = ?", [comment]).fetchone()[0] == 1
        assert set(shots) == set(links) and all(p.stat().st_size > 20_000 for p in shots.values())
    finally:
        page.context.close()


# ---- (b) clinician: no upload page, not even by URL; deep links; every page's screenshot ------------------------
def test_clinician_is_refused_the_upload_page_and_opens_timelines_by_link(served):
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
        shown(page.get_by_text("does not give access to Upload"))  # refused, and audited
        settled(page)
        assert page.get_by_role("heading", name="Upload lab results").count() == 0
        assert page.locator('[data-testid="stFileUploader"]').count() == 0
        assert "Upload" not in page.locator('[data-testid="stSidebarNav"]').inner_text()
        with served.store.read() as cur:
            refused = cur.execute("SELECT count(*) FROM audit_log WHERE action = 'denied' AND username = 'carla' "
                                  "AND json_extract_string(detail, '$.page') = 'upload'").fetchone()[0]
        assert refused == 1
        screenshot(page, "clinician_upload_refused")

        # a bookmarked link: this patient's potassium over the whole history
        page.goto(f"{served.url}/timeline?patient={served.patient}&analyte={served.potassium}&period=all")
        heading(page, "Patient timeline")
        fig = timeline_figure(page, served.patient)
        assert list(fig["axes"].values()) and all(t.startswith("Potassium<br>") for t in fig["axes"].values())
        assert parse_qs(urlparse(page.url).query)["period"] == ["all"]
        assert "Showing the latest episode" not in page.locator('[data-testid="stMain"]').inner_text()
        screenshot(page, "clinician_timeline_from_link")
        # a link to a patient this store does not have: said plainly, nobody else shown
        page.goto(f"{served.url}/timeline?patient=NOT-A-PATIENT-42")
        shown(page.get_by_text("who is not in this database"))
        settled(page)
        assert page.locator(".st-key-timeline_chart").count() == 0
        screenshot(page, "clinician_unknown_patient_link")
        with served.store.read() as cur:
            via = cur.execute("SELECT count(*) FROM audit_log WHERE username = 'carla' AND action = 'view_patient' "
                              "AND patient_id = ? AND json_extract_string(detail, '$.via') = 'link'",
                              [served.patient]).fetchone()[0]
            refused = cur.execute("SELECT count(*) FROM audit_log WHERE username = 'carla' AND action = 'denied' "
                                  "AND patient_id = 'NOT-A-PATIENT-42'").fetchone()[0]
            dump = cur.execute("SELECT logged_at, action, patient_id, detail FROM audit_log WHERE username = 'carla' "
                               "ORDER BY audit_id").fetchall()
        assert via >= 1 and refused >= 1, "\n".join(map(str, dump))
        assert set(shots) == set(links) and all(p.stat().st_size > 20_000 for p in shots.values())
    finally:
        page.context.close()


# ---- (c) analyst: upload feedback and the rejected rows' download; a timeline link refused ------------------------
def test_analyst_sees_what_happened_to_every_uploaded_row_and_downloads_the_rejected_ones(served, tmp_path):
    from dashboard import access

    upload = tmp_path / "ward_export.csv"
    upload.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                      "E2E-1,2024-03-01 08:00,2951-2,Sodium,139,mmol/L\n"
                      "E2E-1,2024-03-01 08:00,2951-2,Sodium,139,mmol/L\n"
                      "E2E-1,2024-03-02 08:00,2951-2,=HYPERLINK(\"x\"),141,furlongs\n"
                      "E2E-1,2024-03-03 08:00,2823-3,Potassium,4.4,bananas\n")
    page = sign_in(served, "analyst")
    try:
        heading(page, "Upload lab results")
        links = nav_links(page)
        assert list(links) == [p.title for p in access.pages_for_roles(["analyst"])] == ["Upload", "Model", "Local codes"]
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(upload))
        shown(page.get_by_role("button", name="Import"))
        settled(page)
        page.get_by_role("button", name="Import").click()
        shown(page.get_by_text("What happened to every row"))
        settled(page)
        table = grid_texts(page, "upload_outcomes_box")
        got = {(r[0], r[1]): r[2] for r in table}
        assert got[("Loaded", "stored as results")] == "1"
        assert got[("Skipped", "exact duplicate of a row already kept")] == "1"
        assert got[("Quarantined", "unit unknown or not convertible")] == "2"
        with page.expect_download() as dl:
            page.get_by_role("button", name=re.compile(r"Download the 2 rejected rows")).click()
        text = Path(dl.value.path()).read_text(encoding="utf-8")
        assert "furlongs" in text and "bananas" in text and "'=HYPERLINK" in text  # formulas neutralised
        shots = {"Upload": screenshot(page, "analyst_upload")}
        open_nav(page, "Model", "Forecasting model")
        shots["Model"] = screenshot(page, "analyst_model")
        open_nav(page, "Local codes", "Local test codes")
        shots["Local codes"] = screenshot(page, "analyst_local_codes_page")
        # a timeline link opened by a role without timelines: a message, nothing of the patient
        page.goto(f"{served.url}/timeline?patient={served.patient}")
        shown(page.get_by_text("does not give access to patient timelines"))
        settled(page)
        assert served.patient not in page.locator('[data-testid="stMain"]').inner_text().replace(
            "does not give access", "")  # no data of the patient
        screenshot(page, "analyst_timeline_link_refused")
        assert set(shots) == set(links) and all(p.stat().st_size > 20_000 for p in shots.values())
    finally:
        page.context.close()


# ---- (d) admin: every page, looked at ---------------------------------------------------------------------------
def test_admin_opens_every_page(served):
    from dashboard import access

    # signed out, a shared link first shows the sign-in form, then the linked view
    page = sign_in(served, "admin", url=f"{served.url}/timeline?patient={served.patient}&period=all")
    try:
        heading(page, "Patient timeline")
        timeline_figure(page, served.patient)
        assert parse_qs(urlparse(page.url).query)["period"] == ["all"]
        open_nav(page, "Patients", "Patients")
        links = nav_links(page)
        assert list(links) == [p.title for p in access.pages_for_roles(["admin"])]
        headings = {"Patients": "Patients", "Patient timeline": "Patient timeline", "Review": "Expert review",
                    "Upload": "Upload lab results", "Model": "Forecasting model", "Local codes": "Local test codes",
                    "Audit": "Audit log",
                    "Users": "Users"}
        shots = {}
        for title in links:
            open_nav(page, title, headings[title])
            if title == "Patient timeline":
                timeline_figure(page, page.get_by_role("combobox", name="Patient").input_value())
            shots[title] = screenshot(page, f"admin_{links[title] or 'patients'}")
        assert set(shots) == set(links) and all(p.stat().st_size > 20_000 for p in shots.values())
    finally:
        page.context.close()


# ---- (e) UI-17 in a real browser: the verdict lands on the output shown; a double click stores one verdict ----------
def test_ui17_review_in_the_browser_with_a_double_click(served_ui17):
    """UI-17 as written: PR-0101 'invalid' with the comment 'baseline wrong', PR-0102 'valid' (the two due first,
    on 2024-10-07, in the queue's order), the second saved by a double click; exactly two rows, each on the output
    shown, PR-0103 still pending and shown next with an empty comment box."""
    ids = served_ui17.ids
    by_output = {v: k for k, v in ids.items()}
    wanted = {"P0022": ("invalid", "baseline wrong"), "P0023": ("valid", "")}
    page = sign_in(served_ui17, "expert")
    try:
        open_nav(page, "Review", "Expert review")
        card = page.locator(".st-key-review_card")
        for step in ("click", "dblclick"):
            oid = card.locator("code").first.inner_text().strip()
            assert by_output[oid] in wanted, f"{by_output[oid]} shown before the two outputs due on 2024-10-07"
            verdict, comment = wanted.pop(by_output[oid])
            assert card.get_by_role("textbox").input_value() == ""  # an empty form for each output
            if comment:
                card.get_by_role("textbox").fill(comment)
            button = verdict_button(card, verdict)
            shown(button)
            getattr(button, step)()
            shown(page.get_by_text(re.compile(rf"Saved( once)?: {oid} is {verdict}")))
            settled(page)
            assert card.locator("code").first.inner_text().strip() != oid  # the next output at once
        with served_ui17.store.read() as cur:
            rows = cur.execute("SELECT output_id, verdict, comment, annotator FROM annotations").fetchall()
        assert sorted(rows) == sorted([(ids["P0022"], "invalid", "baseline wrong", "ed"),
                                       (ids["P0023"], "valid", None, "ed")])
        assert card.locator("code").first.inner_text().strip() == ids["P0024"]  # PR-0103 stays pending
        assert card.get_by_role("textbox").input_value() == ""
        screenshot(page, "expert_review_ui17")
    finally:
        page.context.close()


# ---- (d) sessions end: an admin's cookie replayed after sign-out shows the sign-in form ----------------------
def test_an_admins_cookie_replayed_after_sign_out_shows_the_sign_in_form(served):
    page = sign_in(served, "admin")
    thief = served.browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    thief.set_default_timeout(GUARD_S * 1000)
    try:
        open_nav(page, "Users", "Users")
        screenshot(page, "admin_users")
        cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert SESSION_COOKIE not in page.evaluate("document.cookie")  # page scripts cannot read it
        # a copy of the cookie is the session while it lasts (a reload or a second tab of the same browser)...
        thief.add_cookies([cookie])
        stolen = thief.new_page()
        stolen.goto(f"{served.url}/users")
        heading(stolen, "Users")
        # ... and nothing once the admin signs out: the session is revoked in the store
        page.get_by_role("button", name="Sign out").click()
        shown(page.get_by_text("You signed out."))
        page.wait_for_function("() => document.documentElement.dataset.labtrendSession === 'cleared'")
        assert SESSION_COOKIE not in {c["name"] for c in page.context.cookies()}
        stolen.goto(f"{served.url}/users")
        stolen.get_by_role("textbox", name="Username").wait_for()
        settled(stolen)
        assert stolen.get_by_role("heading", name="Users", exact=True).count() == 0
        assert stolen.get_by_text("Dr Ada Admin", exact=True).count() == 0
        screenshot(stolen, "admin_cookie_replayed_after_sign_out")
        with served.store.read() as cur:
            rows = cur.execute("SELECT action, username, json_extract_string(detail, '$.via'), "
                               "json_extract_string(detail, '$.reason') FROM audit_log "
                               "WHERE action IN ('login', 'login_failed', 'logout') ORDER BY audit_id").fetchall()
        mine = [r for r in rows if r[1] in ("ada", "")]
        assert ("login", "ada", "password", None) in mine and ("logout", "ada", None, None) in mine
        assert ("login", "ada", "cookie", None) in mine  # the copy's sign-in is audited like a password one
        assert mine[-1] == ("login_failed", "", "cookie", "signed out")  # the replay is refused and audited
    finally:
        thief.close()


# ---- issue 11: flags counted for every source, age from the birth date or the source's age ---------------------------
def test_patients_list_counts_abnormal_and_critical_results(served):
    from data import queries

    pats = queries.patients(served.store, limit=1_000_000)
    top = pats.sort_values(["n_critical", "patient_id"], ascending=[False, True]).iloc[0]
    assert top["n_critical"] > 0
    page = sign_in(served, "clinician")
    try:
        heading(page, "Patients")
        grid = page.locator(".st-key-patients_table table[role='grid']")
        grid.wait_for(state="attached")
        headers = grid.evaluate("t => [...t.querySelectorAll('thead th')].map(c => c.innerText.trim())")
        for name in ("Age (y)", "Abnormal", "Critical", "Implausible"):
            assert name in headers, headers
        search = page.get_by_role("textbox", name="Patient id contains")
        search.fill(str(top["patient_id"]))
        search.press("Enter")
        page.get_by_role("button", name=f"Open timeline of {top['patient_id']}").wait_for()
        settled(page)
        page.wait_for_function("() => document.querySelectorAll(\".st-key-patients_table table[role='grid'] tbody tr\")"
                               ".length === 1")
        rows = grid_texts(page, "patients_table")
        assert len(rows) == 1, rows
        row = dict(zip([h for h in headers if h], [c for c in rows[0]][-len([h for h in headers if h]):]))
        assert row["Critical"] == str(int(top["n_critical"])) and row["Abnormal"] == str(int(top["n_abnormal"]))
        assert row["Age (y)"] == str(int(top["age_years"]))
        screenshot(page, "clinician_patients_critical")
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
