"""Training of the LabTrend forecaster: pretraining on the open corpus, fine-tuning on a site.

Pure training logic: history frames (and, for fine-tuning, one explicit checkpoint directory)
in, models out. The caller (``train.py``) chooses the device and dtype, sets up DDP, and
writes checkpoints and logs; it hands those in through :class:`Runtime`. Every
hyperparameter is a field of :class:`TrainSettings`.

Examples
--------
For each patient and analyte, every result after the first one is a **target**. Its history
is every result of that patient collected strictly before it (the inference rule, FC-12,
in ``model.features``). Targets that share a collection time share one **row**: one
specimen, up to ``max_queries`` analytes forecast from the same history. :class:`ExampleBuilder`
sorts a frame once into flat per-patient arrays. For every result it precomputes the
previous result of the same analyte (the anchor), the number of prior results and the
horizon. A training step draws row positions at random from these arrays, so no
(history, target) pair is ever materialised. Training and validation targets need one prior
result (the anchor; :data:`model.MIN_HISTORY`), as the product forecasts from one.
Pretraining also draws **masked-value rows**: a window of history with no queries, so that
single-visit data (NHANES) teach relations between analytes. The pretraining model also
hides ``mask_prob`` of every row's values.

Curriculum
----------
Each training row gets a difficulty in [0, 1]: half the percentile rank of its (geometric
mean) horizon, plus half the inverse percentile rank of its number of history events. Long
horizons and sparse histories are hard. Rows are put into 10 difficulty buckets and drawn
with probability proportional to ``count * exp(-beta * difficulty)``. ``beta`` falls
linearly from ``curriculum_strength`` to 0 over the first ``curriculum_fraction`` of the
run, and sampling is uniform from then on. Early steps therefore see short horizons and
dense histories first. Every train line of the metrics log records ``curriculum_beta``,
``mean_horizon_days`` and ``mean_events`` of the rows drawn.

Validation
----------
The split is by patient: no patient is in both training and validation. It is sized in
patients (``val_fraction``) and stratified by the number of results: patients are sorted by
result count and cut into ``n_val`` consecutive blocks, and one random patient per block
goes to validation. At each eval, a fixed subset of validation rows (``eval_rows``) is
scored with pinball loss, MAE (median; normalised units), 80 % coverage (q10..q90) and
NMAE (MAE / (p99 - p1) of the analyte's targets, canonical units, as in
``model.evaluation``). Early stopping watches the validation pinball loss with
``patience``. At the end, every validation row is scored. The validation patients then
calibrate the intervals: split-conformal per analyte (:mod:`model.conformal`), stored in the
pipeline. Coverage after calibration is estimated by two-fold cross-fitting over the
validation patients, so it is not measured on the points that fitted it.

Fine-tuning modes
-----------------
* ``full`` (the product's design): every parameter trains, and this is asserted.
* ``embeddings``: only ``model.embeddings.*`` (analyte table, value/censor, time
  encodings, patient age/sex, query anchor/horizon and their LayerNorms) and the
  ``quantile_head`` train. Everything else has ``requires_grad=False``.
* ``lora``: peft LoRA (``lora_rank``) on every attention and feed-forward linear layer
  (``q/k/v/o_proj``, ``fc_in``, ``fc_out``), plus the quantile head. The adapters are merged
  at the end, so the pipeline is a plain :class:`LabTrendForForecasting`. New analytes keep
  their initial embedding, because LoRA does not train the embeddings.
* ``scratch``: the same architecture from random initialisation, with no pretraining,
  replay or L2-SP.

Vocabulary and scaler
---------------------
The pretrained vocabulary is extended with the site's new analytes, appended at the end so
pretrained ids do not change. A new embedding row starts at the mean of the pretrained
analyte rows, which is "a typical analyte" rather than noise. The vocabulary covers every
site analyte, including ones seen only in validation patients. Only codes are used, never
values.

The scaler depends on ``scaler_policy``:

* ``'site'`` (default) refits every site analyte on the training patients. The forecast
  head works in normalised units, so a site population that differs from the corpus's
  (MIMIC ICU vs NHANES) is re-centred.
* ``'pretrained'`` keeps the corpus statistics for known analytes.

On MIMIC-IV demo (small config, 300 full fine-tuning steps, same seed), the site scaler
reached a validation NMAE of 0.0628 against 0.0638 for the corpus statistics (last value:
0.0639). The corpus statistics forgot a little less: corpus pinball +5.1 % against +6.9 %.
Pinball losses of the two are not comparable, because their normalised units differ.

Pretrained analytes the site lacks keep their corpus statistics. Analytes with no result in
the training patients fall back to the corpus statistics, or else to the validation patients'
results; these are counted in the report.

Step scale
----------
Before training, each analyte's ``analyte_step_scale`` (a model buffer, saved with the
weights) is set from the training patients (:func:`step_scales`): the robust spread of the
change between consecutive results of that analyte, in normalised units. The forecasting
head predicts changes from the anchor in these units, so slowly moving analytes (MCV, RDW,
creatinine) are not forecast with the spread learnt on fast ones (potassium, glucose), and
every analyte weighs alike in the pinball loss. Pretraining sets it from the corpus the same
way; a checkpoint made before it existed loads with ones (plain normalised units).

Forgetting
----------
L2-SP adds ``l2sp * sum ||theta - theta_pretrained||^2`` over the trainable parameters of
the shared backbone (``model.*``). New embedding rows are excluded, and L2-SP replaces weight
decay on the parameters it covers. Replay draws a ``replay`` fraction of every batch from
the pretraining corpus's training patients. Forgetting is measured as the forecasting
pinball loss (plus MAE, coverage and NMAE) on the corpus's validation patients, before and
after fine-tuning. Both are expressed in the **pretrained scaler's** normalised units, so
that a refitted scaler cannot make the numbers incomparable. The corpus validation patients
are the ones pretraining held out (``pretraining.json`` in the checkpoint).

Schedule and budget
-------------------
AdamW with linear warm-up and cosine decay to ``min_lr_ratio``, and gradient clipping.
``max_minutes`` budgets the **optimisation** (steps and the evaluations between them), not
the data preparation before it or the final scoring after it: on a busy machine a run that
spent its budget loading data ended after 13 steps and was saved as if trained. After
``timing_steps`` steps, and at every eval, the number of steps that fit in the remaining
time is re-estimated (eval cost included). The cosine schedule and the curriculum run over
that number, so a time-bound run still ends with a decayed learning rate. When time runs
out the loop evaluates once more, stops, and restores the best checkpoint. Neither the
budget nor early stopping ends a run before ``min_steps`` (it overruns the budget and
says so); a run with fewer ``steps`` than that is marked **undertrained** in the report
(``warnings``, ``undertrained``), which ``train.py`` repeats in its log, ``run.json`` and
output. Seeds are fixed (``seed_everything``). bf16 autocast is used only on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from model import MIN_HISTORY, QUANTILES, history_stratum
from model.configuration import LabTrendConfig, config_preset
from model.conformal import (
    DEFAULT_LEVELS,
    ConformalCalibration,
    _interval_columns,
    _is_extended,
    fit_conformal,
    interval_coverage,
)
from model.features import (
    SOFT_CLIP,
    SOFT_LIMIT,
    N_SPECIAL,
    PAD_ID,
    SEX_IDS,
    SEX_UNKNOWN,
    AnalyteScaler,
    AnalyteVocab,
    ContextRow,
    collate,
    summary_from_sums,
    validate_history,
)
from model.inference import CALIBRATION_FILE, SCALER_FILE, VOCAB_FILE, ForecastPipeline
from model.modeling import LabTrendForForecasting, LabTrendForPretraining

__all__ = [
    "MODES",
    "SCALER_POLICIES",
    "MODE_LR",
    "PRETRAIN_LR",
    "PRETRAINING_REPORT_FILE",
    "TrainSettings",
    "Runtime",
    "seed_everything",
    "split_patients",
    "ExampleBuilder",
    "CurriculumSampler",
    "forecast_metrics",
    "extend_vocabulary",
    "resize_analyte_embeddings",
    "step_scales",
    "configure_mode",
    "save_pretraining_checkpoint",
    "load_checkpoint_calibration",
    "load_pretraining_checkpoint",
    "pretrain",
    "finetune",
]

log = logging.getLogger(__name__)

MODES = ("full", "embeddings", "lora", "scratch")
SCALER_POLICIES = ("site", "pretrained")
LOSS_WEIGHTINGS = ("none", "nmae")
# Peak learning rates when TrainSettings.lr is None. Full fine-tuning moves every pretrained
# weight, so it takes the smallest step; the partial modes and scratch train fewer or fresh weights.
MODE_LR = {"full": 3e-4, "embeddings": 1e-3, "lora": 1e-3, "scratch": 1e-3}
PRETRAIN_LR = 1e-3
PRETRAINING_REPORT_FILE = "pretraining.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")

_DAY_US = 86_400 * 1_000_000
_MODEL_INPUTS = (
    "event_analyte", "event_value", "event_censor", "event_time", "event_mask", "patient_age", "patient_sex",
    "query_analyte", "query_horizon", "query_anchor_value", "query_anchor_censor", "query_mask", "query_summary",
)
_LEVELS = np.asarray(QUANTILES, dtype=np.float64)
_I10, _I50, _I90 = QUANTILES.index(0.1), QUANTILES.index(0.5), QUANTILES.index(0.9)


# =============================================================================================
# Settings and runtime
# =============================================================================================


@dataclass
class TrainSettings:
    """Hyperparameters of one pretraining or fine-tuning call. ``train.py`` shows each as a flag."""

    # --- optimisation
    steps: int = 2000  # most optimizer steps; on CPU the time budget usually ends the run first
    batch_size: int = 32  # rows per step per process (a row: one patient at one time, <= max_queries targets)
    lr: float | None = None  # peak learning rate; None: MODE_LR[mode] when fine-tuning, PRETRAIN_LR when pretraining
    weight_decay: float = 0.01  # AdamW decoupled decay on weight matrices (not embeddings/norms/biases/L2-SP params)
    warmup_steps: int = 50  # linear warm-up steps (at most 10 % of the run), then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak learning rate
    grad_clip: float = 1.0  # clip the global gradient norm (transformers are spiky early in fine-tuning)
    ema_decay: float = 0.0  # exponential moving average of the weights (evaluated and kept); 0 disables
    loss_weighting: str = "none"  # 'nmae': weigh each target so the pinball loss is in units of its analyte's range
    # --- evaluation, stopping and budget
    eval_every: int = 25  # optimizer steps between validation evals
    eval_rows: int = 256  # validation rows scored at each eval (a fixed subset); the final scoring uses all
    final_eval_rows: int = 20000  # cap on the rows of the final scoring and conformal calibration
    patience: int = 6  # evals without a val pinball improvement of min_delta before early stopping
    min_delta: float = 1e-4  # smallest val pinball decrease that counts as an improvement
    max_minutes: float | None = None  # budget of the optimisation (steps and their evals); data preparation and final scoring not counted
    min_steps: int = 200  # neither the budget nor early stopping ends a run before this; fewer --steps is 'undertrained'
    timing_steps: int = 10  # steps timed before the first estimate of how many steps fit the budget
    # --- validation split
    val_fraction: float = 0.2  # fraction of patients held out for validation and conformal calibration
    min_val_patients: int = 2  # at least this many validation patients (small sites)
    # --- curriculum
    curriculum_fraction: float = 0.3  # fraction of the run over which easy-first sampling anneals to uniform
    curriculum_strength: float = 3.0  # initial beta: the hardest bucket is drawn exp(-beta) times as often
    # --- fine-tuning
    scaler_policy: str = "site"  # 'site': refit site analytes on site training patients; 'pretrained': keep corpus stats
    l2sp: float = 1e-3  # L2-SP strength alpha on the shared backbone (0 disables)
    replay: float = 0.125  # fraction of each fine-tuning batch drawn from the pretraining corpus (0 disables)
    lora_rank: int = 8  # LoRA rank r (mode 'lora'); lora_alpha = 2 r
    conformal_min_points: int = 50  # analytes with fewer calibration points use the pooled adjustment
    forgetting_rows: int = 256  # corpus validation rows scored before and after fine-tuning
    # --- pretraining
    masked_row_fraction: float = 0.25  # fraction of each pretraining batch that is masked-value-only rows
    pretrain_val_fraction: float = 0.05  # corpus patients held out for pretraining validation / forgetting
    pretrain_max_val_patients: int = 1000  # cap on those patients
    # --- reproducibility
    seed: int = 0  # seeds python, numpy and torch; the sampler of rank r uses seed + r

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay ({self.ema_decay}) must be in [0, 1)")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting {self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        if self.scaler_policy not in SCALER_POLICIES:
            raise ValueError(f"scaler_policy {self.scaler_policy!r} is not one of {SCALER_POLICIES}")
        for name in ("replay", "masked_row_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be in [0, 1)")
        if not 0.0 <= self.curriculum_fraction <= 1.0:
            raise ValueError(f"curriculum_fraction ({self.curriculum_fraction}) must be in [0, 1]")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction ({self.val_fraction}) must be in (0, 1)")
        for name in ("steps", "batch_size", "eval_every", "eval_rows", "patience", "timing_steps", "min_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.l2sp < 0:
            raise ValueError(f"l2sp ({self.l2sp}) must be >= 0")


def _identity(x):
    return x


@dataclass
class Runtime:
    """What the caller decides: device, precision, activation checkpointing, DDP and logging.

    The defaults run one CPU process. ``train.py`` fills in the DDP fields: ``wrap_model``
    (DistributedDataParallel), ``broadcast`` (rank 0's picklable object to every rank) and
    ``any_rank`` (a flag that is True on any rank, so all ranks stop together).
    """

    device: torch.device = torch.device("cpu")
    bf16: bool = False  # bf16 autocast for forward passes; honoured only on CUDA
    gradient_checkpointing: bool = False  # recompute activations in backward (saves memory, costs time)
    rank: int = 0
    world_size: int = 1
    wrap_model: Callable[[nn.Module], nn.Module] = _identity
    broadcast: Callable[[object], object] = _identity
    any_rank: Callable[[bool], bool] = _identity
    progress_bar: bool = True  # tqdm on rank 0
    log: Callable[[dict], None] | None = None  # one call per metrics record (rank 0 only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def emit(self, record: dict) -> None:
        if self.is_main and self.log is not None:
            self.log(record)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# =============================================================================================
# Patient-grouped, stratified split
# =============================================================================================


def split_patients(
    history: pd.DataFrame, val_fraction: float, seed: int, min_val_patients: int = 1, max_val_patients: int | None = None
) -> tuple[list[str], list[str]]:
    """(train ids, validation ids): disjoint, sized by patients, stratified by number of results.

    Patients are sorted by result count (ties in a seeded random order) and cut into ``n_val``
    blocks of consecutive counts. One random patient of each block goes to validation, so
    light and heavy patients are represented as in the whole site.
    """
    counts = history.groupby("patient_id", sort=True).size()
    n = len(counts)
    if n < 2:
        raise ValueError(f"a patient-grouped split needs at least 2 patients, got {n}")
    n_val = max(int(min_val_patients), int(round(val_fraction * n)))
    if max_val_patients is not None:
        n_val = min(n_val, int(max_val_patients))
    n_val = min(max(n_val, 1), n - 1)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(n), counts.to_numpy()))  # by count, ties at random
    picks = [block[rng.integers(len(block))] for block in np.array_split(order, n_val)]
    ids = counts.index.to_numpy().astype(str)
    val = np.zeros(n, dtype=bool)
    val[picks] = True
    return sorted(ids[~val].tolist()), sorted(ids[val].tolist())


# =============================================================================================
# Examples
# =============================================================================================


class ExampleBuilder:
    """A history frame as flat arrays sorted by (patient, time, analyte id), ready to cut rows from.

    Only results of analytes in ``vocab`` are kept (the others cannot be normalised). A
    repeated (patient, analyte, time) keeps the last row given. Per result ``i`` (all arrays
    ``(n_results,)``): ``pid`` patient index, ``t`` collection time (int64 microseconds),
    ``aid`` vocabulary id, ``value`` canonical unit, ``censor`` in {-1, 0, +1}, ``z``
    normalised value, ``prev`` the previous result of the same analyte of the same patient (-1
    when none), ``n_prior`` how many results of that analyte precede it. Groups are the
    distinct (patient, time) pairs: ``g_start``/``g_end`` delimit their results. Targets are the
    results with ``n_prior >= 1``, ordered by group.
    """

    def __init__(self, history: pd.DataFrame, vocab: AnalyteVocab, scaler: AnalyteScaler, *,
                 max_events: int, max_queries: int):
        h = validate_history(history)
        aid = vocab.encode(h["analyte_code"])
        keep = aid >= N_SPECIAL
        self.n_unknown_dropped = int((~keep).sum())
        h, aid = h.loc[keep].reset_index(drop=True), aid[keep]
        self.vocab, self.scaler = vocab, scaler
        self.max_events, self.max_queries = int(max_events), int(max_queries)
        self.loss_w: np.ndarray | None = None  # per result, set by set_loss_weights
        pid, patient_ids = pd.factorize(h["patient_id"], sort=True)
        self.patient_ids = np.asarray(patient_ids, dtype=object)
        t = h["collected_at"].to_numpy().astype("datetime64[us]").astype(np.int64)
        order = np.lexsort((aid, t, pid))  # stable: duplicates stay in the order given
        pid, t, aid = pid[order], t[order], aid[order]
        dup = np.zeros(len(order), dtype=bool)
        dup[:-1] = (pid[1:] == pid[:-1]) & (t[1:] == t[:-1]) & (aid[1:] == aid[:-1])  # keep the last copy
        order, pid, t, aid = order[~dup], pid[~dup], t[~dup], aid[~dup]
        self.n_duplicates_dropped = int(dup.sum())
        self.pid, self.t, self.aid = pid.astype(np.int64), t, aid
        self.value = h["value"].to_numpy(np.float64)[order]
        self.censor = h["censor"].to_numpy(np.int64)[order]
        self.codes = np.asarray(vocab.codes, dtype=object)[aid - N_SPECIAL] if len(aid) else np.array([], dtype=object)
        self.z = scaler.normalise(self.codes, self.value) if len(aid) else np.zeros(0, np.float32)
        n, n_pat = len(t), len(self.patient_ids)
        self.p_start = np.searchsorted(self.pid, np.arange(n_pat), side="left")
        self._demographics(h.iloc[order], n_pat)

        # previous result of the same analyte: sort by (patient, analyte, time)
        o2 = np.lexsort((t, aid, pid))
        same = np.zeros(n, dtype=bool)
        if n > 1:
            same[1:] = (pid[o2][1:] == pid[o2][:-1]) & (aid[o2][1:] == aid[o2][:-1])
        self.prev = np.full(n, -1, dtype=np.int64)
        self.prev[o2[1:][same[1:]]] = o2[:-1][same[1:]]
        run_start = np.maximum.accumulate(np.where(~same, np.arange(n), 0)) if n else np.zeros(0, np.int64)
        self.n_prior = np.empty(n, dtype=np.int64)
        self.n_prior[o2] = np.arange(n) - run_start
        self._series_order, self._series_id = o2, (np.cumsum(~same) if n else np.zeros(0, np.int64))
        self._running_stats()

        # groups: distinct (patient, time)
        new = np.ones(n, dtype=bool)
        if n > 1:
            new[1:] = (pid[1:] != pid[:-1]) | (t[1:] != t[:-1])
        self.g_start = np.flatnonzero(new)
        self.g_end = np.append(self.g_start[1:], n).astype(np.int64)
        self.g_pid, self.g_t = pid[self.g_start], t[self.g_start]
        self.row_group = np.cumsum(new) - 1

        # targets, ordered by group
        self.targets = np.flatnonzero(self.n_prior >= 1)
        self.horizon_days = np.zeros(n, dtype=np.float64)
        prev_t = t[self.prev[self.targets]]
        self.horizon_days[self.targets] = (t[self.targets] - prev_t) / _DAY_US
        tg = self.row_group[self.targets]
        groups = np.arange(len(self.g_start))
        self.g_tstart = np.searchsorted(tg, groups, side="left")
        self.g_tend = np.searchsorted(tg, groups, side="right")
        # per group: geometric-mean horizon of its targets (days) and history events a row uses
        log_h = np.bincount(tg, weights=np.log1p(self.horizon_days[self.targets]), minlength=len(groups))
        self.g_horizon = np.expm1(log_h / np.maximum(self.g_tend - self.g_tstart, 1))
        self.g_events = np.minimum(self.g_start - self.p_start[self.g_pid], self.max_events)

    def _running_stats(self) -> None:
        """Running statistics of each (patient, analyte) series up to and including each result
        (normalised units), accumulated oldest first as ``model.features`` does at inference."""
        o2, n = self._series_order, len(self._series_order)
        series = pd.DataFrame({"k": self._series_id, "z": self.z[o2].astype(np.float64)})
        series["zz"] = series["z"] * series["z"]
        g = series.groupby("k", sort=False)
        self._run = {}
        for name, values in (("s", g["z"].cumsum()), ("ss", g["zz"].cumsum()), ("lo", g["z"].cummin()),
                             ("hi", g["z"].cummax())):
            arr = np.empty(n, dtype=np.float64)
            arr[o2] = values.to_numpy(np.float64)
            self._run[name] = arr

    def _demographics(self, h: pd.DataFrame, n_pat: int) -> None:
        """Per patient: first known age with its time (age at another time is extrapolated), first known sex."""
        self.age = np.full(n_pat, np.nan)
        self.age_t = np.zeros(n_pat, dtype=np.int64)
        self.sex = np.full(n_pat, SEX_UNKNOWN, dtype=np.int64)
        frame = pd.DataFrame({"pid": self.pid, "t": self.t})
        if "age_years" in h:
            frame["age"] = h["age_years"].to_numpy(np.float64)
            first = frame[frame["age"].notna()].groupby("pid", sort=False).first()
            self.age[first.index.to_numpy()] = first["age"].to_numpy()
            self.age_t[first.index.to_numpy()] = first["t"].to_numpy()
        if "sex" in h:
            sex = h["sex"].map(SEX_IDS).to_numpy(dtype=np.float64, na_value=np.nan)
            known = pd.DataFrame({"pid": self.pid, "sex": sex}).dropna().groupby("pid", sort=False).first()
            self.sex[known.index.to_numpy()] = known["sex"].to_numpy(np.int64)

    def set_loss_weights(self, groups: np.ndarray, ranges: np.ndarray, clip: float = 10.0) -> None:
        """Weigh each target's loss so that an error of one normalised unit counts as what it is
        worth in its analyte's NMAE: ``d value / d z`` at the anchor (canonical units per
        normalised unit; on a log scale it grows with the value) divided by the analyte's range
        (``ranges`` per vocabulary id, p99 - p1). The weights depend on the anchor only, never
        on the target value (a weight that did would bias the quantiles). They are scaled to
        mean 1 over the targets of ``groups`` and clipped to ``[1 / clip, clip]``; analytes
        without a range get 1.
        """
        w = np.ones(len(self.t), dtype=np.float64)
        t = self.targets
        if len(t):
            r = np.asarray(ranges, dtype=np.float64)[self.aid[t]]
            jac = self.scaler.unit_per_normalised(self.codes[t], self.z[self.prev[t]])
            ok = np.isfinite(r) & (r > 0) & np.isfinite(jac)
            raw = np.where(ok, jac / np.where(ok, r, 1.0), np.nan)
            in_groups = np.zeros(len(self.g_start), dtype=bool)
            in_groups[np.asarray(groups, dtype=np.int64)] = True
            ref = raw[in_groups[self.row_group[t]] & ok]
            mean = float(np.mean(ref)) if len(ref) else 1.0
            w[t] = np.where(ok, np.clip(np.nan_to_num(raw / mean, nan=1.0), 1.0 / clip, clip), 1.0)
        self.loss_w = w.astype(np.float32)

    # --- views -------------------------------------------------------------------------------

    def renormalised(self, scaler: AnalyteScaler) -> ExampleBuilder:
        """The same examples with values normalised by ``scaler`` (another model's view)."""
        other = copy.copy(self)
        other.scaler = scaler
        other.z = scaler.normalise(self.codes, self.value) if len(self.t) else self.z
        other._running_stats()
        return other

    def groups_of(self, patient_ids: Sequence[str]) -> np.ndarray:
        """Indices of the groups of the given patients (unknown ids are ignored)."""
        wanted = np.isin(self.patient_ids, np.asarray(list(patient_ids), dtype=object))
        return np.flatnonzero(wanted[self.g_pid])

    def target_counts(self, min_prior: int) -> np.ndarray:
        """Per group, the targets with at least ``min_prior`` prior results of their analyte."""
        ok = self.targets[self.n_prior[self.targets] >= min_prior]
        return np.bincount(self.row_group[ok], minlength=len(self.g_start))

    def group_stats(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(geometric-mean horizon in days, history events used) of each group's row."""
        return self.g_horizon[groups], self.g_events[groups]

    def nmae_ranges(self, groups: np.ndarray | None = None) -> np.ndarray:
        """Per vocabulary id, p99 - p1 of that analyte's target values (canonical units; NaN when
        none), over the targets of ``groups`` (default: all)."""
        out = np.full(len(self.vocab), np.nan)
        t = self.targets
        if groups is not None:
            in_groups = np.zeros(len(self.g_start), dtype=bool)
            in_groups[np.asarray(groups, dtype=np.int64)] = True
            t = t[in_groups[self.row_group[t]]]
        tv = pd.DataFrame({"aid": self.aid[t], "v": self.value[t]})
        if len(tv):
            q = tv.groupby("aid")["v"].quantile([0.01, 0.99]).unstack()
            out[q.index.to_numpy()] = (q[0.99] - q[0.01]).to_numpy()
        return out

    # --- rows --------------------------------------------------------------------------------

    def _row(self, g: int, queries: np.ndarray, at: int | None = None, inclusive: bool = False) -> ContextRow:
        """Row of group ``g``: events strictly before its time (or up to it when ``inclusive``)."""
        p = int(self.g_pid[g])
        end = int(self.g_end[g] if inclusive else self.g_start[g])
        ev = slice(max(int(self.p_start[p]), end - self.max_events), end)
        at = int(self.g_t[g]) if at is None else int(at)
        age = self.age[p] + (at - self.age_t[p]) / _DAY_US / 365.25 if np.isfinite(self.age[p]) else np.nan
        prev = self.prev[queries]
        return ContextRow(
            patient_id=str(self.patient_ids[p]),
            at=np.datetime64(at, "us"),
            event_analyte=self.aid[ev],
            event_value=self.z[ev],
            event_censor=self.censor[ev],
            event_time=((at - self.t[ev]) / _DAY_US).astype(np.float32),
            patient_age=float(age),
            patient_sex=int(self.sex[p]),
            query_analyte=self.aid[queries],
            query_horizon=((at - self.t[prev]) / _DAY_US).astype(np.float32),
            query_anchor_value=self.z[prev],
            query_anchor_censor=self.censor[prev],
            query_summary=self.query_summary(queries),
            query_index=queries,
            target_value=self.z[queries],
            target_censor=self.censor[queries],
            target_weight=self.loss_w[queries] if self.loss_w is not None else None,
        )

    def query_summary(self, targets: np.ndarray) -> np.ndarray:
        """:data:`model.features.QUERY_SUMMARY` of each target's prior results: ``(targets, k)``."""
        p = self.prev[targets]
        pp = self.prev[p]
        before = np.where(pp >= 0, self.z[np.maximum(pp, 0)].astype(np.float64), np.nan)
        r = self._run
        return summary_from_sums(self.n_prior[targets], r["s"][p], r["ss"][p], r["lo"][p], r["hi"][p],
                                 self.z[p].astype(np.float64), before)

    def _queries(self, g: int, min_prior: int) -> np.ndarray:
        q = self.targets[self.g_tstart[g] : self.g_tend[g]]
        return q[self.n_prior[q] >= min_prior]

    def sample_rows(self, groups: np.ndarray, rng: np.random.Generator, min_prior: int = 1) -> list[ContextRow]:
        """One training row per group; a group with more than ``max_queries`` targets gets a random subset."""
        rows = []
        for g in groups:
            q = self._queries(int(g), min_prior)
            if len(q) > self.max_queries:
                q = np.sort(rng.choice(q, self.max_queries, replace=False))
            rows.append(self._row(int(g), q))
        return rows

    def eval_rows(self, groups: np.ndarray, min_prior: int = MIN_HISTORY) -> list[ContextRow]:
        """Every target of ``groups`` with ``min_prior`` prior results, ``max_queries`` per row (deterministic)."""
        rows = []
        for g in groups:
            q = self._queries(int(g), min_prior)
            for s in range(0, len(q), self.max_queries):
                rows.append(self._row(int(g), q[s : s + self.max_queries]))
        return rows

    def masked_rows(self, groups: np.ndarray, offsets_days: np.ndarray) -> list[ContextRow]:
        """Masked-value rows: the history up to and including each group's time, no queries.

        The row's reference time is the group time plus ``offsets_days`` (so event times
        are > 0, as at inference).
        """
        empty = np.zeros(0, dtype=np.int64)
        return [
            self._row(int(g), empty, at=int(self.g_t[g] + max(off, 1e-3) * _DAY_US), inclusive=True)
            for g, off in zip(groups, offsets_days)
        ]


class CurriculumSampler:
    """Draws groups so that early training favours short horizons and dense histories.

    ``difficulty = 0.5 * rank(horizon) + 0.5 * (1 - rank(events))``, with percentile ranks in
    [0, 1]. Groups are put into ``n_buckets`` equal-width difficulty buckets. A draw at
    training progress ``p`` picks bucket ``b`` with probability ``count_b * exp(-beta(p) *
    center_b)``, then a group uniformly inside it, where
    ``beta(p) = strength * max(0, 1 - p / fraction)``. From ``p >= fraction`` on, every group
    is equally likely.
    """

    def __init__(self, groups: np.ndarray, horizon_days: np.ndarray, events: np.ndarray, *,
                 fraction: float, strength: float, n_buckets: int = 10):
        if len(groups) == 0:
            raise ValueError("the curriculum needs at least one training row (no patient has two results of an analyte)")
        self.fraction, self.strength = float(fraction), float(strength)
        rank_h = pd.Series(np.log1p(horizon_days)).rank(pct=True).to_numpy()
        rank_e = pd.Series(events.astype(np.float64)).rank(pct=True).to_numpy()
        difficulty = 0.5 * rank_h + 0.5 * (1.0 - rank_e)
        bucket = np.minimum((difficulty * n_buckets).astype(np.int64), n_buckets - 1)
        order = np.argsort(bucket, kind="stable")
        self.members = np.asarray(groups)[order]
        self.counts = np.bincount(bucket, minlength=n_buckets)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.centers = (np.arange(n_buckets) + 0.5) / n_buckets

    def beta(self, progress: float) -> float:
        if self.fraction <= 0:
            return 0.0
        return self.strength * max(0.0, 1.0 - progress / self.fraction)

    def sample(self, rng: np.random.Generator, n: int, progress: float) -> np.ndarray:
        w = self.counts * np.exp(-self.beta(progress) * self.centers)
        b = rng.choice(len(w), size=n, p=w / w.sum())
        idx = self.offsets[b] + np.minimum((rng.random(n) * self.counts[b]).astype(np.int64), self.counts[b] - 1)
        return self.members[idx]


# =============================================================================================
# Scoring
# =============================================================================================


def _to_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def _padded_masks(masks: Sequence[np.ndarray], n_events: int) -> np.ndarray:
    out = np.zeros((len(masks), n_events), dtype=bool)
    for i, m in enumerate(masks):
        out[i, : len(m)] = m
    return out


@torch.no_grad()
def _predict(model: nn.Module, rows: list[ContextRow], runtime: Runtime, batch_size: int = 64,
             value_masks: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Quantiles of every query of ``rows`` (normalised units) and their builder indices.

    With ``value_masks`` (one bool array per row; a pretraining model), also the masked
    value pinball summed over hidden events, and their count.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].event_analyte))  # similar lengths: less padding
    q_out, idx_out, masked_sum, masked_n = [], [], 0.0, 0
    device = runtime.device
    for s in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[s : s + batch_size]]
        arrays = collate(chunk)
        inputs = _to_tensors({k: arrays[k] for k in _MODEL_INPUTS}, device)
        if value_masks is not None:
            vm = _padded_masks([value_masks[i] for i in order[s : s + batch_size]], arrays["event_analyte"].shape[1])
            inputs["value_mask"] = torch.from_numpy(vm).to(device)
        with runtime.autocast():
            out = model(**inputs)
        quantiles = out.quantiles.float().cpu().numpy()  # [batch x queries x n_quantiles]
        for b, r in enumerate(chunk):
            q_out.append(quantiles[b, : len(r.query_index)])
            idx_out.append(r.query_index)
        if value_masks is not None:
            n_hidden = int(out.value_mask.sum())
            masked_sum += float(out.masked_loss) * n_hidden
            masked_n += n_hidden
    model.train(was_training)
    if not q_out:
        return np.zeros((0, len(QUANTILES))), np.zeros(0, dtype=np.int64), masked_sum, masked_n
    return np.concatenate(q_out).astype(np.float64), np.concatenate(idx_out), masked_sum, masked_n


