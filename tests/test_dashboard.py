"""The Streamlit app through AppTest: login, roles, every page, timeline, upload, review, audit.

Each test signs in through the form, or starts a server-side session for an account of the
store and puts its id in the browser session (``app_helpers.signed_in``), as a password
sign-in does; roles are then read from the store, as in production.
"""

from __future__ import annotations

import json
import os
import sys
import types
import time
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import app_helpers
from dashboard import access
from data import audit
from data.db import open_store
from data.importers import run_import

APP = Path(__file__).resolve().parent.parent / "dashboard" / "streamlit_app.py"
PAGES_DIR = APP.parent / "app_pages"
PASSWORD = app_helpers.PASSWORD
USERS = {"clinician": "carla", "expert": "ed", "analyst": "ana", "admin": "ada"}
TIMEOUT = 600  # a hang guard for one script run (AppTest), not a pacing assumption: a loaded machine is slow


@pytest.fixture(scope="module")
def env(tmp_path_factory, cases):
    """A store with the case files imported and one account per role, no model."""
    root = tmp_path_factory.mktemp("dash")
    db = root / "lab.duckdb"
    store = open_store(db)
    for name in ("LAB-01", "LAB-02", "LAB-04", "LAB-05", "LAB-10", "XAI-15"):
        run_import(store, cases / f"{name}.csv")
    for role, name in USERS.items():
        app_helpers.ensure_user(store, name, role)
    mp = pytest.MonkeyPatch()
    mp.setenv("LABTREND_DB", str(db))
    mp.setenv("LABTREND_MODEL", str(root / "no-model"))
    for var in ("LABTREND_SESSION_IDLE_MINUTES", "LABTREND_SESSION_MAX_HOURS"):
        mp.delenv(var, raising=False)
    yield types.SimpleNamespace(db=db, store=store, root=root, cases=cases)
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_restored():
    """The dashboard sets torch's thread count for its whole process (``state.torch_threads``); AppTest runs
    it inside pytest, so the count is put back for the test modules that run after this one."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def signed_in(role: str) -> AppTest:
    return app_helpers.signed_in(USERS[role], role, TIMEOUT)


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error",
                                   "success") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def frame_with(at: AppTest, column: str) -> pd.DataFrame:
    """The first st.dataframe on the page that has ``column``."""
    for d in at.dataframe:
        v = d.value
        v = v.data if hasattr(v, "data") and not isinstance(v, pd.DataFrame) else v
        if column in v.columns:
            return v
    raise AssertionError(f"no table with column {column!r}")


def submit(at: AppTest, label: str = "Save verdict") -> AppTest:
    return next(b for b in at.button if b.label == label).click().run()


def audit_rows(env, action: str) -> pd.DataFrame:
    return audit.read_log(env.store, action=action)


# ---- login ----------------------------------------------------------------------------------------
def test_login_form_first_and_nothing_else(env):
    """A visitor who has not signed in sees the sign-in form and no page."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [t.label for t in at.text_input] == ["Username", "Password"]
    assert "Patients" not in texts(at)


def sign_in_form(at: AppTest, username: str, password: str = PASSWORD) -> AppTest:
    at.text_input(key="lt_login_username").input(username)
    at.text_input(key="lt_login_password").input(password)
    return next(b for b in at.button if b.label == "Sign in").click().run()


def test_sign_in_and_a_second_browser_session_stays_signed_out(env):
    """Carla signs in with her password; another session opened afterwards still sees the form."""
    at = sign_in_form(AppTest.from_file(str(APP), default_timeout=TIMEOUT).run(), "carla")
    assert not at.exception
    assert at.session_state["lt_session"]
    assert at.title[0].value == "Patients"
    other = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert "lt_session" not in other.session_state
    assert [t.label for t in other.text_input] == ["Username", "Password"]
    logins = audit_rows(env, "login")
    mine = logins[logins["username"] == "carla"]
    assert mine["detail"].str.contains('"via": "password"').any()


def test_wrong_password_is_refused_and_audited(env):
    at = sign_in_form(AppTest.from_file(str(APP), default_timeout=TIMEOUT).run(), "carla", "not the password")
    assert "lt_session" not in at.session_state
    assert any("incorrect" in e.value for e in at.error)
    failed = audit_rows(env, "login_failed")
    assert ((failed["username"] == "carla") & failed["detail"].str.contains("wrong password")).any()


