"""Forecasts from DataFrames: the one entry point the dashboard and evaluation use.

``ForecastPipeline`` bundles the fine-tuned :class:`~model.modeling.LabTrendForForecasting`
with what turns frames into its inputs and its outputs back into canonical units: the
analyte vocabulary, the per-analyte scaler and (optionally) per-analyte conformal interval
adjustments. A saved pipeline directory holds::

    config.json, model.safetensors   the network (transformers)
    vocab.json, scaler.json          feature encoding (model.features)
    calibration.json                 conformal adjustments (only when calibrated)
    model_version                    the version string below, for tools that do not load torch

Results are CPU float32 whatever the device; bf16 autocast is used only on CUDA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from model import MIN_HISTORY, QUANTILE_COLUMNS, QUANTILES, history_stratum
from model.conformal import ConformalCalibration, fit_conformal
from model.features import (
    STATUS_OK,
    AnalyteScaler,
    AnalyteVocab,
    EncodedQueries,
    collate,
    encode_queries,
    validate_history,
    validate_queries,
)
from model.modeling import LabTrendForForecasting

__all__ = ["ForecastPipeline", "resolve_device"]

VOCAB_FILE = "vocab.json"
SCALER_FILE = "scaler.json"
CALIBRATION_FILE = "calibration.json"
VERSION_FILE = "model_version"
_MODEL_INPUTS = (
    "event_analyte", "event_value", "event_censor", "event_time", "event_mask", "patient_age", "patient_sex",
    "query_analyte", "query_horizon", "query_anchor_value", "query_anchor_censor", "query_mask", "query_summary",
)
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or 'auto' (CUDA when available, else CPU) -> ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


class ForecastPipeline:
    """Fine-tuned model + vocabulary + scaler (+ conformal calibration) -> forecasts frame.

    Args:
        model: the forecasting network; put it on the device you want before passing it.
        vocab: analyte vocabulary the model was trained with (``len(vocab) == config.n_analytes``).
        scaler: per-analyte normalisation fitted on the training data.
        conformal: per-analyte interval adjustments, or None for the raw model quantiles.
    """

    def __init__(
        self,
        model: LabTrendForForecasting,
        vocab: AnalyteVocab,
        scaler: AnalyteScaler,
        conformal: ConformalCalibration | None = None,
    ):
        config = model.config
        if len(vocab) != config.n_analytes:
            raise ValueError(f"vocabulary size ({len(vocab)}) != model config n_analytes ({config.n_analytes})")
        if not np.allclose(config.quantiles, QUANTILES):
            raise ValueError(f"model quantiles {config.quantiles} != forecasts contract {list(QUANTILES)}")
        missing = [c for c in vocab.codes if c not in scaler]
        if missing:
            raise ValueError(f"analyte(s) {missing[:5]} are in the vocabulary but have no scaler statistics")
        self.model = model.eval()
        self.vocab = vocab
        self.scaler = scaler
        self.conformal = conformal
        self.model_version = self._compute_version()

    # --- persistence -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ForecastPipeline:
        """Load a directory written by :meth:`save_pretrained`; ``device`` is 'cpu', 'cuda' or 'auto'."""
        path = Path(path)
        for name in (VOCAB_FILE, SCALER_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a ForecastPipeline directory")
        model = LabTrendForForecasting.from_pretrained(path).to(resolve_device(device))
        vocab = AnalyteVocab.from_dict(json.loads((path / VOCAB_FILE).read_text()))
        scaler = AnalyteScaler.from_dict(json.loads((path / SCALER_FILE).read_text()))
        conformal = None
        if (path / CALIBRATION_FILE).is_file():
            conformal = ConformalCalibration.from_dict(json.loads((path / CALIBRATION_FILE).read_text()))
        return cls(model, vocab, scaler, conformal)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the network (safetensors), vocabulary, scaler, calibration and version to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        (path / VOCAB_FILE).write_text(json.dumps(self.vocab.to_dict(), indent=1))
        (path / SCALER_FILE).write_text(json.dumps(self.scaler.to_dict(), indent=1))
        if self.conformal is not None:
            (path / CALIBRATION_FILE).write_text(json.dumps(self.conformal.to_dict(), indent=1))
        elif (path / CALIBRATION_FILE).exists():
            (path / CALIBRATION_FILE).unlink()
        (path / VERSION_FILE).write_text(self.model_version + "\n")

    def _compute_version(self) -> str:
        """'lt-' + 12 hex digits of SHA-256 over everything that changes a forecast.

        That is the config (less library bookkeeping), the weights, the vocabulary, the
        scaler and the calibration, so two pipelines with the same version give the same
        forecasts on the same device.
        """
        h = hashlib.sha256()
        config = {k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps(self.vocab.to_dict(), sort_keys=True).encode())
        h.update(json.dumps(self.scaler.to_dict(), sort_keys=True).encode())
        if self.conformal is not None:
            h.update(json.dumps(self.conformal.to_dict(), sort_keys=True).encode())
        return "lt-" + h.hexdigest()[:12]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- forecasting -------------------------------------------------------------------------

    def _predict_normalised(
        self, history: pd.DataFrame, queries: pd.DataFrame, batch_size: int
    ) -> tuple[EncodedQueries, np.ndarray]:
        """Encoded queries and raw model quantiles ``(n_queries, n_quantiles)`` (normalised; NaN unless 'ok')."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        config = self.model.config
        enc = encode_queries(
            history, queries, self.vocab, self.scaler,
            max_events=config.max_events, max_queries=config.max_queries, min_history=MIN_HISTORY, validated=True,
        )
        z = np.full((len(enc.status), len(QUANTILES)), np.nan, dtype=np.float64)
        device = self.device
        on_cuda = device.type == "cuda"
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        # Similar lengths together: less padding. The order cannot change a row's result.
        rows = sorted(enc.rows, key=lambda r: len(r.event_analyte))
        with torch.inference_mode(), autocast:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                arrays = collate(chunk)
                inputs = {k: torch.from_numpy(arrays[k]).to(device) for k in _MODEL_INPUTS}
                quantiles = self.model(**inputs).quantiles.float().cpu().numpy()  # [batch x queries x n_quantiles]
                for b, row in enumerate(chunk):
                    z[row.query_index] = quantiles[b, : len(row.query_index)]
        return enc, z

    def _check_units(self, h: pd.DataFrame) -> None:
        if "unit_canonical" not in h:
            return
        # a set of (code, unit) pairs in plain Python: pandas' dropna + drop_duplicates cost
        # more than the network's forward pass for one patient (benchmarks/model.py latency)
        pairs = set(zip(h["analyte_code"].to_numpy(dtype=object).tolist(),
                        h["unit_canonical"].to_numpy(dtype=object).tolist()))
        for code, unit in sorted((c, str(u)) for c, u in pairs if u is not None and not pd.isna(u)):
            stats = self.scaler.stats.get(code)
            if stats is not None and stats.unit is not None and unit != stats.unit:
                raise ValueError(
                    f"analyte {code!r} has unit {unit!r} in the history but the model was trained in {stats.unit!r}"
                )

    def forecast(self, history: pd.DataFrame, queries: pd.DataFrame, batch_size: int = 256) -> pd.DataFrame:
        """Quantile forecasts for ``queries`` from ``history`` (contracts in ``model/__init__.py``).

        Each query ``(patient_id, analyte_code, at)`` is forecast from that patient's results
        collected strictly before ``at``; times are continuous days, so irregular sampling
        needs no resampling. Returns the queries' columns plus ``q05 .. q95`` (float32,
        canonical unit, monotone), ``lo95``/``hi95`` (the split-conformal 95 % prediction
        interval, calibrated on q05..q95; NaN when the model has no 95 % calibration),
        ``unit``, ``n_history`` (prior results of that analyte),
        ``status`` and ``model_version``, one row per query in the queries' order.
        ``status`` is 'ok' (quantiles finite), "Not enough measurements to forecast (0;
        minimum 1)" (no prior result of the analyte) or "analyte not in model vocabulary"
        (quantiles NaN: there is no forecast). A forecast from a single prior result is 'ok':
        it leans on the population and the patient's other analytes, and its intervals are
        calibrated on single-result forecasts (``model.history_basis`` words it "based on 1
        measurement"). A patient's forecast does not depend on which other queries are in the call.

        Raises:
            ValueError: a missing column, an unparseable or missing time, a non-finite or
                non-numeric value, a censor flag outside {-1, 0, +1}, an unknown sex code, or
                a canonical unit different from the one the model was trained in.
        """
        h = validate_history(history)
        self._check_units(h)
        q_in = queries.reset_index(drop=True)
        q = validate_queries(q_in)
        enc, z = self._predict_normalised(h, q, batch_size)
        ok = enc.status == STATUS_OK
        codes = q["analyte_code"].to_numpy(dtype=object)
        values = np.full_like(z, np.nan)
        wide = np.full((len(z), 2), np.nan)
        if ok.any():
            z_ok = z[ok]
            if self.conformal is not None:
                raw = z_ok
                strata = history_stratum(enc.n_history[ok])
                z_ok = self.conformal.apply(codes[ok], raw, strata)
                ext = self.conformal.extended_bounds(codes[ok], raw, z_ok, strata).get(0.95)
                if ext is not None:
                    wide[ok, 0] = self.scaler.denormalise(codes[ok], ext[:, 0])
                    wide[ok, 1] = self.scaler.denormalise(codes[ok], ext[:, 1])
            values[ok] = self.scaler.denormalise(codes[ok], z_ok)

        units = {code: self._unit(code, h) for code in set(codes.tolist())}
        added = {col: values[:, k].astype(np.float32) for k, col in enumerate(QUANTILE_COLUMNS)}
        added.update({
            "lo95": wide[:, 0].astype(np.float32), "hi95": wide[:, 1].astype(np.float32),
            "unit": pd.array([units[c] for c in codes], dtype=object), "n_history": enc.n_history,
            "status": pd.array(enc.status, dtype=object), "model_version": self.model_version,
        })
        out = q_in.drop(columns=[c for c in added if c in q_in.columns])
        return pd.concat([out, pd.DataFrame(added, index=out.index)], axis=1)

    def _unit(self, code: str, h: pd.DataFrame) -> str | None:
        stats = self.scaler.stats.get(code)
        if stats is not None and stats.unit is not None:
            return stats.unit
        if "unit_canonical" in h:
            units = h.loc[h["analyte_code"] == code, "unit_canonical"].dropna()
            if len(units):
                return str(units.iloc[-1])
        return None

    def calibrate(
        self, history: pd.DataFrame, queries: pd.DataFrame, *, min_points: int = 50, batch_size: int = 256
    ) -> ForecastPipeline:
        """A new pipeline whose intervals are split-conformal calibrated on ``queries``.

        ``queries`` must carry the true ``value`` (canonical unit) and may carry ``censor``;
        censored truths and queries without an 'ok' forecast are left out. Use held-out
        patients, not training ones. This pipeline is left unchanged.
        """
        h = validate_history(history)
        self._check_units(h)
        q = validate_queries(queries)
        if "value" not in q:
            raise ValueError("calibration queries need a 'value' column with the true result")
        enc, z = self._predict_normalised(h, q, batch_size)
        use = (enc.status == STATUS_OK) & (q["censor"].to_numpy() == 0)
        codes = q["analyte_code"].to_numpy(dtype=object)[use]
        y = self.scaler.normalise(codes, q["value"].to_numpy()[use]).astype(np.float64)
        conformal = fit_conformal(codes, z[use], y, quantile_levels=QUANTILES, min_points=min_points,
                                  strata=history_stratum(enc.n_history[use]))
        conformal.meta = {"n_points": int(use.sum()), "base_model_version": self.model_version}
        return ForecastPipeline(self.model, self.vocab, self.scaler, conformal)