def forecast_metrics(builder: ExampleBuilder, index: np.ndarray, quantiles: np.ndarray, scaler: AnalyteScaler,
                     *, metric_scaler: AnalyteScaler | None = None, ranges: np.ndarray | None = None) -> dict:
    """Metrics of quantile forecasts of the builder's results ``index``.

    ``quantiles`` (``(n, n_quantiles)``) are in ``scaler``'s normalised units. Censored
    targets are left out. Pinball loss, MAE of the median and 80 % coverage are computed in
    ``metric_scaler``'s normalised units (default ``scaler``). Comparing two models that
    use different scalers therefore needs one shared ``metric_scaler``. NMAE is the mean of
    ``|y - q50| / (p99 - p1)`` in canonical units, with ``ranges`` per vocabulary id
    (default: from ``builder``). ``nmae_last_value`` is the same for the last-value forecast.
    """
    exact = builder.censor[index] == 0
    index, quantiles = index[exact], quantiles[exact]
    if len(index) == 0:
        return {"n_targets": 0}
    codes = builder.codes[index]
    ms = metric_scaler or scaler
    q_canon = scaler.denormalise(codes, quantiles)  # [n x n_quantiles], canonical units
    qn = np.column_stack([ms.normalise(codes, q_canon[:, k]) for k in range(q_canon.shape[1])]).astype(np.float64)
    y = builder.value[index]
    yn = ms.normalise(codes, y).astype(np.float64)
    diff = yn[:, None] - qn
    pinball = np.maximum(_LEVELS * diff, (_LEVELS - 1) * diff).mean()
    ranges = builder.nmae_ranges() if ranges is None else ranges
    r = ranges[builder.aid[index]]
    ok = np.isfinite(r) & (r > 0)
    last = builder.value[builder.prev[index]]
    return {
        "pinball": float(pinball),
        "mae": float(np.abs(yn - qn[:, _I50]).mean()),
        "coverage80": float(np.mean((qn[:, _I10] <= yn) & (yn <= qn[:, _I90]))),
        "nmae": float(np.mean(np.abs(y - q_canon[:, _I50])[ok] / r[ok])) if ok.any() else float("nan"),
        "nmae_last_value": float(np.mean(np.abs(y - last)[ok] / r[ok])) if ok.any() else float("nan"),
        "n_targets": int(len(index)),
    }


