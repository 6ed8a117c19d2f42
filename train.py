"""Train LabTrend's forecaster: pretrain on the open lab corpus, then fully fine-tune on the site.

    python train.py                                   # fine-tune var/model (pretrains var/pretrained once if missing)
    python train.py --stage pretrain --config small   # (re)build the cached pretrained checkpoint
    python train.py --stage pretrain --exclude-source cdisc --init var/pre-no-cdisc   # leave one source out
    python train.py --stage pretrain --sources today --exclude-source synthetic     # without the synthetic cohort
    python train.py --mode embeddings --out var/model-emb --exclude-patients test_ids.txt
    torchrun --standalone --nproc_per_node=2 train.py --config tiny --steps 50
    accelerate launch --multi_gpu --num_processes 2 train.py ...   # same env as torchrun
    labtrend train ...                                # the same flags

DDP is detected from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``, as set by torchrun and by
``accelerate launch`` (``--cpu`` gives one process: accelerate runs several CPU processes only
through MPI, whose variables this script does not read).

This script owns what touches the outside world (nanoGPT's split): device, dtype and seeds,
DDP, reading the store and the corpus, checkpoints and logs. The training logic is in
``model/training.py``. It sees frames, plus the one checkpoint directory it fine-tunes from.

Outputs (written by rank 0 into ``<dir>.partial``, then swapped in whole, so a reader never
loads half a model; a failed run leaves its ``.partial`` folder with the logs). Rank 0 holds
``<dir>.lock`` for the whole run, so a second run into the same folder stops at once (exit 2)
instead of overwriting the first one's files; a run killed mid-way (kill -9, power loss) leaves
its ``.partial`` folder behind, and the next run into that folder removes it and says so
(:func:`claim_output`). A fine-tuning run is audited in the store it read (``train``, as the
operating-system account, :mod:`data.audit`).

* pretrain -> ``--init`` (default ``$LABTREND_PRETRAINED`` or ``var/pretrained``; fine-tuning
  starts from that cache when it exists, else from the checkpoint shipped in
  ``model/checkpoints/pretrained-small``):
  ``config.json``, ``model.safetensors``, ``vocab.json``, ``scaler.json``,
  ``pretraining.json`` (held-out corpus patients, chosen within each source; per-source counts of
  patients, values, analytes, kept and dropped values in ``corpus_summary``; metrics) and
  ``metrics.jsonl``.
* finetune -> ``--out`` (default ``$LABTREND_MODEL`` or ``var/model``): the ForecastPipeline
  (``config.json``, ``model.safetensors``, ``vocab.json``, ``scaler.json``,
  ``calibration.json``, ``model_version``), plus ``metrics.jsonl`` (one JSON line per eval:
  step, split, metrics, lr, elapsed), ``run.json`` (settings, device, wall time, final
  metrics, forgetting, trained parameters) and ``patients.json`` (training and validation
  ids, and the count and hash of the excluded ones).

Exit status: 0 success, 2 an input that cannot be used (the message names it), 1 anything else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from data import settings as paths

EXIT_BAD_INPUT = 2
# Optimisation budget per stage on CPU when --max-minutes is not given (data loading and the
# final scoring come on top: about a minute for the MIMIC-IV demo on 2 quiet cores, so a
# fine-tuning run takes about 5 minutes).
CPU_MINUTES = {"pretrain": 5.0, "finetune": 3.5}
# Open datasets of the corpus that the shipped checkpoint was pretrained on; fine-tuning replays
# from the sources its checkpoint records, and from these for a checkpoint that records none.
CORPUS_SOURCES = "physionet2012,eicu,nhanes"


class UsageError(Exception):
    """An input that cannot be used; reported with exit status 2."""


# =============================================================================================
# Settings: every flag with its default and why
# =============================================================================================


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)'; a None default is explained in the flag's own help instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """All settings of a training run. ``labtrend train`` uses this same list."""
    p.formatter_class = HelpFormatter  # every default shows in --help
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", choices=["pretrain", "finetune", "all"], default="finetune",
                   help="finetune: the site model (pretrains once if the cache is missing); all: pretrain again first")
    g.add_argument("--mode", choices=["full", "embeddings", "lora", "scratch"], default="full",
                   help="full fine-tuning is the product's design; the others are for comparison")
    g.add_argument("--config", choices=["tiny", "small", "base"], default=None,
                   help="network size for pretrain/scratch (default small: trains in minutes on 2 CPU cores); "
                        "fine-tuning takes the checkpoint's size")
    g.add_argument("--db", help="the site's lab store (default: $LABTREND_DB, else var/labtrend.duckdb)")
    g.add_argument("--out", help="output directory (finetune default: $LABTREND_MODEL or var/model; "
                                 "pretrain default: the --init location)")
    g.add_argument("--init", help="pretrained checkpoint (default: $LABTREND_PRETRAINED; else var/pretrained when "
                                  "--stage pretrain built it there; else the shipped "
                                  "model/checkpoints/pretrained-small; pretraining writes var/pretrained)")
    g.add_argument("--exclude-patients", metavar="FILE",
                   help="patient ids (one per line) never used in training or validation, e.g. a test set")

    g = p.add_argument_group("hardware and budget")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when available (under DDP: cuda:LOCAL_RANK)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help=f"optimisation budget per stage: steps and their evaluations, not data loading or the final "
                        f"scoring (default on CPU: {CPU_MINUTES}; on CUDA none); the best checkpoint is kept")
    g.add_argument("--min-steps", type=int, default=200,
                   help="the budget and early stopping never end a run before this many steps (a busy machine "
                        "overruns the budget, and says so); a run with fewer --steps is marked UNDERTRAINED")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward to save memory (default: on for CUDA, off on CPU)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000, help="most optimizer steps; on CPU the budget ends runs first")
    g.add_argument("--batch-size", type=int, default=32, help="rows per step per process (a row: one patient-time)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 3e-4 full, 1e-3 embeddings/lora/scratch/pretrain)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay on weight matrices")
    g.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up (at most 10%% of the run), then cosine")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at this fraction of the peak lr")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an exponential moving average of the weights (evaluated and saved); 0 disables")
    g.add_argument("--loss-weighting", choices=["none", "nmae"], default="none",
                   help="nmae: weigh each target so the pinball loss is in units of its analyte's range (the metric)")
    g.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch (sampler of rank r: seed + r)")

    g = p.add_argument_group("validation and stopping")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="patients held out (stratified by result count) for validation and conformal calibration")
    g.add_argument("--min-val-patients", type=int, default=2, help="at least this many validation patients")
    g.add_argument("--eval-every", type=int, default=25, help="steps between validation evals")
    g.add_argument("--eval-rows", type=int, default=256, help="validation rows per eval (fixed subset)")
    g.add_argument("--final-eval-rows", type=int, default=20000, help="cap on rows of the final scoring/calibration")
    g.add_argument("--patience", type=int, default=6, help="evals without val pinball improvement before stopping")
    g.add_argument("--min-delta", type=float, default=1e-4, help="smallest val pinball decrease that counts")
    g.add_argument("--timing-steps", type=int, default=10, help="steps timed before fitting the schedule to the budget")
    g.add_argument("--conformal-min-points", type=int, default=50,
                   help="analytes with fewer calibration points use the pooled conformal adjustment")

    g = p.add_argument_group("curriculum")
    g.add_argument("--curriculum-fraction", type=float, default=0.3,
                   help="fraction of the run over which short-horizon/dense-history-first sampling anneals to uniform")
    g.add_argument("--curriculum-strength", type=float, default=3.0,
                   help="initial beta: the hardest rows are drawn exp(-beta) times as often as the easiest")

    g = p.add_argument_group("fine-tuning")
    g.add_argument("--l2sp", type=float, default=1e-3,
                   help="L2-SP alpha: pull the backbone toward the pretrained weights (0 disables)")
    g.add_argument("--replay", type=float, default=0.125,
                   help="fraction of each batch replayed from the pretraining corpus (0 disables)")
    g.add_argument("--scaler-policy", choices=["site", "pretrained"], default="site",
                   help="site: refit site analytes' normalisation on site training patients")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (mode lora)")
    g.add_argument("--forgetting-rows", type=int, default=256,
                   help="held-out corpus rows scored before and after fine-tuning (forgetting)")

    g = p.add_argument_group("pretraining corpus")
    g.add_argument("--sources", "--corpus-sources", dest="corpus_sources", default=None, metavar="LIST",
                   help="corpus sources, comma-separated: physionet2012, eicu, nhanes, synthetic, physionet2019, "
                        "physionet2012c, mimic3, cdisc; or all, today (the first four), none (synthetic only). "
                        "Default: all for pretraining; for fine-tuning replay, the sources the checkpoint was "
                        f"pretrained on ({CORPUS_SOURCES} when it records none). Missing datasets are skipped")
    g.add_argument("--exclude-source", action="append", default=None, metavar="SOURCE",
                   help="leave a source out (repeatable or comma-separated), e.g. for leave-one-source-out runs; "
                        "'synthetic' pretrains without the synthetic cohort")
    g.add_argument("--synthetic-patients", type=int, default=1000,
                   help="synthetic patients added to the corpus (0: none, as --exclude-source synthetic)")
    g.add_argument("--corpus-max-rows", type=int, default=None,
                   help="keep whole patients up to this many rows (default: all)")
    g.add_argument("--masked-row-fraction", type=float, default=0.25,
                   help="fraction of a pretraining batch that is masked-value-only rows (single-visit data)")
    g.add_argument("--pretrain-val-fraction", type=float, default=0.05,
                   help="corpus patients held out for validation, chosen within each source")
    g.add_argument("--pretrain-max-val-patients", type=int, default=1000,
                   help="cap on held-out corpus patients per source")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def train_settings(args: argparse.Namespace, max_minutes: float | None):
    """The :class:`model.training.TrainSettings` of ``args``."""
    from model.training import TrainSettings

    return TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, loss_weighting=args.loss_weighting,
        eval_every=args.eval_every, eval_rows=args.eval_rows, final_eval_rows=args.final_eval_rows,
        patience=args.patience, min_delta=args.min_delta, max_minutes=max_minutes, timing_steps=args.timing_steps,
        min_steps=args.min_steps,
        val_fraction=args.val_fraction, min_val_patients=args.min_val_patients,
        curriculum_fraction=args.curriculum_fraction, curriculum_strength=args.curriculum_strength,
        scaler_policy=args.scaler_policy, l2sp=args.l2sp, replay=args.replay, lora_rank=args.lora_rank,
        conformal_min_points=args.conformal_min_points, forgetting_rows=args.forgetting_rows,
        masked_row_fraction=args.masked_row_fraction, pretrain_val_fraction=args.pretrain_val_fraction,
        pretrain_max_val_patients=args.pretrain_max_val_patients, seed=args.seed,
    )


# =============================================================================================
# Device, seeds, DDP
# =============================================================================================


def setup_runtime(args: argparse.Namespace):
    """Device, precision and (under torchrun / accelerate launch) the process group and DDP hooks."""
    import torch
    import torch.distributed as dist

    from model.inference import resolve_device
    from model.training import Runtime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    checkpointing = device.type == "cuda" if args.gradient_checkpointing is None else args.gradient_checkpointing
    runtime = Runtime(
        device=device, bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=checkpointing, rank=rank, world_size=world, progress_bar=args.progress,
    )
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # share the cores instead of oversubscribing them
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        from torch.nn.parallel import DistributedDataParallel

        def wrap_model(model):
            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        def broadcast(obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        def any_rank(flag: bool) -> bool:
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)

        runtime.wrap_model, runtime.broadcast, runtime.any_rank = wrap_model, broadcast, any_rank
    return runtime


def _barrier(runtime) -> None:
    if runtime.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# =============================================================================================
# Inputs
# =============================================================================================


def read_patient_ids(path: str | None) -> list[str]:
    """Ids in ``path``, one per line, as the store keeps them (``data.identifiers.patient_key``);
    blank lines and '#' comments are skipped."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--exclude-patients {p}: file not found")
    from data.identifiers import patient_key

    # the same rule as the store's ids: an invisible character copied along does not let a patient through
    ids = [patient_key(line.split("#", 1)[0]) for line in p.read_text(encoding="utf-8-sig").splitlines()]
    return sorted({i for i in ids if i})


