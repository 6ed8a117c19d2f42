"""Training: sample construction, curriculum, modes, forgetting, early stopping, train.py and DDP (tiny, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from model.features import N_SPECIAL, AnalyteScaler, AnalyteVocab, encode_queries
from model.inference import ForecastPipeline
from model.modeling import LabTrendForForecasting
from model.synthetic import DEFAULT_ANALYTES, generate_cohort, to_canonical_csv
from model.training import (
    CurriculumSampler,
    ExampleBuilder,
    TrainSettings,
    extend_vocabulary,
    finetune,
    load_pretraining_checkpoint,
    pretrain,
    resize_analyte_embeddings,
    save_pretraining_checkpoint,
    split_patients,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS_ANALYTES = DEFAULT_ANALYTES[:12]  # the site has 7 more: the vocabulary must grow
MONITORED = ("pinball", "mae", "coverage80", "nmae")


def fast(**overrides) -> TrainSettings:
    """Settings for a few-second run: small batches, few eval rows, replay and L2-SP on."""
    base = dict(steps=5, eval_every=5, batch_size=8, eval_rows=24, final_eval_rows=300, forgetting_rows=24,
                conformal_min_points=20, replay=0.25, l2sp=1e-3, warmup_steps=2)
    return TrainSettings(**{**base, **overrides})


def quiet():
    from model.training import Runtime

    return Runtime(progress_bar=False)


def hash_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def initial_state(init_dir: Path, site: pd.DataFrame) -> dict[str, torch.Tensor]:
    """The weights fine-tuning starts from: the checkpoint with the analyte table grown for the site."""
    model, vocab, _, _ = load_pretraining_checkpoint(init_dir)
    extended, _ = extend_vocabulary(vocab, site["analyte_code"].unique())
    resize_analyte_embeddings(model, len(extended))
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    return generate_cohort(20, seed=1, analytes=CORPUS_ANALYTES)[0]


@pytest.fixture(scope="module")
def site() -> pd.DataFrame:
    h = generate_cohort(14, seed=2)[0]
    return h.assign(patient_id=h["patient_id"].str.replace("synthetic:", "site-", regex=False))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus) -> Path:
    model, vocab, scaler = pretrain(corpus, "tiny", settings=fast(steps=6, eval_every=3), runtime=quiet())
    path = tmp_path_factory.mktemp("pretrained")
    save_pretraining_checkpoint(path, model, vocab, scaler, model.training_report)
    return path


# --- examples, split, curriculum --------------------------------------------------------------


def test_builder_rows_equal_the_inference_encoding(site):
    """Training and validation rows are cut exactly as ForecastPipeline encodes a query (FC-12)."""
    h = site[site["patient_id"].isin(sorted(site["patient_id"].unique())[:4])]
    vocab, scaler = AnalyteVocab.fit(h), AnalyteScaler.fit(h)
    b = ExampleBuilder(h, vocab, scaler, max_events=64, max_queries=8)
    rows = b.eval_rows(np.arange(len(b.g_start)), min_prior=2)
    idx = np.concatenate([r.query_index for r in rows])
    queries = pd.DataFrame({"patient_id": b.patient_ids[b.pid[idx]], "analyte_code": b.codes[idx],
                            "at": b.t[idx].astype("datetime64[us]"), "value": b.value[idx]})
    enc = encode_queries(h, queries, vocab, scaler, max_events=64, max_queries=8, min_history=2)
    assert (enc.status == "ok").all()
    where = {qi: (r, j) for r in enc.rows for j, qi in enumerate(r.query_index)}
    pos = 0
    for r in rows:
        for j in range(len(r.query_index)):
            e, k = where[pos]
            pos += 1
            np.testing.assert_array_equal(e.event_analyte, r.event_analyte)
            np.testing.assert_allclose(e.event_value, r.event_value)
            np.testing.assert_allclose(e.event_time, r.event_time, rtol=1e-6)
            assert e.query_analyte[k] == r.query_analyte[j]
            assert e.query_horizon[k] == pytest.approx(r.query_horizon[j])
            assert e.query_anchor_value[k] == pytest.approx(r.query_anchor_value[j])
            np.testing.assert_array_equal(e.query_summary[k], r.query_summary[j])  # every prior result
            assert e.target_value[k] == pytest.approx(r.target_value[j])
            assert e.patient_age == pytest.approx(r.patient_age)
    assert pos > 100
    # history strictly before the target, anchor = previous result of the same analyte
    r = rows[-1]
    assert (r.event_time > 0).all() and (r.query_horizon > 0).all()


def test_split_is_patient_grouped_sized_by_patients_and_stratified(site):
    train_ids, val_ids = split_patients(site, 0.25, seed=3, min_val_patients=2)
    assert not set(train_ids) & set(val_ids)
    assert set(train_ids) | set(val_ids) == set(site["patient_id"])
    assert len(val_ids) == round(0.25 * site["patient_id"].nunique())
    counts = site.groupby("patient_id").size().sort_values()
    ranks = counts.rank(method="first").loc[val_ids]  # one patient per block of similar counts
    assert ranks.min() <= len(counts) / 3 and ranks.max() > 2 * len(counts) / 3
    assert split_patients(site, 0.25, seed=3, min_val_patients=2) == (train_ids, val_ids)


def test_curriculum_draws_short_horizons_and_dense_histories_first(site):
    vocab, scaler = AnalyteVocab.fit(site), AnalyteScaler.fit(site)
    b = ExampleBuilder(site, vocab, scaler, max_events=64, max_queries=8)
    groups = np.flatnonzero(b.target_counts(1) > 0)
    horizon, events = b.group_stats(groups)
    sampler = CurriculumSampler(groups, horizon, events, fraction=0.3, strength=3.0)
    rng = np.random.default_rng(0)
    early = b.group_stats(sampler.sample(rng, 4000, progress=0.0))
    late = b.group_stats(sampler.sample(rng, 4000, progress=0.5))  # past the curriculum: uniform
    assert sampler.beta(0.0) == 3.0 and sampler.beta(0.15) == pytest.approx(1.5) and sampler.beta(0.5) == 0.0
    assert np.log1p(early[0]).mean() < np.log1p(late[0]).mean() - 0.1
    assert early[1].mean() > late[1].mean()
    assert np.log1p(late[0]).mean() == pytest.approx(np.log1p(horizon).mean(), abs=0.1)


def test_vocabulary_grows_without_moving_pretrained_ids(pretrained, site):
    model, vocab, _, _ = load_pretraining_checkpoint(pretrained)
    before = model.model.embeddings.analyte.weight.detach().clone()
    extended, added = extend_vocabulary(vocab, site["analyte_code"].unique())
    assert added and set(added).isdisjoint(vocab.codes)
    assert extended.codes[: len(vocab.codes)] == vocab.codes
    resize_analyte_embeddings(model, len(extended))
    after = model.model.embeddings.analyte.weight.detach()
    assert model.config.n_analytes == len(extended) == after.shape[0]
    torch.testing.assert_close(after[: len(vocab)], before)
    torch.testing.assert_close(after[len(vocab) :], before[N_SPECIAL:].mean(0).expand(len(added), -1))


# --- fine-tuning modes ------------------------------------------------------------------------


def test_full_finetune_changes_every_weight_and_leaves_the_checkpoint_untouched(pretrained, site, corpus):
    files = hash_dir(pretrained)
    start = initial_state(pretrained, site)
    pipe = finetune(pretrained, site, "full", settings=fast(), runtime=quiet(), corpus_history=corpus)
    report = pipe.training_report
    assert report["frozen_parameters"] == [] and report["n_trainable"] == report["n_parameters"]
    final = pipe.model.state_dict()
    assert set(final) == set(start)
    unchanged = [n for n in start if torch.equal(start[n], final[n])]
    assert unchanged == [], f"parameters a full fine-tune did not move: {unchanged}"
    assert hash_dir(pretrained) == files  # the pretrained checkpoint is byte-identical on disk
    assert report["vocabulary"]["added"] and pipe.conformal is not None
    some = site[site["patient_id"] == report["patients"]["validation"][0]]
    queries = some.groupby("analyte_code").tail(1)[["patient_id", "analyte_code", "collected_at"]]
    out = pipe.forecast(some, queries.rename(columns={"collected_at": "at"}))
    ok = out["status"] == "ok"
    assert ok.any() and np.isfinite(out.loc[ok, ["q05", "q50", "q95"]].to_numpy()).all()


def test_embeddings_mode_trains_only_embeddings_and_head(pretrained, site, corpus):
    start = initial_state(pretrained, site)
    pipe = finetune(pretrained, site, "embeddings", settings=fast(), runtime=quiet(), corpus_history=corpus)
    report = pipe.training_report
    trained = set(report["trainable_parameters"])
    assert trained == {n for n in start if n.startswith(("model.embeddings.", "quantile_head."))}
    assert "model.embeddings.analyte.weight" in trained and "quantile_head.weight" in trained
    final = pipe.model.state_dict()
    for name in report["frozen_parameters"]:
        assert torch.equal(start[name], final[name]), f"frozen {name} moved"
    assert any(n.startswith("model.encoder_layers.") for n in report["frozen_parameters"])
    assert not torch.equal(start["quantile_head.weight"], final["quantile_head.weight"])


@pytest.mark.parametrize("mode", ["lora", "scratch"])
def test_lora_and_scratch_train_save_and_load(pretrained, site, corpus, mode, tmp_path):
    pipe = finetune(None if mode == "scratch" else pretrained, site, mode, settings=fast(steps=3),
                    runtime=quiet(), config="tiny", corpus_history=corpus)
    report = pipe.training_report
    if mode == "lora":
        assert any(".lora_A." in n for n in report["trainable_parameters"])
        assert "quantile_head.weight" in report["trainable_parameters"]
        assert not any("lora" in k for k in pipe.model.state_dict())  # adapters merged
        assert "before" in report["forgetting"]
    else:
        assert report["frozen_parameters"] == [] and "skipped" in report["forgetting"]
        assert set(report["vocabulary"]["added"]) == set(site["analyte_code"])
    pipe.save_pretrained(tmp_path)
    loaded = ForecastPipeline.from_pretrained(tmp_path)
    assert loaded.model_version == pipe.model_version
    some = site[site["patient_id"] == report["patients"]["validation"][0]]
    queries = some.groupby("analyte_code").tail(1)[["patient_id", "analyte_code", "collected_at"]]
    queries = queries.rename(columns={"collected_at": "at"})
    pd.testing.assert_frame_equal(pipe.forecast(some, queries), loaded.forecast(some, queries))


def test_gradient_checkpointing_gives_the_same_training_step(pretrained, site):
    """Activation checkpointing (default on CUDA) recomputes activations; the weights it produces are the same."""
    from model.training import Runtime

    states = []
    for checkpointing in (False, True):
        pipe = finetune(pretrained, site, "full", settings=fast(steps=2, eval_every=2, replay=0.0),
                        runtime=Runtime(progress_bar=False, gradient_checkpointing=checkpointing))
        assert pipe.model.model.gradient_checkpointing is checkpointing
        states.append(pipe.model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-4, atol=1e-6)


def test_early_stopping_triggers_on_a_plateau(pretrained, site):
    """With lr = 0 the validation pinball never improves after the first eval: stop after `patience` more."""
    pipe = finetune(pretrained, site, "full", settings=fast(steps=50, eval_every=1, patience=2, lr=0.0, replay=0.0,
                                                            min_steps=1),
                    runtime=quiet())
    report = pipe.training_report
    assert report["stop_reason"] == "early_stopping"
    assert report["steps"] == 3 and report["best_step"] == 1


def test_time_budget_is_respected_and_the_best_checkpoint_kept(pretrained, site):
    """A 6-second budget with 100 000 steps: the schedule shrinks to fit, the run ends in time, the best eval wins."""
    from model.training import Runtime

    lines: list[dict] = []
    start = time.monotonic()
    pipe = finetune(pretrained, site, "full", runtime=Runtime(progress_bar=False, log=lines.append),
                    settings=fast(steps=100_000, eval_every=5, timing_steps=2, max_minutes=0.1, patience=1000,
                                  replay=0.0, min_steps=3))
    elapsed = time.monotonic() - start
    report = pipe.training_report
    assert report["steps"] < 100_000
    # the schedule shrank to what fits (or, on a starved machine, the deadline came first)
    assert report["planned_steps"] < 100_000 or report["stop_reason"] == "time"
    assert elapsed < 0.1 * 60 + 6  # slack for shared CI machines
    val = {x["step"]: x["metrics"]["pinball"] for x in lines if x["split"] == "val" and x["step"] > 0}
    assert report["best_step"] in val
    assert report["val_best_eval"]["pinball"] <= min(val.values()) + TrainSettings().min_delta


def test_budget_is_the_optimisation_not_the_data_preparation(pretrained, site, monkeypatch):
    """Issue 13 (c): a run whose data preparation takes longer than its whole budget still optimises for
    its budget; a budget too short for min_steps is overrun and said so; fewer steps than min_steps is
    reported UNDERTRAINED."""
    original = ExampleBuilder.__init__
    prep_s = 4.0

    def slow(self, *args, **kwargs):  # a slow disk or a busy machine, simulated
        original(self, *args, **kwargs)
        time.sleep(prep_s)

    monkeypatch.setattr(ExampleBuilder, "__init__", slow)
    budget_min = 0.05  # 3 s, less than the preparation
    pipe = finetune(pretrained, site, "full", runtime=quiet(),
                    settings=fast(steps=100_000, eval_every=5, timing_steps=2, max_minutes=budget_min, patience=1000,
                                  replay=0.0, min_steps=2))
    report = pipe.training_report
    assert report["seconds"] > prep_s  # the call took the preparation ...
    assert report["fit_seconds"] >= 0.5 * 60 * budget_min  # ... and the optimisation still had its budget
    assert report["stop_reason"] == "time" and report["steps"] >= 2 and not report["undertrained"]
    monkeypatch.setattr(ExampleBuilder, "__init__", original)

    overrun = finetune(pretrained, site, "full", runtime=quiet(),
                       settings=fast(steps=1000, eval_every=5, max_minutes=1e-4, min_steps=12, replay=0.0))
    r = overrun.training_report
    assert r["steps"] >= 12 and not r["undertrained"]
    assert any("time budget" in w and "ran" in w for w in r["warnings"])

    short = finetune(pretrained, site, "full", runtime=quiet(), settings=fast(steps=3, replay=0.0, min_steps=10))
    r = short.training_report
    assert r["steps"] == 3 and r["undertrained"] and r["warnings"][0].startswith("UNDERTRAINED: training stopped after 3")


# --- train.py -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site_store(tmp_path_factory, site) -> Path:
    from data.db import open_store
    from data.importers import run_import

    folder = tmp_path_factory.mktemp("store")
    csv = to_canonical_csv(generate_cohort(14, seed=2)[0], folder / "site.csv")
    db = folder / "site.duckdb"
    summary = run_import(open_store(db), csv)
    assert summary.rows_loaded > 1000
    return db


CORPUS_FLAGS = ["--corpus-sources", "none", "--synthetic-patients", "16", "--config", "tiny", "--no-progress",
                "--device", "cpu", "--batch-size", "8", "--eval-rows", "24", "--final-eval-rows", "300",
                "--forgetting-rows", "24", "--conformal-min-points", "10", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def cli_pretrained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "pretrained"
    assert train.main(["--stage", "pretrain", "--init", str(path), "--steps", "4", "--eval-every", "2", *CORPUS_FLAGS]) == 0
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, site_store, cli_pretrained):
    """``train.py --config tiny --steps 5`` with three patients excluded; every ExampleBuilder is recorded."""
    from data.db import open_store
    from data.queries import patients

    folder = tmp_path_factory.mktemp("run")
    excluded = patients(open_store(site_store))["patient_id"].tolist()[:3]
    (folder / "exclude.txt").write_text("# held-out test patients\n" + "\n".join(excluded) + "\n\n")
    seen: list[set] = []
    original = ExampleBuilder.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(set(self.patient_ids.tolist()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ExampleBuilder, "__init__", recording)
        rc = train.main(["--db", str(site_store), "--init", str(cli_pretrained), "--out", str(folder / "model"),
                         "--exclude-patients", str(folder / "exclude.txt"), "--steps", "5", "--eval-every", "2",
                         *CORPUS_FLAGS])
    return rc, folder / "model", excluded, seen


def test_cli_end_to_end_writes_a_loadable_pipeline_and_logs(cli_run, site_store):
    rc, out, _, _ = cli_run
    assert rc == 0
    for name in ("config.json", "model.safetensors", "vocab.json", "scaler.json", "calibration.json",
                 "model_version", "metrics.jsonl", "run.json", "patients.json"):
        assert (out / name).is_file(), name
    assert not out.with_name(out.name + ".partial").exists()
    run = json.loads((out / "run.json").read_text())
    pipe = ForecastPipeline.from_pretrained(out)
    assert run["model_version"] == pipe.model_version == (out / "model_version").read_text().strip()
    assert run["report"]["steps"] == 5 and run["wall_seconds"] > 0 and run["world_size"] == 1
    # --steps 5 is below --min-steps: said loudly in run.json (and on stderr)
    assert run["undertrained"] and run["warnings"][0].startswith("UNDERTRAINED")


def test_excluded_patients_never_reach_training_or_validation(cli_run):
    rc, out, excluded, seen = cli_run
    assert rc == 0 and len(excluded) == 3
    recorded = json.loads((out / "patients.json").read_text())
    assert recorded["excluded_count"] == 3
    assert not set(excluded) & (set(recorded["train"]) | set(recorded["validation"]))
    assert seen and all(not set(excluded) & ids for ids in seen)  # no sample builder ever held them
    assert any(set(recorded["validation"]) <= ids for ids in seen)


def test_metrics_log_has_monitored_metrics_and_forgetting(cli_run):
    _, out, _, _ = cli_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(set(x) == {"step", "split", "metrics", "lr", "elapsed"} for x in lines)
    val = [x for x in lines if x["split"] == "val"]
    assert [x["step"] for x in val] == [0, 2, 4, 5]
    assert all(set(MONITORED) <= set(x["metrics"]) for x in val)
    train_lines = [x for x in lines if x["split"] == "train"]
    assert {"loss", "l2sp", "mean_horizon_days", "curriculum_beta", "replay_rows"} <= set(train_lines[0]["metrics"])
    assert train_lines[0]["metrics"]["curriculum_beta"] > train_lines[-1]["metrics"]["curriculum_beta"]
    forgetting = [x for x in lines if x["split"] == "pretrain_val"]
    assert [x["step"] for x in forgetting] == [0, 5]
    report = json.loads((out / "run.json").read_text())["report"]
    assert set(MONITORED) <= set(report["forgetting"]["before"]) and "pinball_increase" in report["forgetting"]
    assert set(MONITORED) <= set(report["val"]) and "crossfit_coverage" in report["calibration"]


def test_the_training_run_is_audited_in_the_store_it_read(cli_run, site_store):
    """``train.py`` (and ``labtrend train``) leaves one ``train`` row, as the OS account, in the store it read."""
    import getpass

    from data import audit
    from data.db import open_store

    rc, out, excluded, _ = cli_run
    rows = audit.read_log(open_store(site_store), action="train")
    assert len(rows) == 1 and rows.iloc[0]["username"] == getpass.getuser() and rows.iloc[0]["role"] == "cli"
    detail = json.loads(rows.iloc[0]["detail"])
    assert detail["exit_status"] == 0 and detail["out"] == str(out) and detail["mode"] == "full"
    assert detail["model_version"] == json.loads((out / "run.json").read_text())["model_version"]


def test_a_run_killed_mid_way_leaves_a_partial_folder_that_the_next_run_removes_and_reports(
        tmp_path, site_store, cli_pretrained, capsys):
    """kill -9 during training leaves ``<out>.partial``; while that run lives a second run into the same folder is
    refused (the lock), and the next run after the kill removes the orphan and says so on stderr."""
    out = tmp_path / "model"
    partial = out.with_name("model.partial")
    args = ["--db", str(site_store), "--init", str(cli_pretrained), "--out", str(out), *CORPUS_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    victim = subprocess.Popen([sys.executable, "train.py", *args, "--steps", "100000", "--eval-every", "1"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (partial / "metrics.jsonl").is_file() or not (partial / "metrics.jsonl").read_text().strip():
            assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never wrote an evaluation"
            time.sleep(0.1)  # poll the state again
        assert train.main([*args, "--steps", "2"]) == 2  # the folder is being written by a live run
        assert "another training run is writing" in capsys.readouterr().err
    finally:
        victim.kill()
        victim.wait()
    assert partial.is_dir() and not out.exists()  # the orphan of a run killed mid-way
    assert train.main([*args, "--steps", "2", "--eval-every", "2"]) == 0
    err = capsys.readouterr().err
    assert f"removed {partial.resolve()}, left by an interrupted run" in err
    assert not partial.exists() and (out / "config.json").is_file()
    ForecastPipeline.from_pretrained(out)


def test_a_run_killed_while_swapping_its_model_in_puts_the_old_one_back(tmp_path, capsys):
    final = tmp_path / "model"
    old = tmp_path / "model.old"
    old.mkdir()
    (old / "config.json").write_text("{}")  # killed between the two renames of publish()
    (tmp_path / "model.partial").mkdir()
    train.claim_output(final).release()
    assert (final / "config.json").is_file() and not old.exists() and not (tmp_path / "model.partial").exists()
    err = capsys.readouterr().err
    assert "put back" in err and "left by an interrupted run" in err


def test_cli_rejects_unusable_inputs(tmp_path, site_store, cli_pretrained, capsys):
    assert train.main(["--db", str(tmp_path / "none.duckdb"), "--init", str(cli_pretrained), *CORPUS_FLAGS]) == 2
    assert "no lab store" in capsys.readouterr().err
    assert train.main(["--db", str(site_store), "--init", str(cli_pretrained), "--exclude-patients",
                       str(tmp_path / "missing.txt"), *CORPUS_FLAGS]) == 2
    assert train.main(["--db", str(site_store), "--init", str(tmp_path / "empty"), *CORPUS_FLAGS]) == 2
    assert "not a pretraining checkpoint" in capsys.readouterr().err
    assert train.main(["--db", str(site_store), "--init", str(cli_pretrained), "--out", str(cli_pretrained),
                       *CORPUS_FLAGS]) == 2


def test_a_size_without_a_checkpoint_trains_from_scratch_and_says_so(tmp_path, site_store, cli_pretrained, capsys,
                                                                     monkeypatch):
    """Issue 13 (d): `--config small` when the checkpoint at hand is another size (here tiny) fine-tunes that
    size from scratch with a warning, instead of stopping; an explicit --init of another size is an error."""
    monkeypatch.setenv("LABTREND_PRETRAINED", str(cli_pretrained))  # the default checkpoint is tiny
    out = tmp_path / "small"
    flags = list(CORPUS_FLAGS)
    flags[flags.index("--config") + 1] = "small"
    assert train.main(["--db", str(site_store), "--out", str(out), "--steps", "2", "--eval-every", "2", *flags]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["mode"] == "scratch" and run["init"] is None
    assert "FROM SCRATCH" in run["warnings"][0] and "FROM SCRATCH" in capsys.readouterr().err
    assert ForecastPipeline.from_pretrained(out).model.config.d_model == 96  # small
    assert train.main(["--db", str(site_store), "--init", str(cli_pretrained), "--out", str(tmp_path / "x"),
                       *flags]) == 2
    assert "differs from the checkpoint --init" in capsys.readouterr().err


def test_parser_defaults_are_the_training_defaults():
    """train.py shows every TrainSettings field as a flag, with the same default."""
    args = train.build_parser().parse_args([])
    defaults = TrainSettings()
    settings = train.train_settings(args, max_minutes=None)
    for field in defaults.__dataclass_fields__:
        assert getattr(settings, field) == getattr(defaults, field), field
    help_text = train.build_parser().format_help()
    assert "(default: 0.001)" in help_text and "--exclude-patients" in help_text


def test_labtrend_cli_registers_train():
    from labtrend import cli

    add, cmd, _ = cli.COMMANDS["train"]
    args = cli.build_parser().parse_args(["train", "--mode", "embeddings", "--steps", "7"])
    assert args.mode == "embeddings" and args.steps == 7 and args.l2sp == TrainSettings().l2sp


def test_two_process_ddp_on_cpu_with_gloo(tmp_path, site_store, cli_pretrained):
    """``torchrun --nproc_per_node=2 train.py`` runs unchanged: two gloo ranks, rank 0 writes once."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--db", str(site_store), "--init", str(cli_pretrained), "--out", str(out), "--steps", "4",
           "--eval-every", "2", *CORPUS_FLAGS]
    # timeout: a hang guard (a gloo rank waiting for a dead peer), not a speed check; speed is benchmarks/' job
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["report"]["steps"] == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "val"] == [0, 2, 4]  # one writer
    assert proc.stdout.count('"stage": "finetune"') == 1
    ForecastPipeline.from_pretrained(out)


