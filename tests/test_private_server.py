"""The dashboard, the demo and the model server stay on this machine, from any working folder (issue 14, point 2).

Streamlit reads ``.streamlit/config.toml`` only from the working folder, so a dashboard started
elsewhere used to listen on every interface, with full error details and usage statistics on.
The servers here are started from a temporary folder with ``HOME`` pointing there too (no
user-level Streamlit settings), and the test reads the sockets the process tree listens on
(psutil), waiting for the listening state and the health answer, never for a fixed time.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from data import settings

ROOT = Path(__file__).resolve().parent.parent
FC12_MODEL = ROOT / "tests" / "fixtures" / "fc12" / "model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _labtrend() -> list[str]:
    """The installed ``labtrend`` command of this environment (as an operator runs it)."""
    exe = Path(sys.executable).with_name("labtrend")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "labtrend.cli"]


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _listening(proc: subprocess.Popen) -> set[tuple[str, int]]:
    """Every (address, port) the process and its children listen on."""
    found = set()
    for p in _tree(proc):
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return found


def _wait_until_answering(proc: subprocess.Popen, port: int, path: str, log: Path, timeout_s: float = 180) -> None:
    """Wait for the state 'listening on ``port`` and answering ``path``' (the process must stay alive)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if any(p == port for _, p in _listening(proc)):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.1)  # poll the state again
    raise AssertionError(f"nothing answered on port {port} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the command and the server it started (``labtrend dashboard`` runs Streamlit as a child)."""
    try:
        tree = _tree(proc)
    except psutil.NoSuchProcess:
        return
    for p in reversed(tree):
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        p.kill()
    proc.wait(timeout=20)


def _environment(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env["HOME"] = str(folder)  # no ~/.streamlit/config.toml of this machine
    return env


def test_dashboard_started_from_another_folder_listens_on_localhost_only(tmp_path):
    port = _free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*_labtrend(), "dashboard", "--db", str(tmp_path / "lab.duckdb"), "--server.port",
                                 str(port), "--server.fileWatcherType", "none"],
                                cwd=tmp_path, env=_environment(tmp_path), stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_until_answering(proc, port, "/_stcore/health", log)
        listening = _listening(proc)
        # the session cookie route of dashboard/server.py is served beside Streamlit's own
        request = urllib.request.Request(f"http://127.0.0.1:{port}/_labtrend/session", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 403  # no X-LabTrend-Session header
    finally:
        _stop(proc)
    assert listening == {("127.0.0.1", port)}, listening
    assert "Collecting usage statistics" not in log.read_text()


def test_model_server_started_from_another_folder_listens_on_localhost_only(tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*_labtrend(), "serve-model", "--model", str(FC12_MODEL), "--port", str(port),
                                 "--device", "cpu", "--log-level", "warning"],
                                cwd=tmp_path, env=_environment(tmp_path), stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_until_answering(proc, port, "/health", log)
        listening = _listening(proc)
    finally:
        _stop(proc)
    assert listening == {("127.0.0.1", port)}, listening


def test_the_project_settings_are_passed_and_the_command_line_overrides_them():
    from labtrend.cli import dashboard_command, streamlit_options

    flags = streamlit_options([])
    assert {"--server.address=127.0.0.1", "--client.showErrorDetails=type", "--browser.gatherUsageStats=false",
            "--server.headless=true", "--server.maxUploadSize=200", "--runner.postScriptGC=false"} <= set(flags)
    assert "--theme.primaryColor=#1f4e79" in flags  # the look too, not only the safety settings
    mine = ["--server.address", "0.0.0.0", "--server.port=8600"]
    cmd = dashboard_command(mine)
    assert cmd[-3:] == mine and not [f for f in cmd[:-3] if f.startswith(("--server.address", "--server.port"))]
    assert cmd[4] == str(settings.PROJECT_ROOT / "dashboard" / "server.py")


def test_the_demo_serves_the_dashboard_with_the_same_settings(tmp_path, cases, monkeypatch, capsys):
    """``labtrend demo`` (import, model, outputs, accounts) ends in the same command as ``labtrend dashboard``."""
    import functools

    import torch

    from clinical import predict
    from clinical.anomalies import history_from_timeline
    from data import audit, queries, users
    from data.db import open_store
    from data.importers import run_import
    from labtrend import cli
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    # a model the demo may reuse: trained without exactly its held-out patient (here: untrained, tiny)
    scratch = open_store(tmp_path / "scratch.duckdb")
    run_import(scratch, cases / "XAI-15.csv")
    h = history_from_timeline(queries.timeline(scratch, "P0020"))
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(h)
    model = tmp_path / "model"
    ForecastPipeline(LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab))), vocab,
                     AnalyteScaler.fit(h)).save_pretrained(model)
    (model / "patients.json").write_text(json.dumps({"excluded_sha256": hashlib.sha256(b"P0020").hexdigest()}))

    monkeypatch.setattr(settings, "VAR_DIR", tmp_path / "var")
    monkeypatch.setattr(cli, "_demo_source", lambda work: (cases / "XAI-15.csv", "the XAI-15 case"))
    # the outputs without SHAP (20 s of exact Shapley values on a busy machine; explanations are tested elsewhere)
    monkeypatch.setattr(predict, "predict_patient", functools.partial(predict.predict_patient, explain=False))
    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    assert cli.main(["demo", "--model", str(model), "--holdout", "1", "--predict-patients", "1",
                     "--server.port", "8600"]) == 0
    assert seen["cmd"] == cli.dashboard_command(["--server.port", "8600"])
    assert "--server.address=127.0.0.1" in seen["cmd"]
    db = tmp_path / "var" / "demo.duckdb"
    assert seen["env"]["LABTREND_DB"] == str(db.resolve())
    out = capsys.readouterr().out
    store = open_store(db)
    accounts = {u["username"]: u["roles"] for u in users.list_users(store)}
    assert accounts == {f"demo-{r}": [r] for r in ("clinician", "expert", "analyst", "admin")}
    assert all(name in out for name in accounts)  # the passwords are printed once, beside the names
    actions = set(audit.read_log(store)["action"])
    assert {"import", "predict", "user_add"} <= actions