def _conformal(builder: ExampleBuilder, index: np.ndarray, quantiles: np.ndarray, scaler: AnalyteScaler,
               min_points: int, seed: int) -> tuple[object | None, dict]:
    """Split-conformal calibration on all validation points, and its coverage cross-fitted over two patient folds.

    ``quantiles`` are in ``scaler``'s units, which must be the builder's scaler.
    """
    assert builder.scaler is scaler
    exact = builder.censor[index] == 0
    index, quantiles = index[exact], quantiles[exact]
    codes = builder.codes[index]
    strata = history_stratum(builder.n_prior[index])  # one-result forecasts are calibrated apart
    qn = np.asarray(quantiles, dtype=np.float64)  # the model's normalised units, as ForecastPipeline.calibrate
    yn = builder.z[index].astype(np.float64)  # the builder normalises with the same scaler
    info: dict = {"n_points": int(len(index)), "raw_coverage": interval_coverage(qn, yn) if len(index) else {}}
    # levels whose rank ceil((n+1)level) exists for an analyte with min_points points
    levels = tuple(lv for lv in DEFAULT_LEVELS if math.ceil(lv / (1 - lv) - 1e-9) <= min_points)
    if levels != DEFAULT_LEVELS:
        info["levels_left_out"] = [lv for lv in DEFAULT_LEVELS if lv not in levels]
    try:
        calibration = fit_conformal(codes, qn, yn, min_points=min_points, levels=levels, strata=strata)
    except ValueError as exc:  # too few points to certify the intervals
        info["skipped"] = str(exc)
        return None, info
    # Cross-fitted estimate: calibrate on one half of the validation patients, measure on the other.
    pids = builder.pid[index]
    fold = np.random.default_rng(seed).permutation(len(np.unique(pids)))[np.searchsorted(np.unique(pids), pids)] % 2
    covered, counted = {}, 0
    single = strata == "single"
    covered_single, counted_single = {}, 0  # the same, for the forecasts from one prior result alone
    for f in (0, 1):
        fit, test = fold != f, fold == f
        if not fit.any() or not test.any():  # a single validation patient: nothing to cross-fit
            continue
        try:
            cal = fit_conformal(codes[fit], qn[fit], yn[fit], min_points=min_points, levels=levels,
                                strata=strata[fit])
        except ValueError:
            continue
        adjusted = cal.apply(codes[test], qn[test], strata[test])
        inside = {}
        for level in levels:
            if not _is_extended(QUANTILES, level):
                i, j = _interval_columns(QUANTILES, level)
                inside[level] = (adjusted[:, i] <= yn[test]) & (yn[test] <= adjusted[:, j])
        for level, b in cal.extended_bounds(codes[test], qn[test], adjusted, strata[test]).items():
            inside[level] = (b[:, 0] <= yn[test]) & (yn[test] <= b[:, 1])
        one = single[test]
        for level, hit in inside.items():
            covered[level] = covered.get(level, 0.0) + float(hit.sum())
            covered_single[level] = covered_single.get(level, 0.0) + float(hit[one].sum())
        counted += int(test.sum())
        counted_single += int(one.sum())
    if counted:
        info["crossfit_coverage"] = {str(k): float(v / counted) for k, v in covered.items()}
        info["crossfit_points"] = counted
    if counted_single:
        info["crossfit_coverage_single"] = {str(k): float(v / counted_single) for k, v in covered_single.items()}
        info["crossfit_points_single"] = counted_single
    info["raw_coverage"] = {str(k): float(v) for k, v in info["raw_coverage"].items()}
    return calibration, info


