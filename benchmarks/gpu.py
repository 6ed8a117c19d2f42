"""GPU benchmark: full fine-tuning with ``--config base`` on one CUDA device, with bf16 autocast
and gradient checkpointing each on and off. Reports events/s, peak GPU memory and wall time.

    python benchmarks/gpu.py [--steps 60] [--pretrain-steps 200] [--batch-size 64]

Run it whenever a GPU is available. It pretrains a base-size checkpoint for --pretrain-steps on
the open corpus (timed too), then fine-tunes it on MIMIC-IV demo four times. On a machine
without CUDA it says so and exits 0 having measured nothing (``--device cpu`` forces a CPU run
of the same script, for checking it works: use ``--config tiny`` then).
Prints JSON and saves it to benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import save  # noqa: E402
from benchmarks.model import measure_finetune, mimic_cohort  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="base")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print('{"benchmark": "gpu", "measured": false, "reason": "no CUDA device on this machine"}')
        return
    from model.corpus import load_pretraining_corpus
    from model.training import Runtime, TrainSettings, pretrain, save_pretraining_checkpoint

    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="labtrend-gpu-bench-"))
    _, history = mimic_cohort(tmp)
    corpus = load_pretraining_corpus(max_rows=1_000_000, include_synthetic_patients=2000, seed=0)
    rt = Runtime(device=device, bf16=args.device == "cuda", progress_bar=False)
    t0 = time.perf_counter()
    model, vocab, scaler = pretrain(corpus, args.config, steps=args.pretrain_steps, runtime=rt,
                                    settings=TrainSettings(batch_size=args.batch_size, eval_every=args.pretrain_steps))
    pretrain_s = time.perf_counter() - t0
    init = tmp / "pretrained"
    save_pretraining_checkpoint(init, model, vocab, scaler)
    del model
    runs = []
    for bf16 in (False, True):
        for ckpt in (False, True):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            r = measure_finetune(init, history, steps=args.steps, batch_size=args.batch_size, config=args.config,
                                 runtime=Runtime(device=device, bf16=bf16, gradient_checkpointing=ckpt,
                                                 progress_bar=False))
            r.pop("pipeline")
            r.update(bf16=bf16, gradient_checkpointing=ckpt)
            if device.type == "cuda":
                r["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            runs.append(r)
    base = runs[0]["events_per_s"]
    for r in runs:
        r["speed_vs_fp32_no_checkpointing"] = round(r["events_per_s"] / base, 3)
    save("gpu", {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                 "config": args.config, "pretrain": {"steps": args.pretrain_steps, "seconds": round(pretrain_s, 1)},
                 "finetune_runs": runs})


if __name__ == "__main__":
    main()