def load_site(args: argparse.Namespace, exclude: list[str], runtime):
    """The site's cohort without the excluded patients; ranks read in turn (DuckDB has one writer)."""
    from data.db import open_store
    from data.queries import cohort

    db = paths.db_path(args.db)
    if not db.is_file():
        raise UsageError(f"no lab store at {db}; import data first (labtrend import PATH --db {db})")
    frame = None
    for r in range(runtime.world_size):
        if r == runtime.rank:
            frame = cohort(open_store(db), exclude_patients=exclude or None)
        _barrier(runtime)
    if frame.empty:
        raise UsageError(f"the store {db} has no numeric results to train on (after excluding {len(exclude)} patients)")
    return frame


def corpus_selection(args: argparse.Namespace, stage: str, init: Path | None = None) -> tuple[tuple[str, ...], int]:
    """(open sources, synthetic patients) of the corpus a stage reads; see ``--sources``.

    Without ``--sources``, pretraining reads every source and fine-tuning replays from the sources
    recorded in ``init``'s ``pretraining.json`` (:data:`CORPUS_SOURCES` when it records none).
    """
    from model.corpus import resolve_sources

    selection, synthetic = args.corpus_sources, args.synthetic_patients
    if selection is None and stage == "finetune":
        recorded = {}
        if init is not None and (Path(init) / "pretraining.json").is_file():
            recorded = json.loads((Path(init) / "pretraining.json").read_text()).get("args", {})
        selection = recorded.get("corpus_sources") or CORPUS_SOURCES
        if "exclude_source" in recorded:  # a record that lists 'synthetic' when it was used
            synthetic = recorded.get("synthetic_patients", synthetic) if "synthetic" in selection.split(",") else 0
        elif "synthetic_patients" in recorded:
            synthetic = recorded["synthetic_patients"]
    exclude = [x.strip() for item in (args.exclude_source or []) for x in item.split(",") if x.strip()]
    try:
        keys = resolve_sources(selection or "all", exclude)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if "synthetic" in exclude:
        synthetic = 0
    return tuple(k for k in keys if k != "synthetic"), max(int(synthetic), 0)


