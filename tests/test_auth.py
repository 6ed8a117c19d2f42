"""Sessions that end, accounts administered in the store, everything audited (issue 14: 1, 9, 10).

The clock is injected (``now=`` in :mod:`data.sessions`, or ``data.sessions.utcnow`` replaced for a
whole app run): no test sleeps. The browser side of the cookie (HttpOnly, replay after sign-out
in a real Chromium) is in ``test_e2e_browser.py``; here the app runs under AppTest and the cookie
it would receive is fed to it through ``dashboard.auth._cookie_token``.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
import types
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import app_helpers
from data import audit, sessions, users
from data.db import open_store

APP = app_helpers.APP
PASSWORD = app_helpers.PASSWORD
TIMEOUT = 60
T0 = datetime(2024, 3, 1, 8, 0)
TESTS = users.Actor("tests", ("cli",))
POLICY = sessions.SessionPolicy()  # 15 minutes idle, 12 hours in all


@pytest.fixture
def accounts(store):
    for name, role in (("ada", "admin"), ("carla", "clinician")):
        users.add_user(store, name, f"Dr {name.title()}", role, PASSWORD, by=TESTS)
    return store


def log(store, action: str):
    return audit.read_log(store, action=action)


# ---- sessions ----------------------------------------------------------------------------------------------
def test_a_session_ends_after_15_idle_minutes_and_its_cookie_with_it(accounts):
    store = accounts
    session, grant = sessions.start(store, "carla", policy=POLICY, now=T0)
    token, _ = sessions.redeem_grant(store, grant, now=T0 + timedelta(seconds=2))
    assert sessions.check(store, session.session_id, policy=POLICY, now=T0 + timedelta(minutes=14)).ok
    # each page run is activity: 14 more minutes after the last one is still inside the timeout
    assert sessions.resume(store, token, policy=POLICY, now=T0 + timedelta(minutes=28)).ok
    ended = sessions.resume(store, token, policy=POLICY, now=T0 + timedelta(minutes=43, seconds=1))
    assert not ended.ok and ended.ended == "idle" and ended.session_id == session.session_id
    # ended for good: activity afterwards does not bring it back
    assert sessions.check(store, session.session_id, policy=POLICY, now=T0 + timedelta(minutes=44)).ended == "idle"
    assert "15 minutes without activity" in POLICY.message("idle")


def test_a_session_ends_at_its_absolute_lifetime_however_active(accounts):
    store = accounts
    policy = sessions.SessionPolicy(lifetime=timedelta(hours=2))
    session, _ = sessions.start(store, "carla", policy=policy, now=T0)
    t = T0
    while t < T0 + timedelta(hours=2) - timedelta(minutes=14):
        t += timedelta(minutes=14)  # a click every 14 minutes: never idle
        assert sessions.check(store, session.session_id, policy=policy, now=t).ok, t
    assert sessions.check(store, session.session_id, policy=policy, now=T0 + timedelta(hours=2)).ended == "lifetime"
    assert "limit of 2 hours" in policy.message("lifetime")


def test_idle_timeout_and_lifetime_are_configurable(monkeypatch):
    monkeypatch.setenv("LABTREND_SESSION_IDLE_MINUTES", "5")
    monkeypatch.setenv("LABTREND_SESSION_MAX_HOURS", "8.5")
    policy = sessions.SessionPolicy.from_settings()
    assert (policy.idle, policy.lifetime) == (timedelta(minutes=5), timedelta(hours=8.5))
    monkeypatch.setenv("LABTREND_SESSION_IDLE_MINUTES", "0")
    with pytest.raises(ValueError, match="LABTREND_SESSION_IDLE_MINUTES"):
        sessions.SessionPolicy.from_settings()


def test_the_grant_works_once_within_two_minutes_and_only_hashes_are_stored(accounts):
    store = accounts
    session, grant = sessions.start(store, "ada", policy=POLICY, now=T0)
    assert sessions.redeem_grant(store, grant, now=T0 + timedelta(seconds=121)) is None  # too late
    session, grant = sessions.start(store, "ada", policy=POLICY, now=T0)
    token, redeemed = sessions.redeem_grant(store, grant, now=T0 + timedelta(seconds=1))
    assert redeemed.session_id == session.session_id and redeemed.expires_at == T0 + timedelta(hours=12)
    assert sessions.redeem_grant(store, grant, now=T0 + timedelta(seconds=2)) is None  # used
    with store.read() as cur:
        stored = json.dumps(cur.execute("SELECT * FROM sessions").fetchall(), default=str)
    assert token not in stored and grant not in stored and sessions.digest(token) in stored
    assert sessions.resume(store, "a forged token", policy=POLICY, now=T0).ended == "unknown"


def test_sign_out_revokes_the_session_so_its_cookie_is_worthless(accounts):
    store = accounts
    session, grant = sessions.start(store, "ada", policy=POLICY, now=T0)
    token, _ = sessions.redeem_grant(store, grant, now=T0)
    assert sessions.revoke(store, session.session_id, "signed out", now=T0 + timedelta(minutes=1))
    replay = sessions.resume(store, token, policy=POLICY, now=T0 + timedelta(minutes=2))
    assert not replay.ok and replay.ended == "signed out"


# ---- accounts ----------------------------------------------------------------------------------------------
def test_disabling_ends_every_open_session_at_once_and_is_audited(accounts):
    store = accounts
    s1, _ = sessions.start(store, "carla", policy=POLICY, now=sessions.utcnow())
    s2, _ = sessions.start(store, "carla", policy=POLICY, now=sessions.utcnow())
    admin = users.Actor("ada", ("admin",), {"via": "dashboard"})
    assert users.disable_user(store, "carla", by=admin) == 2
    now = sessions.utcnow()
    assert {sessions.check(store, s.session_id, policy=POLICY, now=now).ended for s in (s1, s2)} == {"account disabled"}
    assert users.authenticate(store, "carla", PASSWORD, now=now) == (None, "disabled")
    row = log(store, "user_disable").iloc[0]
    assert row["username"] == "ada" and json.loads(row["detail"]) == {"username": "carla", "sessions_ended": 2,
                                                                      "via": "dashboard"}
    users.enable_user(store, "carla", by=admin)
    assert users.authenticate(store, "carla", PASSWORD, now=now)[0].username == "carla"
    assert sessions.check(store, s1.session_id, policy=POLICY, now=now).ended == "account disabled"  # stays ended
    users.set_role(store, "carla", "expert", by=admin)
    assert users.get_user(store, "carla").roles == ("expert",)
    assert json.loads(log(store, "user_role").iloc[0]["detail"])["from"] == ["clinician"]
    assert len(log(store, "user_enable")) == 1


def test_the_last_admin_stays_and_no_admin_disables_themselves(accounts):
    store = accounts
    ada = users.Actor("ada", ("admin",))
    with pytest.raises(users.UserError, match="your own account"):
        users.disable_user(store, "ada", by=ada)
    with pytest.raises(users.UserError, match="last enabled admin"):
        users.disable_user(store, "ada", by=TESTS)
    with pytest.raises(users.UserError, match="last enabled admin"):
        users.set_role(store, "ada", "clinician", by=TESTS)
    users.add_user(store, "bob", "Dr Bob", "admin", PASSWORD, by=ada)
    users.set_role(store, "ada", "clinician", by=TESTS)  # another admin exists now
    assert users.get_user(store, "ada").roles == ("clinician",)


def test_a_reset_password_must_be_changed_and_ends_the_sessions(accounts):
    store = accounts
    s, _ = sessions.start(store, "carla", policy=POLICY, now=sessions.utcnow())
    temporary = users.reset_password(store, "carla", by=users.Actor("ada", ("admin",)))
    assert len(temporary) >= users.MIN_PASSWORD_LENGTH
    assert sessions.check(store, s.session_id, policy=POLICY, now=sessions.utcnow()).ended == "password reset"
    assert users.authenticate(store, "carla", PASSWORD, now=sessions.utcnow()) == (None, "wrong password")
    user, _ = users.authenticate(store, "carla", temporary, now=sessions.utcnow())
    assert user.must_change_password
    assert temporary not in json.dumps(audit.read_log(store).to_dict("records"), default=str)
    new, _ = sessions.start(store, "carla", policy=POLICY, now=sessions.utcnow())
    assert sessions.check(store, new.session_id, policy=POLICY, now=sessions.utcnow()).must_change_password
    with pytest.raises(users.UserError, match="differ"):
        users.change_password(store, "carla", temporary, temporary, session_id=new.session_id, by=TESTS)
    users.change_password(store, "carla", temporary, "my own long password", session_id=new.session_id, by=TESTS)
    check = sessions.check(store, new.session_id, policy=POLICY, now=sessions.utcnow())
    assert check.ok and not check.must_change_password


def test_passwords_are_bcrypt_hashes_of_10_characters_to_72_bytes(accounts):
    store = accounts
    with store.read() as cur:
        hashes = [r[0] for r in cur.execute("SELECT password_hash FROM users").fetchall()]
    assert all(h.startswith("$2b$12$") for h in hashes) and PASSWORD not in "".join(hashes)
    with pytest.raises(users.UserError, match="at least 10"):
        users.add_user(store, "kim", "K", "analyst", "short", by=TESTS)
    with pytest.raises(users.UserError, match="72 bytes"):
        users.add_user(store, "kim", "K", "analyst", "é" * 40, by=TESTS)
    with pytest.raises(users.UserError, match="role"):
        users.add_user(store, "kim", "K", "superuser", PASSWORD, by=TESTS)
    assert users.authenticate(store, "nobody", PASSWORD, now=T0) == (None, "unknown user")


def test_accounts_of_the_former_users_file_import_with_their_hashes(store, tmp_path):
    import bcrypt

    legacy = tmp_path / "users.yaml"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    legacy.write_text(f"credentials:\n  usernames:\n    jdoe:\n      name: Dr J Doe\n      password: '{hashed}'\n"
                      f"      roles: [expert]\ncookie:\n  name: labtrend_auth\n  expiry_days: 1\n")
    assert users.import_users_file(store, legacy, by=TESTS) == ["jdoe"]
    assert users.import_users_file(store, legacy, by=TESTS) == []  # already there
    user, _ = users.authenticate(store, "jdoe", PASSWORD, now=T0)
    assert user.roles == ("expert",)
    legacy.write_text("credentials:\n  usernames:\n    eve:\n      name: Eve\n      password: plain\n      roles: [admin]\n")
    with pytest.raises(users.UserError, match="no bcrypt hash"):
        users.import_users_file(store, legacy, by=TESTS)


# ---- the session cookie route ------------------------------------------------------------------------------
def test_the_route_sets_an_httponly_strict_cookie_once_per_grant(accounts, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from dashboard import session_cookie

    monkeypatch.setenv("LABTREND_DB", str(accounts.settings.path))
    _, grant = sessions.start(accounts, "ada", policy=POLICY, now=sessions.utcnow())
    client = TestClient(Starlette(routes=session_cookie.routes()))
    url, header = session_cookie.ROUTE, {session_cookie.HEADER: "1"}
    assert client.post(url, json={"grant": grant}).status_code == 403  # no header: a cross-site form
    r = client.post(url, json={"grant": grant}, headers=header)
    assert r.status_code == 204
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{session_cookie.COOKIE_NAME}=") and "HttpOnly" in cookie and "Path=/" in cookie
    assert "samesite=strict" in cookie.lower() and re.search(r"Max-Age=4319\d", cookie)
    token = cookie.split(";")[0].split("=", 1)[1]
    assert sessions.resume(accounts, token, policy=POLICY, now=sessions.utcnow()).ok
    assert client.post(url, json={"grant": grant}, headers=header).status_code == 403  # once
    cleared = client.post(url, json={"action": "clear"}, headers=header)
    assert cleared.status_code == 204 and "Max-Age=0" in cleared.headers["set-cookie"]


# ---- the app: sign-in, replay, idle, disable, forced change, user administration -------------------------------
@pytest.fixture(scope="module")
def app_env(tmp_path_factory, cases):
    root = tmp_path_factory.mktemp("auth")
    store = open_store(root / "lab.duckdb")
    from data.importers import run_import

    run_import(store, cases / "LAB-01.csv")
    for name, role in (("ada", "admin"), ("carla", "clinician"), ("bob", "admin")):
        app_helpers.ensure_user(store, name, role)
    mp = pytest.MonkeyPatch()
    mp.setenv("LABTREND_DB", str(root / "lab.duckdb"))
    mp.setenv("LABTREND_MODEL", str(root / "no-model"))
    for var in ("LABTREND_SESSION_IDLE_MINUTES", "LABTREND_SESSION_MAX_HOURS", "LABTREND_MODEL_URL"):
        mp.delenv(var, raising=False)
    yield types.SimpleNamespace(store=store, root=root)
    mp.undo()


def fresh() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def sign_in(at: AppTest, username: str, password: str = PASSWORD) -> AppTest:
    at.text_input(key="lt_login_username").input(username)
    at.text_input(key="lt_login_password").input(password)
    return next(b for b in at.button if b.label == "Sign in").click().run()


def on_sign_in_form(at: AppTest) -> bool:
    return [t.label for t in at.text_input] == ["Username", "Password"] and not at.sidebar.button


def grant_of(at: AppTest) -> str:
    """The grant the page hands to the browser (inside the page script of this run)."""
    bodies = [e.proto.body for e in at.get("html")]
    found = [m.group(1) for b in bodies for m in [re.search(r'\\"grant\\": \\"([^\\"]+)\\"', b)] if m]
    assert len(found) == 1, bodies
    return found[0]


def test_an_admins_cookie_replayed_after_sign_out_shows_the_sign_in_form(app_env, monkeypatch):
    from dashboard import auth

    at = sign_in(fresh().run(), "ada")
    assert at.title[0].value == "Patients" and not at.exception
    # what the cookie route does with the grant this page received: the browser now holds the token
    token, _ = sessions.redeem_grant(app_env.store, grant_of(at), now=sessions.utcnow())
    monkeypatch.setattr(auth, "_cookie_token", lambda: token)
    copy = fresh().run()  # another browser session presenting the cookie
    copy.switch_page("app_pages/users.py").run()
    assert copy.title[0].value == "Users"
    logins = log(app_env.store, "login")
    assert json.loads(logins.iloc[0]["detail"])["via"] == "cookie" and logins.iloc[0]["username"] == "ada"

    failed_before = len(log(app_env.store, "login_failed"))
    at.sidebar.button(key="lt_logout").click().run()  # the admin signs out
    assert on_sign_in_form(at) and any("You signed out" in i.value for i in at.info)
    assert log(app_env.store, "logout").iloc[0]["username"] == "ada"
    replay = fresh().run()
    assert on_sign_in_form(replay) and not replay.title[0].value == "Users"
    refused = log(app_env.store, "login_failed").iloc[0]
    assert json.loads(refused["detail"])["reason"] == "signed out" and json.loads(refused["detail"])["via"] == "cookie"
    assert any("clear" in e.proto.body for e in replay.get("html"))  # the browser is told to drop the cookie
    copy.run()  # the tab already open with the copied cookie ends at its next click
    assert on_sign_in_form(copy)
    replay.run()  # the same refused cookie is audited once per browser session, not per click
    assert len(log(app_env.store, "login_failed")) == failed_before + 1


def test_an_idle_tab_shows_the_sign_in_form_and_says_why(app_env, monkeypatch):
    clock = types.SimpleNamespace(now=sessions.utcnow())
    monkeypatch.setattr(sessions, "utcnow", lambda: clock.now)
    at = app_helpers.signed_in("carla", "clinician", TIMEOUT)
    assert at.title[0].value == "Patients"
    clock.now += timedelta(minutes=10)
    assert at.run().title[0].value == "Patients"  # activity at 10 minutes
    clock.now += timedelta(minutes=14)
    assert at.run().title[0].value == "Patients"  # 14 minutes after the last activity
    clock.now += timedelta(minutes=15, seconds=1)
    at.run()
    assert on_sign_in_form(at)
    assert any("15 minutes without activity" in i.value for i in at.info)
    ended = log(app_env.store, "session_ended").iloc[0]
    assert ended["username"] == "carla" and json.loads(ended["detail"])["reason"] == "idle"


def test_a_disabled_users_open_tab_ends_at_the_next_click(app_env):
    tab = app_helpers.signed_in("carla", "clinician", TIMEOUT)
    assert tab.title[0].value == "Patients"
    admin = app_helpers.signed_in("ada", "admin", TIMEOUT)
    admin.switch_page("app_pages/users.py").run()
    admin.selectbox(key="users_who").select("carla").run()
    admin.button(key="users_disable").click().run()
    assert any("carla is disabled" in s.value for s in admin.success), [e.value for e in admin.error]
    assert tab.run() and on_sign_in_form(tab) and any("disabled" in i.value for i in tab.info)
    refused = sign_in(fresh().run(), "carla")
    assert any("disabled" in e.value for e in refused.error)
    admin.selectbox(key="users_who").select("carla").run()
    admin.button(key="users_enable").click().run()
    assert sign_in(fresh().run(), "carla").title[0].value == "Patients"
    actions = set(log(app_env.store, None)["action"])
    assert {"user_disable", "user_enable", "session_ended", "login_failed"} <= actions


def test_an_admin_resets_a_password_and_the_user_must_choose_a_new_one(app_env):
    admin = app_helpers.signed_in("bob", "admin", TIMEOUT)
    admin.switch_page("app_pages/users.py").run()
    admin.selectbox(key="users_who").select("carla").run()
    admin.selectbox(key="users_role").select("expert").run()
    admin.button(key="users_set_role").click().run()
    admin.selectbox(key="users_who").select("carla").run()
    admin.button(key="users_reset").click().run()
    temporary = admin.code[0].value
    assert len(temporary) >= 10 and not admin.exception
    at = sign_in(fresh().run(), "carla", temporary)
    assert at.title[0].value == "Choose a new password" and "Patients" not in [t.value for t in at.title]
    inputs = at.text_input
    inputs[0].input(temporary)
    inputs[1].input("carla's own long password")
    inputs[2].input("carla's own long password")
    at.button[0].click().run()
    assert at.title[0].value == "Patients" and at.session_state["lt_user"].roles == ("expert",)
    reset = log(app_env.store, "user_password_reset").iloc[0]
    assert reset["username"] == "bob" and temporary not in reset["detail"]
    assert len(log(app_env.store, "password_change")) == 1


# ---- the command line is audited as the OS account ------------------------------------------------------------
def test_cli_imports_views_predictions_and_user_changes_are_audited_as_the_os_user(tmp_path, cases, monkeypatch,
                                                                                     capsys):
    import torch

    from clinical.anomalies import history_from_timeline
    from data import queries
    from labtrend import cli
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    db = tmp_path / "lab.duckdb"
    assert cli.main(["import", str(cases / "XAI-15.csv"), "--db", str(db)]) == 0
    assert cli.main(["import", str(tmp_path / "missing.csv"), "--db", str(db)]) == 2
    assert cli.main(["timeline", "--patient", "P0020", "--db", str(db)]) == 0
    assert cli.main(["patients", "--db", str(db)]) == 0
    store = open_store(db)
    h = history_from_timeline(queries.timeline(store, "P0020"))
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(h)
    ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab,
                     AnalyteScaler.fit(h)).save_pretrained(tmp_path / "model")
    assert cli.main(["predict", "--model", str(tmp_path / "model"), "--db", str(db), "--patient", "P0020",
                     "--no-explain"]) == 0
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(readline=lambda: "a long cli password\n"))
    assert cli.main(["users", "add", "--username", "Jdoe", "--name", "Dr J Doe", "--role", "expert",
                     "--password-stdin", "--db", str(db)]) == 0
    assert cli.main(["users", "set-role", "--username", "jdoe", "--role", "analyst", "--db", str(db)]) == 0
    assert cli.main(["users", "disable", "--username", "jdoe", "--db", str(db)]) == 0
    assert cli.main(["users", "disable", "--username", "jdoe", "--db", str(db)]) == 2  # already
    assert cli.main(["users", "enable", "--username", "jdoe", "--db", str(db)]) == 0
    capsys.readouterr()
    assert cli.main(["users", "reset-password", "--username", "jdoe", "--db", str(db)]) == 0
    temporary = json.loads(capsys.readouterr().out)["temporary_password"]
    assert users.authenticate(store, "jdoe", temporary, now=sessions.utcnow())[0].must_change_password

    rows = audit.read_log(store)
    assert set(rows["username"]) == {getpass.getuser()} and set(rows["role"]) == {"cli"}
    by_action = {a: [json.loads(d) for d in g["detail"]] for a, g in rows.groupby("action")}
    imports = by_action["import"]
    assert sorted(d["status"] for d in imports) == ["complete", "rejected"]
    assert all(d["via"] == "cli" and d["host"] for d in imports)
    assert rows.loc[rows["action"] == "view_patient", "patient_id"].tolist() == ["P0020"]
    predicted = rows[rows["action"] == "predict"]
    assert predicted["patient_id"].tolist() == ["P0020"] and by_action["predict"][0]["exit_status"] == 0
    assert by_action["predict"][0]["model_version"]
    assert {"list_patients", "user_add", "user_role", "user_disable", "user_enable",
            "user_password_reset"} <= set(by_action)
    assert temporary not in json.dumps(by_action, default=str)
    # a command pointed at a missing store reads nothing and creates nothing, so there is nothing to audit
    assert cli.main(["timeline", "--patient", "P0020", "--db", str(tmp_path / "typo.duckdb")]) == 2
    assert not (tmp_path / "typo.duckdb").exists()


def test_the_cli_no_longer_imports_the_dashboard_package_for_users_or_settings():
    import subprocess

    code = ("import sys, labtrend.cli as c, train, model.corpus; "
            "c.build_parser().parse_args(['users', 'list']); "
            "from data import users, sessions, audit, settings; "
            "print(sorted(m for m in sys.modules if m == 'dashboard' or m.startswith('dashboard.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    from data import settings
    from labtrend import settings as compat

    assert compat is settings  # one module under both names
