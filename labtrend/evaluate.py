"""``labtrend evaluate``: the model card, measured on held-out patients of the store.

Reads the store and the pretrained checkpoint (the edges), then runs the pure evaluation of
``model.evaluation``: the baselines and the fine-tuning modes on the same task, the same
patient-grouped folds, the same targets. Writes ``model_card.json`` and ``model_card.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

from data import settings

BASELINES = ("last value", "historical mean", "linear trend", "LightGBM")
MODES = ("full", "embeddings", "lora", "scratch")


def baseline_methods(names: tuple[str, ...], analytes: list[str], seed: int = 0) -> list:
    """The baselines named in ``names`` (of :data:`BASELINES`), in that table's order.

    LightGBM models exactly the task's ``analytes``: left to pick the most frequent analytes of
    each fold's training patients, it had no model for a task analyte that was not among them,
    and those targets fell back to the last value (1,113 of the 5-fold card's targets).
    """
    from model.baselines import HistoricalMean, LastValue, LightGBMForecaster, LinearTrend

    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}; choose from {list(BASELINES)}")
    every = (LastValue(), HistoricalMean(), LinearTrend(), LightGBMForecaster(analytes=list(analytes), seed=seed))
    return [m for m in every if m.name in names]


def run_evaluation(db: str | Path | None, out_dir: str | Path, *, init_dir: str | Path | None = None,
                   patients_file: str | None = None, folds: int = 1, k: int = 5, seed: int = 0,
                   modes: tuple[str, ...] = MODES, minutes_per_mode: float = 3.0, config: str = "small",
                   replay_corpus: bool = False, baselines: tuple[str, ...] = BASELINES, progress=print) -> dict:
    """Evaluate baselines and fine-tuning modes; write the model card into ``out_dir``.

    ``folds`` of the ``k`` patient-grouped folds are used (all methods see the same ones);
    ``patients_file`` instead names the test patients. Each mode fine-tunes for at most
    ``minutes_per_mode`` minutes per fold. ``baselines`` names which of :data:`BASELINES` run.
    Raises FileNotFoundError when a mode needs the
    pretrained checkpoint and there is none.
    """
    from data import queries
    from data.db import open_store
    from model.evaluation import build_task, evaluate, grouped_folds, holdout_fold, read_patient_list, write_model_card
    from model.finetuned import FineTunedForecaster
    from model.training import TrainSettings

    init = Path(init_dir) if init_dir else settings.pretrained_dir()
    if any(m != "scratch" for m in modes) and not (init / "config.json").is_file():
        raise FileNotFoundError(f"no pretrained checkpoint in {init}: run `labtrend train --stage pretrain` first")
    store = open_store(settings.db_path(db))
    cohort = queries.cohort(store)
    task = build_task(cohort, n_analytes=20)
    if patients_file:
        fold_list = holdout_fold(task.patients, read_patient_list(patients_file))
        split = f"test patients from {Path(patients_file).name}"
    else:
        fold_list = grouped_folds(task.patients, k=k, seed=seed)[:folds]
        split = f"{len(fold_list)} of {k} patient-grouped folds (seed {seed})"
    corpus = None
    if replay_corpus:
        from model.corpus import load_pretraining_corpus

        corpus = load_pretraining_corpus(max_rows=300_000, seed=seed)
    methods = baseline_methods(baselines, task.analytes, seed=seed)
    train_settings = TrainSettings(max_minutes=minutes_per_mode, seed=seed)
    methods += [FineTunedForecaster(m, init, settings=train_settings, config=config, corpus_history=corpus) for m in modes]
    results, timings = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        progress(f"evaluating {m.name} ...")
        results[m.name] = evaluate(m, task, fold_list, seed=seed)
        timings[m.name] = round(time.perf_counter() - t0, 1)
        o = results[m.name].overall
        progress(f"  {m.name}: NMAE {o.get('nmae_weighted', o.get('nmae')):.4f} ({timings[m.name]} s)")
    names = {r.analyte_code: r.analyte_name for r in queries.top_analytes(store, 200).itertuples()}
    reports = {m.name: m.reports for m in methods if hasattr(m, "reports")}
    meta = {
        "dataset": str(settings.db_path(db).name),
        "split": split,
        "task": task.describe(),
        "analyte_names": names,
        "primary_method": "full fine-tuning" if "full" in modes else None,
        "minutes_per_mode": minutes_per_mode,
        "config": config,
        "pretrained_checkpoint": str(init.name),
        "wall_s": timings,
        "training_reports": reports,
    }
    return write_model_card(results, out_dir, meta)