def load_corpus(args: argparse.Namespace, stage: str = "pretrain", init: Path | None = None):
    from model.corpus import load_pretraining_corpus

    sources, synthetic = corpus_selection(args, stage, init)
    corpus = load_pretraining_corpus(max_rows=args.corpus_max_rows, include_synthetic_patients=synthetic,
                                     seed=args.seed, sources=sources)
    if corpus.empty:
        raise UsageError("the pretraining corpus is empty: no dataset found and no synthetic patients")
    return corpus


def checkpoint_size(path: Path) -> dict:
    """The architecture fields of a checkpoint's config.json (to compare with a preset)."""
    config = json.loads((path / "config.json").read_text())
    return {k: config.get(k) for k in _architecture_keys()}


# =============================================================================================
# Outputs (rank 0 only)
# =============================================================================================


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple, Path)):
        return list(o) if not isinstance(o, Path) else str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")


def staging_dir(final: Path) -> Path:
    """``<final>.partial``, empty."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _last_written(folder: Path) -> str:
    times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()] or [folder.stat().st_mtime]
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(times)))


def claim_output(final: Path):
    """Lock ``<final>.lock`` for this run and clear what an interrupted run into ``final`` left.

    * ``<final>.partial``: the folder of a run killed before it finished; removed.
    * ``<final>.old``: a run killed while swapping its result in. With ``final`` present the swap
      was done and the old folder is removed; with ``final`` missing, the old model is put back.

    Each is reported on stderr. Returns the held ``filelock.FileLock`` (release it when the run ends;
    the kernel releases it when the process dies, however it dies). Raises :class:`UsageError` when
    another run holds the lock.
    """
    from filelock import FileLock, Timeout

    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.with_name(final.name + ".lock")), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(f"another training run is writing {final} (it holds {lock.lock_file}); "
                         "wait for it to finish or choose another --out") from None
    partial, old = final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old)
            print(f"train.py: removed {old}, the previous model kept by an interrupted run after its new one "
                  f"was in place", file=sys.stderr, flush=True)
        else:
            old.rename(final)
            print(f"train.py: put back {final} from {old}: a run was interrupted while replacing it",
                  file=sys.stderr, flush=True)
    if partial.is_dir():
        when = _last_written(partial)
        shutil.rmtree(partial)
        print(f"train.py: removed {partial}, left by an interrupted run (last written {when})",
              file=sys.stderr, flush=True)
    return lock


def publish(partial: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``partial`` directory."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(final)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as written."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record, default=_json_default) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _args_record(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


# =============================================================================================
# Stages
# =============================================================================================


def budget_minutes(args: argparse.Namespace, stage: str, runtime) -> float | None:
    if args.max_minutes is not None:
        return args.max_minutes
    return CPU_MINUTES[stage] if runtime.device.type == "cpu" else None


def warn_loudly(stage: str, report: dict, runtime) -> list[str]:
    """Print the run's warnings (undertrained, budget overrun, worse than its start) to stderr; return them."""
    warnings = list(report.get("warnings") or [])
    if runtime.is_main:
        for w in warnings:
            print(f"train.py: WARNING ({stage}): {w}", file=sys.stderr, flush=True)
    return warnings


