"""The Streamlit app through AppTest: login, roles, every page, timeline, upload, review, audit.

Each test signs in the way streamlit-authenticator records a login in the session
(``authentication_status``, ``username``, ``name``, ``roles`` in ``st.session_state``);
roles are then read from the temporary users file, as in production.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import types
import time
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import app_helpers
from dashboard import access, audit
from data.db import open_store
from data.importers import run_import

APP = Path(__file__).resolve().parent.parent / "dashboard" / "streamlit_app.py"
PAGES_DIR = APP.parent / "app_pages"
PASSWORD = "a long test password"
USERS = {"clinician": "carla", "expert": "ed", "analyst": "ana", "admin": "ada"}
TIMEOUT = 60


@pytest.fixture(scope="module")
def env(tmp_path_factory, cases):
    """A store with the case files imported, a users file with one user per role, no model."""
    root = tmp_path_factory.mktemp("dash")
    db = root / "lab.duckdb"
    store = open_store(db)
    for name in ("LAB-01", "LAB-02", "LAB-04", "LAB-05", "LAB-10", "XAI-15"):
        run_import(store, cases / f"{name}.csv")
    users = root / "users.yaml"
    for role, name in USERS.items():
        access.add_user(name, f"Dr {name.title()}", role, PASSWORD, users)
    mp = pytest.MonkeyPatch()
    mp.setenv("LABTREND_DB", str(db))
    mp.setenv("LABTREND_USERS", str(users))
    mp.setenv("LABTREND_MODEL", str(root / "no-model"))
    mp.setenv("LABTREND_COOKIE_KEY", "test-cookie-key-not-a-secret-0123456789")
    yield types.SimpleNamespace(db=db, store=store, users=users, root=root, cases=cases)
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


def test_sign_in_and_a_second_browser_session_stays_signed_out(env):
    """Carla signs in with her password; another session opened afterwards still sees the form."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.text_input[0].input("carla")
    at.text_input[1].input(PASSWORD)
    at.button[0].click().run()
    assert not at.exception
    assert at.session_state["authentication_status"] is True
    assert at.title[0].value == "Patients"
    other = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not other.session_state["authentication_status"]
    assert [t.label for t in other.text_input] == ["Username", "Password"]
    logins = audit_rows(env, "login")
    assert "carla" in set(logins["username"])


def test_wrong_password_is_refused(env):
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.text_input[0].input("carla")
    at.text_input[1].input("not the password")
    at.button[0].click().run()
    assert not at.session_state["authentication_status"]
    assert any("incorrect" in e.value for e in at.error)


def test_a_user_removed_from_the_file_loses_access(env):
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["authentication_status"] = True
    at.session_state["username"] = "mallory"
    at.session_state["roles"] = ["admin"]  # what the session claims does not count
    at.run()
    assert any("not known" in e.value for e in at.error)
    assert "Audit" not in texts(at)


# ---- roles and pages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role", access.ROLES)
def test_every_page_for_every_role(env, role):
    """Each role can open exactly its pages, each without an exception; the others are not in the navigation."""
    at = signed_in(role)
    assert not at.exception
    for spec in access.PAGES:
        if spec.key == "timeline":
            at.session_state["timeline_patient"] = "P0020"
        if role in spec.roles:
            at.switch_page(f"app_pages/{Path(spec.path).name}").run()
            assert not at.exception, (role, spec.key, at.exception)
            assert at.title and at.title[0].value, (role, spec.key)
        else:
            with pytest.raises(ValueError, match="navigation page"):
                at.switch_page(f"app_pages/{Path(spec.path).name}")


def test_clinician_cannot_reach_upload_even_directly(env):
    """Upload is not in a clinician's navigation, and running the page file itself is refused and audited."""
    at = signed_in("clinician")
    with pytest.raises(ValueError):
        at.switch_page("app_pages/upload.py")
    direct = AppTest.from_file(str(PAGES_DIR / "upload.py"), default_timeout=TIMEOUT)
    direct.session_state["lt_user"] = at.session_state["lt_user"]
    direct.session_state["authentication_status"] = True
    direct.run()
    assert any("does not give access to Upload" in e.value for e in direct.error)
    assert not direct.file_uploader
    denied = audit_rows(env, "denied")
    assert ((denied["username"] == "carla") & denied["detail"].str.contains("upload")).any()


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


def test_review_ui17_saves_each_verdict_once_on_the_output_shown(env):
    """UI-17 with the real verdict service: the verdict lands on the output on screen, each submit
    is saved once, a resubmitted form adds nothing, the next output shows with an empty form."""
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
        assert at.radio(key=f"review_verdict_{oid}").value is None  # an empty form for each output
        at.radio(key=f"review_verdict_{oid}").set_value(verdict)
        if comment:
            at.text_area(key=f"review_comment_{oid}").input(comment)
        last_shown = dict(current)
        submit(at)
        assert not at.exception
    assert sorted(shown) == ["P0022", "P0023"]
    rows = _annotations(env, ids.values())
    assert sorted(rows) == sorted([(ids["P0022"], "ed", "invalid", "baseline wrong"), (ids["P0023"], "ed", "valid", None)])
    assert ids["P0024"] in texts(at)  # the third stays pending and is shown next
    mine = frame_with(at, "verdict")  # "Your verdicts": one row per output judged, newest first, read from the store
    assert sorted(zip(mine["output_id"], mine["verdict"], mine["comment"].fillna(""))) == sorted(
        [(ids["P0022"], "invalid", "baseline wrong"), (ids["P0023"], "valid", "")])
    assert "Your verdicts" in texts(at)

    # the same form sent again (a double click arriving after the rerun): one row per submission
    at.session_state["review_current"] = last_shown
    at.session_state["review_saved"] = set()
    at.run()
    oid = last_shown["output"]["output_id"]
    at.radio(key=f"review_verdict_{oid}").set_value(wanted[by_output[oid]][0])
    submit(at)
    assert len(_annotations(env, ids.values())) == 2
    assert "already saved" in texts(at)
    verdicts = audit_rows(env, "verdict")
    assert set(verdicts["detail"].map(lambda d: json.loads(d)["output_id"])) >= {ids["P0022"], ids["P0023"]}