def test_step_scales_are_each_analytes_typical_change_in_the_given_patients(site):
    from model.training import step_scales

    vocab, scaler = AnalyteVocab.fit(site), AnalyteScaler.fit(site)
    b = ExampleBuilder(site, vocab, scaler, max_events=64, max_queries=8)
    train_ids = sorted(site["patient_id"].unique())[:10]
    groups = b.groups_of(train_ids)
    step = step_scales(b, groups, min_targets=30)
    # recomputed by hand: consecutive results of each analyte within each training patient
    h = site[site["patient_id"].isin(train_ids)].sort_values(["patient_id", "analyte_code", "collected_at"])
    h = h.assign(z=scaler.normalise(h["analyte_code"].to_numpy(), h["value"].to_numpy()))
    d = h.groupby(["patient_id", "analyte_code"])["z"].diff().dropna()
    by_code = d.groupby(h.loc[d.index, "analyte_code"])
    fitted = []
    for code, x in by_code:
        sid = vocab.encode([code])[0]
        if len(x) < 30:
            continue
        q25, q75 = np.quantile(x.to_numpy(np.float64), [0.25, 0.75])
        expected = np.clip((q75 - q25) / 1.349 if q75 > q25 else np.abs(x).mean(), 0.05, 2.0)
        assert step[sid] == pytest.approx(expected, rel=1e-5), code
        fitted.append(expected)
    assert len(fitted) >= 5
    # too few targets (here: every analyte) -> the median of the fitted ones; none at all -> 1
    few = step_scales(b, groups, min_targets=10**6)
    assert np.all(few == 1.0)
    special = step[:N_SPECIAL]
    assert np.allclose(special, np.median(fitted), rtol=1e-5)
    # a patient subset gives other scales: the scales come from the given patients only
    other = step_scales(b, b.groups_of(sorted(site["patient_id"].unique())[10:]), min_targets=5)
    assert not np.allclose(other, step)


