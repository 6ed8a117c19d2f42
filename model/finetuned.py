"""The fine-tuned transformer as an evaluated :class:`model.evaluation.Forecaster`.

``FineTunedForecaster(mode=...)`` fine-tunes from the pretrained checkpoint on each fold's
training patients (``model.training.finetune``) and forecasts with the resulting
:class:`model.inference.ForecastPipeline`, so that 'full', 'embeddings', 'lora' and
'scratch' are compared with the baselines on exactly the same held-out patients.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from model.inference import ForecastPipeline
from model.training import Runtime, TrainSettings, finetune

__all__ = ["FineTunedForecaster", "PipelineForecaster"]

MODE_NAMES = {
    "full": "full fine-tuning",
    "embeddings": "embedding-only fine-tuning",
    "lora": "LoRA fine-tuning",
    "scratch": "trained from scratch",
}


class PipelineForecaster:
    """An already-trained pipeline (no fitting): e.g. the deployed model on a test set."""

    def __init__(self, pipeline: ForecastPipeline, name: str = "deployed model"):
        self.pipeline = pipeline
        self.name = name

    def fit(self, train_history: pd.DataFrame) -> None:  # noqa: D401 - nothing to fit
        return None

    def predict(self, history: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
        return self.pipeline.forecast(history, queries)


class FineTunedForecaster:
    """Fine-tunes a fresh copy per fold; ``mode`` is 'full', 'embeddings', 'lora' or 'scratch'.

    Parameters
    ----------
    init_dir : the pretrained checkpoint (read only); ignored for 'scratch'.
    settings : training settings (``max_minutes`` bounds each fold's fine-tuning).
    config : architecture preset for 'scratch' ('tiny', 'small', 'base').
    corpus_history : pretraining corpus for replay and the forgetting measurement (optional).
    """

    def __init__(self, mode: str, init_dir: str | Path | None, settings: TrainSettings | None = None,
                 runtime: Runtime | None = None, config: str = "small",
                 corpus_history: pd.DataFrame | None = None):
        if mode not in MODE_NAMES:
            raise ValueError(f"mode {mode!r} is not one of {sorted(MODE_NAMES)}")
        self.mode = mode
        self.name = MODE_NAMES[mode]
        self.init_dir = None if mode == "scratch" else init_dir
        self.settings = settings or TrainSettings()
        self.runtime = runtime or Runtime(progress_bar=False)
        self.config = config
        self.corpus_history = corpus_history
        self.pipeline: ForecastPipeline | None = None
        self.reports: list[dict] = []

    def fit(self, train_history: pd.DataFrame) -> None:
        settings = replace(self.settings)
        self.pipeline = finetune(self.init_dir, train_history, self.mode, settings=settings, runtime=self.runtime,
                                 config=self.config, corpus_history=self.corpus_history)
        self.reports.append(getattr(self.pipeline, "training_report", {}) or {})

    def predict(self, history: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
        if self.pipeline is None:
            raise RuntimeError(f"{self.name}: predict() before fit()")
        return self.pipeline.forecast(history, queries)