# =============================================================================================
# Model preparation
# =============================================================================================


def extend_vocabulary(vocab: AnalyteVocab, codes: Sequence[str]) -> tuple[AnalyteVocab, list[str]]:
    """``vocab`` plus the codes it lacks (sorted, appended, so existing ids do not change), and those codes."""
    new = sorted({str(c) for c in codes} - set(vocab.codes))
    return AnalyteVocab(list(vocab.codes) + new), new


def resize_analyte_embeddings(model: LabTrendForForecasting, n_analytes: int) -> None:
    """Grow the analyte table to ``n_analytes`` rows; each new row is the mean of the pretrained analyte rows."""
    old = model.model.embeddings.analyte
    n_old, d = old.weight.shape
    if n_analytes == n_old:
        return
    if n_analytes < n_old:
        raise ValueError(f"cannot shrink the analyte vocabulary from {n_old} to {n_analytes}")
    new = nn.Embedding(n_analytes, d, padding_idx=PAD_ID).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:n_old] = old.weight
        new.weight[n_old:] = old.weight[N_SPECIAL:].mean(dim=0)
    model.model.embeddings.analyte = new
    step = model.analyte_step_scale
    model.analyte_step_scale = torch.cat([step, torch.ones(n_analytes - n_old, dtype=step.dtype, device=step.device)])
    model.config.n_analytes = n_analytes