def test_finetune_sets_step_scales_from_training_patients_and_saves_them(pretrained, site, corpus, tmp_path):
    from model.training import step_scales

    pipe = finetune(pretrained, site, "full", settings=fast(steps=2), runtime=quiet(), corpus_history=corpus)
    report = pipe.training_report
    b = ExampleBuilder(site, pipe.vocab, pipe.scaler, max_events=64, max_queries=8)
    expected = step_scales(b, b.groups_of(report["patients"]["train"]))
    np.testing.assert_allclose(pipe.model.analyte_step_scale.numpy(), expected, rtol=1e-6)
    assert len(set(report["step_scale"].values())) > 1
    pipe.save_pretrained(tmp_path / "m")
    again = ForecastPipeline.from_pretrained(tmp_path / "m")
    assert torch.equal(again.model.analyte_step_scale, pipe.model.analyte_step_scale)


# --- issue 13 -------------------------------------------------------------------------------------


def test_pretraining_checkpoint_carries_a_calibration_for_its_own_intervals(pretrained, site, monkeypatch):
    """Issue 13 (e): the checkpoint is calibrated on its pretraining validation patients, so a pipeline
    made from it as it is has finite 95 % bounds; a fine-tuning run too small to calibrate on its own
    validation patients inherits that calibration and says so."""
    from model.training import load_checkpoint_calibration

    cal = load_checkpoint_calibration(pretrained)
    assert cal is not None and "pretraining validation" in cal.meta["source"]
    zero_shot = ForecastPipeline.from_pretrained(pretrained)
    patient = sorted(site["patient_id"].unique())[0]
    h = site[site["patient_id"] == patient]
    q = h.groupby("analyte_code").tail(1)[["patient_id", "analyte_code"]].assign(
        at=h["collected_at"].max() + pd.Timedelta(days=2))
    q = q[q["analyte_code"].isin(zero_shot.vocab.codes)]
    f = zero_shot.forecast(h, q)
    ok = f["status"] == "ok"
    assert ok.any() and np.isfinite(f.loc[ok, ["lo95", "hi95"]].to_numpy()).all()
    assert (f.loc[ok, "lo95"] <= f.loc[ok, "q05"]).all() and (f.loc[ok, "q95"] <= f.loc[ok, "hi95"]).all()

    import model.training as training

    def too_few(*args, **kwargs):  # what a site with a handful of validation results gets
        raise ValueError("7 calibration points cannot certify a 95% interval; need at least 19")

    monkeypatch.setattr(training, "fit_conformal", too_few)
    small = finetune(pretrained, site, "full", runtime=quiet(), settings=fast(steps=2, eval_every=2, replay=0.0))
    r = small.training_report
    assert "fallback" in r["calibration"] and small.conformal is not None
    assert small.conformal.meta["inherited_from"].startswith("pretrained checkpoint")
    assert any("pretrained checkpoint's calibration" in w for w in r["warnings"])