def test_a_session_claimed_in_the_browser_session_does_not_count(env):
    """Only a live session id of the store signs in: names and roles put in the session state do not."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["lt_session"] = "made-up"
    at.session_state["lt_user"] = types.SimpleNamespace(username="mallory", roles=("admin",))
    at.run()
    assert [t.label for t in at.text_input] == ["Username", "Password"]
    assert "Audit" not in texts(at)


# ---- roles and pages ---------------------------------------------------------------------------------
def denied_count(env, username: str, page_key: str) -> int:
    d = audit_rows(env, "denied")
    return int(((d["username"] == username) & d["detail"].str.contains(f'"page": "{page_key}"')).sum())


@pytest.mark.parametrize("role", access.ROLES)
def test_every_page_for_every_role(env, role):
    """Each role opens exactly its pages, each without an exception. Any other page, asked for by its URL
    (hidden from the menu, so reachable only that way), is refused with a message and audited each time."""
    at = signed_in(role)
    assert not at.exception
    username = USERS[role]
    for spec in access.PAGES:
        if spec.key == "timeline":
            at.session_state["timeline_patient"] = "P0020"
        before = denied_count(env, username, spec.key)
        at.switch_page(f"app_pages/{Path(spec.path).name}").run()
        assert not at.exception, (role, spec.key, at.exception)
        if role in spec.roles:
            assert at.title and at.title[0].value, (role, spec.key)
            assert denied_count(env, username, spec.key) == before
        else:
            assert any(f"does not give access to {spec.title}" in e.value for e in at.error), (role, spec.key)
            assert not at.title and not at.file_uploader and not at.dataframe, (role, spec.key)
            assert denied_count(env, username, spec.key) == before + 1, (role, spec.key)


def test_a_page_file_run_alone_checks_the_session_and_the_role(env):
    """Running the upload page file itself (outside the entry point) checks the session in the store and the
    role: a clinician is refused and audited; a revoked session is told to sign in."""
    at = signed_in("clinician")
    direct = AppTest.from_file(str(PAGES_DIR / "upload.py"), default_timeout=TIMEOUT)
    direct.session_state["lt_user"] = at.session_state["lt_user"]
    direct.session_state["lt_session"] = at.session_state["lt_session"]
    before = denied_count(env, "carla", "upload")
    direct.run()
    assert any("does not give access to Upload" in e.value for e in direct.error)
    assert not direct.file_uploader
    assert denied_count(env, "carla", "upload") == before + 1
    from data import sessions

    sessions.revoke(env.store, at.session_state["lt_session"], "signed out", now=sessions.utcnow())
    direct.run()
    assert any("sign in" in e.value for e in direct.error) and not direct.file_uploader


def test_page_files_refuse_without_sign_in(env):
    at = AppTest.from_file(str(PAGES_DIR / "timeline.py"), default_timeout=TIMEOUT).run()
    assert any("sign in" in e.value for e in at.error)
    assert not at.get("plotly_chart")


# ---- timeline ------------------------------------------------------------------------------------------
def test_timeline_of_p0001_draws_censored_markers_and_is_audited(env):
    """LAB-01 on the page: '<10' is a triangle at 10, never a point at 0; the view is in the audit log."""
    at = signed_in("clinician")
    at.session_state["timeline_patient"] = "P0001"
    at.switch_page("app_pages/timeline.py").run()
    assert not at.exception
    specs = plotly_specs(at)
    assert specs, "no chart"
    data = specs[0]["data"]
    symbols = [t.get("marker", {}).get("symbol") for t in data]
    assert "triangle-down" in symbols
    cens = next(t for t in data if t.get("marker", {}).get("symbol") == "triangle-down")
    assert cens["y"] == [10.0] and cens["text"][0].startswith("<10")
    assert "Rheumatoid factor" in specs[0]["layout"]["yaxis"]["title"]["text"]
    assert "No trained model loaded: forecasts unavailable" in texts(at)
    views = audit_rows(env, "view_patient")
    assert ((views["patient_id"] == "P0001") & (views["username"] == "carla")).any()
    n = len(audit_rows(env, "view_patient"))
    at.run()  # a rerun of the same view is not a new view
    assert len(audit_rows(env, "view_patient")) == n


def test_timeline_lab10_and_cumulative_table(env):
    at = signed_in("expert")
    at.session_state["timeline_patient"] = "P0012"
    at.switch_page("app_pages/timeline.py").run()
    assert not at.exception
    spec = plotly_specs(at)[0]
    assert spec["layout"]["yaxis"]["range"][1] < 200  # sodium axis not stretched by 1390
    table = frame_with(at, "Reference interval")
    assert "1390 (implausible?)" in table.astype(str).to_numpy().ravel().tolist()


# ---- upload ----------------------------------------------------------------------------------------------
def _count(store) -> int:
    with store.read() as cur:
        return cur.execute("SELECT count(*) FROM lab_results").fetchone()[0]


def test_upload_ui18_adds_exactly_three_rows_once(env):
    """UI-18: an analyst uploads the 3-row file: +3 rows, a summary, an audit row; again: nothing added."""
    at = signed_in("analyst")
    assert at.title[0].value == "Upload lab results"  # the analyst's first page
    before = _count(env.store)
    at.file_uploader[0].set_value(("UI-18.csv", (env.cases / "UI-18.csv").read_bytes(), "text/csv")).run()
    assert not at.exception
    assert "Long CSV" in texts(at)
    at.button(key="upload_import").click().run()
    assert not at.exception
    assert _count(env.store) == before + 3
    assert "3 rows, 3 loaded" in texts(at)
    ups = audit_rows(env, "upload")
    assert (ups["detail"].map(json.loads).map(lambda d: d.get("file") == "UI-18.csv" and d.get("rows_loaded") == 3)).any()
    at.button(key="upload_import").click().run()
    assert _count(env.store) == before + 3
    assert "already imported" in texts(at)


def test_upload_shows_quarantine_and_offers_the_csv(env, tmp_path):
    bad = ("patient_id,collected_at,loinc,test_name,value,unit\n"
           "P0900,2024-01-01 08:00,2951-2,Sodium,140,mmol/L\n"
           "P0900,2024-01-02 08:00,2951-2,=HYPERLINK(\"x\"),141,furlongs\n")
    at = signed_in("admin")
    at.switch_page("app_pages/upload.py").run()
    at.file_uploader[0].set_value(("bad.csv", bad.encode(), "text/csv")).run()
    at.button(key="upload_import").click().run()
    assert not at.exception
    assert "1 quarantined" in texts(at)
    q = frame_with(at, "reason")
    assert len(q) == 1 and "unit" in q.iloc[0]["reason"]
    assert at.get("download_button")


def test_upload_of_an_unreadable_file_writes_nothing(env):
    at = signed_in("analyst")
    before = _count(env.store)
    at.file_uploader[0].set_value(("empty.csv", b"", "text/csv")).run()
    if any(b.key == "upload_import" for b in at.button):
        at.button(key="upload_import").click().run()
    assert not at.exception
    assert at.error
    assert _count(env.store) == before


# ---- audit --------------------------------------------------------------------------------------------------
def test_audit_page_lists_patient_views_and_uploads(env):
    clin = signed_in("clinician")
    clin.session_state["timeline_patient"] = "P0003"
    clin.switch_page("app_pages/timeline.py").run()
    ana = signed_in("analyst")
    ana.file_uploader[0].set_value(("FC-12.csv", (env.cases / "FC-12.csv").read_bytes(), "text/csv")).run()
    ana.button(key="upload_import").click().run()
    admin = signed_in("admin")
    admin.switch_page("app_pages/audit.py").run()
    assert not admin.exception
    log = frame_with(admin, "action")
    assert ((log["action"] == "view_patient") & (log["patient_id"] == "P0003") & (log["username"] == "carla")).any()
    assert ((log["action"] == "upload") & (log["username"] == "ana") & log["detail"].str.contains("FC-12")).any()


def test_audit_log_is_append_only_api():
    assert not [n for n in dir(audit) if n.startswith(("delete", "update", "remove"))]
    with pytest.raises(ValueError, match="unknown audit action"):
        audit.record(None, "x", [], "drop_table")


# ---- review (UI-17) ---------------------------------------------------------------------------------------
def _ui17_outputs(env) -> dict[str, str]:
    """Store the UI-17 queue as forecast outputs (clinical.outputs); patient id -> output id."""
    outputs = pytest.importorskip("clinical.outputs")
    q = pd.read_csv(env.cases / "UI-17.csv")
    frame = pd.DataFrame({
        "patient_id": q["patient_id"], "analyte_code": q["loinc"], "at": pd.to_datetime(q["forecast_for"]),
        **{c: q["predicted_value"].astype(float) for c in ("q05", "q10", "q25", "q50", "q75", "q90", "q95")},
        "unit": q["unit"], "n_history": 3, "status": "ok", "model_version": "lt-ui17",
    })
    records = outputs.forecast_outputs(frame)
    outputs.store_outputs(env.store, records)
    return {r["patient_id"]: r["output_id"] for r in records}


def _annotations(env, ids) -> list[tuple]:
    with env.store.read() as cur:
        return cur.execute("SELECT output_id, annotator, verdict, comment FROM annotations "
                           "WHERE list_contains(?, output_id) ORDER BY annotation_id", [list(ids)]).fetchall()


def _verdict(at: AppTest, oid: str, verdict: str) -> AppTest:
    """One click on the card's verdict button (one click or one key saves)."""
    return at.button(key=f"review_{verdict}_{oid}").click().run()


