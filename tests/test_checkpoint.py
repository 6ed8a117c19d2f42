"""The shipped pretrained checkpoint: what it is, that it matches the code, and that a wheel carries it."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from labtrend import settings
from model.configuration import PRESETS

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = settings.SHIPPED_PRETRAINED


def test_shipped_checkpoint_is_small_complete_and_in_the_package_data():
    files = {p.name: p for p in SHIPPED.iterdir() if p.is_file()}
    for name in ("config.json", "model.safetensors", "vocab.json", "scaler.json", "pretraining.json",
                 "calibration.json", "README.md"):
        assert name in files, name
    assert sum(p.stat().st_size for p in files.values()) <= 25 * 2**20  # lives in the repository
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["model"]
    for p in files.values():
        rel = p.relative_to(ROOT / "model").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), f"{rel} would be missing from a wheel"


def test_shipped_checkpoint_is_the_current_small_architecture():
    """Fine-tuning with the default --config small must not fall back to training from scratch."""
    import train

    assert train.checkpoint_size(SHIPPED) == train._preset_size("small")
    config = json.loads((SHIPPED / "config.json").read_text())
    assert all(config[k] == v for k, v in PRESETS["small"].items() if k not in ("dropout",))


def test_shipped_checkpoint_card_has_hugging_face_metadata_with_measured_results():
    text = (SHIPPED / "README.md").read_text()
    head = yaml.safe_load(text.split("---")[1])
    assert head["license"] == "odbl" and head["library_name"] == "transformers"
    assert "physionet-challenge-2012" in head["datasets"]
    metrics = {m["name"]: m["value"] for m in head["model-index"][0]["results"][0]["metrics"]}
    report = json.loads((SHIPPED / "pretraining.json").read_text())
    assert metrics["NMAE"] == pytest.approx(report["val"]["nmae"], abs=1e-5)
    assert metrics["NMAE"] < metrics["last value NMAE (same rows)"]


def test_shipped_checkpoint_card_reports_zero_shot_sources_it_never_saw():
    """Issue 13 (leave-source-out): the card's zero-shot table is the benchmark's output for sources that were
    not in the checkpoint's corpus, and each beats the last value."""
    report = json.loads((SHIPPED / "pretraining.json").read_text())
    head = yaml.safe_load((SHIPPED / "README.md").read_text().split("---")[1])
    card = {r["dataset"]["name"].split(" ")[0]: {m["name"]: m["value"] for m in r["metrics"]}
            for r in head["model-index"][0]["results"] if r["dataset"].get("split") == "zero-shot"}
    assert report["zero_shot"] and set(card) == {z["source"] for z in report["zero_shot"]}
    for z in report["zero_shot"]:
        assert z["source"] not in report["corpus"]
        bench = json.loads((ROOT / "benchmarks" / "results" / f"zero_shot_{z['source']}_{SHIPPED.name}.json").read_text())
        assert bench["pretraining_overlap"]["overlapping_sources"] == []
        assert z["nmae"] == pytest.approx(bench["nmae"]) and card[z["source"]]["NMAE"] == pytest.approx(z["nmae"], abs=1e-5)
        assert z["nmae"] < z["last_value_nmae"]


def test_shipped_checkpoint_forecasts_zero_shot_with_calibrated_95_bounds(cases):
    """Issue 13 (e): used as it is, the checkpoint gives finite 95 % bounds (its own calibration)."""
    from model.inference import ForecastPipeline

    pipe = ForecastPipeline.from_pretrained(SHIPPED)
    assert pipe.conformal is not None
    h = pd.DataFrame({"patient_id": "P", "collected_at": pd.to_datetime(["2024-01-01 08:00", "2024-01-02 08:00"]),
                      "analyte_code": "2823-3", "value": [4.1, 4.6], "censor": np.int8(0),
                      "unit_canonical": "mmol/L", "sex": "F", "age_years": 70.0})
    f = pipe.forecast(h, pd.DataFrame({"patient_id": ["P"], "analyte_code": ["2823-3"],
                                       "at": [pd.Timestamp("2024-01-03 08:00")]})).iloc[0]
    assert f["status"] == "ok" and np.isfinite([f["lo95"], f["hi95"]]).all()
    assert f["lo95"] <= f["q05"] <= f["q50"] <= f["q95"] <= f["hi95"]


def test_extreme_real_value_is_not_squashed_by_a_narrow_site_scaler():
    """Issue 13 (a): WBC 240-375 x10^3/uL (last 342) on a site whose WBC spread is narrow and raw-scaled.
    The former hard clip of the site's z-score at 20 gave a forecast of about 100 (interval 92-106, the
    clip's value); the compressed scaler gives the series back: 342 inside the 80 % interval."""
    from model.features import SOFT_CLIP, SOFT_LIMIT, AnalyteScaler, AnalyteStats
    from model.inference import ForecastPipeline

    pipe = ForecastPipeline.from_pretrained(SHIPPED)
    values = (240, 275, 310, 290, 375, 330, 300, 342)
    end = pd.Timestamp("2024-05-10 08:00")
    h = pd.DataFrame({"patient_id": "P", "collected_at": [end - pd.Timedelta(days=len(values) - 1 - i)
                                                          for i in range(len(values))],
                      "analyte_code": "6690-2", "value": np.array(values, float), "censor": np.int8(0),
                      "unit_canonical": "10*3/uL", "sex": "M", "age_years": 60.0})
    q = pd.DataFrame({"patient_id": ["P"], "analyte_code": ["6690-2"], "at": [end + pd.Timedelta(days=1)]})
    stats = dict(pipe.scaler.stats)
    stats["6690-2"] = AnalyteStats(transform="raw", center=8.0, scale=4.9, lower=0.05, unit="10*3/uL", n=2000)

    def forecast(scaler):
        return ForecastPipeline(pipe.model, pipe.vocab, scaler, pipe.conformal).forecast(h, q).iloc[0]

    clipped = forecast(AnalyteScaler(stats, clip=20.0, soft_limit=None))  # a scaler saved before issue 13
    assert clipped["hi95"] < 200  # the defect, reproduced: the clip's value, far below every result
    f = forecast(AnalyteScaler(stats, clip=SOFT_CLIP, soft_limit=SOFT_LIMIT))  # what fine-tuning fits now
    assert f["status"] == "ok" and f["q10"] <= 342 <= f["q90"]
    assert min(values) * 0.8 <= f["q50"] <= max(values) * 1.2