def run_pretrain(args: argparse.Namespace, out: Path, runtime) -> dict:
    from model.training import pretrain, save_pretraining_checkpoint

    started = time.monotonic()
    budget = budget_minutes(args, "pretrain", runtime)
    from model.corpus import corpus_summary, split_by_source

    corpus = load_corpus(args, "pretrain")
    corpus_report = corpus.attrs.get("report", {})
    loaded_s = round(time.monotonic() - started, 1)
    # validation patients chosen within each source (same ones whatever else is in the corpus)
    _, val_ids, split = split_by_source(corpus, args.pretrain_val_fraction, args.seed, args.pretrain_max_val_patients)
    summary = corpus_summary(corpus, corpus_report, split)
    partial = staging_dir(out) if runtime.is_main else None
    metrics = MetricsLog(partial / "metrics.jsonl") if runtime.is_main else None
    runtime.log = metrics
    try:
        model, vocab, scaler = pretrain(corpus, args.config or "small",
                                        settings=train_settings(args, budget), runtime=runtime,
                                        validation_patients=val_ids)
    finally:
        runtime.log = None
        if metrics is not None:
            metrics.close()
    report = dict(model.training_report, corpus=corpus_report, corpus_summary=summary, corpus_load_seconds=loaded_s,
                  wall_seconds=round(time.monotonic() - started, 1), device=str(runtime.device),
                  args=dict(_args_record(args), corpus_sources=",".join(summary["sources"]),
                            exclude_source=",".join(args.exclude_source or [])))
    if runtime.is_main:
        save_pretraining_checkpoint(partial, model, vocab, scaler, report)
        publish(partial, out)
    _barrier(runtime)
    return {"stage": "pretrain", "out": str(out), "wall_seconds": report["wall_seconds"], "steps": report["steps"],
            "stop_reason": report["stop_reason"], "val": report["val"], "rows": report["rows"],
            "warnings": warn_loudly("pretrain", report, runtime)}


