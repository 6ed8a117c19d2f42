"""The network, its heads and the forecast pipeline (tiny config, CPU, seconds)."""

from __future__ import annotations

import inspect
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from model import QUANTILE_COLUMNS, QUANTILES, history_basis
from model.configuration import PRESETS, LabTrendConfig, config_preset
from model.features import AnalyteScaler, AnalyteVocab
from model.inference import ForecastPipeline
from model.modeling import LabTrendForForecasting, LabTrendForPretraining, LabTrendModel, pinball_loss

N_Q = len(QUANTILES)
HBA1C = "4548-4"


# --- helpers ----------------------------------------------------------------------------------


def validate_tensor(t: torch.Tensor, shape: tuple, dtype: torch.dtype = torch.float32) -> None:
    assert isinstance(t, torch.Tensor)
    assert tuple(t.shape) == shape, f"shape {tuple(t.shape)} != {shape}"
    assert t.dtype == dtype
    assert torch.isfinite(t).all()


def tiny_config(**overrides) -> LabTrendConfig:
    return config_preset("tiny", n_analytes=12, **overrides)


def randomise_heads(model: torch.nn.Module, seed: int = 0, std: float = 0.5) -> None:
    """Heads start at zero weight (persistence); give them weights so outputs depend on the backbone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head" in name and name.endswith("weight") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def random_batch(config: LabTrendConfig, lengths=(6, 3, 1), n_queries=(2, 1, 2), seed=0, targets=True) -> dict:
    """A right-padded batch with rows of the given event / query counts; padded slots are 0."""
    g = torch.Generator().manual_seed(seed)
    b, e, q = len(lengths), max(lengths), max(n_queries)
    event_mask = torch.tensor([[1] * n + [0] * (e - n) for n in lengths])
    query_mask = torch.tensor([[1] * n + [0] * (q - n) for n in n_queries])
    batch = dict(
        event_analyte=torch.randint(3, config.n_analytes, (b, e), generator=g) * event_mask,
        event_value=torch.randn(b, e, generator=g) * event_mask,
        event_censor=torch.randint(-1, 2, (b, e), generator=g) * event_mask,
        event_time=torch.rand(b, e, generator=g) * 400 * event_mask,
        event_mask=event_mask,
        patient_age=torch.tensor([55.0, float("nan"), 3.5][:b] + [40.0] * max(0, b - 3)),
        patient_sex=torch.tensor([0, 1, 2][:b] + [1] * max(0, b - 3)),
        query_analyte=torch.randint(3, config.n_analytes, (b, q), generator=g) * query_mask,
        query_horizon=torch.rand(b, q, generator=g) * 30 * query_mask,
        query_anchor_value=torch.randn(b, q, generator=g) * query_mask,
        query_anchor_censor=torch.zeros(b, q, dtype=torch.long),
        query_mask=query_mask,
    )
    if targets:
        batch["target_value"] = torch.randn(b, q, generator=g)
        batch["target_censor"] = torch.zeros(b, q, dtype=torch.long)
    return batch


def row(batch: dict, i: int, n_events: int, n_queries: int) -> dict:
    """Row ``i`` of ``batch`` alone, without any padding."""
    out = {}
    for k, v in batch.items():
        if k.startswith("event_"):
            out[k] = v[i : i + 1, :n_events]
        elif k.startswith("query_") or k.startswith("target_"):
            out[k] = v[i : i + 1, :n_queries]
        else:
            out[k] = v[i : i + 1]
    return out


def fc12_history(cases) -> pd.DataFrame:
    raw = pd.read_csv(cases / "FC-12.csv", dtype={"loinc": str})
    return pd.DataFrame({
        "patient_id": raw["patient_id"], "collected_at": pd.to_datetime(raw["collected_at"]),
        "analyte_code": raw["loinc"], "value": raw["value"].astype(float), "censor": np.int8(0),
        "unit_canonical": raw["unit"], "sex": None, "age_years": np.nan,
    })


def synthetic_history(n_patients=20, n_results=6, seed=0) -> pd.DataFrame:
    """Sodium (raw scale) and CRP (log scale, some '<5' results) random walks, irregular times."""
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        t = pd.Timestamp("2023-01-01") + pd.Timedelta(days=int(rng.integers(0, 100)))
        na, crp = rng.normal(139, 3), np.exp(rng.normal(2, 1))
        for _ in range(n_results):
            t += pd.Timedelta(hours=float(rng.uniform(6, 24 * 40)))
            na += rng.normal(0, 1.5)
            crp *= np.exp(rng.normal(0, 0.5))
            base = dict(patient_id=f"S{p:03d}", collected_at=t, sex="FM"[p % 2], age_years=30 + p)
            recs.append(dict(base, analyte_code="2951-2", value=round(na, 1), censor=0, unit_canonical="mmol/L"))
            censored = crp < 5
            recs.append(dict(base, analyte_code="1988-5", value=5.0 if censored else round(crp, 2),
                             censor=-1 if censored else 0, unit_canonical="mg/L"))
    h = pd.DataFrame(recs)
    h["censor"] = h["censor"].astype(np.int8)
    return h


def make_pipeline(history: pd.DataFrame, seed: int = 0) -> ForecastPipeline:
    """A tiny pipeline whose head is slightly off persistence (like a briefly trained one)."""
    torch.manual_seed(seed)
    vocab = AnalyteVocab.fit(history)
    model = LabTrendForForecasting(config_preset("tiny", n_analytes=len(vocab)))
    randomise_heads(model, seed, std=0.05)
    return ForecastPipeline(model, vocab, AnalyteScaler.fit(history))


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def history(cases) -> pd.DataFrame:
    return pd.concat([fc12_history(cases), synthetic_history()], ignore_index=True)


@pytest.fixture(scope="module")
def pipeline(history) -> ForecastPipeline:
    return make_pipeline(history)


def fc12_queries(patients=("P0014", "P0015", "P0016"), at="2024-12-01") -> pd.DataFrame:
    return pd.DataFrame({"patient_id": list(patients), "analyte_code": HBA1C, "at": pd.Timestamp(at)})


# --- configuration ----------------------------------------------------------------------------


def test_config_docstring_documents_every_field():
    doc = LabTrendConfig.__doc__
    params = [p for p in inspect.signature(LabTrendConfig.__init__).parameters if p not in ("self", "kwargs")]
    for name in params:
        assert re.search(rf"^\s+{name} \(`[^`]+`, \*optional\*, defaults to ", doc, re.M), f"{name} undocumented"
    for group in ("Vocabulary", "Architecture", "Time encoding", "Heads", "Pretraining", "Fine-tuning"):
        assert f"> {group}" in doc


def test_config_presets_round_trip_and_errors(tmp_path):
    for name in PRESETS:
        assert config_preset(name, n_analytes=50).n_analytes == 50
    c = config_preset("tiny", n_analytes=20)
    assert (c.d_model, c.n_layers, c.model_type, c.quantiles) == (32, 2, "labtrend", list(QUANTILES))
    c.save_pretrained(tmp_path)
    assert LabTrendConfig.from_pretrained(tmp_path).to_dict() == c.to_dict()
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        LabTrendConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="strictly increasing"):
        LabTrendConfig(quantiles=(0.5, 0.1))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        config_preset("huge")


# --- network ----------------------------------------------------------------------------------


def test_output_shapes_and_monotone_quantiles():
    config = tiny_config()
    batch = random_batch(config)
    fc = LabTrendForForecasting(config).eval()
    randomise_heads(fc)
    out = fc(**batch)
    validate_tensor(out.loss, ())
    validate_tensor(out.quantiles, (3, 2, N_Q))
    validate_tensor(out.query_hidden_state, (3, 2, config.d_model))
    assert (out.quantiles.diff(dim=-1) >= 0).all()

    pre = LabTrendForPretraining(config)
    randomise_heads(pre)
    out = pre(**batch)
    validate_tensor(out.masked_quantiles, (3, 6, N_Q))
    validate_tensor(out.quantiles, (3, 2, N_Q))
    assert out.value_mask.dtype == torch.bool and not (out.value_mask & ~batch["event_mask"].bool()).any()
    assert (out.masked_quantiles.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(out.loss, out.masked_loss + config.pretrain_forecast_weight * out.forecast_loss)

    inputs = {k: v for k, v in batch.items() if not k.startswith("target")}
    base = LabTrendModel(config)(**inputs, output_hidden_states=True)
    validate_tensor(base.last_hidden_state, (3, 6, config.d_model))
    validate_tensor(base.patient_hidden_state, (3, config.d_model))
    assert len(base.hidden_states) == config.n_layers + 1


def test_untrained_forecast_is_persistence_around_the_anchor():
    config = tiny_config()
    batch = random_batch(config)
    q = LabTrendForForecasting(config).eval()(**batch).quantiles
    torch.testing.assert_close(q[..., N_Q // 2], batch["query_anchor_value"])


def test_padding_never_influences_real_positions():
    """FC-12: a row gives the same output alone, padded, or next to longer rows; padded slots may hold anything."""
    config = tiny_config()
    model = LabTrendForForecasting(config).eval()
    randomise_heads(model)
    batch = random_batch(config, lengths=(6, 3, 1), n_queries=(2, 1, 2))
    # garbage in every padded slot
    for k in ("event_value", "event_time"):
        batch[k] = torch.where(batch["event_mask"].bool(), batch[k], torch.full_like(batch[k], 1e4))
    real = batch["event_mask"].bool()
    batch["event_analyte"] = torch.where(real, batch["event_analyte"], torch.full_like(batch["event_analyte"], 5))
    with torch.no_grad():
        together = model(**batch).quantiles
        for i, (n_e, n_q) in enumerate([(6, 2), (3, 1), (1, 2)]):
            alone = model(**row(batch, i, n_e, n_q)).quantiles
            torch.testing.assert_close(together[i, :n_q], alone[0], rtol=1e-5, atol=1e-6)


def test_loss_ignores_padded_queries_and_handles_censoring():
    config = tiny_config()
    model = LabTrendForForecasting(config).eval()
    batch = random_batch(config)
    loss = model(**batch).loss
    padded = ~batch["query_mask"].bool()
    batch["target_value"] = torch.where(padded, torch.full_like(batch["target_value"], 1e6), batch["target_value"])
    torch.testing.assert_close(model(**batch).loss, loss)

    levels = torch.tensor(QUANTILES)
    q = torch.tensor([[-1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0]])
    one = torch.ones(1, dtype=torch.bool)
    # '<2' with every quantile below 2: nothing wrong; '>-3' with every quantile above -3: nothing wrong
    assert pinball_loss(q, torch.tensor([2.0]), levels, one, torch.tensor([-1])) == 0
    assert pinball_loss(q, torch.tensor([-3.0]), levels, one, torch.tensor([1])) == 0
    assert pinball_loss(q, torch.tensor([2.0]), levels, one, torch.tensor([0])) > 0
    # '<0' only penalises the quantiles above 0
    expected = sum((1 - t) * max(v, 0.0) for t, v in zip(QUANTILES, q[0].tolist())) / N_Q
    got = pinball_loss(q, torch.tensor([0.0]), levels, one, torch.tensor([-1]))
    torch.testing.assert_close(got, torch.tensor(expected))


def test_masked_value_is_really_hidden():
    """predict_masked sees the analyte and time of a hidden event, never its value or censor flag."""
    config = tiny_config()
    model = LabTrendForPretraining(config).eval()
    randomise_heads(model)
    batch = random_batch(config, targets=False)
    mask = torch.zeros_like(batch["event_mask"], dtype=torch.bool)
    mask[0, 2] = True
    first = model.predict_masked(batch, mask)
    validate_tensor(first, (3, 6, N_Q))
    batch["event_value"][0, 2] += 50.0
    batch["event_censor"][0, 2] = 1
    torch.testing.assert_close(model.predict_masked(batch, mask)[0, 2], first[0, 2])
    # an unmasked event's value does change the prediction
    batch["event_value"][0, 3] += 5.0
    assert not torch.allclose(model.predict_masked(batch, mask)[0, 2], first[0, 2])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    config = tiny_config(dropout=0.1)
    model = LabTrendForPretraining(config).train()
    randomise_heads(model)
    batch = random_batch(config)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(123)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_off, grads_off = loss_and_grads()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.model.gradient_checkpointing
    loss_on, grads_on = loss_and_grads()
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_forecasting_loads_pretrained_backbone(tmp_path):
    config = tiny_config()
    pre = LabTrendForPretraining(config)
    randomise_heads(pre, seed=3)
    pre.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    fc, info = LabTrendForForecasting.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]  # the masked value head is dropped on purpose, without a warning
    for prefix, a, b in (("model", pre.model, fc.model), ("quantile_head", pre.quantile_head, fc.quantile_head)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{prefix}.{k} differs"
    batch = random_batch(config)
    with torch.no_grad():
        expected = pre.eval()(**batch, value_mask=torch.zeros(3, 6)).quantiles
        torch.testing.assert_close(fc.eval()(**batch).quantiles, expected)


def test_too_many_events_is_a_value_error():
    config = tiny_config(max_events=4)
    batch = random_batch(config, lengths=(6, 3, 1))
    with pytest.raises(ValueError, match=r"events per row \(6\) exceed config.max_events \(4\)"):
        LabTrendForForecasting(config)(**batch)


# --- pipeline ---------------------------------------------------------------------------------


def test_fc12_one_value_and_constant_series(pipeline, history):
    """P0014 (one value) gets a forecast from that value (FC-12 as reconciled with issue 13); P0015 (7.0 x 3) a
    finite forecast near 7.0, no warnings."""
    f = no_warnings(pipeline.forecast, history, fc12_queries())
    assert list(f.columns) == [
        "patient_id", "analyte_code", "at", *QUANTILE_COLUMNS, "lo95", "hi95", "unit", "n_history", "status",
        "model_version",
    ]
    assert f[["lo95", "hi95"]].isna().all().all()  # an uncalibrated model has no 95 % interval
    p14, p15, p16 = (f.iloc[i] for i in range(3))
    assert p14["status"] == "ok" and p14["n_history"] == 1
    assert history_basis(p14["n_history"]) == "based on 1 measurement"
    for r in (p14, p15, p16):
        assert r["status"] == "ok" and r["unit"] == "%"
        qs = r[list(QUANTILE_COLUMNS)].to_numpy(dtype=float)
        assert np.isfinite(qs).all() and (np.diff(qs) >= 0).all()
    assert abs(p15["q50"] - 7.0) < 0.5 and p15["n_history"] == 3
    assert all(f[c].dtype == np.float32 for c in QUANTILE_COLUMNS)
    assert re.fullmatch(r"lt-[0-9a-f]{12}", f["model_version"].iloc[0])


def test_fc12_alone_equals_batch(pipeline, history):
    """P0016's forecast is the same alone, with P0014/P0015, and inside a large mixed batch."""
    alone = pipeline.forecast(history, fc12_queries(["P0016"]))
    small = pipeline.forecast(history, fc12_queries(["P0014", "P0016", "P0015"]))
    others = history[history.patient_id.str.startswith("S")].groupby("patient_id").tail(1)
    big_q = pd.concat([
        pd.DataFrame({"patient_id": others.patient_id, "analyte_code": others.analyte_code, "at": others.collected_at}),
        fc12_queries(["P0016"]),
    ], ignore_index=True)
    big = pipeline.forecast(history, big_q, batch_size=7)
    a = alone[list(QUANTILE_COLUMNS)].to_numpy()[0]
    np.testing.assert_allclose(small[list(QUANTILE_COLUMNS)].to_numpy()[1], a, rtol=1e-6)
    np.testing.assert_allclose(big[list(QUANTILE_COLUMNS)].to_numpy()[-1], a, rtol=1e-6)
    # the forecast actually depends on the history (not a constant head)
    assert not np.allclose(a, pipeline.forecast(history, fc12_queries(["P0015"]))[list(QUANTILE_COLUMNS)].to_numpy()[0])