def step_scales(builder: ExampleBuilder, groups: np.ndarray, *, min_targets: int = 30, floor: float = 0.05,
                cap: float = 2.0) -> np.ndarray:
    """Per vocabulary id (``(n_analytes,)``), the typical change between consecutive results of
    the analyte in ``groups``, in normalised units: the robust spread (IQR / 1.349) of
    ``z[target] - z[previous result]``, or the mean absolute change when that spread is 0
    (values reported in coarse steps), clipped to ``[floor, cap]``.

    Analytes with fewer than ``min_targets`` targets get the median of the others (a typical
    analyte); with none measured at all, every entry is 1 (plain normalised units).
    """
    out = np.full(len(builder.vocab), np.nan)
    in_groups = np.zeros(len(builder.g_start), dtype=bool)
    in_groups[np.asarray(groups, dtype=np.int64)] = True
    t = builder.targets[in_groups[builder.row_group[builder.targets]]]
    if len(t):
        frame = pd.DataFrame({"aid": builder.aid[t], "d": builder.z[t].astype(np.float64) - builder.z[builder.prev[t]]})
        for aid, d in frame.groupby("aid")["d"]:
            if len(d) < min_targets:
                continue
            q25, q75 = np.quantile(d.to_numpy(), [0.25, 0.75])
            spread = (q75 - q25) / 1.349
            out[int(aid)] = np.clip(spread if spread > 0 else float(np.abs(d).mean()), floor, cap)
    fitted = out[np.isfinite(out)]
    return np.where(np.isfinite(out), out, float(np.median(fitted)) if len(fitted) else 1.0)


def _set_step_scales(model: nn.Module, builder: ExampleBuilder, train_ids: Sequence[str],
                     keep: Sequence[str] = ()) -> np.ndarray:
    """Set ``model.analyte_step_scale`` from the training patients (all ranks alike); return it.

    The analytes in ``keep`` keep the value the model has (a checkpoint's, valid as long as
    their normalisation is the checkpoint's too)."""
    step = step_scales(builder, builder.groups_of(train_ids))
    current = model.analyte_step_scale.detach().cpu().numpy().astype(np.float64)
    for code in keep:
        if code in builder.vocab:
            i = int(builder.vocab.encode([code])[0])
            if i < len(current):
                step[i] = current[i]
    with torch.no_grad():
        model.analyte_step_scale.copy_(torch.as_tensor(step, dtype=model.analyte_step_scale.dtype))
    return step


def _fit_scaler(site_train: pd.DataFrame, site_all: pd.DataFrame, vocab: AnalyteVocab,
                pretrained: AnalyteScaler | None, policy: str) -> tuple[AnalyteScaler, dict]:
    """Scaler covering every vocabulary code (see the module docstring for the policy)."""
    fitted = AnalyteScaler.fit(site_train).stats if len(site_train) else {}  # stats only: convention below
    base = dict(pretrained.stats) if pretrained is not None else {}
    stats, source = {}, {}
    fallback = None
    for code in vocab.codes:
        if code in base and (policy == "pretrained" or code not in fitted):
            stats[code], source[code] = base[code], "pretrained"
        elif code in fitted:
            stats[code], source[code] = fitted[code], "site_train"
        else:
            if fallback is None:
                fallback = AnalyteScaler.fit(site_all).stats
            stats[code], source[code] = fallback[code], "site_validation"
    counts = pd.Series(source).value_counts().to_dict() if source else {}
    # the checkpoint's convention for extremes (compressed or clipped), else the current default
    clip = pretrained.clip if pretrained is not None else SOFT_CLIP
    soft = pretrained.soft_limit if pretrained is not None else SOFT_LIMIT
    return (AnalyteScaler(stats, clip=clip, soft_limit=soft),
            {"policy": policy, "sources": {k: int(v) for k, v in counts.items()},
             "pretrained_codes": sorted(c for c, src in source.items() if src == "pretrained")})


def configure_mode(model: LabTrendForForecasting, mode: str, lora_rank: int = 8) -> nn.Module:
    """Set ``requires_grad`` for ``mode`` (see the module docstring); for 'lora', return the peft model."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if mode in ("full", "scratch"):
        for p in model.parameters():
            p.requires_grad_(True)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert not frozen, f"full fine-tuning must train every parameter; frozen: {frozen}"
        return model
    if mode == "embeddings":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.embeddings.") or name.startswith("quantile_head."))
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    peft_model = get_peft_model(model, config)
    for p in model.quantile_head.parameters():
        p.requires_grad_(True)
    return peft_model


def _l2sp_terms(model: LabTrendForForecasting, n_pretrained_analytes: int) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]]:
    """(parameter, pretrained value, row mask) for every trainable backbone parameter."""
    terms = []
    analyte = model.model.embeddings.analyte.weight
    for name, p in model.model.named_parameters():
        if not p.requires_grad:
            continue
        mask = None
        if p is analyte:
            mask = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
            mask[:n_pretrained_analytes] = 1.0  # new analytes' rows are free to move
        terms.append((p, p.detach().clone(), mask))
    return terms


def _l2sp_penalty(terms) -> torch.Tensor:
    total = None
    for p, ref, mask in terms:
        d = (p.float() - ref.float()) ** 2
        s = (d * mask).sum() if mask is not None else d.sum()
        total = s if total is None else total + s
    return total


def _param_groups(model: nn.Module, weight_decay: float, exclude: set[int]) -> list[dict]:
    """AdamW groups: decay on trainable weight matrices except embedding tables and ``exclude`` (L2-SP)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and id(p) not in embedding_ids and id(p) not in exclude:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# =============================================================================================
# Checkpoints of pretraining (explicit directory only)
# =============================================================================================