def test_review_ui17_saves_each_verdict_once_on_the_output_shown(env):
    """UI-17 with the real verdict service: the verdict lands on the output on screen, each click is saved once,
    the same click arriving again (a double click, a click during a rerun) adds nothing and says so, the next
    output shows at once with an empty comment box."""
    ids = _ui17_outputs(env)
    by_output = {v: k for k, v in ids.items()}
    wanted = {"P0022": ("invalid", "baseline wrong"), "P0023": ("valid", "")}
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    shown = []
    for _ in range(2):
        current = at.session_state["review_current"]
        oid = current["output"]["output_id"]
        assert oid in texts(at)
        shown.append(by_output[oid])
        if by_output[oid] not in wanted:
            pytest.fail(f"{by_output[oid]} shown before the two outputs due on 2024-10-07")
        verdict, comment = wanted[by_output[oid]]
        assert not at.text_area(key=f"review_comment_{oid}").value  # an empty comment box for each output
        if comment:
            at.text_area(key=f"review_comment_{oid}").input(comment)
        last_shown = dict(current)
        _verdict(at, oid, verdict)
        assert not at.exception
        assert f"Saved: {oid} is {verdict}." in texts(at)
        assert at.session_state["review_current"]["output"]["output_id"] != oid  # the next output at once
    assert sorted(shown) == ["P0022", "P0023"]
    rows = _annotations(env, ids.values())
    assert sorted(rows) == sorted([(ids["P0022"], "ed", "invalid", "baseline wrong"), (ids["P0023"], "ed", "valid", None)])
    assert ids["P0024"] in texts(at)  # the third stays pending and is shown next
    mine = frame_with(at, "verdict")  # "Your verdicts": one row per output judged, newest first, read from the store
    assert sorted(zip(mine["output_id"], mine["verdict"], mine["comment"].fillna(""))) == sorted(
        [(ids["P0022"], "invalid", "baseline wrong"), (ids["P0023"], "valid", "")])
    assert "Your verdicts" in texts(at)

    # the same button clicked again (the second click of a double click arriving after the rerun): one row
    at.session_state["review_current"] = last_shown
    at.session_state["review_saved"] = set()
    at.run()
    oid = last_shown["output"]["output_id"]
    _verdict(at, oid, wanted[by_output[oid]][0])
    assert len(_annotations(env, ids.values())) == 2
    assert f"Saved once: {oid} is {wanted[by_output[oid]][0]}; the repeated click added nothing." in texts(at)
    verdicts = audit_rows(env, "verdict")
    assert set(verdicts["detail"].map(lambda d: json.loads(d)["output_id"])) >= {ids["P0022"], ids["P0023"]}
    assert (verdicts["detail"].map(lambda d: json.loads(d)["output_id"]) == oid).sum() == 1  # audited once


def test_review_two_tabs_store_one_verdict_and_say_so(env):
    """The same expert has one output open in two tabs: the first click stores it, the second (stale) tab
    stores nothing and says the output was already judged."""
    ids = _ui17_outputs(env)
    tab_a, tab_b = signed_in("admin"), signed_in("admin")
    for tab in (tab_a, tab_b):
        tab.switch_page("app_pages/review.py").run()
    oid = tab_a.session_state["review_current"]["output"]["output_id"]
    assert tab_b.session_state["review_current"]["output"]["output_id"] == oid
    _verdict(tab_a, oid, "valid")
    _verdict(tab_b, oid, "invalid")
    assert not tab_b.exception
    with env.store.read() as cur:
        rows = cur.execute("SELECT verdict FROM annotations WHERE output_id = ? AND annotator = 'ada'", [oid]).fetchall()
    assert rows == [("valid",)]
    assert f"{oid} was already judged **valid** by you (in another tab or window); nothing added." in texts(tab_b)
    assert tab_b.session_state["review_current"]["output"]["output_id"] != oid
    assert set(ids.values()) >= {oid}


