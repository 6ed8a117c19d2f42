"""`labtrend forecast` and `labtrend evaluate` end to end (tiny model, synthetic site, CPU)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from labtrend.cli import main as cli_main
from model.synthetic import generate_cohort, to_canonical_csv
from model.training import Runtime, TrainSettings, pretrain, save_pretraining_checkpoint


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A store with a 15-patient synthetic site and a tiny pretrained checkpoint."""
    from data.db import open_store
    from data.importers import run_import

    d = tmp_path_factory.mktemp("site")
    h, _ = generate_cohort(15, seed=4)
    csv = d / "site.csv"
    to_canonical_csv(h.assign(patient_id=h["patient_id"].str.replace("synthetic:", "S", regex=False)), csv)
    db = d / "site.duckdb"
    run_import(open_store(db), csv)
    corpus, _ = generate_cohort(10, seed=5)
    s = TrainSettings(steps=4, eval_every=2, batch_size=8, eval_rows=16, final_eval_rows=200, warmup_steps=1)
    model, vocab, scaler = pretrain(corpus, "tiny", settings=s, runtime=Runtime(progress_bar=False))
    init = d / "pretrained"
    save_pretraining_checkpoint(init, model, vocab, scaler, {})
    return d, db, init


def test_evaluate_writes_a_card_comparing_modes_and_baselines(site, capsys):
    d, db, init = site
    out = d / "model"
    rc = cli_main(["evaluate", "--db", str(db), "--model", str(out), "--init", str(init), "--modes", "full,embeddings",
                   "--minutes-per-mode", "0.15", "--config", "tiny", "--baselines", "last value,historical mean"])
    assert rc == 0
    card = json.loads((out / "model_card.json").read_text())
    names = set(card["ranking"])
    assert names == {"last value", "historical mean", "full fine-tuning", "embedding-only fine-tuning"}
    assert "full fine-tuning" in card["statement"].lower()
    readme = (out / "README.md").read_text()
    assert readme.count("|") > 20 and readme.startswith("---\n") and "model-index:" in readme
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["winner"] == card["winner"]


def test_evaluate_without_pretrained_checkpoint_says_how(site, tmp_path, capsys):
    _, db, _ = site
    rc = cli_main(["evaluate", "--db", str(db), "--model", str(tmp_path / "m"), "--init", str(tmp_path / "none")])
    assert rc == 2 and "labtrend train --stage pretrain" in capsys.readouterr().err


def test_evaluate_rejects_unknown_names_before_any_work(tmp_path, capsys):
    """A typo in --baselines or --modes stops at once (exit 2) instead of being ignored or
    failing after the other methods have trained."""
    db = tmp_path / "never-created.duckdb"
    assert cli_main(["evaluate", "--db", str(db), "--baselines", "last value,LightGMB"]) == 2
    assert "--baselines: unknown ['LightGMB']" in capsys.readouterr().err
    assert cli_main(["evaluate", "--db", str(db), "--modes", "full,lora2"]) == 2
    assert "--modes: unknown ['lora2']" in capsys.readouterr().err
    assert not db.exists()


def test_lightgbm_baseline_models_exactly_the_task_analytes():
    """Every task analyte has a LightGBM model (none falls back to the last value for want of one)."""
    from labtrend.evaluate import BASELINES, baseline_methods

    methods = baseline_methods(BASELINES, ["2823-3", "2951-2", "local:rare"], seed=3)
    assert [m.name for m in methods] == list(BASELINES)
    assert methods[-1].analytes == ["2823-3", "2951-2", "local:rare"]
    assert [m.name for m in baseline_methods(("LightGBM", "last value"), ["x"])] == ["last value", "LightGBM"]
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_methods(("lightgbm",), ["x"])


def test_forecast_cli_batch(site, tmp_path, capsys):
    d, db, init = site
    model = tmp_path / "model"
    assert cli_main(["train", "--db", str(db), "--out", str(model), "--init", str(init), "--config", "tiny",
                     "--steps", "3", "--device", "cpu"]) == 0
    capsys.readouterr()
    from data import queries
    from data.db import open_store

    store = open_store(db)
    c = queries.cohort(store)
    pid = c["patient_id"].iloc[0]
    code = c[c.patient_id == pid]["analyte_code"].value_counts().index[0]
    at = c[c.patient_id == pid]["collected_at"].max() + pd.Timedelta(days=2)
    qf = tmp_path / "q.csv"
    pd.DataFrame({"patient_id": [pid, pid], "analyte": [code, "9999-9"], "at": [at, at]}).to_csv(qf, index=False)
    outf = tmp_path / "fc.csv"
    assert cli_main(["forecast", "--model", str(model), "--db", str(db), "--queries", str(qf), "--out", str(outf)]) == 0
    fc = pd.read_csv(outf)
    assert list(fc["status"]) == ["ok", "analyte not in model vocabulary"]
    assert fc.loc[0, "q05"] <= fc.loc[0, "q50"] <= fc.loc[0, "q95"]
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,at\nx,2024-01-01\n")
    assert cli_main(["forecast", "--model", str(model), "--db", str(db), "--queries", str(bad), "--out", str(outf)]) == 2
    assert "analyte" in capsys.readouterr().err


def test_busy_database_is_a_message_not_a_traceback(monkeypatch, capsys):
    """When another process keeps the database past the retry budget, the command says so and
    exits 3 (no Python traceback for the analyst)."""
    from data.db import StoreBusyError
    from labtrend import cli

    def busy(args):
        raise StoreBusyError("database lab.duckdb is busy (held by another process) for more than 60 s")

    monkeypatch.setitem(cli.COMMANDS, "patients", (cli.COMMANDS["patients"][0], busy, "patients"))
    assert cli.main(["patients", "--db", "lab.duckdb"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("labtrend patients: database lab.duckdb is busy") and "try again" in err


@pytest.mark.parametrize("command", [["patients"], ["timeline", "--patient", "P1"], ["batches"],
                                     ["quarantine", "--batch", "1", "--out", "q.csv"]])
def test_reading_commands_do_not_create_a_database(tmp_path, capsys, command):
    """A mistyped --db is an error (exit 2, naming the path), not a new, empty database."""
    db = tmp_path / "typo" / "lab.duckdb"
    assert cli_main(command + ["--db", str(db)]) == 2
    assert f"no database at {db}" in capsys.readouterr().err
    assert not db.exists() and not db.parent.exists()