def save_pretraining_checkpoint(path: str | os.PathLike, model: LabTrendForPretraining, vocab: AnalyteVocab,
                                scaler: AnalyteScaler, report: dict | None = None,
                                calibration: ConformalCalibration | None = None) -> None:
    """Write ``config.json``, ``model.safetensors``, ``vocab.json``, ``scaler.json``, ``pretraining.json``,
    the checkpoint's model card ``README.md`` (:func:`model.evaluation.write_checkpoint_card`)
    and, when there is one (default: ``model.calibration``, set by :func:`pretrain`),
    ``calibration.json``: conformal intervals from the pretraining validation patients, so the
    checkpoint used as it is (``ForecastPipeline.from_pretrained``) has calibrated 95 % bounds."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / VOCAB_FILE).write_text(json.dumps(vocab.to_dict(), indent=1))
    (path / SCALER_FILE).write_text(json.dumps(scaler.to_dict(), indent=1))
    (path / PRETRAINING_REPORT_FILE).write_text(json.dumps(report or {}, indent=1, default=str))
    calibration = calibration if calibration is not None else getattr(model, "calibration", None)
    if calibration is not None:
        (path / CALIBRATION_FILE).write_text(json.dumps(calibration.to_dict(), indent=1))
    from model.evaluation import write_checkpoint_card

    write_checkpoint_card(path)


def load_checkpoint_calibration(path: str | os.PathLike) -> ConformalCalibration | None:
    """The conformal calibration saved with a pretraining checkpoint, or None (older checkpoints)."""
    f = Path(path) / CALIBRATION_FILE
    return ConformalCalibration.from_dict(json.loads(f.read_text())) if f.is_file() else None


def load_pretraining_checkpoint(path: str | os.PathLike) -> tuple[LabTrendForForecasting, AnalyteVocab, AnalyteScaler, dict]:
    """The forecasting model (backbone + forecasting head), vocabulary, scaler and report of a pretraining checkpoint."""
    path = Path(path)
    for name in ("config.json", VOCAB_FILE, SCALER_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: not a LabTrend pretraining checkpoint")
    model = LabTrendForForecasting.from_pretrained(path)
    vocab = AnalyteVocab.from_dict(json.loads((path / VOCAB_FILE).read_text()))
    scaler = AnalyteScaler.from_dict(json.loads((path / SCALER_FILE).read_text()))
    report_file = path / PRETRAINING_REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if len(vocab) != model.config.n_analytes:
        raise ValueError(f"{path}: vocabulary size ({len(vocab)}) != config n_analytes ({model.config.n_analytes})")
    return model, vocab, scaler, report


# =============================================================================================
# The loop
# =============================================================================================


@dataclass
class _FitResult:
    steps: int
    best_step: int | None
    best_metrics: dict | None
    initial_metrics: dict
    stop_reason: str
    planned_steps: int
    budget_overrun_s: float = 0.0  # past the time budget to reach min_steps
    fit_seconds: float = 0.0  # the optimisation loop, evaluations included


def _training_warnings(result: _FitResult, settings: TrainSettings) -> list[str]:
    """What a reader of the model must know about how its training ended (empty when nothing)."""
    out = []
    if result.steps < settings.min_steps:
        out.append(f"UNDERTRAINED: training stopped after {result.steps} optimizer steps, below the minimum of "
                   f"{settings.min_steps} (--steps {settings.steps}); do not use this model for patients")
    if result.budget_overrun_s > 0:
        out.append(f"the time budget of {settings.max_minutes:g} min was too short for the minimum of "
                   f"{settings.min_steps} steps on this machine: training ran {result.budget_overrun_s:.0f} s longer")
    return out


def _lr_factor(step: int, total: int, settings: TrainSettings) -> float:
    warm = max(1, min(settings.warmup_steps, total // 10))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _fit(model: nn.Module, *, sample: Callable[[float], tuple[dict, dict]], evaluate: Callable[[nn.Module], dict],
         metric: str, lr: float, settings: TrainSettings, runtime: Runtime,
         extra_loss: Callable[[], torch.Tensor] | None = None,
         no_decay: set[int] | None = None, t0: float | None = None) -> _FitResult:
    """Optimise ``model`` on batches from ``sample(progress)``; keep the weights with the best ``evaluate(net)[metric]``.

    With ``settings.ema_decay`` an exponential moving average of the weights (torch's
    ``AveragedModel``) is what ``evaluate`` scores and what is kept: a cheap ensemble of the
    last few hundred steps' weights, less noisy than the last step's.

    ``evaluate`` runs on rank 0 and its result is broadcast, so every rank takes the same
    early-stopping decision. ``settings.max_minutes`` budgets this loop (the optimizer steps
    and the evaluations between them) from its first evaluation on: preparing the data
    before it and the final scoring after it are not counted, so a slow disk or a busy
    machine cannot eat the optimisation. Neither the budget nor early stopping ends a run
    before ``settings.min_steps``; a run that still ends below it (``settings.steps`` smaller)
    is reported by the caller as undertrained. The step-0 (initial) metrics are logged but
    are not a candidate: the result is always a trained model.
    """
    t0 = time.monotonic() if t0 is None else t0
    floor = min(settings.min_steps, settings.steps)  # no time or early stop before this
    t_fit = time.monotonic()
    deadline = time.monotonic() + 60.0 * settings.max_minutes if settings.max_minutes else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay, no_decay or set()), lr=lr,
                                  betas=(0.9, 0.98), eps=1e-8)
    ema = None
    if settings.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
    scored = ema.module if ema is not None else model  # the weights that are evaluated and kept
    net = runtime.wrap_model(model)

    def run_eval() -> tuple[dict, float]:
        start = time.monotonic()
        metrics = evaluate(scored) if runtime.is_main else None
        return runtime.broadcast((metrics, time.monotonic() - start))

    def record(step: int, split: str, metrics: dict, lr_now: float) -> None:
        runtime.emit({"step": step, "split": split, "metrics": metrics, "lr": lr_now,
                      "elapsed": round(time.monotonic() - t0, 3)})

    initial, _ = run_eval()  # the first evaluation also pays one-off costs (allocations, lazy initialisation)
    record(0, "val", initial, 0.0)
    if deadline is not None:
        _, eval_s = run_eval()  # what an evaluation costs from now on: the step plan is made from it
    else:
        eval_s = 0.0
    total = settings.steps
    lr_cap = math.inf  # set when the plan is extended, so the learning rate never climbs back up

    def replan(step: int, step_s: float) -> int:
        """Steps that fit before the deadline at ``step_s`` seconds a step (the recent rate: load changes)."""
        if deadline is None:
            return total
        per_step = step_s + eval_s / settings.eval_every
        left = deadline - time.monotonic()
        planned = min(settings.steps, max(step + 1, floor, step + int(left / max(per_step, 1e-6))))
        return int(runtime.broadcast(planned))

    best, best_step, best_metrics, best_state, bad = math.inf, None, None, None, 0
    stop_reason, step, window_time, window_steps = "steps", 0, 0.0, 0
    acc: dict[str, float] = {}
    n_acc = 0
    pbar = tqdm(total=total, disable=not (runtime.progress_bar and runtime.is_main), desc="train", leave=False)
    while step < total:
        net.train()
        ts = time.monotonic()
        progress = step / total
        arrays, stats = sample(progress)
        inputs = _to_tensors(arrays, runtime.device)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(lr_cap, _lr_factor(step, total, settings))
        with runtime.autocast():
            out = net(**inputs)
        loss = out.loss.float()
        parts = {"task_loss": float(loss.detach())}
        if getattr(out, "masked_loss", None) is not None:
            parts["masked_loss"] = float(out.masked_loss.detach())
            if out.forecast_loss is not None:
                parts["forecast_loss"] = float(out.forecast_loss.detach())
        if extra_loss is not None:
            penalty = extra_loss()
            parts["l2sp"] = float(penalty.detach())
            loss = loss + penalty
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite training loss {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        window_time += time.monotonic() - ts
        window_steps += 1
        for k, v in {**parts, "loss": float(loss.detach()), "grad_norm": float(grad_norm), **stats}.items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        pbar.update(1)
        if step == settings.timing_steps:
            total = replan(step, window_time / window_steps)
            pbar.total = total
        late = deadline is not None and step >= floor and time.monotonic() + eval_s > deadline
        late = runtime.any_rank(late)
        if step % settings.eval_every == 0 or step >= total or late:
            lr_now = optimizer.param_groups[0]["lr"]
            record(step, "train", {k: v / n_acc for k, v in acc.items()}, lr_now)
            acc, n_acc = {}, 0
            metrics, eval_s = run_eval()
            record(step, "val", metrics, lr_now)
            value = metrics.get(metric, math.inf)  # absent when no validation target could be scored
            pbar.set_postfix({metric: f"{value:.4f}"})
            if value < best - settings.min_delta:
                best, best_step, best_metrics, bad = value, step, metrics, 0
                best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
            else:
                bad += 1
            if bad >= settings.patience and step >= floor:
                stop_reason = "early_stopping"
                break
            if step < total and window_steps >= settings.timing_steps:
                total = replan(step, window_time / window_steps)
                pbar.total = total
                window_time, window_steps = 0.0, 0
        if late:
            stop_reason = "time"
            break
        if step >= total and total < settings.steps and deadline is not None and window_steps:
            # an early plan made while the machine was busy can be too short: use the time left
            more = replan(step, window_time / window_steps)
            if more >= step + settings.eval_every:
                lr_cap = min(lr_cap, _lr_factor(step, total, settings))
                total = more
                pbar.total = total
    pbar.close()
    if stop_reason == "steps" and step < settings.steps:  # the time plan ended it, not --steps
        stop_reason = "time"
    if best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:
        model.load_state_dict(ema.module.state_dict())
    overrun = max(0.0, time.monotonic() - deadline) if deadline is not None else 0.0
    return _FitResult(step, best_step, best_metrics, initial, stop_reason, total, round(overrun, 1),
                      round(time.monotonic() - t_fit, 1))


# =============================================================================================
# Pretraining
# =============================================================================================


def _resolve_config(config: str | LabTrendConfig, n_analytes: int) -> LabTrendConfig:
    if isinstance(config, str):
        return config_preset(config, n_analytes=n_analytes)
    config = copy.deepcopy(config)
    config.n_analytes = n_analytes
    return config


def _shard(ids: Sequence[str], runtime: Runtime) -> list[str]:
    """The patients of this rank (DistributedSampler-equivalent: disjoint, every patient on one rank)."""
    shard = list(ids)[runtime.rank :: runtime.world_size]
    if not shard:
        raise ValueError(f"rank {runtime.rank} of {runtime.world_size} has no training patient (only {len(ids)})")
    return shard


def _fixed_subset(items: list, n: int, seed: int) -> list:
    if len(items) <= n:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def pretrain(corpus_history: pd.DataFrame, config: str | LabTrendConfig, steps: int | None = None, *,
             settings: TrainSettings | None = None, runtime: Runtime | None = None,
             validation_patients: Sequence[str] | None = None) -> tuple[LabTrendForPretraining, AnalyteVocab, AnalyteScaler]:
    """Pretrain on the corpus with masked value prediction and next-value forecasting.

    Args:
        corpus_history: history frame of the pretraining corpus (``model.corpus``).
        config: a preset name ('tiny', 'small', 'base') or a :class:`LabTrendConfig`;
            ``n_analytes`` is set from the fitted vocabulary.
        steps: overrides ``settings.steps``.
        validation_patients: the held-out corpus patients (e.g. ``model.corpus.split_by_source``,
            one split per source); default: :func:`split_patients` over the whole corpus.

    Returns the model (on ``runtime.device``, best validation checkpoint), the vocabulary
    fitted on the corpus and the scaler fitted on its training patients. ``model.training_report``
    holds the split (validation patient ids), metrics and stop reason.
    """
    settings = replace(settings or TrainSettings(), **({"steps": steps} if steps else {}))
    runtime = runtime or Runtime()
    t0 = time.monotonic()
    seed_everything(settings.seed)
    h = validate_history(corpus_history)
    if validation_patients is None:
        train_ids, val_ids = split_patients(h, settings.pretrain_val_fraction, settings.seed, 1,
                                            settings.pretrain_max_val_patients)
    else:
        ids = set(h["patient_id"].unique())
        val_ids = sorted(ids & {str(p) for p in validation_patients})
        train_ids = sorted(ids - set(val_ids))
        if not val_ids or not train_ids:
            raise ValueError(f"validation_patients leave {len(train_ids)} training and {len(val_ids)} validation "
                             "patients in the corpus; both must be at least 1")
    vocab = AnalyteVocab.fit(h)
    scaler, scaler_info = _fit_scaler(h[h["patient_id"].isin(train_ids)], h, vocab, None, "site")
    scaler_info.pop("pretrained_codes")
    config = _resolve_config(config, len(vocab))
    model = LabTrendForPretraining(config).to(runtime.device)
    if runtime.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    torch.manual_seed(settings.seed + runtime.rank)  # masking and dropout differ per rank

    builder = ExampleBuilder(h, vocab, scaler, max_events=config.max_events, max_queries=config.max_queries)
    ranges = builder.nmae_ranges()
    rng = np.random.default_rng(settings.seed + runtime.rank)
    _set_step_scales(model, builder, train_ids)
    shard = _shard(train_ids, runtime)
    train_groups = builder.groups_of(shard)
    fc_groups = train_groups[builder.target_counts(1)[train_groups] > 0]
    if settings.loss_weighting == "nmae":
        builder.set_loss_weights(fc_groups, builder.nmae_ranges(fc_groups))
    horizon, events = builder.group_stats(fc_groups)
    sampler = CurriculumSampler(fc_groups, horizon, events, fraction=settings.curriculum_fraction,
                                strength=settings.curriculum_strength)
    offsets_pool = builder.horizon_days[builder.targets] if len(builder.targets) else np.ones(1)
    n_masked = int(round(settings.masked_row_fraction * settings.batch_size))

    def sample(progress: float) -> tuple[dict, dict]:
        groups = sampler.sample(rng, settings.batch_size - n_masked, progress)
        rows = builder.sample_rows(groups, rng)
        if n_masked:
            mg = rng.choice(train_groups, n_masked)
            rows += builder.masked_rows(mg, rng.choice(offsets_pool, n_masked))
        h_, e_ = builder.group_stats(groups)
        return collate(rows), {"mean_horizon_days": float(h_.mean()), "mean_events": float(e_.mean()),
                               "curriculum_beta": sampler.beta(progress)}

    val_groups = builder.groups_of(val_ids)
    val_rows = _fixed_subset(builder.eval_rows(val_groups), settings.eval_rows, settings.seed)
    mask_rng = np.random.default_rng(settings.seed + 7)
    masked_val_groups = _fixed_subset(list(val_groups), settings.eval_rows, settings.seed + 1)
    masked_val_rows = builder.masked_rows(np.asarray(masked_val_groups, dtype=np.int64),
                                          np.ones(len(masked_val_groups)))
    value_masks = [mask_rng.random(len(r.event_analyte)) < max(config.mask_prob, 0.15) for r in masked_val_rows]
    no_masks = [np.zeros(len(r.event_analyte), dtype=bool) for r in val_rows]  # forecasting sees every value

    def evaluate(net: nn.Module) -> dict:
        q, idx, _, _ = _predict(net, val_rows, runtime, value_masks=no_masks)
        metrics = forecast_metrics(builder, idx, q, scaler, ranges=ranges) if len(idx) else {"n_targets": 0}
        _, _, m_sum, m_n = _predict(net, masked_val_rows, runtime, value_masks=value_masks)
        metrics["masked_pinball"] = m_sum / max(m_n, 1)
        metrics["loss"] = metrics["masked_pinball"] + config.pretrain_forecast_weight * metrics.get("pinball", 0.0)
        return metrics

    lr = PRETRAIN_LR if settings.lr is None else settings.lr
    result = _fit(model, sample=sample, evaluate=evaluate, metric="loss", lr=lr, settings=settings,
                  runtime=runtime, t0=t0)
    model.eval()
    # Intervals for the checkpoint itself (a zero-shot pipeline, and fine-tuning runs whose own
    # validation is too small to calibrate): split-conformal on the held-out corpus patients.
    model.calibration, calibration_info = None, {"skipped": "not the main process"}
    if runtime.is_main:
        cal_rows = _fixed_subset(builder.eval_rows(val_groups), settings.final_eval_rows, settings.seed)
        q, idx, _, _ = _predict(model, cal_rows, runtime, value_masks=[np.zeros(len(r.event_analyte), bool)
                                                                       for r in cal_rows])
        model.calibration, calibration_info = _conformal(builder, idx, q, scaler, settings.conformal_min_points,
                                                         settings.seed)
        if model.calibration is not None:
            model.calibration.meta = {"n_points": calibration_info["n_points"], "validation_patients": len(val_ids),
                                      "source": "pretraining validation patients (held-out corpus patients)"}
    model.training_report = {
        "stage": "pretrain",
        "config": config.to_dict(),
        "rows": int(len(h)), "patients_train": len(train_ids), "validation_patients": val_ids,
        "analytes": len(vocab.codes), "scaler": scaler_info,
        "steps": result.steps, "planned_steps": result.planned_steps, "best_step": result.best_step,
        "stop_reason": result.stop_reason, "val_initial": result.initial_metrics, "val": result.best_metrics,
        "fit_seconds": result.fit_seconds, "warnings": _training_warnings(result, settings),
        "undertrained": result.steps < settings.min_steps, "calibration": calibration_info,
        "lr": lr, "seconds": round(time.monotonic() - t0, 1), "settings": asdict(settings),
        "world_size": runtime.world_size,
    }
    for w in model.training_report["warnings"]:
        log.warning(w)
    return model, vocab, scaler


# =============================================================================================
# Fine-tuning
# =============================================================================================


def _drop_patients(h: pd.DataFrame, exclude: set[str]) -> pd.DataFrame:
    return h[~h["patient_id"].isin(exclude)] if exclude else h


def finetune(init_dir: str | os.PathLike | None, site_history: pd.DataFrame, mode: str = "full", *,
             settings: TrainSettings | None = None, runtime: Runtime | None = None,
             config: str | LabTrendConfig = "small", corpus_history: pd.DataFrame | None = None,
             exclude_patients: Sequence[str] | None = None) -> ForecastPipeline:
    """Fine-tune a pretrained checkpoint (or train from scratch) on a site's history.

    Args:
        init_dir: a pretraining checkpoint (:func:`save_pretraining_checkpoint`); read,
            never written. None only with ``mode='scratch'``.
        site_history: the site's cohort (``data.queries.cohort``), history contract.
        mode: 'full' (default), 'embeddings', 'lora' or 'scratch' (module docstring).
        config: architecture for 'scratch' without ``init_dir`` (preset name or config).
        corpus_history: the pretraining corpus, for replay and the forgetting measurement
            (both skipped when None).
        exclude_patients: ids never used in training or validation (e.g. a test set).

    Returns a calibrated :class:`ForecastPipeline` (model on ``runtime.device``, best
    validation checkpoint). ``pipeline.training_report`` holds the final validation
    metrics, calibration, forgetting, which parameters trained, and the patient lists.
    Ranks other than 0 return an uncalibrated pipeline and a report without final scoring.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if init_dir is None and mode != "scratch":
        raise ValueError(f"mode {mode!r} needs a pretrained checkpoint (init_dir); only 'scratch' trains without one")
    settings = settings or TrainSettings()
    runtime = runtime or Runtime()
    t0 = time.monotonic()
    seed_everything(settings.seed)
    exclude = {str(p) for p in (exclude_patients or [])}
    site = _drop_patients(validate_history(site_history), exclude)
    if site.empty:
        raise ValueError("the site history is empty (after excluding patients): nothing to fine-tune on")
    train_ids, val_ids = split_patients(site, settings.val_fraction, settings.seed, settings.min_val_patients)
    assert not (set(train_ids) | set(val_ids)) & exclude and not set(train_ids) & set(val_ids)
    site_train = site[site["patient_id"].isin(train_ids)]

    # --- model, vocabulary, scaler
    pre_scaler, pre_report, n_pretrained = None, {}, 0
    if mode == "scratch":
        vocab = AnalyteVocab.fit(site)
        model = LabTrendForForecasting(_resolve_config(config, len(vocab)))
        added = list(vocab.codes)
    else:
        model, pre_vocab, pre_scaler, pre_report = load_pretraining_checkpoint(init_dir)
        n_pretrained = len(pre_vocab)
        vocab, added = extend_vocabulary(pre_vocab, site["analyte_code"].unique())
        resize_analyte_embeddings(model, len(vocab))
    scaler, scaler_info = _fit_scaler(site_train, site, vocab, pre_scaler, settings.scaler_policy)
    model = model.to(runtime.device)
    config = model.config
    if runtime.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    use_l2sp = mode != "scratch" and settings.l2sp > 0
    l2sp_terms = _l2sp_terms(model, n_pretrained) if use_l2sp and mode != "lora" else []
    base_model = model
    model = configure_mode(model, mode, settings.lora_rank)
    l2sp_terms = [t for t in l2sp_terms if t[0].requires_grad]
    trainable = [n for n, p in base_model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in base_model.named_parameters() if not p.requires_grad]
    n_trainable = sum(p.numel() for p in base_model.parameters() if p.requires_grad)
    if mode == "full":
        assert not frozen, f"full fine-tuning must train every parameter; frozen: {frozen}"
    torch.manual_seed(settings.seed + runtime.rank)

    # --- examples
    builder = ExampleBuilder(site, vocab, scaler, max_events=config.max_events, max_queries=config.max_queries)
    ranges = builder.nmae_ranges()
    rng = np.random.default_rng(settings.seed + runtime.rank)
    train_groups = builder.groups_of(_shard(train_ids, runtime))
    train_groups = train_groups[builder.target_counts(1)[train_groups] > 0]
    if settings.loss_weighting == "nmae":
        builder.set_loss_weights(train_groups, builder.nmae_ranges(train_groups))
    horizon, events = builder.group_stats(train_groups)
    sampler = CurriculumSampler(train_groups, horizon, events, fraction=settings.curriculum_fraction,
                                strength=settings.curriculum_strength)
    # analytes that keep the checkpoint's normalisation keep its step scales: the pretrained head's
    # units stay what they were, so fine-tuning starts from the checkpoint's own forecasts
    step = _set_step_scales(base_model, builder, train_ids, keep=scaler_info.pop("pretrained_codes"))
    val_groups = builder.groups_of(val_ids)
    all_val_rows = _fixed_subset(builder.eval_rows(val_groups), settings.final_eval_rows, settings.seed)
    val_rows = _fixed_subset(all_val_rows, settings.eval_rows, settings.seed)
    if not val_rows:
        raise ValueError(f"the {len(val_ids)} validation patients have no target with {MIN_HISTORY} prior results")

    # --- pretraining corpus: replay and forgetting
    replay, corpus_val, corpus_val_ref, corpus_rows = None, None, None, []
    corpus = None
    if corpus_history is not None and mode != "scratch":
        corpus = _drop_patients(validate_history(corpus_history), exclude)
        corpus = corpus[corpus["analyte_code"].isin(set(pre_vocab.codes))]
        if corpus["patient_id"].nunique() < 2:
            corpus = None
    if corpus is not None:
        # The patients pretraining held out; for a checkpoint without that record (or another corpus),
        # hold out corpus patients the same way pretraining does.
        corpus_val_ids = set(pre_report.get("validation_patients") or []) & set(corpus["patient_id"].unique())
        if not corpus_val_ids:
            corpus_val_ids = set(split_patients(corpus, settings.pretrain_val_fraction, settings.seed, 1,
                                                settings.pretrain_max_val_patients)[1])
        is_val = corpus["patient_id"].isin(corpus_val_ids)
        corpus_val_ref = ExampleBuilder(corpus[is_val], pre_vocab, pre_scaler, max_events=config.max_events,
                                        max_queries=config.max_queries)
        corpus_val = ExampleBuilder(corpus[is_val], vocab, scaler, max_events=config.max_events,
                                    max_queries=config.max_queries)
        groups = np.arange(len(corpus_val.g_start))
        corpus_rows = _fixed_subset(corpus_val.eval_rows(groups), settings.forgetting_rows, settings.seed)
        if settings.replay > 0:
            rb = ExampleBuilder(corpus[~is_val], vocab, scaler, max_events=config.max_events,
                                max_queries=config.max_queries)
            rg = rb.groups_of(_shard(rb.patient_ids, runtime))
            rg = rg[rb.target_counts(1)[rg] > 0]
            if len(rg) and settings.loss_weighting == "nmae":
                rb.set_loss_weights(rg, rb.nmae_ranges(rg))
            if len(rg):
                replay = (rb, rg)
    n_replay = int(round(settings.replay * settings.batch_size)) if replay is not None else 0

    def sample(progress: float) -> tuple[dict, dict]:
        groups = sampler.sample(rng, settings.batch_size - n_replay, progress)
        rows = builder.sample_rows(groups, rng)
        if n_replay:
            rows += replay[0].sample_rows(rng.choice(replay[1], n_replay), rng)
        h_, e_ = builder.group_stats(groups)
        return collate(rows), {"mean_horizon_days": float(h_.mean()), "mean_events": float(e_.mean()),
                               "curriculum_beta": sampler.beta(progress), "replay_rows": float(n_replay)}

    def evaluate(net: nn.Module) -> dict:
        q, idx, _, _ = _predict(net, val_rows, runtime)
        return forecast_metrics(builder, idx, q, scaler, ranges=ranges)

    def forgetting(net: nn.Module, view: ExampleBuilder, view_scaler: AnalyteScaler) -> dict:
        rows = [view._row(int(view.row_group[r.query_index[0]]), r.query_index) for r in corpus_rows]
        q, idx, _, _ = _predict(net, rows, runtime)
        return forecast_metrics(view, idx, q, view_scaler, metric_scaler=pre_scaler,
                                ranges=corpus_val_ref.nmae_ranges())

    before = None
    if corpus_rows and runtime.is_main:
        before = forgetting(model, corpus_val_ref, pre_scaler)
        runtime.emit({"step": 0, "split": "pretrain_val", "metrics": before, "lr": 0.0,
                      "elapsed": round(time.monotonic() - t0, 3)})

    lr = MODE_LR[mode] if settings.lr is None else settings.lr
    result = _fit(
        model, sample=sample, evaluate=evaluate, metric="pinball", lr=lr, settings=settings, runtime=runtime,
        t0=t0,
        extra_loss=(lambda: settings.l2sp * _l2sp_penalty(l2sp_terms)) if l2sp_terms else None,
        no_decay={id(t[0]) for t in l2sp_terms},
    )
    if mode == "lora":
        model = model.merge_and_unload()
    model.eval()

    report = {
        "stage": "finetune", "mode": mode, "lr": lr,
        "steps": result.steps, "planned_steps": result.planned_steps, "best_step": result.best_step,
        "stop_reason": result.stop_reason, "val_initial": result.initial_metrics, "val_best_eval": result.best_metrics,
        "fit_seconds": result.fit_seconds, "warnings": _training_warnings(result, settings),
        "undertrained": result.steps < settings.min_steps,
        "vocabulary": {"pretrained": max(n_pretrained - N_SPECIAL, 0), "added": added, "total": len(vocab.codes)},
        "scaler": scaler_info,
        "step_scale": {str(vocab.codes[i - N_SPECIAL]): round(float(step[i]), 4)
                       for i in np.unique(builder.aid[builder.targets]) if i >= N_SPECIAL},
        "trainable_parameters": trainable, "frozen_parameters": frozen,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_trainable": n_trainable,
        "l2sp": settings.l2sp if l2sp_terms else 0.0, "replay": settings.replay if n_replay else 0.0,
        "patients": {"train": train_ids, "validation": val_ids, "excluded": len(exclude)},
        "examples": {"train_rows": int(len(train_groups)), "val_rows": len(all_val_rows),
                     "val_rows_per_eval": len(val_rows), "dropped_unknown_analyte": builder.n_unknown_dropped},
        "settings": asdict(settings), "world_size": runtime.world_size,
    }
    conformal = None
    if runtime.is_main:
        q, idx, _, _ = _predict(model, all_val_rows, runtime)
        report["val"] = forecast_metrics(builder, idx, q, scaler, ranges=ranges)
        conformal, report["calibration"] = _conformal(builder, idx, q, scaler, settings.conformal_min_points,
                                                      settings.seed)
        runtime.emit({"step": result.steps, "split": "val_final", "metrics": report["val"], "lr": 0.0,
                      "elapsed": round(time.monotonic() - t0, 3)})
        if before is None:
            report["forgetting"] = {"skipped": "no pretraining corpus rows to score (corpus not given, scratch, "
                                               "or no held-out corpus target with enough history)"}
        else:
            after = forgetting(model, corpus_val, scaler)
            runtime.emit({"step": result.steps, "split": "pretrain_val", "metrics": after, "lr": 0.0,
                          "elapsed": round(time.monotonic() - t0, 3)})
            report["forgetting"] = {
                "before": before, "after": after, "units": "pretrained scaler's normalised units",
                "pinball_increase": after["pinball"] - before["pinball"],
                "relative_increase": (after["pinball"] - before["pinball"]) / before["pinball"],
            }
        if conformal is not None:
            conformal.meta = {"n_points": report["calibration"]["n_points"], "validation_patients": len(val_ids),
                              "base_model_version": ForecastPipeline(model, vocab, scaler).model_version}
        elif init_dir is not None and (inherited := load_checkpoint_calibration(init_dir)) is not None:
            # too few validation points to certify intervals: the checkpoint's own calibration, on its held-out
            # corpus patients, is the best evidence there is (in the pretrained scaler's units: exact for the
            # analytes that keep them, approximate for refitted ones)
            conformal = inherited
            conformal.meta = {**conformal.meta, "inherited_from": "pretrained checkpoint (pretraining validation set)"}
            report["calibration"]["fallback"] = "pretrained checkpoint's calibration (pretraining validation set)"
            report["warnings"].append(
                f"too few validation points to calibrate intervals on this site ({report['calibration']['skipped']}); "
                "the intervals use the pretrained checkpoint's calibration on its held-out corpus patients")
        initial, final = result.initial_metrics.get("pinball"), report["val"].get("pinball")
        report["worse_than_initial"] = bool(initial is not None and final is not None and final > initial)
        if report["worse_than_initial"]:
            report["warnings"].append(f"the fine-tuned model's validation pinball loss ({final:.4f}) is worse than "
                                      f"the checkpoint it started from ({initial:.4f})")
    for w in report["warnings"]:
        log.warning(w)
    report["seconds"] = round(time.monotonic() - t0, 1)
    pipeline = ForecastPipeline(model, vocab, scaler, conformal)
    pipeline.training_report = report
    return pipeline
