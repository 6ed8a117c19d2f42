"""labtrend score: incremental selection, idempotence, resume after a kill, engines, a reader beside the writer."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data import queries
from data.db import Store, StoreSettings, open_store
from data.importers import run_import
from labtrend.scoring import ScoreConfig, run_scoring, select_patients, scoring_key

N_PATIENTS = 5
TOP = 2  # forecasts (and explanations) per patient: enough to compare, cheap on a busy machine


def _copy_store(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    if Path(str(src) + ".wal").exists():
        shutil.copy(str(src) + ".wal", str(dst) + ".wal")
    return dst


@pytest.fixture(scope="module")
def small_world(mimic_store, tmp_path_factory):
    """A store with N_PATIENTS small MIMIC-IV demo patients (the rest deleted) and a tiny random model."""
    from model.configuration import config_preset
    from model.features import AnalyteScaler, AnalyteVocab
    from model.inference import ForecastPipeline
    from model.modeling import LabTrendForForecasting

    root = tmp_path_factory.mktemp("scoring")
    with mimic_store.read():  # the session store is idle: its file is complete on disk
        pass
    db = _copy_store(Path(mimic_store.settings.path), root / "base.duckdb")
    store = open_store(db)
    pats = queries.patients(store, limit=1000)
    keep = sorted(pats[(pats["n_results"] >= 100) & (pats["n_results"] <= 250)]["patient_id"])[:N_PATIENTS]
    assert len(keep) == N_PATIENTS
    with store.write() as cur:
        for table in ("results", "patients"):
            cur.execute(f"DELETE FROM {table} WHERE NOT list_contains(?, patient_id)", [keep])
    history = queries.cohort(store)
    torch.manual_seed(0)
    vocab = AnalyteVocab.fit(history)
    model = LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab)))
    pipe = ForecastPipeline(model, vocab, AnalyteScaler.fit(history))
    pipe.save_pretrained(root / "model")
    return {"db": db, "model": root / "model", "patients": keep, "root": root}


def _fresh(world, name: str) -> Path:
    return _copy_store(world["db"], world["root"] / f"{name}.duckdb")


def _config(db: Path, world, **kw) -> ScoreConfig:
    return ScoreConfig(db_path=str(db), model_dir=str(world["model"]), top_n=TOP, **kw)


def _outputs(db: Path) -> pd.DataFrame:
    with Store(StoreSettings(path=str(db))).read() as cur:
        return cur.execute("SELECT output_id, kind, patient_id, payload::VARCHAR AS payload, payload_sha256, updated_at "
                           "FROM model_outputs ORDER BY output_id").df()


def test_incremental_selection_idempotence_and_one_new_file(small_world, tmp_path):
    db = _fresh(small_world, "incr")
    cfg = _config(db, small_world)
    first = run_scoring(cfg, engine="serial", progress=False)
    assert first["selected"] == first["scored"] == N_PATIENTS and first["failed"] == 0
    assert first["reasons"] == {"new": N_PATIENTS} and first["model_loads"] == 1
    assert set(first["by_kind"]) >= {"forecast", "anomaly", "explanation"}
    stored = _outputs(db)
    assert len(stored) == first["outputs"]["inserted"] > 0

    again = run_scoring(cfg, engine="serial", progress=False)  # nothing new: nobody selected, nothing stored
    assert again["selected"] == 0 and again["outputs"] == {"inserted": 0, "updated": 0, "unchanged": 0, "superseded": 0}
    redo = run_scoring(cfg, engine="serial", everyone=True, progress=False)  # recomputed: the same outputs
    assert redo["selected"] == N_PATIENTS and redo["outputs"]["inserted"] == redo["outputs"]["updated"] == 0
    after = _outputs(db)
    assert after[["output_id", "payload_sha256"]].equals(stored[["output_id", "payload_sha256"]])
    assert (after["updated_at"] == stored["updated_at"]).all()

    # one new file: a new result for one patient and a new patient; only they are scored
    one = small_world["patients"][2]
    last = queries.timeline(Store(StoreSettings(path=str(db))), one)["collected_at"].max()
    new = tmp_path / "new.csv"
    t1, t2 = last + pd.Timedelta(hours=6), last + pd.Timedelta(hours=30)
    new.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                   f"{one},{t1:%Y-%m-%d %H:%M},2823-3,Potassium,4.4,mmol/L\n"
                   + "".join(f"NEW-1,2024-01-0{d} 08:00,2823-3,Potassium,{4 + d / 10},mmol/L\n" for d in range(1, 5))
                   + f"{one},{t2:%Y-%m-%d %H:%M},2951-2,Sodium,139,mmol/L\n")
    run_import(Store(StoreSettings(path=str(db))), new)
    key = scoring_key(first["model_version"], cfg)
    sel = select_patients(Store(StoreSettings(path=str(db))), key)
    assert dict(zip(sel["patient_id"], sel["reason"])) == {one: "new results", "NEW-1": "new"}
    inc = run_scoring(cfg, engine="serial", progress=False)
    assert inc["selected"] == inc["scored"] == 2
    touched = set(_outputs(db).merge(stored[["output_id", "payload_sha256"]], how="left", indicator=True,
                                     on=["output_id", "payload_sha256"]).query("_merge == 'left_only'")["patient_id"])
    assert touched == {one, "NEW-1"}

    # --patients and --since narrow the candidates
    assert len(select_patients(Store(StoreSettings(path=str(db))), key, everyone=True, patients=[one])) == 1
    st = Store(StoreSettings(path=str(db)))
    last_of = {p: queries.timeline(st, p)["collected_at"].max() for p in queries.patients(st)["patient_id"]}
    since = select_patients(st, key, everyone=True, since=t1)
    assert one in set(since["patient_id"]) and set(since["patient_id"]) == {p for p, t in last_of.items() if t >= t1}


def _score_cmd(db: Path, world, ids: list[str], tmp_path: Path, *extra) -> list[str]:
    f = tmp_path / "ids.txt"
    f.write_text("".join(f"{p}\n" for p in ids))
    return [sys.executable, "-m", "labtrend.cli", "score", "--db", str(db), "--model", str(world["model"]),
            "--engine", "serial", "--write-batch", "1", "--patients", str(f), "--no-progress", "--top", str(TOP), *extra]


def _state(store: Store) -> pd.DataFrame:
    with store.read() as cur:
        return cur.execute("SELECT patient_id, status, scored_at FROM scoring_state").df()


def test_resume_after_kill_keeps_the_patients_done(small_world, tmp_path):
    db = _fresh(small_world, "kill")
    ids = small_world["patients"]
    proc = subprocess.Popen(_score_cmd(db, small_world, ids, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    reader = Store(StoreSettings(path=str(db), busy_timeout_s=120))
    try:
        done = 0
        while proc.poll() is None and done == 0:  # wait for the first written patient, then kill
            done = len(_state(reader))
            time.sleep(0.05)  # polling interval: the writer needs the file between two reads
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = _state(reader)
    assert 1 <= len(before) < len(ids) and (before["status"] == "ok").all()
    outputs_before = _outputs(db)
    assert set(outputs_before["patient_id"]) == set(before["patient_id"])  # outputs and state: one transaction

    resumed = run_scoring(_config(db, small_world), engine="serial", patients=ids, progress=False)
    assert resumed["selected"] == len(ids) - len(before)  # the patients done stay done
    after = _state(reader)
    assert len(after) == len(ids) and (after["status"] == "ok").all()
    kept = after.merge(before, on="patient_id", suffixes=("", "_before"))
    assert (kept["scored_at"] == kept["scored_at_before"]).all()


def test_writer_never_conflicts_with_a_dashboard_reading(small_world, tmp_path):
    """A scoring run in another process and a dashboard-like reader in this one: both go through."""
    from clinical.outputs import pending_outputs

    db = _fresh(small_world, "reader")
    ids = small_world["patients"][:3]
    proc = subprocess.Popen(_score_cmd(db, small_world, ids, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    reader = Store(StoreSettings(path=str(db), busy_timeout_s=120))
    seen, reads = [], 0
    while proc.poll() is None:
        seen.append(len(pending_outputs(reader, "expert-a", limit=None)))
        assert len(queries.timeline(reader, ids[0])) > 0
        reads += 1
        time.sleep(0.05)  # a page load now and then, not a reader that never lets go of the file
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert reads > 0 and seen == sorted(seen)  # only whole batches are ever seen, and never lost
    assert len(pending_outputs(reader, "expert-a", limit=None)) == len(_outputs(db))
    assert '"scored": 3' in out


def test_engines_give_the_same_outputs_and_load_the_model_once_per_worker(small_world):
    pytest.importorskip("distributed", reason="the dask engine needs the 'distributed' extra")
    ids = small_world["patients"][:3]
    results = {}
    for engine in ("serial", "process", "dask"):
        db = _fresh(small_world, f"engine-{engine}")
        s = run_scoring(_config(db, small_world), engine=engine, workers=2, patients=ids, progress=False)
        assert s["scored"] == len(ids) and s["failed"] == 0, s
        assert s["model_loads"] == s["worker_processes"] <= (1 if engine == "serial" else 2)
        results[engine] = _outputs(db)
    ref = results["serial"]
    assert len(ref) > 0
    for engine in ("process", "dask"):
        got = results[engine]
        assert got["output_id"].tolist() == ref["output_id"].tolist(), engine
        assert got["payload"].tolist() == ref["payload"].tolist(), engine  # forecasts bit for bit (JSON floats)
    fc = ref[ref["kind"] == "forecast"]
    assert len(fc) > 0 and all('"q50": ' in p for p in fc["payload"])


def test_score_command_names_unknown_patients_and_a_missing_model(small_world, tmp_path):
    from labtrend.cli import main

    db = _fresh(small_world, "cli")
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# review list\n{small_world['patients'][0]}\nNOBODY-1\n\n")
    assert main(["score", "--db", str(db), "--model", str(small_world["model"]), "--patients", str(ids)]) == 2
    assert main(["score", "--db", str(db), "--model", str(tmp_path / "no-model"), "--no-progress"]) == 2
    assert main(["score", "--db", str(tmp_path / "missing.duckdb"), "--model", str(small_world["model"])]) == 2