def test_review_shows_the_priority_and_keeps_the_service_order(env):
    """The queue table is clinical.outputs.pending_outputs' order (most important first) with readable headers;
    the output on screen is its first row and says why it is there."""
    outputs = pytest.importorskip("clinical.outputs")
    ids = _ui17_outputs(env)
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    queue = frame_with(at, "Why it is here")
    expected = outputs.pending_outputs(env.store, "ed")
    assert queue["Priority"].tolist() == expected["priority"].tolist()
    assert queue["Patient"].tolist() == expected["patient_id"].tolist()
    assert not [c for c in queue.columns if "_" in c]  # readable headers, not column names
    assert all(link.startswith("timeline?patient=") and "period=" in link for link in queue["Timeline"])
    assert at.session_state["review_current"]["output"]["output_id"] == expected["output_id"].iloc[0]
    assert set(expected["output_id"]) <= set(ids.values()) and expected["forecast_for"].is_monotonic_increasing
    assert "priority 5: forecast to validate" in texts(at)


def test_review_without_the_verdict_service_says_so(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "clinical.outputs", None)  # import fails: not installed
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    assert "No model outputs to review yet" in texts(at) or "unavailable" in texts(at)
    assert not at.get("form")


# ---- database busy (UI-18) -----------------------------------------------------------------------------------
def _busy_app():
    import streamlit as st

    from dashboard import state

    slot = st.empty()
    state.set_busy_slot(slot)

    @st.cache_data(show_spinner=False)
    def query(x):
        state._notify_busy(2.3)  # what the Store calls while another process holds the file
        return x * 2

    st.write(query(21))


def test_busy_notice_is_shown_and_not_replayed_from_the_cache():
    at = AppTest.from_function(_busy_app, default_timeout=TIMEOUT).run()
    assert any("Database busy, retrying" in w.value for w in at.warning)
    at.run()  # cache hit: no wait, so no notice
    assert not any("Database busy" in w.value for w in at.warning)


# ---- command line ---------------------------------------------------------------------------------------------
def test_dashboard_command_passes_db_model_and_streamlit_options(tmp_path, monkeypatch):
    import subprocess

    from labtrend import cli

    seen = {}

    def fake_call(cmd, env):
        seen.update(cmd=cmd, env=env)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    assert cli.main(["dashboard", "--db", str(tmp_path / "x.duckdb"), "--model", str(tmp_path / "m"),
                     "--server.port", "8600"]) == 0
    assert seen["cmd"][1:4] == ["-m", "streamlit", "run"]
    assert seen["cmd"][4].endswith(os.path.join("dashboard", "server.py"))  # st.App: the session cookie route
    assert seen["cmd"][-2:] == ["--server.port", "8600"]
    # the project's settings, whatever the working folder: this machine only, short errors, no usage statistics
    assert {"--server.address=127.0.0.1", "--client.showErrorDetails=type",
            "--browser.gatherUsageStats=false"} <= set(seen["cmd"])
    assert seen["env"]["LABTREND_DB"] == str((tmp_path / "x.duckdb").resolve())
    assert seen["env"]["LABTREND_MODEL"] == str((tmp_path / "m").resolve())



# ---- uploads of folders (zip) -------------------------------------------------------------------------------
def _zip(entries: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_of_an_omop_folder_is_detected_and_imported(env):
    fixtures = Path(__file__).parent / "fixtures" / "omop"
    data = _zip({f"omop_export/{p.name}": p.read_bytes() for p in fixtures.iterdir()} | {"__MACOSX/._x": b"junk"})
    at = signed_in("analyst")
    at.file_uploader[0].set_value(("omop_export.zip", data, "application/zip")).run()
    assert not at.exception
    assert "OMOP" in texts(at)
    before = _count(env.store)
    at.button(key="upload_import").click().run()
    assert not at.exception and _count(env.store) > before
    assert "omop_export" in texts(at)


def test_stage_upload_refuses_paths_outside_the_archive(tmp_path):
    from dashboard import uploads
    from data.importers import ImportFileError

    with pytest.raises(ImportFileError, match="outside the archive"):
        uploads.stage_upload("evil.zip", _zip({"../../evil.csv": b"x"}), tmp_path / "a")
    single = uploads.stage_upload("one.zip", _zip({"dir/LAB-01.csv": b"patient_id\n"}), tmp_path / "b")
    assert single.name == "LAB-01.csv" and single.is_file()
    assert uploads.safe_name("../../etc/pass wd.csv") == "pass_wd.csv"


# ---- with a model folder ----------------------------------------------------------------------------------------
def test_timeline_with_a_saved_pipeline_draws_the_forecast_band(env, tmp_path, monkeypatch):
    """The forecast plug-in end to end: a saved ForecastPipeline in $LABTREND_MODEL gives a labelled band.

    The tiny network is untrained (its head is persistence); only the plumbing is under test.
    """
    torch = pytest.importorskip("torch")
    from data import queries
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    history = queries.cohort(env.store)
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(history)
    pipe = ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab,
                            AnalyteScaler.fit(history))
    pipe.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("LABTREND_MODEL", str(tmp_path / "model"))
    at = signed_in("clinician")
    at.session_state["timeline_patient"] = "P0020"
    at.switch_page("app_pages/timeline.py").run()
    assert not at.exception
    names = [t.get("name", "") for t in plotly_specs(at)[0]["data"]]
    assert f"Forecast median (model {pipe.model_version})" in names
    assert "Forecast 80% interval (q10–q90)" in names
    fc = frame_with(at, "80% interval")
    assert len(fc) == 3 and set(fc["status"]) == {"ok"}
    assert "No trained model loaded" not in texts(at)


def test_patients_search_filters_and_opens_the_timeline(env):
    at = signed_in("clinician")
    assert at.title[0].value == "Patients"
    at.number_input(key="patients_min_implausible").set_value(1).run()
    assert list(frame_with(at, "patient_id")["patient_id"]) == ["P0012"]  # LAB-10's entry errors
    at.number_input(key="patients_min_implausible").set_value(0).run()
    at.text_input(key="patients_search").input("p0001").run()
    assert list(frame_with(at, "patient_id")["patient_id"]) == ["P0001"]
    at.button(key="patients_open").click().run()
    assert not at.exception
    assert at.title[0].value == "Patient timeline"
    assert at.selectbox(key="timeline_patient").value == "P0001"


