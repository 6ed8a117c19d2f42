"""The LabTrend network: a transformer over irregular lab histories that forecasts quantiles.

Read top to bottom: loss, blocks, output dataclasses, then the models.

* :class:`LabTrendModel` (the backbone) embeds every prior result as an event token
  (analyte + value/censor/observed + continuous time before the forecast time), prepends
  one patient token (age, sex), runs a pre-norm transformer encoder over them, and lets
  each query (analyte, horizon, anchor value) read the encoded events through a small
  cross-attention decoder. There is no position index: time enters only as days.
* :class:`LabTrendForPretraining` adds a masked value head (predict hidden event values
  from the rest of the history) and the forecasting head (next-value queries on held-out
  last results).
* :class:`LabTrendForForecasting` is the backbone plus the forecasting head; it loads the
  backbone (and the forecasting head) from a pretraining checkpoint with
  ``LabTrendForForecasting.from_pretrained(pretraining_dir)``.

Units: values are in normalised units per analyte (``model.features.AnalyteScaler``),
times in days. Masks: 1 / True = real, 0 / False = padding (``event_mask``,
``query_mask``); padded positions are never attention keys, so they cannot change a real
position's output. The modules take their device from the inputs and never read files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from model.configuration import LabTrendConfig
from model.features import PAD_ID

__all__ = [
    "pinball_loss",
    "LabTrendModelOutput",
    "LabTrendForPretrainingOutput",
    "LabTrendForForecastingOutput",
    "LabTrendPreTrainedModel",
    "LabTrendModel",
    "LabTrendForPretraining",
    "LabTrendForForecasting",
]


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def pinball_loss(
    quantiles: torch.Tensor,
    target: torch.Tensor,
    levels: torch.Tensor,
    mask: torch.Tensor,
    censor: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean pinball (quantile) loss over the real entries and all quantile levels.

    Args:
        quantiles: predictions of shape ``(..., n_quantiles)``, normalised units.
        target: true values of shape ``(...)``, normalised units.
        levels: quantile levels of shape ``(n_quantiles,)``.
        mask: ``(...)``, 1 / True where the target exists; other entries are ignored.
        censor: ``(...)`` in {-1, 0, +1} or None. For ``-1`` (the true value is at most
            the target) a quantile at or below the target costs nothing; for ``+1`` a
            quantile at or above it costs nothing (censored quantile regression).
        weight: ``(...)`` non-negative weight of each entry, or None (all 1): the loss is then
            ``sum(weight * loss) / sum(weight)`` over the real entries.
    """
    diff = target.unsqueeze(-1) - quantiles  # [... x n_quantiles]
    loss = torch.maximum(levels * diff, (levels - 1) * diff)
    if censor is not None:
        c = censor.unsqueeze(-1)
        loss = torch.where(((c < 0) & (diff > 0)) | ((c > 0) & (diff < 0)), torch.zeros_like(loss), loss)
    keep = mask.bool().unsqueeze(-1).expand_as(loss)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if weight is None:
        return loss.sum() / keep.sum().clamp_min(1)
    w = torch.where(mask.bool(), weight.float(), torch.zeros_like(weight, dtype=torch.float32))
    return (loss.mean(-1) * w).sum() / w.sum().clamp_min(1e-12)


def _forecast_loss(config, quantiles, target_value, target_censor, query_mask, levels, weight=None) -> torch.Tensor:
    """Pinball loss of query quantiles; padded queries (``query_mask`` 0) are ignored."""
    mask = torch.ones_like(target_value, dtype=torch.bool) if query_mask is None else query_mask.bool()
    censor = target_censor if config.censored_loss else None
    return pinball_loss(quantiles, target_value.float(), levels, mask, censor, weight)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class LabTrendTimeEncoding(nn.Module):
    """Days (continuous, >= 0) -> ``d_model``: ``[log1p(t), sin(2 pi f t + p), cos(2 pi f t + p)]`` -> linear.

    Frequencies ``f`` (stored as log) and phases ``p`` are learned; initial periods are
    log-spaced between ``time_min_period_days`` and ``time_max_period_days``.
    """

    def __init__(self, config: LabTrendConfig):
        super().__init__()
        k = config.time_fourier_features
        self.log_frequency = nn.Parameter(torch.empty(k))
        self.phase = nn.Parameter(torch.empty(k))
        self.proj = nn.Linear(1 + 2 * k, config.d_model)

    @staticmethod
    def initial_log_frequency(config: LabTrendConfig) -> torch.Tensor:
        periods = torch.logspace(
            math.log10(config.time_min_period_days), math.log10(config.time_max_period_days),
            config.time_fourier_features, dtype=torch.float32,
        )
        return -torch.log(periods)

    def forward(self, days: torch.Tensor) -> torch.Tensor:
        days = days.float().clamp_min(0.0)
        angle = 2 * math.pi * days.unsqueeze(-1) * self.log_frequency.exp() + self.phase  # [... x k]
        features = torch.cat([torch.log1p(days).unsqueeze(-1), angle.sin(), angle.cos()], dim=-1)  # [... x 1+2k]
        return self.proj(features)  # [... x d_model]