def test_save_load_round_trip_identical_forecasts(pipeline, history, tmp_path):
    crp = pd.DataFrame({"patient_id": ["S001"], "analyte_code": ["1988-5"], "at": [pd.Timestamp("2024-06-01")]})
    q = pd.concat([fc12_queries(), crp])
    before = pipeline.forecast(history, q)
    pipeline.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "vocab.json", "scaler.json", "model_version"):
        assert (tmp_path / name).is_file(), name
    loaded = ForecastPipeline.from_pretrained(tmp_path, device="cpu")
    assert loaded.model_version == pipeline.model_version == (tmp_path / "model_version").read_text().strip()
    pd.testing.assert_frame_equal(loaded.forecast(history, q), before)


def test_censored_and_unknown_inputs(pipeline, history):
    """Censored histories forecast finitely; an analyte outside the vocabulary gets a status."""
    crp_censored = history[(history.analyte_code == "1988-5") & (history.censor == -1)]
    pid = crp_censored.patient_id.iloc[0]
    q = pd.DataFrame({"patient_id": pid, "analyte_code": ["1988-5", "NOT-A-CODE"], "at": pd.Timestamp("2025-01-01")})
    f = no_warnings(pipeline.forecast, history, q)
    assert f["status"].tolist() == ["ok", "analyte not in model vocabulary"]
    assert np.isfinite(f.loc[0, list(QUANTILE_COLUMNS)].to_numpy(dtype=float)).all() and f.loc[0, "q05"] > 0
    assert f.loc[0, "unit"] == "mg/L"


