"""Held-out corpus sources: write one as a LabTrend site, or score a checkpoint zero-shot on one.

    # a source as a site: canonical CSV + DuckDB store + a patient-grouped 80/20 split
    python benchmarks/heldout_sources.py site physionet2012c --out var/sites/setc
    python train.py --db var/sites/setc/site.duckdb --exclude-patients var/sites/setc/test_patients.txt \\
        --out var/sites/setc/model                    # fine-tune on the 80 %

    # zero-shot NMAE vs last value of a checkpoint (pretraining or fine-tuned) on a source's patients
    python benchmarks/heldout_sources.py zero-shot --checkpoint var/pre-no-cdisc --source cdisc
    python benchmarks/heldout_sources.py zero-shot --checkpoint var/sites/setc/model \\
        --db var/sites/setc/site.duckdb --patients var/sites/setc/test_patients.txt
    # learning curve: the same validation patients of a source for checkpoints of different corpora
    python benchmarks/heldout_sources.py zero-shot --checkpoint var/pre-all --source physionet2012 \\
        --validation-of var/pre-all

``site`` writes ``<out>/site.csv.gz``, ``site.duckdb``, ``train_patients.txt``,
``test_patients.txt`` and ``site.json`` (:func:`model.source_sites.write_site`). ``zero-shot``
scores with :func:`model.source_sites.score_checkpoint` (the model card's task: NMAE = MAE / (p99 -
p1) per analyte, count-weighted, every target scored for the model and for the last value), prints
the JSON and saves it to ``benchmarks/results/zero_shot_<cohort>_<checkpoint>.json``. The JSON says
whether the cohort's source was in the checkpoint's pretraining corpus (``pretraining_overlap``):
a zero-shot figure is only one when ``overlapping_sources`` is empty.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine  # noqa: E402


def _site(args) -> int:
    from model.corpus import load_source
    from model.source_sites import write_site

    t0 = time.perf_counter()
    history = load_source(args.source)
    files = write_site(history, args.out, test_fraction=args.test_fraction, seed=args.seed, db=not args.no_db)
    out = {"source": args.source, "out": str(args.out), "csv": str(files.csv), "db": str(files.db) if files.db else None,
           "train_patients_file": str(files.train_patients), "test_patients_file": str(files.test_patients),
           **files.counts, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    return 0


def _zero_shot(args) -> int:
    from model.evaluation import read_patient_list
    from model.source_sites import score_checkpoint

    if bool(args.source) == bool(args.db):
        print("heldout_sources.py zero-shot: give exactly one of --source and --db", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.source:
        from model.corpus import load_source

        history, cohort = load_source(args.source), args.source
    else:
        from data.db import open_store
        from data.queries import cohort as store_cohort

        if not Path(args.db).is_file():
            print(f"heldout_sources.py zero-shot: no store at {args.db}", file=sys.stderr)
            return 2
        history, cohort = store_cohort(open_store(args.db)), Path(args.db).parent.name or Path(args.db).stem
    patients = read_patient_list(args.patients) if args.patients else None
    if patients is not None:
        cohort += "-" + Path(args.patients).stem
    if args.validation_of:
        report = Path(args.validation_of) / "pretraining.json"
        if not report.is_file():
            print(f"heldout_sources.py zero-shot: no pretraining.json in {args.validation_of}", file=sys.stderr)
            return 2
        val = set(json.loads(report.read_text()).get("validation_patients") or [])
        patients = sorted(val if patients is None else val & set(patients))
        cohort += "-validation"
    result = score_checkpoint(args.checkpoint, history, patients=patients, max_patients=args.max_patients,
                              n_analytes=args.analytes, folds=args.folds, seed=args.seed,
                              leakage_check=args.leakage_check, device=args.device)
    payload = {"benchmark": "zero_shot", "machine": machine(), "cohort": cohort,
               "command": " ".join(["benchmarks/heldout_sources.py", *sys.argv[1:]]), "wall_s": round(time.perf_counter() - t0, 1), **result}
    text = json.dumps(payload, indent=1, default=str)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"zero_shot_{cohort}_{Path(args.checkpoint).name}.json").write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="heldout_sources.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("site", help="write a corpus source as a site (CSV, DuckDB store, 80/20 split)")
    s.add_argument("source", help="a key of model.corpus.SOURCES, e.g. physionet2012c or cdisc")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-db", action="store_true", help="write the CSV and the split only")
    s.set_defaults(func=_site)
    z = sub.add_parser("zero-shot", help="score a checkpoint on a source's (or a store's) patients")
    z.add_argument("--checkpoint", required=True, help="a pretraining checkpoint or a fine-tuned model directory")
    z.add_argument("--source", help="a key of model.corpus.SOURCES")
    z.add_argument("--db", help="a site store instead of a source")
    z.add_argument("--patients", help="score only these patients (one id per line), e.g. test_patients.txt")
    z.add_argument("--validation-of", metavar="DIR",
                   help="score only the validation patients recorded in DIR/pretraining.json (chosen within each "
                        "source, so the same patients for every corpus that holds the source: learning curves)")
    z.add_argument("--max-patients", type=int, default=None, help="a seeded random subset, for quick runs")
    z.add_argument("--analytes", type=int, default=20, help="the cohort's most frequent analytes scored")
    z.add_argument("--folds", type=int, default=5)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--leakage-check", type=int, default=40, help="queries per fold checked for look-ahead (0: off)")
    z.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    z.add_argument("--no-save", action="store_true", help="print only")
    z.set_defaults(func=_zero_shot)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"heldout_sources.py {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