def test_review_shows_the_priority_and_keeps_the_service_order(env):
    """The queue table is clinical.outputs.pending_outputs' order (most important first) with its
    priority columns; the output on screen is its first row and says why it is there."""
    outputs = pytest.importorskip("clinical.outputs")
    ids = _ui17_outputs(env)
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    queue = frame_with(at, "priority_reason")
    expected = outputs.pending_outputs(env.store, "ed")
    assert queue["priority"].tolist() == expected["priority"].tolist()
    assert queue["summary"].tolist() == expected["summary"].tolist()
    assert at.session_state["review_current"]["output"]["output_id"] == expected["output_id"].iloc[0]
    assert set(expected["output_id"]) <= set(ids.values()) and expected["forecast_for"].is_monotonic_increasing
    assert "priority 3: forecast to validate" in texts(at)


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
def test_users_add_hashes_the_password_and_protects_the_files(tmp_path, monkeypatch):
    from labtrend import cli

    users = tmp_path / "conf" / "users.yaml"
    monkeypatch.delenv("LABTREND_COOKIE_KEY", raising=False)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(readline=lambda: "s3cret horse staple\n"))
    assert cli.main(["users", "add", "--username", "Jdoe", "--name", "Dr J Doe", "--role", "expert",
                     "--password-stdin", "--users", str(users)]) == 0
    text = users.read_text()
    assert "s3cret" not in text and "$2b$" in text
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert access.list_users(users) == [{"username": "jdoe", "name": "Dr J Doe", "roles": ["expert"]}]
    key = access.cookie_key(users)
    assert len(key) == 64 and stat.S_IMODE((users.parent / "cookie.key").stat().st_mode) == 0o600
    assert access.cookie_key(users) == key
    assert cli.main(["users", "add", "--username", "jdoe", "--name", "X", "--role", "admin", "--password-stdin",
                     "--users", str(users)]) == 2  # exists
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(readline=lambda: "short\n"))
    assert cli.main(["users", "add", "--username", "kim", "--name", "K", "--role", "admin", "--password-stdin",
                     "--users", str(users)]) == 2


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
    assert seen["cmd"][4].endswith(os.path.join("dashboard", "streamlit_app.py"))
    assert seen["cmd"][-2:] == ["--server.port", "8600"]
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


def test_page_waits_while_another_process_writes_and_says_so(env, monkeypatch):
    """UI-18: another process holds the DuckDB file for 3 s; the page waits, says "busy", then renders."""
    import subprocess

    from dashboard import state

    shown = []
    real = state._outside_cache_capture
    monkeypatch.setattr(state, "_outside_cache_capture", lambda draw, *a, **k: (shown.append(a[0]), real(draw, *a, **k)))
    signed_in("clinician")  # imports done first: on a loaded machine they alone outlasted the 3 s hold
    state.data_version.clear()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
                               "time.sleep(3); c.close()", str(env.db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        at = signed_in("clinician")
    finally:
        holder.wait(timeout=30)
    assert not at.exception
    assert at.title[0].value == "Patients" and frame_with(at, "patient_id").shape[0] > 0
    assert shown and shown[0].startswith("Database busy, retrying")


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
    assert "Outside the reference interval" in set(flags["rule"])
    assert not any("_" in r for r in flags["rule"])
    assert advice in [m.value for m in at.markdown]
    assert any("Potassium in a haemolysed specimen" in m.value and "urgency high" in m.value for m in at.markdown)
    assert not [d for d in at.dataframe if "urgency" in getattr(d.value, "columns", [])]
    state._recommendations.clear()


def test_review_card_names_the_rule_and_writes_the_value_as_a_result(env, monkeypatch):
    from dashboard import services

    row = {"output_id": "ano-0123456789abcdef01234567", "patient_id": "P0020", "analyte_code": "2345-7",
           "analyte_name": "Glucose", "kind": "anomaly", "forecast_for": pd.NaT, "predicted_value": 159.0,
           "unit": "mg/dL", "model_version": "rules-2026.11-2+catalogue-2026.11-2", "status": "",
           "rule": "reference_interval", "summary": "pO2 68 mm[Hg] is above the reference interval 70–105 mm[Hg]"}
    monkeypatch.setattr(services, "pending_outputs",
                        lambda store, expert: services.ServiceResult(pd.DataFrame([row]), True, ""))
    at = signed_in("expert")
    at.switch_page("app_pages/review.py").run()
    assert not at.exception
    shown = texts(at)
    assert "Glucose: **159 mg/dL**" in shown and "159.0" not in shown
    assert "rule: Outside the reference interval" in shown and "reference_interval" not in shown
    assert "rule set rules-2026.11-2+catalogue-2026.11-2" in shown and "model rules-" not in shown
    assert "pO2 68 mmHg is above the reference interval 70–105 mmHg" in shown and "mm[Hg]" not in shown


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