def test_invalid_input_raises_named_value_error(pipeline, history):
    q = fc12_queries()
    with pytest.raises(ValueError, match=r"history is missing column\(s\) \['value'\]"):
        pipeline.forecast(history.drop(columns=["value"]), q)
    bad = history.copy()
    bad.loc[3, "value"] = np.inf
    with pytest.raises(ValueError, match=r"non-numeric value inf \(row 3: patient P0015"):
        pipeline.forecast(bad, q)
    with pytest.raises(ValueError, match="queries column 'at' has an unparseable time 'tomorrow'"):
        pipeline.forecast(history, q.assign(at="tomorrow"))
    with pytest.raises(ValueError, match="analyte '4548-4' has unit 'mmol/mol' in the history but .* trained in '%'"):
        pipeline.forecast(history.assign(unit_canonical=history.unit_canonical.replace("%", "mmol/mol")), q)
    with pytest.raises(ValueError, match=r"vocabulary size \(3\) != model config n_analytes"):
        ForecastPipeline(pipeline.model, AnalyteVocab([]), pipeline.scaler)


def test_calibrate_returns_new_calibrated_pipeline(pipeline, tmp_path):
    """Conformal calibration reaches nominal coverage on its calibration set and leaves the original alone."""
    hist = synthetic_history(n_patients=40, n_results=8, seed=5)
    sodium = hist[hist.analyte_code == "2951-2"].copy()
    sodium["rank"] = sodium.groupby("patient_id").cumcount()
    targets = sodium[sodium["rank"] >= 2]
    cal_q = pd.DataFrame({"patient_id": targets.patient_id, "analyte_code": targets.analyte_code,
                          "at": targets.collected_at, "value": targets.value, "censor": targets.censor})
    calibrated = pipeline.calibrate(hist, cal_q, min_points=50)
    assert pipeline.conformal is None and calibrated.conformal is not None
    assert calibrated.model_version != pipeline.model_version
    f = calibrated.forecast(hist, cal_q)
    y = cal_q["value"].to_numpy()
    for level, (lo, hi) in {0.5: ("q25", "q75"), 0.8: ("q10", "q90"), 0.9: ("q05", "q95")}.items():
        assert ((f[lo] <= y) & (y <= f[hi])).mean() >= level - 1e-9
    assert ((f["lo95"] <= y) & (y <= f["hi95"])).mean() >= 0.95 - 1e-9
    assert ((f["lo95"] <= f["q05"]) & (f["q95"] <= f["hi95"])).all()
    calibrated.save_pretrained(tmp_path)
    assert (tmp_path / "calibration.json").is_file()
    pd.testing.assert_frame_equal(ForecastPipeline.from_pretrained(tmp_path).forecast(hist, cal_q), f)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(pipeline, history, tmp_path):
    pipeline.save_pretrained(tmp_path)
    gpu = ForecastPipeline.from_pretrained(tmp_path, device="cuda")
    q = fc12_queries()
    a, b = pipeline.forecast(history, q), gpu.forecast(history, q)
    assert all(b[c].dtype == np.float32 for c in QUANTILE_COLUMNS)
    np.testing.assert_allclose(b[list(QUANTILE_COLUMNS)].to_numpy(), a[list(QUANTILE_COLUMNS)].to_numpy(), rtol=2e-2)


