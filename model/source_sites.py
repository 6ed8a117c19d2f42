"""A corpus source as a LabTrend site, and zero-shot scoring of a checkpoint on held-out patients.

Two uses the evaluation of issue 13 needs:

* **a source as a site** (:func:`write_site`): one source of :mod:`model.corpus` (e.g. PhysioNet
  2012 set C, the CDISC outpatients) written as the canonical long CSV the importer reads
  (``patient_id, collected_at, loinc, test_name, value, unit, specimen_id, sex, birth_date``,
  through :func:`model.synthetic.to_canonical_csv`) and imported into a DuckDB store by the normal
  importer, with a patient-grouped, deterministic split (:func:`site_split`) written as
  ``train_patients.txt`` / ``test_patients.txt``. Fine-tune on the 80 % with ``train.py --db
  <dir>/site.duckdb --exclude-patients <dir>/test_patients.txt``; score the 20 % with
  :func:`score_checkpoint` (or ``labtrend evaluate --patients``).
* **zero-shot scoring** (:func:`score_checkpoint`): a pretraining checkpoint or a fine-tuned model
  directory forecasts the targets of a history frame it never trained on, scored by
  :mod:`model.evaluation` (the model card's task and scorer): NMAE = MAE / (p99 - p1) per analyte,
  count-weighted, with every target scored for both the model and the last value (targets with
  fewer than ``MIN_HISTORY`` prior results and failed forecasts count as the last value, as the
  card does, and are counted).

Patients keep their source prefix (``physionet2012c:152871``), so a held-out source's ids can
be checked against a checkpoint's ``pretraining.json`` (:func:`pretraining_overlap`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from model import HISTORY_COLUMNS

__all__ = ["SiteFiles", "site_split", "write_site", "score_checkpoint", "pretraining_overlap", "load_forecaster"]


@dataclass
class SiteFiles:
    """What :func:`write_site` wrote: paths and counts."""

    csv: Path
    train_patients: Path
    test_patients: Path
    db: Path | None
    counts: dict = field(default_factory=dict)


def site_split(history: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, test ids): patient-grouped, deterministic for a given ``history`` and ``seed``.

    The same rule as the fine-tuning validation split (:func:`model.training.split_patients`:
    stratified by number of results, so light and heavy patients are in both parts). Raises
    ``ValueError`` for fewer than 2 patients or a fraction outside (0, 1).
    """
    from model.training import split_patients

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction ({test_fraction}) must be in (0, 1)")
    return split_patients(history, test_fraction, seed, 1)


def _write_ids(path: Path, ids: list[str], header: str) -> None:
    path.write_text(f"# {header}\n" + "\n".join(ids) + "\n", encoding="utf-8")