def test_patients_list_counts_critical_results_of_a_file_without_flags(env, tmp_path, monkeypatch):
    """Issue 11: a canonical CSV without a flag column (potassium 6.8, sodium 127, creatinine 2.1) is counted
    abnormal and critical from the catalogue limits; age comes from the birth date."""
    db = tmp_path / "noflags.duckdb"
    csv = tmp_path / "no_flags.csv"
    csv.write_text("patient_id,collected_at,loinc,test_name,value,unit,sex,birth_date\n"
                   "P1,2024-03-01 08:00,2823-3,Potassium,6.8,mmol/L,F,1950-05-01\n"
                   "P1,2024-03-01 08:00,2951-2,Sodium,127,mmol/L,F,1950-05-01\n"
                   "P1,2024-03-01 08:00,2160-0,Creatinine,2.1,mg/dL,F,1950-05-01\n"
                   "P2,2024-03-01 08:00,2823-3,Potassium,4.1,mmol/L,M,1980-01-01\n", encoding="utf-8")
    run_import(open_store(db), csv)
    monkeypatch.setenv("LABTREND_DB", str(db))
    at = signed_in("clinician")
    table = frame_with(at, "patient_id").set_index("patient_id")
    assert table.loc["P1", ["n_abnormal", "n_critical"]].tolist() == [3, 1]
    assert int(table.loc["P1", "age_years"]) == 73 and "age_at_ref" not in table.columns
    at.number_input(key="patients_min_critical").set_value(1).run()
    assert list(frame_with(at, "patient_id")["patient_id"]) == ["P1"]
    at.number_input(key="patients_min_critical").set_value(0).run()
    at.number_input(key="patients_min_abnormal").set_value(1).run()
    assert list(frame_with(at, "patient_id")["patient_id"]) == ["P1"]
    assert not at.exception


