"""Configuration of the LabTrend forecasting transformer, and the size presets.

The configuration travels with the weights (``config.json`` next to ``model.safetensors``),
so a checkpoint always rebuilds the network it was trained with. Run settings that do not
change the network (learning rate, batch size, device, activation checkpointing) belong to
``train.py``, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

from model import QUANTILES

__all__ = ["LabTrendConfig", "config_preset", "PRESETS"]


class LabTrendConfig(PretrainedConfig):
    r"""Configuration of [`LabTrendModel`] and its pretraining and forecasting heads.

    Inputs are irregular lab histories: one token per result (analyte, normalised value,
    censor flag, days before the forecast time) plus one patient token (age, sex). There is
    no time grid and no position index; time enters only through the continuous time
    encoding. Values are in normalised units (see ``model.features.AnalyteScaler``).

    Args:
        > Vocabulary

        n_analytes (`int`, *optional*, defaults to 64):
            Size of the analyte vocabulary **including** the three special ids: 0 = padding,
            1 = unknown analyte, 2 = mask (reserved). Must equal ``len(AnalyteVocab)``.

        > Architecture

        d_model (`int`, *optional*, defaults to 128):
            Width of every token (event, patient and query) in the network.
        n_layers (`int`, *optional*, defaults to 4):
            Number of self-attention layers in the event encoder.
        n_decoder_layers (`int`, *optional*, defaults to 1):
            Number of cross-attention layers through which queries read the encoded events.
            Queries never attend to each other, so a forecast does not depend on which other
            queries share its row.
        n_heads (`int`, *optional*, defaults to 4):
            Attention heads per layer; must divide ``d_model``.
        d_ff (`int`, *optional*, defaults to 256):
            Hidden width of the feed-forward block in every layer.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the input embeddings, attention weights and residual branches.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        max_events (`int`, *optional*, defaults to 256):
            Most events one row may hold; the feature builder keeps the most recent
            ``max_events`` results before the forecast time. The patient token is extra.
        max_queries (`int`, *optional*, defaults to 16):
            Most queries one row may hold; the feature builder splits larger groups over
            several rows with the same events.
        query_summary_features (`int`, *optional*, defaults to 6):
            Width of the summary of a query analyte's prior results added to its query token
            (``model.features.QUERY_SUMMARY``: mean, previous, minimum, maximum relative to
            the anchor, standard deviation, log count). It covers every prior result, also
            those older than the ``max_events`` window. 0 leaves it out.
        event_context (`bool`, *optional*, defaults to `False`):
            Give every event token what a tabular model reads from the history, computed by the
            network from its own inputs (so removing events removes them too): its recency rank
            among the results of its analyte (0 = the latest before the forecast time, 1, 2,
            3 or more), and the change from the previous observed result of the same analyte
            with the days between them (a local slope). With it one cross-attention layer can
            find "the latest value of every other analyte". `False` (checkpoints made before
            it existed) leaves the event tokens as they were.
        query_context (`bool`, *optional*, defaults to `False`):
            Give every query token counts and times read from the events: results of its
            analyte in the last day and the last week, days since the patient's last result
            of any analyte, results of any analyte in the last day (acuity), and days between
            the analyte's last two results. `False` leaves the query tokens as they were.

        input_soft_limit (`float`, *optional*, defaults to 0.0):
            When > 0, the values that enter the network as features (event values and the
            query anchor) pass through ``L * tanh(z / L)``: nearly unchanged in the range
            the model was trained on, bounded beyond it, so a real result far outside the
            training range (WBC 342 x10^3/uL) is read as "very high" instead of being
            extrapolated linearly into an absurd change. The forecast itself is still
            ``anchor + change`` with the anchor's exact value. 0 (checkpoints made before it
            existed) passes values as they are.

        > Time encoding

        time_fourier_features (`int`, *optional*, defaults to 16):
            Number of learned sine/cosine pairs in the time encoding. Each time (in days) is
            encoded as ``[log1p(days), sin(2 pi f_k days + p_k), cos(2 pi f_k days + p_k)]``
            followed by a linear map to ``d_model``; frequencies ``f_k`` and phases ``p_k``
            are learned.
        time_min_period_days (`float`, *optional*, defaults to 0.25):
            Shortest initial period of the Fourier features, in days (6 hours).
        time_max_period_days (`float`, *optional*, defaults to 3650.0):
            Longest initial period of the Fourier features, in days (10 years). Initial
            periods are spaced evenly on a log scale between the two.

        > Heads

        quantiles (`Sequence[float]`, *optional*, defaults to `(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)`):
            Quantile levels predicted by both heads, strictly increasing in (0, 1). The
            forecasts contract (``model.QUANTILES``) needs the default.
        head_init_spread (`float`, *optional*, defaults to 0.5):
            Standard deviation, in normalised units, of the Gaussian whose quantiles the
            heads predict at initialisation. The forecasting head starts as "last value of
            the analyte +- this spread" (persistence), and learns corrections from there.
        value_clip (`float`, *optional*, defaults to 20.0):
            Normalised values are clipped to ``[-value_clip, value_clip]`` on the way in and
            when forecasts are turned back into canonical units, so a typo that slipped past
            the plausibility filter cannot overflow anything (LAB-10).

        > Pretraining

        mask_prob (`float`, *optional*, defaults to 0.15):
            Fraction of observed event values hidden in masked value prediction. The
            analyte and the time of a hidden event stay visible; its value and censor flag
            do not.
        pretrain_forecast_weight (`float`, *optional*, defaults to 1.0):
            Weight of the next-value forecasting loss (queries on held-out last results)
            relative to the masked value loss in pretraining.

        > Fine-tuning

        head_dropout (`float`, *optional*, defaults to 0.0):
            Dropout applied just before each quantile head.
        censored_loss (`bool`, *optional*, defaults to `True`):
            How censored targets enter the pinball loss. `True`: a ``'<L'`` target only
            penalises quantiles above ``L`` and a ``'>U'`` target only quantiles below ``U``
            (the true value is somewhere beyond the limit). `False`: the limit is treated as
            an exact value.

    Activation (gradient) checkpointing is a run setting, not a field: call
    ``model.activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` on
    transformers 4.x) in the training script.

    Example:

    ```python
    >>> from model.configuration import config_preset
    >>> from model.modeling import LabTrendForForecasting
    >>> config = config_preset("tiny", n_analytes=40)
    >>> model = LabTrendForForecasting(config)
    ```
    """

    model_type = "labtrend"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(
        self,
        # vocabulary
        n_analytes: int = 64,
        # architecture
        d_model: int = 128,
        n_layers: int = 4,
        n_decoder_layers: int = 1,
        n_heads: int = 4,
        d_ff: int = 256,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        max_events: int = 256,
        max_queries: int = 16,
        query_summary_features: int = 6,
        event_context: bool = False,
        query_context: bool = False,
        input_soft_limit: float = 0.0,
        # time encoding
        time_fourier_features: int = 16,
        time_min_period_days: float = 0.25,
        time_max_period_days: float = 3650.0,
        # heads
        quantiles: Sequence[float] = QUANTILES,
        head_init_spread: float = 0.5,
        value_clip: float = 20.0,
        # pretraining
        mask_prob: float = 0.15,
        pretrain_forecast_weight: float = 1.0,
        # fine-tuning
        head_dropout: float = 0.0,
        censored_loss: bool = True,
        **kwargs,
    ):
        self.n_analytes = n_analytes
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_decoder_layers = n_decoder_layers
        self.n_heads = n_heads
        self.d_ff = d_ff
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.max_events = max_events
        self.max_queries = max_queries
        self.query_summary_features = query_summary_features
        self.event_context = bool(event_context)
        self.query_context = bool(query_context)
        self.input_soft_limit = float(input_soft_limit)
        self.time_fourier_features = time_fourier_features
        self.time_min_period_days = time_min_period_days
        self.time_max_period_days = time_max_period_days
        self.quantiles = [float(q) for q in quantiles]
        self.head_init_spread = head_init_spread
        self.value_clip = value_clip
        self.mask_prob = mask_prob
        self.pretrain_forecast_weight = pretrain_forecast_weight
        self.head_dropout = head_dropout
        self.censored_loss = censored_loss
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        if self.n_analytes < 4:
            raise ValueError(f"n_analytes ({self.n_analytes}) must be at least 4: 3 special ids plus one analyte")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        q = self.quantiles
        if not q or any(not 0.0 < x < 1.0 for x in q) or any(b <= a for a, b in zip(q, q[1:])):
            raise ValueError(f"quantiles ({q}) must be strictly increasing and inside (0, 1)")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"mask_prob ({self.mask_prob}) must be in [0, 1)")
        if not 0.0 < self.time_min_period_days <= self.time_max_period_days:
            raise ValueError(
                f"time periods must satisfy 0 < time_min_period_days ({self.time_min_period_days}) "
                f"<= time_max_period_days ({self.time_max_period_days})"
            )
        if self.input_soft_limit < 0:
            raise ValueError(f"input_soft_limit ({self.input_soft_limit}) must be >= 0 (0 disables it)")
        if self.query_summary_features not in (0, 6):
            raise ValueError(f"query_summary_features ({self.query_summary_features}) must be 0 or 6 "
                             "(model.features.QUERY_SUMMARY)")
        for name in ("n_layers", "n_decoder_layers", "d_ff", "max_events", "max_queries", "time_fourier_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")

    @staticmethod
    def editable_fields() -> tuple[str, ...]:
        """Fields fine-tuning may change on a pretrained checkpoint; all others fix the weights' shapes or meaning."""
        return ("dropout", "head_dropout", "censored_loss", "mask_prob", "pretrain_forecast_weight", "max_queries")


# Sizes, with LabTrendForForecasting parameter counts at n_analytes=200:
#   tiny   34 k   tests
#   small 328 k   fine-tunes on the MIMIC-IV demo on 2 CPU cores (~0.5-1 s per step of 32 rows x 128 events)
#   base  31.7 M  GPU
# What every current preset reads beyond the raw events (issue 13): see the fields' docs.
_CONTEXT = dict(event_context=True, query_context=True, input_soft_limit=8.0)

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=32, n_layers=2, n_decoder_layers=1, n_heads=2, d_ff=64, max_events=64, max_queries=8,
                 time_fourier_features=8, dropout=0.0, **_CONTEXT),
    "small": dict(d_model=96, n_layers=3, n_decoder_layers=2, n_heads=4, d_ff=192, max_events=128, max_queries=16,
                  time_fourier_features=16, dropout=0.1, **_CONTEXT),
    "base": dict(d_model=512, n_layers=8, n_decoder_layers=2, n_heads=8, d_ff=2048, max_events=512, max_queries=32,
                 time_fourier_features=32, dropout=0.1, **_CONTEXT),
}


def config_preset(name: str, **overrides) -> LabTrendConfig:
    """A :class:`LabTrendConfig` of preset size ``name`` ('tiny', 'small' or 'base'), with ``overrides`` applied.

    ``n_analytes`` normally comes from the fitted vocabulary: ``config_preset('small', n_analytes=len(vocab))``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return LabTrendConfig(**{**PRESETS[name], **overrides})


# `AutoConfig.from_pretrained(dir)` rebuilds a LabTrendConfig from any LabTrend checkpoint once
# this module is imported (model_type 'labtrend'); the models register in model.modeling.
def _register_auto_config() -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.register(LabTrendConfig.model_type, LabTrendConfig)
    except ValueError:  # already registered (a module reloaded)
        pass


_register_auto_config()