def _censor_one_hot(censor: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1} -> one-hot of shape ``(..., 3)`` as float."""
    return F.one_hot((censor.long() + 1).clamp(0, 2), num_classes=3).float()


N_RANKS = 4  # recency ranks of an event among its analyte's events: 0 (latest), 1, 2, 3 or more
QUERY_CONTEXT = ("log_n_1d", "log_n_7d", "log_since_any", "log_all_1d", "log_last_gap", "has_last_gap")


def event_context(analyte: torch.Tensor, value: torch.Tensor, time: torch.Tensor, real: torch.Tensor,
                  observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per event: recency rank among its analyte's real events, and [change, log1p gap, has previous].

    Args: ``(batch, events)`` tensors: vocabulary ids, normalised values, days before the
    forecast time (larger = older), real-event mask and observed-value mask (a hidden value
    is neither given nor used as a previous value, so masked value prediction cannot read
    it from a neighbour's change). Order does not matter: "later" is a smaller time, ties
    broken by position. Returns ``rank`` (long, ``(batch, events)``, clipped to
    ``N_RANKS - 1``) and ``features`` (``(batch, events, 3)``): value minus the previous
    observed value of the same analyte, ``log1p`` of the days between them, and 1 where
    there is such a previous value (both 0 otherwise).
    """
    e = analyte.shape[1]
    idx = torch.arange(e, device=analyte.device)
    t = time.float()
    same = (analyte[:, :, None] == analyte[:, None, :]) & real[:, :, None] & real[:, None, :]  # [b x i x j]
    ti, tj = t[:, :, None], t[:, None, :]
    after = (tj < ti) | ((tj == ti) & (idx[None, None, :] > idx[None, :, None]))  # j is later than i
    rank = (same & after).sum(-1).clamp_max(N_RANKS - 1)  # [b x events]
    before = same & ~after & (idx[None, None, :] != idx[None, :, None]) & observed[:, None, :]
    closest = torch.where(before, -tj, torch.full_like(tj, -math.inf)).argmax(-1)  # [b x events]
    has = before.any(-1) & observed
    prev_value = value.float().gather(1, closest)
    prev_time = t.gather(1, closest)
    zero = torch.zeros_like(t)
    delta = torch.where(has, value.float() - prev_value, zero)
    gap = torch.where(has, torch.log1p((prev_time - t).clamp_min(0.0)), zero)
    return rank, torch.stack([delta, gap, has.float()], dim=-1)


def query_context(query_analyte: torch.Tensor, analyte: torch.Tensor, time: torch.Tensor,
                  real: torch.Tensor) -> torch.Tensor:
    """:data:`QUERY_CONTEXT` of each query, read from the events: ``(batch, queries, 6)``.

    ``query_analyte`` is ``(batch, queries)``; the event tensors are ``(batch, events)`` (days
    before the forecast time, real mask). Counts are of real events only.
    """
    t = time.float()
    real = real.bool()
    match = (query_analyte[:, :, None] == analyte[:, None, :]) & real[:, None, :]  # [b x q x e]
    tq = t[:, None, :].expand_as(match)
    n_1d = (match & (tq <= 1.0)).sum(-1).float()
    n_7d = (match & (tq <= 7.0)).sum(-1).float()
    inf = torch.full_like(t, math.inf)
    since_any = torch.where(real, t, inf).min(-1).values  # [b]
    since_any = torch.where(torch.isfinite(since_any), since_any, torch.zeros_like(since_any))
    all_1d = (real & (t <= 1.0)).sum(-1).float()  # [b]
    tm = torch.where(match, tq, torch.full_like(tq, math.inf))
    k = min(2, tm.shape[-1])
    two = tm.topk(k, dim=-1, largest=False).values  # [b x q x k], the two latest
    has_gap = torch.isfinite(two[..., -1]) if k == 2 else torch.zeros_like(n_1d, dtype=torch.bool)
    gap = torch.where(has_gap, (two[..., -1] - two[..., 0]).clamp_min(0.0), torch.zeros_like(n_1d)) if k == 2 \
        else torch.zeros_like(n_1d)
    q = query_analyte.shape[1]
    return torch.stack([
        torch.log1p(n_1d), torch.log1p(n_7d),
        torch.log1p(since_any)[:, None].expand(-1, q), (torch.log1p(all_1d) / 2.0)[:, None].expand(-1, q),
        torch.log1p(gap), has_gap.float(),
    ], dim=-1)