def test_page_waits_while_another_process_writes_and_says_so(env, monkeypatch):
    """UI-18: another process holds the DuckDB file until the page has said "busy" (an event, not a fixed
    time: on a loaded machine the page may start after any fixed hold had ended); then the page renders."""
    import subprocess

    from dashboard import state

    at = app_helpers.session_app(USERS["clinician"], "clinician", TIMEOUT)  # signed in before the file is held
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
                               "sys.stdin.readline(); c.close()", str(env.db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    shown = []
    real = state._outside_cache_capture

    def notice(draw, *a, **k):  # the page's busy notice: record it, then let the other process go
        shown.append(a[0])
        if holder.poll() is None and len(shown) == 1:
            holder.stdin.write("release\n")
            holder.stdin.flush()
        return real(draw, *a, **k)

    monkeypatch.setattr(state, "_outside_cache_capture", notice)
    state.data_version.clear()
    try:
        assert holder.stdout.readline().strip() == "locked"
        at.run()
    finally:
        if holder.poll() is None:
            holder.stdin.write("release\n")
            holder.stdin.flush()
        holder.wait()
    assert not at.exception
    assert shown and shown[0].startswith("Database busy, retrying")
    assert at.title[0].value == "Patients" and frame_with(at, "patient_id").shape[0] > 0


# ---- what a clinician reads (fixes after looking at the pages in a browser) ---------------------------------
def test_timeline_names_anomaly_rules_and_shows_recommendations_in_full(env, monkeypatch):
    """Anomaly rules by name (not 'reference_interval'), units as written on the chart, and each
    recommendation's whole text (a table cell clipped it mid-sentence)."""
    from dashboard import services, state

    advice = ("Consider repeating potassium on a fresh, non-haemolysed specimen before acting on it; "
              "haemolysis releases potassium from red cells and can raise the result falsely.")
    rec = {"rule_id": "k_haemolysis", "rule_version": "t", "patient_id": "P0003", "analyte_code": "2823-3",
           "at": pd.Timestamp("2024-05-05"), "title": "Potassium in a haemolysed specimen", "text": advice,
           "urgency": "high", "source": "Site laboratory policy", "triggered_by": "", "result_ids": ""}
    monkeypatch.setattr(services, "load_recommendations",
                        lambda *a, **k: services.ServiceResult(pd.DataFrame([rec]), True, ""))
    state._recommendations.clear()
    at = signed_in("clinician")
    at.session_state["timeline_patient"] = "P0003"
    at.switch_page("app_pages/timeline.py").run()
    assert not at.exception
    flags = frame_with(at, "rule")
    assert "Pre-analytical pattern: haemolysis reported by the laboratory" in set(flags["rule"])
    # a result outside its reference interval is its H/L label on the chart and in the table, not a review row
    assert "Outside the reference interval" not in set(flags["rule"])
    assert not any("_" in r for r in flags["rule"])
    assert any(" H" in str(v) or " L" in str(v) for v in frame_with(at, "Reference interval").to_numpy().ravel())
    assert advice in [m.value for m in at.markdown]
    assert any("Potassium in a haemolysed specimen" in m.value and "urgency high" in m.value for m in at.markdown)
    assert not [d for d in at.dataframe if "urgency" in getattr(d.value, "columns", [])]
    state._recommendations.clear()


def test_review_card_names_the_rule_and_writes_the_value_as_a_result(env, monkeypatch):
    from dashboard import services

    row = {"output_id": "ano-0123456789abcdef01234567", "patient_id": "P0020", "analyte_code": "2345-7",
           "analyte_name": "Glucose", "kind": "anomaly", "forecast_for": pd.NaT, "predicted_value": 159.0,
           "unit": "mg/dL", "model_version": "rules-2026.11-2+catalogue-2026.11-2", "status": "",
           "output_time": pd.Timestamp("2024-03-01 08:00"), "rule": "reference_interval", "priority": 6,
           "priority_reason": "outside the reference interval",
           "summary": "pO2 68 mm[Hg] is above the reference interval 70–105 mm[Hg]"}
    monkeypatch.setattr(services, "pending_outputs",
                        lambda store, expert: services.ServiceResult(pd.DataFrame([row]), True, ""))
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    shown = texts(at)
    assert "Result: **159 mg/dL**" in shown and "159.0" not in shown
    assert "Rule: **Outside the reference interval**" in shown and "reference_interval" not in shown
    assert "rule set rules-2026.11-2+catalogue-2026.11-2" in shown and "model rules-" not in shown
    assert "pO2 68 mmHg is above the reference interval 70–105 mmHg" in shown and "mm[Hg]" not in shown
    assert "Collected **2024-03-01 08:00**" in shown


def test_forecast_times_are_the_days_after_the_patients_latest_result():
    """An analyte last measured weeks ago is forecast for the days after the timeline's newest result."""
    from dashboard import services

    t0 = pd.Timestamp("2024-03-01 08:00")
    h = pd.DataFrame({"patient_id": "P1", "analyte_code": ["K", "K", "NA", "NA"],
                      "collected_at": [t0, t0 + pd.Timedelta(days=1), t0, t0 + pd.Timedelta(days=40)]})
    q = services.forecast_queries(h, ["K", "NA", "NOT_MEASURED"])
    newest = t0 + pd.Timedelta(days=40)
    assert list(q["analyte_code"]) == ["K"] * 3 + ["NA"] * 3
    assert list(q["at"]) == [newest + pd.Timedelta(days=d) for d in services.FORECAST_HORIZONS_DAYS] * 2
    assert services.forecast_queries(h.iloc[:0], ["K"]).empty


# ---- issue 11: a timeline that opens on what is new, deep links, review with evidence, upload feedback -------------
def _timeline(at: AppTest, **params) -> AppTest:
    """The timeline opened through its address: ``timeline?patient=...&analyte=...&period=...``."""
    at.switch_page("app_pages/timeline.py")
    at.query_params.clear()
    at.query_params.update(params)
    return at.run()


def test_timeline_link_opens_the_patient_analyte_and_period_and_is_audited(env):
    at = signed_in("clinician")
    n_views = len(audit_rows(env, "view_patient"))
    _timeline(at, patient="P0020", analyte="2823-3", period="2024-01-01..2024-12-31")
    assert not at.exception
    assert at.selectbox(key="timeline_patient").value == "P0020"
    spec = plotly_specs(at)[0]
    assert spec["layout"]["meta"]["analytes"] == ["2823-3"]
    assert at.session_state["timeline_period"] == "Custom"
    x0, x1 = spec["layout"]["xaxis"]["range"]
    assert x0.startswith("2024-01-01") and x1.startswith("2024-12-31")
    views = audit_rows(env, "view_patient")
    assert len(views) == n_views + 1 and views.iloc[0]["patient_id"] == "P0020"
    assert json.loads(views.iloc[0]["detail"]) == {"page": "timeline", "via": "link"}
    # the address follows the view: choosing "All" rewrites period=, so the address bar can be bookmarked
    at.segmented_control(key="timeline_period").set_value("All").run()
    assert at.query_params["period"] == "all" and at.query_params["patient"] == "P0020"
    assert at.query_params["analyte"] == "2823-3"
    assert len(audit_rows(env, "view_patient")) == n_views + 1  # the same view: not audited again


def test_timeline_opens_on_the_latest_episode_with_all_one_click_away(env):
    """No admissions in these files: the latest episode is the last 90 days before the newest result."""
    at = signed_in("clinician")
    _timeline(at, patient="P0020")
    assert not at.exception
    assert at.session_state["timeline_period"] == "Latest episode"
    assert "Showing the latest episode: **last 90 days**" in texts(at)
    assert "All" in at.segmented_control(key="timeline_period").options
    assert at.query_params["period"] == "episode"


def test_timeline_link_to_an_unknown_patient_shows_nobody_else_and_says_so(env):
    at = signed_in("clinician")
    _timeline(at, patient="P9999-not-here")
    assert not at.exception
    assert any("P9999-not-here" in e.value and "not in this database" in e.value for e in at.error)
    assert not at.get("plotly_chart") and not at.dataframe
    denied = audit_rows(env, "denied")
    assert ((denied["patient_id"] == "P9999-not-here") & denied["detail"].str.contains("not in this database")).any()


def test_timeline_link_opened_by_a_role_without_timelines_is_refused_with_a_message(env):
    at = signed_in("analyst")
    at.query_params["patient"] = "P0020"
    at.run()
    assert not at.exception
    assert any("does not give access to patient timelines" in e.value for e in at.error)
    assert at.title[0].value == "Upload lab results"  # the analyst's own page, nothing of the patient
    denied = audit_rows(env, "denied")
    assert ((denied["username"] == "ana") & (denied["patient_id"] == "P0020")).any()


def test_a_year_of_five_minute_glucose_is_drawn_thinned_and_listed_in_full(env, tmp_path):
    """105,120 results of one analyte: the chart draws a few thousand real results (the extremes kept), the
    table lists every one of them."""
    import numpy as np

    n = 105_120
    t = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(n) * 5, unit="min")
    rng = np.random.default_rng(0)
    v = np.clip(140 + 40 * np.sin(np.arange(n) / 288 * 2 * np.pi) + rng.normal(0, 8, n), 40, 450).round()
    v[77_777] = 612  # one extreme value that thinning must keep
    csv = tmp_path / "poc_glucose.csv"
    pd.DataFrame({"patient_id": "POC-1", "collected_at": t.strftime("%Y-%m-%d %H:%M"), "loinc": "2345-7",
                  "test_name": "Glucose (POC)", "value": v.astype(int).astype(str), "unit": "mg/dL"}).to_csv(csv, index=False)
    run_import(env.store, csv)
    from dashboard import state

    state.data_version.clear()  # the new patient now, not after the version's few seconds of caching
    at = signed_in("clinician")
    _timeline(at, patient="POC-1", period="all")
    assert not at.exception
    spec = plotly_specs(at)[0]
    drawn, total = spec["layout"]["meta"]["thinned"]["2345-7"]
    assert total == n and drawn <= 4 * figures_max_points()
    ys = [y for tr in spec["data"] if tr.get("name", "").startswith("Result") for y in tr["y"]]
    assert 612 in ys and min(ys) == v.min()
    assert f"{drawn:,} of {n:,} results drawn" in texts(at)
    listing = frame_with(at, "As reported")
    assert len(listing) == n and listing["Result"].iloc[0] == str(int(v[-1]))  # newest first, whole mg/dL as reported