def test_step_scale_is_the_unit_of_each_analytes_forecast_change():
    """quantiles = anchor + step_scale[analyte] * head: doubling one analyte's scale doubles its
    forecast change and leaves every other analyte's forecast as it was."""
    config = tiny_config()
    model = LabTrendForForecasting(config).eval()
    randomise_heads(model)
    batch = random_batch(config)
    before = model(**batch).quantiles - batch["query_anchor_value"].unsqueeze(-1)
    a = int(batch["query_analyte"][0, 0])
    with torch.no_grad():
        model.analyte_step_scale[a] = 2.0
    after = model(**batch).quantiles - batch["query_anchor_value"].unsqueeze(-1)
    hit = (batch["query_analyte"] == a).unsqueeze(-1).expand_as(before)
    torch.testing.assert_close(after[hit], 2 * before[hit])
    torch.testing.assert_close(after[~hit], before[~hit])


# --- issue 13: what a tabular model reads, computed by the network from its own events ---------


def test_event_context_ranks_changes_and_gaps_from_the_events_alone():
    """Rank among the analyte's results (0 = latest), change from the previous observed result and
    the gap to it; the order of the events does not matter, padding and hidden values never count."""
    from model.modeling import event_context, query_context

    a = torch.tensor([[3, 4, 3, 5, 3, 4, 0]])
    t = torch.tensor([[10.0, 9.0, 5.0, 5.0, 1.0, 0.5, 0.0]])  # days before the forecast time
    v = torch.tensor([[1.0, 2.0, 1.5, 0.0, 3.0, 2.5, 9.0]])
    real = a > 0
    rank, f = event_context(a, v, t, real, real)
    assert rank.tolist() == [[2, 1, 1, 0, 0, 0, 0]]
    np.testing.assert_allclose(f[0, :, 0].numpy(), [0, 0, 0.5, 0, 1.5, 0.5, 0], atol=1e-6)  # change
    np.testing.assert_allclose(f[0, :, 1].numpy(), np.log1p([0, 0, 5, 0, 4, 8.5, 0]), atol=1e-6)  # log1p gap
    assert f[0, :, 2].tolist() == [0, 0, 1, 0, 1, 1, 0]
    perm = torch.tensor([4, 0, 6, 2, 5, 1, 3])
    rank_p, f_p = event_context(a[:, perm], v[:, perm], t[:, perm], real[:, perm], real[:, perm])
    assert torch.equal(rank_p, rank[:, perm]) and torch.allclose(f_p, f[:, perm])
    # a hidden value is neither given nor used by the next result of its analyte
    observed = real.clone()
    observed[0, 2] = False
    _, f_h = event_context(a, v, t, real, observed)
    assert f_h[0, 2].tolist() == [0, 0, 0]
    assert f_h[0, 4, 0] == pytest.approx(3.0 - 1.0) and f_h[0, 4, 1] == pytest.approx(np.log1p(9.0))
    v2 = v.clone()
    v2[0, 2] += 50.0
    assert torch.equal(event_context(a, v2, t, real, observed)[1], f_h)

    qa = torch.tensor([[3, 4, 7]])
    qc = query_context(qa, a, t, real)  # [log n_1d, log n_7d, log since any, log all_1d / 2, log gap, has gap]
    np.testing.assert_allclose(qc[0, 0].numpy(), [np.log1p(1), np.log1p(2), np.log1p(0.5), np.log1p(2) / 2,
                                                 np.log1p(4), 1], atol=1e-6)
    np.testing.assert_allclose(qc[0, 2].numpy(), [0, 0, np.log1p(0.5), np.log1p(2) / 2, 0, 0], atol=1e-6)