def run_finetune(args: argparse.Namespace, init: Path, out: Path, runtime, from_scratch: str | None = None) -> dict:
    """Fine-tune ``init`` on the site (``--mode``); with ``from_scratch`` (why) train the ``--config`` size
    from random initialisation instead, every parameter, and say so in the warnings."""
    from model.training import finetune

    started = time.monotonic()
    budget = budget_minutes(args, "finetune", runtime)
    exclude = read_patient_ids(args.exclude_patients)
    site = load_site(args, exclude, runtime)
    mode = "scratch" if from_scratch else args.mode
    corpus = load_corpus(args, "finetune", init) if mode != "scratch" else None
    partial = staging_dir(out) if runtime.is_main else None
    metrics = MetricsLog(partial / "metrics.jsonl") if runtime.is_main else None
    runtime.log = metrics
    try:
        pipeline = finetune(
            None if mode == "scratch" else init, site, mode,
            settings=train_settings(args, budget), runtime=runtime,
            config=args.config or "small", corpus_history=corpus, exclude_patients=exclude,
        )
    finally:
        runtime.log = None
        if metrics is not None:
            metrics.close()
    report = dict(pipeline.training_report)
    if from_scratch:
        report["warnings"] = [from_scratch, *report.get("warnings", [])]
    patients = report.pop("patients")
    wall = round(time.monotonic() - started, 1)
    warnings = warn_loudly("finetune", report, runtime)
    if runtime.is_main:
        pipeline.save_pretrained(partial)
        dump_json(partial / "patients.json", {
            "train": patients["train"], "validation": patients["validation"], "excluded_count": len(exclude),
            "excluded_sha256": hashlib.sha256("\n".join(exclude).encode()).hexdigest() if exclude else None,
        })
        dump_json(partial / "run.json", {
            "stage": "finetune", "mode": mode, "init": None if mode == "scratch" else str(init),
            "model_version": pipeline.model_version, "device": str(runtime.device),
            "world_size": runtime.world_size, "wall_seconds": wall, "warnings": warnings,
            "undertrained": bool(report.get("undertrained")), "args": _args_record(args), "report": report,
        })
        publish(partial, out)
    _barrier(runtime)
    cal = report.get("calibration", {})
    return {"stage": "finetune", "mode": mode, "out": str(out), "model_version": pipeline.model_version,
            "wall_seconds": wall, "steps": report["steps"], "best_step": report["best_step"],
            "stop_reason": report["stop_reason"], "val": report.get("val"), "warnings": warnings,
            "undertrained": bool(report.get("undertrained")),
            "coverage80_conformal_crossfit": cal.get("crossfit_coverage", {}).get("0.8"),
            "forgetting": {k: v for k, v in report.get("forgetting", {}).items() if k not in ("before", "after")}}