def figures_max_points() -> int:
    from dashboard import figures

    return figures.MAX_POINTS


def test_review_card_shows_the_chart_around_the_output_and_the_rule_with_its_numbers(env):
    """An anomaly output of P0020's potassium: the card charts +-7 days with the result ringed, says when it was
    collected and what the rule compared, and links to the timeline around it."""
    outputs = pytest.importorskip("clinical.outputs")
    from dashboard import services
    from data import queries

    r = services.with_reference_limits(queries.timeline(env.store, "P0020"))
    k = r[r["analyte_code"] == "2823-3"].sort_values("collected_at").iloc[-1]
    frame = pd.DataFrame([{
        "result_id": int(k["result_id"]), "patient_id": "P0020", "analyte_code": "2823-3", "analyte_name": "Potassium",
        "collected_at": k["collected_at"], "rule": "critical_value", "flag": "HH", "score": 0.5,
        "value": float(k["value_canonical"]), "unit": "mmol/L",
        "evidence": {"limit": 5.5, "list": "critical value list"}, "source": "Kost 1990",
        "text": "Potassium is above the critical limit 5.5 mmol/L", "model_version": None}])
    records = outputs.anomaly_outputs(frame, "rules-test")
    outputs.store_outputs(env.store, records)
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    assert at.session_state["review_current"]["output"]["output_id"] == records[0]["output_id"]  # critical first
    shown = texts(at)
    assert f"Collected **{k['collected_at']:%Y-%m-%d %H:%M}**" in shown
    assert "Rule: **Critical value** (flag HH)" in shown and "Critical limit 5.5 mmol/L (critical value list)" in shown
    card = next(s for s in plotly_specs(at) if s["layout"]["meta"]["analytes"] == ["2823-3"])
    ring = next(t for t in card["data"] if t.get("name") == "Result under review")
    assert ring["y"] == [float(k["value_canonical"])]
    assert any(t.get("name") == "Reference interval" for t in card["data"])
    lo, hi = (pd.Timestamp(x) for x in card["layout"]["xaxis"]["range"])
    assert lo.normalize() == (k["collected_at"] - pd.Timedelta(days=7)).normalize()
    links = [e for e in at.get("page_link")]
    assert links and "patient=P0020" in str(links[0].proto) and "analyte=2823-3" in str(links[0].proto)
    for v in ("valid", "invalid", "unsure"):  # one key per verdict
        assert at.button(key=f"review_{v}_{records[0]['output_id']}").proto.shortcut


def test_agreement_with_intervals_on_the_review_and_model_pages(env):
    outputs = pytest.importorskip("clinical.outputs")
    ids = _ui17_outputs(env)
    for oid, (a, b) in zip(ids.values(), (("valid", "valid"), ("valid", "invalid"), ("invalid", "invalid"))):
        outputs.record_verdict(env.store, oid, "x1", "expert", a)
        outputs.record_verdict(env.store, oid, "x2", "expert", b)
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    table = frame_with(at, "Gwet's AC1")
    row = table[table["Output kind"] == "Forecast"].iloc[0]
    assert row["Experts"] >= 2 and "(" in row["Gwet's AC1"] and "–" in row["Gwet's AC1"]
    admin = signed_in("admin")
    admin.switch_page("app_pages/model.py").run()
    assert not admin.exception
    assert frame_with(admin, "Gwet's AC1")["Output kind"].tolist() == table["Output kind"].tolist()


def test_upload_says_what_happened_to_every_row_with_reasons_and_the_rejected_rows_download(env):
    bad = ("patient_id,collected_at,loinc,test_name,value,unit\n"
           "P0950,2024-01-01 08:00,2951-2,Sodium,140,mmol/L\n"
           "P0950,2024-01-01 08:00,2951-2,Sodium,140,mmol/L\n"  # an exact copy: skipped as a duplicate
           "P0950,2024-01-02 08:00,2951-2,Sodium,141,furlongs\n"  # quarantined: unit
           "P0950,2024-01-03 08:00,2823-3,Potassium,HEMOLYZED,mmol/L\n")  # loaded as a text result
    at = signed_in("analyst")
    at.file_uploader[0].set_value(("mixed.csv", bad.encode(), "text/csv")).run()
    at.button(key="upload_import").click().run()
    assert not at.exception
    out = frame_with(at, "Outcome")
    got = {(o, r): n for o, r, n in zip(out["Outcome"], out["Reason"], out["Rows"])}
    assert got[("Loaded", "stored as results")] == 2
    assert got[("Quarantined", "unit unknown or not convertible")] == 1
    assert got[("Skipped", "exact duplicate of a row already kept")] == 1
    assert any(o == "Loaded, of which" and "text results" in r for o, r in got)
    assert sum(n for (o, _), n in got.items() if o in ("Loaded", "Quarantined", "Skipped")) == 4
    assert any(b.proto.label.startswith("Download the 1 rejected rows") for b in at.get("download_button"))
    # the same reasons for the batch picked in the import history
    batch = at.session_state["upload_last"]["batch_id"]
    at.selectbox(key="upload_history_batch").set_value(batch).run()
    hist = [d.value for d in at.dataframe if "Outcome" in getattr(d.value, "columns", [])]
    assert len(hist) == 2 and hist[1].equals(hist[0])