def test_context_features_keep_padding_and_batch_independence():
    """With the context features on (every preset), a row's forecast is the same padded in a batch or alone."""
    config = tiny_config()
    assert config.event_context and config.query_context and config.input_soft_limit > 0
    model = LabTrendForForecasting(config).eval()
    randomise_heads(model)
    batch = random_batch(config, targets=False)
    with torch.no_grad():
        full = model(**batch).quantiles
        for i, (ne, nq) in enumerate(((6, 2), (3, 1), (1, 2))):
            alone = model(**row(batch, i, ne, nq)).quantiles
            torch.testing.assert_close(full[i : i + 1, :nq], alone, rtol=1e-5, atol=1e-6)


def test_extreme_anchor_is_read_as_very_high_not_extrapolated():
    """input_soft_limit: the level features saturate, so an anchor 100 normalised units out changes the
    predicted *change* no more than one at the edge of the training range does; the forecast still
    starts from the exact anchor."""
    config = tiny_config()
    model = LabTrendForForecasting(config).eval()
    randomise_heads(model, std=0.5)
    batch = random_batch(config, targets=False)

    def change(anchor):
        b = {k: v.clone() for k, v in batch.items()}
        b["query_anchor_value"][0, 0] = anchor
        b["event_value"][0, :6] = anchor
        with torch.no_grad():
            return (model(**b).quantiles[0, 0] - anchor).numpy()

    edge, far = change(50.0), change(100.0)
    np.testing.assert_allclose(far, edge, atol=1e-3)  # tanh(50 / 8) is already 1 - 1e-5
    plain = LabTrendForForecasting(tiny_config(input_soft_limit=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    b = {k: v.clone() for k, v in batch.items()}
    b["query_anchor_value"][0, 0] = 100.0
    with torch.no_grad():
        assert not np.allclose((plain(**b).quantiles[0, 0] - 100.0).numpy(), far, atol=1e-2)


def test_weighted_pinball_loss():
    levels = torch.tensor(QUANTILES)
    q = torch.zeros(1, 2, N_Q)
    y = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    per = pinball_loss(q[:, :1], y[:, :1], levels, mask[:, :1]), pinball_loss(q[:, 1:], y[:, 1:], levels, mask[:, 1:])
    w = torch.tensor([[3.0, 1.0]])
    torch.testing.assert_close(pinball_loss(q, y, levels, mask, weight=w), (3 * per[0] + per[1]) / 4)
    torch.testing.assert_close(pinball_loss(q, y, levels, mask, weight=torch.ones(1, 2)), pinball_loss(q, y, levels, mask))


def test_auto_classes_load_labtrend_checkpoints(pipeline, tmp_path):
    """AutoConfig / AutoModel / AutoModelForTimeSeriesPrediction know model_type 'labtrend'."""
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForTimeSeriesPrediction

    pipeline.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LabTrendConfig)
    fc = AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path)
    assert isinstance(fc, LabTrendForForecasting)
    for k, v in pipeline.model.state_dict().items():
        torch.testing.assert_close(fc.state_dict()[k], v)
    backbone, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(backbone, LabTrendModel) and not info["missing_keys"]
    assert isinstance(AutoModelForPreTraining.from_config(pipeline.model.config), LabTrendForPretraining)