class LabTrendEmbeddings(nn.Module):
    """Input tokens: events, the patient token and queries. The analyte table is shared."""

    def __init__(self, config: LabTrendConfig):
        super().__init__()
        d = config.d_model
        self.analyte = nn.Embedding(config.n_analytes, d, padding_idx=PAD_ID)
        self.event_value = nn.Linear(5, d)  # [value, censor one-hot (3), observed]
        self.event_time = LabTrendTimeEncoding(config)
        self.patient_sex = nn.Embedding(3, d)  # 0 unknown, 1 F, 2 M
        self.patient_age = nn.Linear(2, d)  # [age / 100, age known]
        self.query_anchor = nn.Linear(4, d)  # [anchor value, anchor censor one-hot (3)]
        # summary of the analyte's prior results (model.features.QUERY_SUMMARY); zero at initialisation
        self.query_summary = LabTrendQuerySummary(config.query_summary_features, d) if config.query_summary_features else None
        self.query_horizon = LabTrendTimeEncoding(config)
        if config.event_context:
            self.event_rank = nn.Embedding(N_RANKS, d)
            self.event_change = nn.Linear(3, d)  # [change from the previous, log1p gap, has previous]
        if config.query_context:
            self.query_context = nn.Linear(len(QUERY_CONTEXT), d)
        self.event_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.patient_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.query_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.soft_limit = float(getattr(config, "input_soft_limit", 0.0) or 0.0)

    def _level(self, value: torch.Tensor) -> torch.Tensor:
        """A normalised value as a feature: ``L * tanh(z / L)`` with ``config.input_soft_limit`` L (0: as is)."""
        z = value.float()
        return self.soft_limit * torch.tanh(z / self.soft_limit) if self.soft_limit > 0 else z

    def events(self, analyte, value, censor, time, observed, real=None) -> torch.Tensor:
        """All ``(batch, events)`` -> ``(batch, events, d_model)``. Unobserved values enter as 0 with observed = 0.

        ``real`` (the event mask; default ``observed``) is needed for the event context.
        """
        obs = observed.float().unsqueeze(-1)  # [batch x events x 1]
        features = torch.cat([self._level(value).unsqueeze(-1) * obs, _censor_one_hot(censor) * obs, obs], dim=-1)
        x = self.analyte(analyte) + self.event_value(features) + self.event_time(time)
        if hasattr(self, "event_rank"):
            rank, change = event_context(analyte, value, time, observed.bool() if real is None else real.bool(),
                                         observed.bool())
            x = x + self.event_rank(rank) + self.event_change(change)
        return self.dropout(self.event_norm(x))  # [batch x events x d_model]

    def patient(self, age: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        """``age`` (years, NaN unknown) and ``sex`` of shape ``(batch,)`` -> ``(batch, 1, d_model)``."""
        known = torch.isfinite(age)
        age = torch.where(known, age, torch.zeros_like(age)).float() / 100.0
        x = self.patient_sex(sex.long().clamp(0, 2)) + self.patient_age(torch.stack([age, known.float()], dim=-1))
        return self.dropout(self.patient_norm(x)).unsqueeze(1)  # [batch x 1 x d_model]

    def queries(self, analyte, horizon, anchor_value, anchor_censor, summary=None, events=None) -> torch.Tensor:
        """All ``(batch, queries)`` (``summary``: ``(batch, queries, k)`` or None) -> ``(batch, queries, d_model)``.

        ``events`` = ``(event_analyte, event_time, event_mask)`` for the query context.
        """
        anchor = torch.cat([self._level(anchor_value).unsqueeze(-1), _censor_one_hot(anchor_censor)], dim=-1)
        x = self.analyte(analyte) + self.query_anchor(anchor) + self.query_horizon(horizon)
        if self.query_summary is not None and summary is not None:
            x = x + self.query_summary(summary.float())
        if hasattr(self, "query_context") and events is not None:
            x = x + self.query_context(query_context(analyte, *events))
        return self.dropout(self.query_norm(x))  # [batch x queries x d_model]


class LabTrendQuerySummary(nn.Linear):
    """Summary of a query analyte's prior results -> ``d_model``; zero-initialised, so a
    checkpoint trained without it (or a fresh model) starts exactly where it was."""


class LabTrendAttention(nn.Module):
    """Multi-head attention of ``x`` over ``memory`` (self-attention when they are the same)."""

    def __init__(self, config: LabTrendConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.o_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, L, d), ``memory`` (batch, S, d), ``key_mask`` (batch, S) bool, True = real key."""
        b, L, d = x.shape
        s = memory.shape[1]
        h = self.n_heads
        q = self.q_proj(x).view(b, L, h, d // h).transpose(1, 2)  # [batch x heads x L x d_head]
        k = self.k_proj(memory).view(b, s, h, d // h).transpose(1, 2)  # [batch x heads x S x d_head]
        v = self.v_proj(memory).view(b, s, h, d // h).transpose(1, 2)
        attn_mask = key_mask[:, None, None, :]  # [batch x 1 x 1 x S], True = may attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [batch x heads x L x d_head]
        return self.o_proj(out.transpose(1, 2).reshape(b, L, d))  # [batch x L x d]


class LabTrendMLP(nn.Module):
    def __init__(self, config: LabTrendConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff)
        self.fc_out = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class LabTrendEncoderLayer(nn.Module):
    """Pre-norm self-attention over [patient, events] + feed-forward."""

    def __init__(self, config: LabTrendConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = LabTrendAttention(config)
        self.norm_mlp = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = LabTrendMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm_attn(hidden)
        hidden = hidden + self.dropout(self.attn(x, x, key_mask))
        return hidden + self.dropout(self.mlp(self.norm_mlp(hidden)))  # [batch x 1+events x d_model]


class LabTrendDecoderLayer(nn.Module):
    """Pre-norm cross-attention of queries over the encoded events + feed-forward (no query self-attention)."""

    def __init__(self, config: LabTrendConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.cross_attn = LabTrendAttention(config)
        self.norm_mlp = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = LabTrendMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        queries = queries + self.dropout(self.cross_attn(self.norm_attn(queries), memory, key_mask))
        return queries + self.dropout(self.mlp(self.norm_mlp(queries)))  # [batch x queries x d_model]


class LabTrendQuantileHead(nn.Module):
    """Hidden state -> monotone quantiles: ``q_0 = a_0``, ``q_k = q_{k-1} + softplus(a_k)``.

    At initialisation the weights are zero and the biases put the quantiles of
    ``N(0, head_init_spread)`` at the configured levels, so the untrained forecasting
    head predicts "the last value +- a spread" rather than noise.
    """

    def __init__(self, config: LabTrendConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.head_dropout)
        # Own parameters rather than an nn.Linear, so this module's _init_weights branch runs.
        self.weight = nn.Parameter(torch.empty(len(config.quantiles), config.d_model))
        self.bias = nn.Parameter(torch.empty(len(config.quantiles)))

    @staticmethod
    def initial_bias(config: LabTrendConfig) -> torch.Tensor:
        z = torch.special.ndtri(torch.tensor(config.quantiles, dtype=torch.float64)) * config.head_init_spread
        steps = (z[1:] - z[:-1]).clamp_min(1e-4)
        return torch.cat([z[:1], torch.log(torch.expm1(steps))]).float()  # softplus^-1 of the steps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raw = F.linear(self.dropout(self.norm(hidden)), self.weight, self.bias).float()  # [... x n_quantiles]
        return torch.cat([raw[..., :1], F.softplus(raw[..., 1:])], dim=-1).cumsum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class LabTrendModelOutput(ModelOutput):
    """Backbone output.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, events, d_model)`):
            Encoded events (padded positions hold unused values).
        patient_hidden_state (`torch.FloatTensor` of shape `(batch, d_model)`):
            Encoded patient token.
        query_hidden_state (`torch.FloatTensor` of shape `(batch, queries, d_model)`, *optional*):
            Decoded queries; None when no queries were given.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Encoder input and every encoder layer's output, each `(batch, 1 + events, d_model)`
            with the patient token first; only with ``output_hidden_states=True``.
    """

    last_hidden_state: torch.FloatTensor | None = None
    patient_hidden_state: torch.FloatTensor | None = None
    query_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LabTrendForPretrainingOutput(ModelOutput):
    """Pretraining output.

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            ``masked_loss + pretrain_forecast_weight * forecast_loss`` (the latter when targets were given).
        masked_loss (`torch.FloatTensor` of shape `()`):
            Mean pinball loss of the hidden event values (0 when nothing was hidden).
        forecast_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean pinball loss of the queries' quantiles.
        masked_quantiles (`torch.FloatTensor` of shape `(batch, events, n_quantiles)`):
            Predicted quantiles of every event's value, normalised units (meaningful where hidden).
        value_mask (`torch.BoolTensor` of shape `(batch, events)`):
            True where the event value was hidden from the network.
        quantiles (`torch.FloatTensor` of shape `(batch, queries, n_quantiles)`, *optional*):
            Forecast quantiles of the queries, normalised units.
    """

    loss: torch.FloatTensor | None = None
    masked_loss: torch.FloatTensor | None = None
    forecast_loss: torch.FloatTensor | None = None
    masked_quantiles: torch.FloatTensor | None = None
    value_mask: torch.BoolTensor | None = None
    quantiles: torch.FloatTensor | None = None


@dataclass
class LabTrendForForecastingOutput(ModelOutput):
    """Forecasting output.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean pinball loss over real queries and quantile levels; only with ``target_value``.
        quantiles (`torch.FloatTensor` of shape `(batch, queries, n_quantiles)`):
            Monotone forecast quantiles, normalised units of each query's analyte.
        query_hidden_state (`torch.FloatTensor` of shape `(batch, queries, d_model)`):
            Decoded queries.
    """

    loss: torch.FloatTensor | None = None
    quantiles: torch.FloatTensor | None = None
    query_hidden_state: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

_INPUTS_DOC = r"""
    Args:
        event_analyte (`torch.LongTensor` of shape `(batch, events)`): analyte ids (0 = padding).
        event_value (`torch.FloatTensor` of shape `(batch, events)`): normalised values; a censored
            result carries its limit.
        event_censor (`torch.LongTensor` of shape `(batch, events)`): -1 '<', 0 exact, +1 '>'.
        event_time (`torch.FloatTensor` of shape `(batch, events)`): days from collection to the
            forecast time (> 0).
        event_mask (`torch.LongTensor` of shape `(batch, events)`): 1 for a real event, 0 for padding.
        patient_age (`torch.FloatTensor` of shape `(batch,)`): years at the forecast time, NaN unknown.
        patient_sex (`torch.LongTensor` of shape `(batch,)`): 0 unknown, 1 F, 2 M.
        query_analyte (`torch.LongTensor` of shape `(batch, queries)`): analyte ids to forecast.
        query_horizon (`torch.FloatTensor` of shape `(batch, queries)`): days from the analyte's last
            result to the forecast time.
        query_anchor_value (`torch.FloatTensor` of shape `(batch, queries)`): that last result, normalised.
        query_anchor_censor (`torch.LongTensor` of shape `(batch, queries)`): its censor flag.
        query_mask (`torch.LongTensor` of shape `(batch, queries)`): 1 for a real query, 0 for padding.
        query_summary (`torch.FloatTensor` of shape `(batch, queries, query_summary_features)`, *optional*):
            summary of each query analyte's prior results (``model.features.QUERY_SUMMARY``);
            None reads as zeros.
"""


class LabTrendPreTrainedModel(PreTrainedModel):
    config_class = LabTrendConfig
    config: LabTrendConfig
    base_model_prefix = "model"
    main_input_name = "event_value"
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal(0, initializer_range) linears/embeddings, unit LayerNorms
        if isinstance(module, LabTrendTimeEncoding):
            init.copy_(module.log_frequency, LabTrendTimeEncoding.initial_log_frequency(self.config))
            init.zeros_(module.phase)
        elif isinstance(module, LabTrendQuerySummary):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LabTrendQuantileHead):
            init.zeros_(module.weight)
            init.copy_(module.bias, LabTrendQuantileHead.initial_bias(self.config))
        if isinstance(getattr(module, "analyte_step_scale", None), torch.Tensor):
            init.ones_(module.analyte_step_scale)  # a checkpoint without step scales: normalised units

    def _register_step_scale(self) -> None:
        """``analyte_step_scale`` (``(n_analytes,)``, saved with the weights): per analyte, the
        unit of the forecasting head's change from the anchor, in normalised units.

        Fine-tuning sets it to the typical change between consecutive results of the analyte
        in the training patients (:func:`model.training.step_scales`), so the head predicts
        changes in units of each analyte's own variation: a slowly moving analyte (MCV, RDW,
        creatinine) is not forecast with the spread of a fast one (potassium, glucose), and
        every analyte weighs alike in the loss. Ones (the initial value, and checkpoints made
        before it existed) mean plain normalised units.
        """
        self.register_buffer("analyte_step_scale", torch.ones(self.config.n_analytes), persistent=True)

    def _forecast_quantiles(self, query_analyte, query_anchor_value, query_hidden) -> torch.Tensor:
        """``anchor + step_scale[analyte] * head(query)``: ``(batch, queries, n_quantiles)``, normalised units."""
        step = self.analyte_step_scale.to(query_hidden.device)[query_analyte].float().unsqueeze(-1)
        return query_anchor_value.float().unsqueeze(-1) + step * self.quantile_head(query_hidden)

    def _quantile_levels(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.config.quantiles, dtype=torch.float32, device=like.device)


def _check_lengths(config: LabTrendConfig, event_analyte: torch.Tensor, query_analyte: torch.Tensor | None) -> None:
    if event_analyte.dim() != 2:
        raise ValueError(f"event_analyte must have shape (batch, events), got {tuple(event_analyte.shape)}")
    if event_analyte.shape[1] > config.max_events:
        raise ValueError(f"events per row ({event_analyte.shape[1]}) exceed config.max_events ({config.max_events})")
    if query_analyte is not None:
        if query_analyte.dim() != 2 or query_analyte.shape[0] != event_analyte.shape[0]:
            raise ValueError(
                f"query_analyte shape {tuple(query_analyte.shape)} does not match batch {event_analyte.shape[0]}"
            )
        if query_analyte.shape[1] > config.max_queries:
            raise ValueError(
                f"queries per row ({query_analyte.shape[1]}) exceed config.max_queries ({config.max_queries})"
            )


class LabTrendModel(LabTrendPreTrainedModel):
    __doc__ = "The LabTrend backbone: event encoder + query cross-attention decoder." + _INPUTS_DOC + r"""
        value_mask (`torch.BoolTensor` of shape `(batch, events)`, *optional*): True where an event's
            value and censor flag are hidden (its analyte and time stay visible).
        output_hidden_states (`bool`, *optional*): also return every encoder layer's output.
    """

    # the heads of a pretraining or forecasting checkpoint, which the backbone alone does not use
    _keys_to_ignore_on_load_unexpected = [r"^(masked_value_head|quantile_head)\.", r"^analyte_step_scale$"]

    def __init__(self, config: LabTrendConfig):
        super().__init__(config)
        self.embeddings = LabTrendEmbeddings(config)
        self.encoder_layers = nn.ModuleList(LabTrendEncoderLayer(config) for _ in range(config.n_layers))
        self.encoder_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.decoder_layers = nn.ModuleList(LabTrendDecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def _run(self, layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(layer.__call__, *args)
        return layer(*args)

    def forward(
        self,
        event_analyte: torch.Tensor,
        event_value: torch.Tensor,
        event_censor: torch.Tensor,
        event_time: torch.Tensor,
        event_mask: torch.Tensor,
        patient_age: torch.Tensor,
        patient_sex: torch.Tensor,
        query_analyte: torch.Tensor | None = None,
        query_horizon: torch.Tensor | None = None,
        query_anchor_value: torch.Tensor | None = None,
        query_anchor_censor: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        query_summary: torch.Tensor | None = None,
    ) -> LabTrendModelOutput:
        _check_lengths(self.config, event_analyte, query_analyte)
        real = event_mask.bool()  # [batch x events]
        observed = real if value_mask is None else real & ~value_mask.bool()
        events = self.embeddings.events(event_analyte, event_value, event_censor, event_time, observed, real)
        patient = self.embeddings.patient(patient_age, patient_sex)  # [batch x 1 x d_model]
        hidden = torch.cat([patient, events], dim=1)  # [batch x 1+events x d_model]
        # The patient token is always a real key, so no row is ever all padding.
        key_mask = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)  # [batch x 1+events]

        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.encoder_layers:
            hidden = self._run(layer, hidden, key_mask)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden,)
        hidden = self.encoder_norm(hidden)

        query_hidden = None
        if query_analyte is not None:
            query_hidden = self.embeddings.queries(
                query_analyte, query_horizon, query_anchor_value, query_anchor_censor, query_summary,
                events=(event_analyte, event_time, real),
            )  # [batch x queries x d_model]
            for layer in self.decoder_layers:
                query_hidden = self._run(layer, query_hidden, hidden, key_mask)
            query_hidden = self.decoder_norm(query_hidden)  # [batch x queries x d_model]

        return LabTrendModelOutput(
            last_hidden_state=hidden[:, 1:],
            patient_hidden_state=hidden[:, 0],
            query_hidden_state=query_hidden,
            hidden_states=all_hidden,
        )


class LabTrendForPretraining(LabTrendPreTrainedModel):
    __doc__ = r"""Backbone + masked value head + forecasting head.

    Objectives (both pinball losses over the configured quantiles, normalised units):

    * masked value prediction: a random ``mask_prob`` fraction of real events (or the given
      ``value_mask``) has its value and censor flag hidden; the masked value head predicts
      their quantiles from the rest of the history, including other analytes at the same time;
    * next-value forecasting (when queries and ``target_value`` are given): the forecasting
      head predicts held-out results exactly as :class:`LabTrendForForecasting` does.

    ``loss = masked_loss + pretrain_forecast_weight * forecast_loss``.
    """ + _INPUTS_DOC + r"""
        value_mask (`torch.BoolTensor` of shape `(batch, events)`, *optional*): events to hide; when
            None, each real event is hidden with probability ``mask_prob`` (the global torch RNG,
            on the inputs' device).
        target_value (`torch.FloatTensor` of shape `(batch, queries)`, *optional*): true values of the
            queries, normalised units.
        target_censor (`torch.LongTensor` of shape `(batch, queries)`, *optional*): their censor flags.
        target_weight (`torch.FloatTensor` of shape `(batch, queries)`, *optional*): loss weight of each
            query (``model.training``'s 'nmae' weighting); None weighs every query alike.
    """

    def __init__(self, config: LabTrendConfig):
        super().__init__(config)
        self.model = LabTrendModel(config)
        self.masked_value_head = LabTrendQuantileHead(config)
        self.quantile_head = LabTrendQuantileHead(config)
        self._register_step_scale()
        self.post_init()

    def forward(
        self,
        event_analyte: torch.Tensor,
        event_value: torch.Tensor,
        event_censor: torch.Tensor,
        event_time: torch.Tensor,
        event_mask: torch.Tensor,
        patient_age: torch.Tensor,
        patient_sex: torch.Tensor,
        query_analyte: torch.Tensor | None = None,
        query_horizon: torch.Tensor | None = None,
        query_anchor_value: torch.Tensor | None = None,
        query_anchor_censor: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        target_value: torch.Tensor | None = None,
        target_censor: torch.Tensor | None = None,
        query_summary: torch.Tensor | None = None,
        target_weight: torch.Tensor | None = None,
    ) -> LabTrendForPretrainingOutput:
        real = event_mask.bool()
        if value_mask is None:
            value_mask = torch.rand(real.shape, device=real.device) < self.config.mask_prob
        value_mask = value_mask.bool() & real  # [batch x events]
        out = self.model(
            event_analyte, event_value, event_censor, event_time, event_mask, patient_age, patient_sex,
            query_analyte, query_horizon, query_anchor_value, query_anchor_censor, query_mask, value_mask=value_mask,
            query_summary=query_summary,
        )
        levels = self._quantile_levels(event_value)
        masked_quantiles = self.masked_value_head(out.last_hidden_state)  # [batch x events x n_quantiles]
        censor = event_censor if self.config.censored_loss else None
        masked_loss = pinball_loss(masked_quantiles, event_value.float(), levels, value_mask, censor)

        quantiles = forecast_loss = None
        if out.query_hidden_state is not None:
            quantiles = self._forecast_quantiles(query_analyte, query_anchor_value, out.query_hidden_state)
            if target_value is not None:
                forecast_loss = _forecast_loss(self.config, quantiles, target_value, target_censor, query_mask, levels,
                                               target_weight)
        loss = masked_loss
        if forecast_loss is not None:
            loss = loss + self.config.pretrain_forecast_weight * forecast_loss
        return LabTrendForPretrainingOutput(
            loss=loss,
            masked_loss=masked_loss,
            forecast_loss=forecast_loss,
            masked_quantiles=masked_quantiles,
            value_mask=value_mask,
            quantiles=quantiles,
        )

    @torch.no_grad()
    def predict_masked(self, batch: dict[str, torch.Tensor], value_mask: torch.Tensor) -> torch.Tensor:
        """Quantiles of each hidden event's value, predicted from the rest of its history.

        ``batch`` holds the event and patient inputs (extra keys are ignored); ``value_mask``
        (bool, ``(batch, events)``) marks the events to hide. To score each result of one
        specimen against the others (multivariate inconsistency), hide one event per row and
        repeat the row. Returns ``(batch, events, n_quantiles)`` in normalised units; only
        positions where ``value_mask & event_mask`` are meaningful.
        """
        names = (
            "event_analyte", "event_value", "event_censor", "event_time", "event_mask", "patient_age", "patient_sex",
        )
        return self.forward(**{k: batch[k] for k in names}, value_mask=value_mask).masked_quantiles


class LabTrendForForecasting(LabTrendPreTrainedModel):
    __doc__ = r"""Backbone + forecasting head, for fine-tuning and inference.

    Each query's quantiles are ``anchor + step_scale[analyte] * head(query)``: the monotone
    head predicts the change from the analyte's last result, in units of that analyte's
    typical change (``analyte_step_scale``; all normalised units), so an untrained head is
    a persistence forecast. The loss is the mean pinball loss over real queries
    (``query_mask``) and quantile levels; padded queries are ignored.
    """ + _INPUTS_DOC + r"""
        target_value (`torch.FloatTensor` of shape `(batch, queries)`, *optional*): true values,
            normalised units; gives ``loss``.
        target_censor (`torch.LongTensor` of shape `(batch, queries)`, *optional*): their censor flags.
        target_weight (`torch.FloatTensor` of shape `(batch, queries)`, *optional*): loss weight of each
            query (``model.training``'s 'nmae' weighting); None weighs every query alike.
    """

    # A pretraining checkpoint also holds the masked value head, which forecasting does not use.
    _keys_to_ignore_on_load_unexpected = [r"^masked_value_head\."]

    def __init__(self, config: LabTrendConfig):
        super().__init__(config)
        self.model = LabTrendModel(config)
        self.quantile_head = LabTrendQuantileHead(config)
        self._register_step_scale()
        self.post_init()

    def forward(
        self,
        event_analyte: torch.Tensor,
        event_value: torch.Tensor,
        event_censor: torch.Tensor,
        event_time: torch.Tensor,
        event_mask: torch.Tensor,
        patient_age: torch.Tensor,
        patient_sex: torch.Tensor,
        query_analyte: torch.Tensor,
        query_horizon: torch.Tensor,
        query_anchor_value: torch.Tensor,
        query_anchor_censor: torch.Tensor,
        query_mask: torch.Tensor | None = None,
        target_value: torch.Tensor | None = None,
        target_censor: torch.Tensor | None = None,
        query_summary: torch.Tensor | None = None,
        target_weight: torch.Tensor | None = None,
    ) -> LabTrendForForecastingOutput:
        out = self.model(
            event_analyte, event_value, event_censor, event_time, event_mask, patient_age, patient_sex,
            query_analyte, query_horizon, query_anchor_value, query_anchor_censor, query_mask,
            query_summary=query_summary,
        )
        quantiles = self._forecast_quantiles(query_analyte, query_anchor_value, out.query_hidden_state)
        loss = None
        if target_value is not None:
            levels = self._quantile_levels(quantiles)
            loss = _forecast_loss(self.config, quantiles, target_value, target_censor, query_mask, levels,
                                  target_weight)
        return LabTrendForForecastingOutput(loss=loss, quantiles=quantiles, query_hidden_state=out.query_hidden_state)


# ---------------------------------------------------------------------------------------------
# Auto classes: `AutoModel.from_pretrained(dir)` gives the backbone of any LabTrend checkpoint,
# `AutoModelForTimeSeriesPrediction` the forecasting model (a pipeline or a pretraining
# checkpoint), `AutoModelForPreTraining` the pretraining model.
# ---------------------------------------------------------------------------------------------


def _register_auto_models() -> None:
    from transformers import AutoModel, AutoModelForPreTraining, AutoModelForTimeSeriesPrediction

    for auto, cls in ((AutoModel, LabTrendModel), (AutoModelForPreTraining, LabTrendForPretraining),
                      (AutoModelForTimeSeriesPrediction, LabTrendForForecasting)):
        try:
            auto.register(LabTrendConfig, cls)
        except ValueError:  # already registered (a module reloaded)
            pass


_register_auto_models()