def test_cached_patient_frames_are_not_changed_by_a_page_run(env, monkeypatch):
    """state.timeline / results_with_limits (with its flag labels and drawing categories) / anomalies are shared
    objects (cache_resource): after the timeline and review pages ran on them, they still equal a fresh computation."""
    from dashboard import services, state
    from data import queries

    fresh_timeline = queries.timeline
    state.timeline.clear()
    at = signed_in("expert")
    _timeline(at, patient="P0020", period="all")
    at.segmented_control(key="timeline_period").set_value("7 d").run()
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    db = str(env.db)
    version = state.data_version(db)
    info = queries.patient_info(env.store, "P0020")
    monkeypatch.setattr(state.queries, "timeline", lambda *a, **k: pytest.fail("not the page's cached frame"))
    raw = state.timeline(db, version, "P0020")  # the object the pages used
    monkeypatch.setattr(state.queries, "timeline", fresh_timeline)
    pd.testing.assert_frame_equal(raw, queries.timeline(env.store, "P0020"))
    age = services.age_years(info, raw["collected_at"].max())
    from dashboard import figures

    pd.testing.assert_frame_equal(state.results_with_limits(db, version, "P0020", info.get("sex"), age),
                                  figures.with_display_columns(services.with_reference_limits(
                                      queries.timeline(env.store, "P0020"), info.get("sex"), age)))
    fresh = services.load_anomalies(queries.timeline(env.store, "P0020"), info, rules=services.flag_rules()).frame
    pd.testing.assert_frame_equal(state.anomalies(db, version, "P0020").frame.reset_index(drop=True),
                                  fresh.reset_index(drop=True))


def test_patient_link_on_the_app_address_opens_the_timeline(env):
    """'/?patient=ID' (a shared link, or a timeline link whose page the sign-in dropped) opens that timeline."""
    at = signed_in("clinician")
    at.query_params["patient"] = "P0020"
    at.query_params["period"] = "all"
    at.run()
    assert not at.exception
    assert at.title[0].value == "Patient timeline"
    assert at.selectbox(key="timeline_patient").value == "P0020" and at.session_state["timeline_period"] == "All"


def test_review_page_shows_the_batch_job_and_starts_it(env, tmp_path, monkeypatch):
    """The review queue is filled by labtrend score: the page says how many patients wait, and the button
    runs the job in its own process while the page keeps reading the store."""
    torch = pytest.importorskip("torch")
    from data import queries
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    db = tmp_path / "scored.duckdb"
    store = open_store(db)
    for name in ("XAI-15", "LAB-04"):
        run_import(store, env.cases / f"{name}.csv")
    history = queries.cohort(store)
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(history)
    ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab,
                     AnalyteScaler.fit(history)).save_pretrained(tmp_path / "model")
    monkeypatch.setenv("LABTREND_DB", str(db))
    monkeypatch.setenv("LABTREND_MODEL", str(tmp_path / "model"))
    n = len(queries.patients(store))
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    assert f"{n} patient(s) with results newer than their stored outputs" in texts(at)
    assert "it has not run on this database yet" in texts(at)
    next(b for b in at.button if b.label.startswith("Compute outputs for the")).click().run()
    assert not at.exception
    assert len(audit.read_log(store, action="score")) == 1
    while True:  # wait on the run's state in the store (the page reads it the same way)
        with store.read() as cur:
            row = cur.execute("SELECT finished_at, scored FROM scoring_runs").fetchone()
        if row is not None and row[0] is not None:
            break
        time.sleep(0.1)
    assert row[1] == n
    at.run()
    assert "0 patient(s) with results newer than their stored outputs" in texts(at)
    assert f"{n} of {n} patients scored" in texts(at)
    assert at.session_state["review_current"] is not None  # the queue has the job's outputs


def test_long_series_is_drawn_thinned_with_its_rings_and_every_raw_value_in_the_table(tmp_path, monkeypatch):
    """A long series (above the page's LONG_SERIES, 5-minute glucose) on the timeline, shown whole: the chart
    draws a bounded number of points (thinned), rings its delta checks (the values-first figure and the one
    with rings are not confused by the figure cache), and every result is a row of the table, with the
    value as reported of each drawn point."""
    import re

    import numpy as np
    import pandas as pd

    from dashboard import figures

    n = 21_000  # LONG_SERIES (dashboard/app_pages/timeline.py) is 20,000
    rng = np.random.default_rng(7)
    t = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(n) * 5, unit="min")
    v = np.clip(140 + 40 * np.sin(np.arange(n) * 5 / 1440 * 2 * np.pi) + rng.normal(0, 12, n), 40, 450).round()
    csv = tmp_path / "poc.csv"
    pd.DataFrame({"patient_id": "POC-T", "collected_at": t.strftime("%Y-%m-%d %H:%M"), "loinc": "2345-7",
                  "test_name": "Glucose (POC)", "value": v.astype(int).astype(str), "unit": "mg/dL"}).to_csv(csv, index=False)
    store = open_store(tmp_path / "lab.duckdb")
    run_import(store, csv)
    monkeypatch.setenv("LABTREND_DB", str(tmp_path / "lab.duckdb"))
    monkeypatch.setenv("LABTREND_MODEL", str(tmp_path / "no-model"))
    at = app_helpers.signed_in("lena", "clinician", TIMEOUT)
    at.switch_page("app_pages/timeline.py")
    at.session_state["timeline_patient"] = "POC-T"
    at.run()
    opened = plotly_specs(at)[-1]  # the latest episode (the last 90 days: every result here), drawn twice
    assert any(str(tr.get("name")).startswith("Anomaly: delta check") for tr in opened["data"])
    at.session_state["timeline_period"] = "All"
    at.run()
    assert not at.exception
    fig = plotly_specs(at)[-1]
    traces = {tr.get("name"): tr for tr in fig["data"]}
    drawn = sum(len(tr.get("x") or []) for tr in fig["data"])
    assert drawn <= 4 * figures.MAX_POINTS + figures.MAX_TREND_POINTS + 100, drawn
    assert fig["layout"]["meta"]["thinned"]["2345-7"][1] == n  # every result counted, a few of them drawn
    assert any(name.startswith("Anomaly: delta check") for name in traces), list(traces)
    listing = next(d.value for d in at.dataframe if "As reported" in d.value.columns)
    assert len(listing) == n
    reported = dict(zip(pd.to_datetime(listing["Collected"]).dt.strftime("%Y-%m-%d %H:%M"), listing["As reported"]))
    points = traces["Result"]
    for x, hover in list(zip(points["x"], points["customdata"]))[:: max(1, len(points["x"]) // 20)]:
        as_reported = re.search(r"As reported: ([^<]+)", hover).group(1)
        assert reported[pd.Timestamp(x).strftime("%Y-%m-%d %H:%M")] == as_reported