def test_ema_weights_are_what_is_evaluated_and_kept(pretrained, site):
    """ema_decay: the saved weights are the moving average (not the last step's), and they were scored."""
    from model.training import Runtime

    lines: list[dict] = []
    pipe = finetune(pretrained, site, "full", runtime=Runtime(progress_bar=False, log=lines.append),
                    settings=fast(steps=6, eval_every=3, replay=0.0, ema_decay=0.5, min_steps=1, lr=3e-3))
    report = pipe.training_report
    val = {x["step"]: x["metrics"]["pinball"] for x in lines if x["split"] == "val" and x["step"] > 0}
    assert report["best_step"] in val
    # the kept model scores what the log says its best eval scored
    assert report["val_best_eval"]["pinball"] == pytest.approx(val[report["best_step"]])
    start = initial_state(pretrained, site)
    assert any(not torch.equal(start[k], v) for k, v in pipe.model.state_dict().items() if k in start)


def test_nmae_loss_weights_follow_the_anchor_and_the_analytes_range(site):
    """loss_weighting='nmae': weight = (canonical units per normalised unit at the anchor) / range,
    mean 1 over the training targets, never a function of the target itself."""
    vocab, scaler = AnalyteVocab.fit(site), AnalyteScaler.fit(site)
    b = ExampleBuilder(site, vocab, scaler, max_events=64, max_queries=8)
    groups = np.arange(len(b.g_start))
    ranges = b.nmae_ranges(groups)
    b.set_loss_weights(groups, ranges)
    t = b.targets
    w = b.loss_w[t].astype(np.float64)
    assert w.mean() == pytest.approx(1.0, rel=0.05) and (w > 0).all()
    raw = scaler.unit_per_normalised(b.codes[t], b.z[b.prev[t]]) / ranges[b.aid[t]]
    ok = (w > 0.11) & (w < 9.9)  # inside the clip
    np.testing.assert_allclose(w[ok] / raw[ok], np.median(w[ok] / raw[ok]), rtol=1e-4)
    row = b.sample_rows(groups[b.target_counts(1) > 0][:4], np.random.default_rng(0))
    batch = __import__("model.features", fromlist=["collate"]).collate(row)
    assert "target_weight" in batch and batch["target_weight"].shape == batch["target_value"].shape
    # the last result of each series is a target and never an anchor: moving it changes no weight
    last = np.setdiff1d(t, b.prev[t])
    before = b.loss_w.copy()
    b.z = b.z.copy()
    b.z[last] += 3.0
    b.set_loss_weights(groups, ranges)
    np.testing.assert_array_equal(b.loss_w, before)