def _outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(init, out)``: the checkpoint fine-tuning starts from (and pretraining writes), and the output folder."""
    # pretraining (--stage pretrain|all) writes the local cache, never the shipped checkpoint
    init = Path(args.init) if args.init else (
        paths.pretrained_cache_dir() if args.stage in ("pretrain", "all") else paths.pretrained_dir())
    out_default = init if args.stage == "pretrain" else paths.model_dir()
    return init, (Path(args.out) if args.out else out_default)


def run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    init, out = _outputs(args)
    with ExitStack() as claims:
        if int(os.environ.get("RANK", "0")) == 0:  # before DDP starts: a refusal ends every rank at once
            writes = [out]
            if args.stage in ("pretrain", "all") or (args.mode != "scratch" and not paths.is_checkpoint(init)):
                writes.append(init)
            for folder in dict.fromkeys(p.resolve() for p in writes):
                claims.callback(claim_output(folder).release)
        return _run(args, init, out)


def _run(args: argparse.Namespace, init: Path, out: Path) -> int:
    from model.training import seed_everything

    runtime = setup_runtime(args)
    seed_everything(args.seed)
    summaries = []
    args.train_summaries = summaries  # for the audit row (main)
    try:
        if args.stage != "pretrain" and args.mode != "scratch" and out.resolve() == init.resolve():
            raise UsageError(f"--out {out} is the pretrained checkpoint; fine-tuning never writes into --init")
        if args.stage == "pretrain":
            summaries.append(run_pretrain(args, out, runtime))
        else:
            needs_init = args.mode != "scratch"
            if needs_init and (args.stage == "all" or not paths.is_checkpoint(init)):
                if args.stage == "finetune" and args.init:
                    raise UsageError(f"--init {init}: not a pretraining checkpoint (run --stage pretrain --init {init})")
                if runtime.is_main and args.stage == "finetune":
                    print(f"train.py: no pretrained checkpoint at {init}; building it once", file=sys.stderr)
                summaries.append(run_pretrain(args, init, runtime))
            from_scratch = None
            if needs_init and args.config and checkpoint_size(init) != _preset_size(args.config):
                if args.init:  # an explicit checkpoint of another size: the two flags contradict each other
                    raise UsageError(f"--config {args.config} differs from the checkpoint --init {init}; leave out "
                                     f"--config to fine-tune that checkpoint's size, or pretrain this size first "
                                     f"(--stage pretrain --config {args.config} --init DIR)")
                from_scratch = (
                    f"no pretrained checkpoint of size '{args.config}' (the one at {init} is another size): this "
                    f"model was trained FROM SCRATCH on the site's data alone (every parameter trains, but nothing "
                    f"is pretrained: no corpus knowledge, no replay or L2-SP). For a pretrained start, pretrain "
                    f"that size first (--stage pretrain --config {args.config} --init DIR) and pass --init DIR")
            summaries.append(run_finetune(args, init, out, runtime, from_scratch=from_scratch))
    finally:
        if runtime.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if runtime.is_main:
        for s in summaries:
            print(json.dumps(s, default=_json_default), flush=True)
    return 0


def _architecture_keys() -> list[str]:
    from model.configuration import PRESETS, LabTrendConfig

    return [k for k in PRESETS["small"] if k not in LabTrendConfig.editable_fields() and k != "dropout"]


def _preset_size(name: str) -> dict:
    from model.configuration import PRESETS

    return {k: PRESETS[name][k] for k in _architecture_keys()}


def main(argv: Sequence[str] | None = None, *, namespace: argparse.Namespace | None = None) -> int:
    """Run ``train.py`` with ``argv`` (or an already parsed ``namespace``, as ``labtrend train`` does)."""
    args = namespace if namespace is not None else build_parser().parse_args(argv)
    status: int | str = "error"
    try:
        status = run(args)
        return status
    except UsageError as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        status = EXIT_BAD_INPUT
        return status
    finally:
        _audit(args, status)


def _audit(args: argparse.Namespace, status) -> None:
    """The ``train`` audit row, in the store a fine-tuning run read (rank 0; none for pretraining alone, which
    reads only the open corpus, or when the store does not exist)."""
    from data import audit
    from data.db import StoreBusyError, open_store

    db = paths.db_path(args.db)
    if args.stage == "pretrain" or int(os.environ.get("RANK", "0")) != 0 or not Path(db).is_file():
        return
    init, out = _outputs(args)
    user, who = audit.cli_actor()
    summary = next((s for s in getattr(args, "train_summaries", []) if s.get("stage") == "finetune"), {})
    detail = {"command": "train", "stage": args.stage, "mode": args.mode, "out": str(out),
              "init": None if args.mode == "scratch" else str(init), "exclude_patients": args.exclude_patients,
              "exit_status": status, "model_version": summary.get("model_version"),
              "steps": summary.get("steps"), **who}
    try:
        audit.record(open_store(db), user, [audit.CLI_ROLE], "train", detail=detail)
    except StoreBusyError as exc:
        print(f"train.py: the audit row could not be written ({exc})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