def write_site(history: pd.DataFrame, out_dir: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0,
               db: bool = True, name: str = "site") -> SiteFiles:
    """Write ``history`` (a history frame, e.g. ``model.corpus.load_source('physionet2012c')``) as a site.

    Files in ``out_dir``: ``<name>.csv.gz`` (every patient; canonical long CSV), ``train_patients.txt``
    and ``test_patients.txt`` (:func:`site_split`; one id per line, '#' header), and with ``db``
    ``<name>.duckdb`` holding the CSV imported by :func:`data.importers.run_import` (an existing store
    of that name is replaced). Returns :class:`SiteFiles`; ``counts`` has patients, values, train/test
    patients and the import summary's loaded/quarantined rows. Raises ``ValueError`` for a frame
    that is not a history frame, and what the importer raises for a file it cannot read.
    """
    from model.synthetic import to_canonical_csv

    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise ValueError(f"write_site: history lacks column(s) {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = site_split(history, test_fraction, seed)
    csv = to_canonical_csv(history, out / f"{name}.csv.gz")
    _write_ids(out / "train_patients.txt", train, f"{len(train)} training patients (site_split seed {seed})")
    _write_ids(out / "test_patients.txt", test,
               f"{len(test)} test patients: --exclude-patients for fine-tuning, scored by score_checkpoint")
    counts = {"patients": int(history["patient_id"].nunique()), "values": int(len(history)),
              "train_patients": len(train), "test_patients": len(test), "test_fraction": test_fraction, "seed": seed}
    store_path = None
    if db:
        from data.db import open_store
        from data.importers import run_import

        store_path = out / f"{name}.duckdb"
        for p in (store_path, store_path.with_name(store_path.name + ".wal")):
            if p.exists():
                p.unlink()
        store = open_store(store_path)
        try:
            summary = run_import(store, csv)
        finally:
            close = getattr(store, "close", None)
            if close is not None:
                close()
        counts.update(rows_loaded=int(summary.rows_loaded), rows_quarantined=int(getattr(summary, "rows_quarantined", 0)))
    (out / "site.json").write_text(json.dumps(counts, indent=1) + "\n")
    return SiteFiles(csv=csv, train_patients=out / "train_patients.txt", test_patients=out / "test_patients.txt",
                     db=store_path, counts=counts)


def load_forecaster(path: str | os.PathLike, device: str = "cpu"):
    """A :class:`model.finetuned.PipelineForecaster` (fit is a no-op: zero-shot) from a pretraining
    checkpoint or a fine-tuned model directory (both hold config, weights, vocabulary and scaler;
    a fine-tuned one also its conformal calibration). Raises ``FileNotFoundError``."""
    from model.finetuned import PipelineForecaster
    from model.inference import ForecastPipeline

    path = Path(path)
    pipe = ForecastPipeline.from_pretrained(path, device=device)
    return PipelineForecaster(pipe, name=f"{path.name} (zero-shot)")


def pretraining_overlap(checkpoint: str | os.PathLike, patient_ids) -> dict:
    """How a cohort's patients relate to a checkpoint's pretraining corpus (from its ``pretraining.json``).

    Returns ``{"sources_in_pretraining": [...], "cohort_sources": [...], "overlapping_sources": [...],
    "validation_patients": n, "patients_possibly_trained_on": n}``: the cohort's sources that the
    checkpoint was pretrained on (a zero-shot claim needs this empty), how many of the cohort's
    patients were its held-out validation patients, and how many belong to a pretraining source
    without being among them (a clean held-out score needs 0). Empty lists when the checkpoint
    records no corpus.
    """
    from model.corpus import resolve_sources, source_of

    report_file = Path(checkpoint) / "pretraining.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    summary = report.get("corpus_summary") or {}
    if summary:
        used = list(summary.get("sources", []))
    else:  # checkpoints written before corpus_summary: the open datasets and the synthetic cohort
        args = report.get("args", {})
        used = list(resolve_sources(args["corpus_sources"])) if args.get("corpus_sources") else []
        if args.get("synthetic_patients"):
            used.append("synthetic")
    ids = pd.unique(np.asarray(patient_ids, dtype=object))
    src = source_of(ids)
    cohort = sorted(set(src))
    val = set(report.get("validation_patients") or [])
    in_val = np.array([p in val for p in ids], dtype=bool)
    in_used = np.isin(src, used)
    return {"sources_in_pretraining": used, "cohort_sources": cohort,
            "overlapping_sources": [s for s in cohort if s in used],
            "validation_patients": int(in_val.sum()),
            "patients_possibly_trained_on": int((in_used & ~in_val).sum())}


def score_checkpoint(checkpoint: str | os.PathLike, history: pd.DataFrame, *, patients=None,
                     max_patients: int | None = None, n_analytes: int = 20, folds: int = 5, seed: int = 0,
                     leakage_check: int = 40, device: str = "cpu") -> dict:
    """Score a checkpoint zero-shot on the targets of ``history`` (the model card's task and scorer).

    ``patients`` restricts the cohort (e.g. a site's ``test_patients.txt``); ``max_patients`` then
    keeps a seeded random subset (for quick runs; the number scored is reported). The task is
    :func:`model.evaluation.build_task` on that cohort (its ``n_analytes`` most frequent analytes);
    the forecaster is not fitted; ``folds`` patient-grouped folds only decide on which patients the
    last-value fallback's interval widths are fitted (the point forecasts, hence the NMAE, do not
    depend on them). Returns a JSON-ready dict: ``nmae``, ``last_value_nmae``, ``ratio`` (model /
    last value on the same targets), coverage, wins per analyte, the fallback and failure counts,
    ``per_analyte`` rows, the model version and :func:`pretraining_overlap`. Raises
    ``ValueError`` when the cohort has no target.
    """
    from model.evaluation import build_task, evaluate, grouped_folds

    h = history[list(HISTORY_COLUMNS)]
    if patients is not None:
        keep = {str(p) for p in patients}
        h = h[h["patient_id"].astype(str).isin(keep)]
    ids = np.sort(h["patient_id"].astype(str).unique())
    if max_patients is not None and len(ids) > max_patients:
        ids = np.sort(np.random.default_rng(seed).choice(ids, int(max_patients), replace=False))
        h = h[h["patient_id"].astype(str).isin(set(ids))]
    task = build_task(h.reset_index(drop=True), n_analytes=n_analytes)
    if task.targets.empty:
        raise ValueError("score_checkpoint: the cohort has no target (no analyte measured twice in a patient)")
    forecaster = load_forecaster(checkpoint, device=device)
    k = int(min(folds, len(task.patients)))
    fold_list = grouped_folds(task.patients, k=k, seed=seed) if k >= 2 else []
    if not fold_list:
        raise ValueError("score_checkpoint: at least 2 patients with targets are needed")
    result = evaluate(forecaster, task, fold_list, leakage_check=leakage_check, seed=seed)
    o = result.overall
    per = result.per_analyte.reset_index()
    return {
        "checkpoint": str(Path(checkpoint).name),
        "model_version": forecaster.pipeline.model_version,
        "patients": int(len(ids)),
        "patients_with_targets": int(len(task.patients)),
        "n_targets": int(o["n_targets"]),
        "n_analytes": int(o["n_analytes"]),
        "nmae": float(o["nmae"]),
        "last_value_nmae": float(o["last_value_nmae"]),
        "ratio": float(o["nmae"] / o["last_value_nmae"]) if o["last_value_nmae"] > 0 else float("nan"),
        "coverage80": float(o["coverage80"]),
        "coverage90": float(o["coverage90"]),
        "wins_vs_last_value": int(o["wins_vs_last_value"]),
        "fallback_fewer_than_min_history": int(o["fallback_fewer_than_min_history"]),
        "failed_forecasts": int(o["failed_forecasts"]),
        "failed_reasons": result.info.get("failed_reasons", {}),
        "leakage_checked_queries": int(result.info.get("leakage_checked_queries", 0)),
        "predict_s": float(result.info.get("predict_s", 0.0)),
        "per_analyte": [{k2: (v.item() if hasattr(v, "item") else v) for k2, v in r.items()}
                        for r in per[["analyte_code", "n", "nmae", "last_value_nmae", "beats_last_value",
                                      "coverage80"]].to_dict("records")],
        "pretraining_overlap": pretraining_overlap(checkpoint, ids),
    }
