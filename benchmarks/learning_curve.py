"""Learning curve of pretraining: validation NMAE against corpus size (and model size), each as a ratio to
the last value on the same validation rows.

    python benchmarks/learning_curve.py                       # pretrain every point, score, save JSON
    python benchmarks/learning_curve.py --aggregate-only      # score and save from checkpoints already built
    python benchmarks/learning_curve.py --config small --steps 200 --corpora today,all

Every point is pretrained from scratch with the same optimizer steps (``--steps``, no time budget, so the
figure does not depend on how busy the machine is) into ``<--work>/<corpus>-<config>`` with ``train.py
--stage pretrain``. Every checkpoint is then scored by :func:`model.source_sites.score_checkpoint` (through
``benchmarks/heldout_sources.py zero-shot``) on the **same** validation patients: those that the largest
corpus's run held out within each scored source (validation patients are chosen within each source, so
they are the same patients whatever else the corpus holds), at most ``--max-patients`` per source. A
source that was not in a point's corpus is scored zero-shot there; the JSON says which ones overlapped.

Corpora: ``today`` (PhysioNet 2012 set A, eICU demo, NHANES + the synthetic cohort), ``today+2019`` (+
PhysioNet 2019), ``all`` (the eight sources). Saves ``benchmarks/results/learning_curve.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine  # noqa: E402

CORPORA = {"today": "today", "today+2019": "today,physionet2019", "all": "all"}
LABELS = {"today": "today", "today+2019": "p2019", "all": "all"}  # folder names
SCORED = ("physionet2012", "physionet2019", "cdisc")


def _name(corpus: str, config: str) -> str:
    return f"{LABELS[corpus]}-{config}"


def pretrain(work: Path, corpus: str, config: str, steps: int) -> dict:
    out = work / _name(corpus, config)
    cmd = [sys.executable, "train.py", "--stage", "pretrain", "--config", config, "--sources",
           CORPORA[corpus], "--steps", str(steps), "--min-steps", str(steps), "--max-minutes", "100000",
           "--eval-every", str(max(steps // 2, 1)), "--final-eval-rows", "6000", "--init", _arg(out)]
    t = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {"command": " ".join(cmd[1:]), "wall_s": round(time.monotonic() - t, 1)}


def _arg(path: Path) -> str:
    """A path as passed to the scripts (run from the project root): relative when inside it, so the saved
    commands name no machine's folders."""
    p = Path(path).resolve()
    return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else str(path)


def score(checkpoint: Path, source: str, validation_of: Path, max_patients: int, reuse: bool = False) -> dict:
    saved = RESULTS / f"zero_shot_{source}-validation_{checkpoint.name}.json"
    if reuse and saved.is_file():  # --aggregate-only: a score saved by an earlier run of this command
        return json.loads(saved.read_text())
    cmd = [sys.executable, "benchmarks/heldout_sources.py", "zero-shot", "--checkpoint",
           _arg(checkpoint), "--source", source, "--validation-of", _arg(validation_of), "--max-patients",
           str(max_patients)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(saved.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "lc", help="where the checkpoints go")
    ap.add_argument("--config", default="tiny", help="model size(s), comma-separated: tiny, small, base")
    ap.add_argument("--corpora", default="today,today+2019,all")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-patients", type=int, default=300, help="validation patients scored per source")
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="another checkpoint scored on the same patients (e.g. the shipped one, trained longer)")
    ap.add_argument("--aggregate-only", action="store_true",
                    help="do not pretrain; use the checkpoints in --work and the scores already saved for them")
    args = ap.parse_args(argv)
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    configs = [c.strip() for c in args.config.split(",") if c.strip()]
    unknown = [c for c in corpora if c not in CORPORA]
    if unknown:
        raise SystemExit(f"learning_curve.py: unknown corpus {unknown}; known: {', '.join(CORPORA)}")
    runs = {}
    for config in configs:
        for corpus in corpora:
            name = _name(corpus, config)
            runs[name] = {"corpus": corpus, "config": config}
            if not args.aggregate_only:
                runs[name]["pretraining"] = pretrain(args.work, corpus, config, args.steps)
    reference = args.work / _name(corpora[-1], configs[-1])  # its held-out patients are everyone's
    paths = {name: args.work / name for name in runs}
    for extra in args.also:
        runs[extra.name] = {"corpus": "as recorded", "config": "as recorded", "note": "not part of the curve: "
                            "its own steps and corpus (pretrained_with), scored on the same patients"}
        paths[extra.name] = extra
    for name, run in runs.items():
        ck = paths[name]
        report = json.loads((ck / "pretraining.json").read_text())
        val = report["val"]
        a = report.get("args") or {}
        run["pretrained_with"] = {k: a.get(k) for k in ("config", "corpus_sources", "steps", "min_steps", "seed",
                                                        "batch_size", "synthetic_patients")}
        run.update(rows=report["rows"], patients_train=report["patients_train"], steps=report["steps"],
                   own_validation={"nmae": val["nmae"], "last_value_nmae": val["nmae_last_value"],
                                   "ratio": val["nmae"] / val["nmae_last_value"], "n_targets": val["n_targets"]},
                   scored={})
        for source in SCORED:
            d = score(ck, source, reference, args.max_patients, reuse=args.aggregate_only)
            run["scored"][source] = {k: d[k] for k in ("nmae", "last_value_nmae", "ratio", "coverage80",
                                                       "patients", "n_targets", "wins_vs_last_value")}
            run["scored"][source]["source_in_corpus"] = bool(d["pretraining_overlap"]["overlapping_sources"])
        print(name, json.dumps({s: round(v["ratio"], 3) for s, v in run["scored"].items()}), flush=True)
    out = {"benchmark": "learning_curve", "machine": machine(), "steps": args.steps, "configs": configs,
           "validation_patients_of": reference.name, "max_patients_per_source": args.max_patients,
           "command": "python benchmarks/learning_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "runs": runs}
    (RESULTS / "learning_curve.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
