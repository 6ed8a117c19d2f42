"""SHAP explanations of one forecast over groups of input events (model-agnostic, additive by construction).

A forecast's median is explained by Shapley values over **groups** of its inputs:

* ``results:<code>`` - every prior result of one analyte in the model's event list. For the
  forecast analyte itself the group also holds the *anchor* (its last result, from which the
  forecasting head predicts the change).
* ``time_since_last_result`` - days from the forecast analyte's last result to the forecast time.
* ``age``, ``sex`` - the patient token (only when known; an unknown one cannot contribute).

**Removing a group** (the custom :class:`EventGroupMasker`) deletes its events from the input
(the network never sees them: padded positions are not attention keys), replaces the anchor
by the population centre of the analyte (normalised value 0, the training median), the
horizon by ``reference_horizon_days`` (default 1 day: a modelling choice, not a clinical
number), age by "unknown" and sex by "unknown" - the encodings the model already has for
missing information. The base value is therefore the forecast with nothing of the patient
known. Values are in the forecast's canonical unit (the median is denormalised, with the
conformal calibration applied exactly as :meth:`ForecastPipeline.forecast` does).

SHAP's own model-agnostic explainers do the work: ``shap.explainers.Exact`` for up to
``max_exact_groups`` groups (``2**G`` evaluations), else ``shap.explainers.Permutation``
(``permutations * (2G + 1)`` evaluations). Beyond ``max_analyte_groups`` analytes the least
frequent share one group (``results:other``) to bound the cost. Both are exactly efficient (base value + sum of
values = the model output on the full input), so any gap against the forecast shown to the
user means the explanation is not about that forecast (another model version, a
non-deterministic model, different inputs). The gap is checked here:
``|base + sum - median| <= 0.01 * max(1, |median|)`` (XAI-15); when it fails, the result
says "Explanation not available for this model version (attributions do not add up;
difference = x)" and the event is logged with the model version. Gradient explainers
(``DeepExplainer``/``GradientExplainer``) are never used: they do not add up on
transformers with LayerNorm (shap #4251, #3505, #3881). ``check_additivity`` is never
switched off; an explainer error comes back as a message, never as a raw exception.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from model import MIN_HISTORY, QUANTILES
from model.features import N_SPECIAL, STATUS_OK, encode_queries

__all__ = [
    "ForecastExplanation",
    "EventGroupMasker",
    "explain_forecast",
    "explain_forecasts",
    "warm_up",
    "NOT_ADDITIVE_MESSAGE",
    "GROUP_TIME",
    "GROUP_AGE",
    "GROUP_SEX",
]

log = logging.getLogger(__name__)

GROUP_TIME = "time_since_last_result"
GROUP_AGE = "age"
GROUP_SEX = "sex"
NOT_ADDITIVE_MESSAGE = "Explanation not available for this model version (attributions do not add up; difference = {diff})"
_MEDIAN = QUANTILES.index(0.5)


@dataclass
class ForecastExplanation:
    """Shapley values of one forecast median, or why there are none.

    ``status``: 'ok' (values add up), 'not_additive', 'unavailable' (no forecast to explain)
    or 'failed' (the explainer raised); ``message`` says it in words when not 'ok'.
    ``groups``: one dict per input group, largest absolute value first: ``group``, ``label``,
    ``analyte_code`` (None for time/age/sex), ``n_events``, ``value`` (canonical unit; None
    unless 'ok'). ``median``: the forecast median explained; ``base_value``: the forecast
    with every group removed; ``additivity_gap``: ``|base + sum - median|``.
    """

    status: str
    message: str | None
    patient_id: str
    analyte_code: str
    at: pd.Timestamp
    unit: str | None
    model_version: str
    method: str | None = None
    median: float | None = None
    base_value: float | None = None
    groups: list[dict] = field(default_factory=list)
    additivity_gap: float | None = None
    tolerance: float | None = None
    n_evaluations: int | None = None
    elapsed_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_payload(self) -> dict:
        """A JSON-safe dict (times as ISO strings, NaN as None)."""
        d = asdict(self)
        d["at"] = pd.Timestamp(self.at).isoformat() if self.at is not None else None
        for k in ("median", "base_value", "additivity_gap", "tolerance", "elapsed_s"):
            v = d[k]
            d[k] = float(v) if v is not None and math.isfinite(float(v)) else None
        return d


_SHAP_JIT_MODULES = ("shap.links", "shap.utils._masked_model", "shap.explainers._exact")
_shap_ready = False


def _shap():
    """shap, imported lazily: it is slow to import and only needed here.

    shap compiles its numba kernels on first use **in every process**: 10-25 s of CPU on a busy
    2-core machine, which every scoring worker and the dashboard's first explanation paid.
    Numba's own on-disk cache is switched on for them (what ``@njit(cache=True)`` does): the
    link functions and the exact explainer's coalition sums are then compiled once per
    installation (numba checks the source file's timestamp, so an upgraded shap compiles
    afresh). The masked model's output bookkeeping takes the link function as an argument and
    cannot be cached, so it is still compiled once per process: :func:`warm_up` does that ahead
    of the first real explanation.
    """
    global _shap_ready
    import shap

    if not _shap_ready:
        import importlib

        try:
            from numba.core.dispatcher import Dispatcher
        except ImportError:  # a numba without this layout: shap still works, it compiles per process
            Dispatcher = None
        if Dispatcher is not None:
            for name in _SHAP_JIT_MODULES:
                try:
                    mod = importlib.import_module(name)
                except ImportError:
                    continue
                for obj in vars(mod).values():
                    if isinstance(obj, Dispatcher) and getattr(obj, "_cache", None) is not None \
                            and type(obj._cache).__name__ == "NullCache":
                        try:
                            obj.enable_caching()
                        except Exception:  # noqa: BLE001 - e.g. a read-only install: compile per process
                            log.debug("numba cache not enabled for %s", obj, exc_info=True)
        _shap_ready = True
    return shap


def _masker_class():
    shap = _shap()

    class EventGroupMaskerImpl(shap.maskers.Masker):
        """Group mask -> keep flags over the model inputs: one per event, then anchor, horizon, age, sex.

        ``event_group[e]`` is the group of event ``e``; ``extra_groups`` the groups of the
        anchor, the horizon, age and sex (-1: not a group, always kept). The model function
        reads the flags and deletes the events whose flag is 0.
        """

        def __init__(self, event_group: np.ndarray, extra_groups: tuple[int, int, int, int], n_groups: int):
            self.event_group = np.asarray(event_group, dtype=np.int64)
            self.extra_groups = np.asarray(extra_groups, dtype=np.int64)
            self.shape = (1, int(n_groups))
            self.clustering = None
            self.immutable_outputs = True
            # every mask of one permutation (or every coalition of the exact explainer) in one call:
            # the value function memoises and orders them by length itself
            self.default_batch_size = 1 << 16

        def __call__(self, mask, *args):
            mask = np.asarray(self._standardize_mask(mask, *args), dtype=bool)
            keep_events = mask[self.event_group] if len(self.event_group) else np.zeros(0, bool)
            extras = np.where(self.extra_groups >= 0, mask[np.maximum(self.extra_groups, 0)], True)
            return np.concatenate([keep_events, extras]).astype(np.float32)[None, :]

    return EventGroupMaskerImpl


def EventGroupMasker(event_group, extra_groups, n_groups):  # noqa: N802 - a class factory (shap imported lazily)
    """A ``shap.maskers.Masker`` that removes whole groups of events (see :func:`_masker_class`)."""
    return _masker_class()(event_group, extra_groups, n_groups)


class _ValueFunction:
    """keep flags ``(n, events + 4)`` -> forecast medians ``(n,)`` in the canonical unit.

    Each distinct coalition is evaluated once per explanation (shap's Permutation explainer
    asks for the empty and the full coalition in every permutation, and antithetic
    permutations share more): values are kept by keep-flag pattern. The masked inputs of one
    call are run shortest first in forward passes of at most ``batch_size`` rows, each padded
    only to its own longest row, so a coalition without most events costs what it holds, not
    the full ``max_events``. ``n_calls`` counts the rows actually run through the network.
    """

    def __init__(self, pipeline, row, code: str, reference_horizon_days: float, batch_size: int):
        self.pipeline = pipeline
        self.row = row
        self.code = code
        self.reference_horizon = float(reference_horizon_days)
        self.batch_size = max(1, int(batch_size))
        self.n_calls = 0
        self._memo: dict[bytes, float] = {}

    def __call__(self, keep: np.ndarray) -> np.ndarray:
        keep = np.asarray(keep) > 0.5
        keys = [k.tobytes() for k in np.packbits(keep, axis=1)]
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self._memo and k not in todo:
                todo[k] = i
        if todo:
            idx = np.fromiter(todo.values(), dtype=np.int64, count=len(todo))
            for k, v in zip(todo, self._evaluate(keep[idx])):
                self._memo[k] = float(v)
        return np.array([self._memo[k] for k in keys], dtype=np.float64)

    def _evaluate(self, keep: np.ndarray) -> np.ndarray:
        n = keep.shape[0]
        self.n_calls += n
        r = self.row
        n_ev = len(r.event_analyte)
        kept = [np.flatnonzero(k[:n_ev]) for k in keep]
        order = np.argsort([len(k) for k in kept], kind="stable")  # shortest first: each pass pads to its own longest
        out = np.empty(n, dtype=np.float64)
        device = self.pipeline.device
        on_cuda = device.type == "cuda"
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        for s in range(0, n, self.batch_size):
            idx = order[s : s + self.batch_size]
            b = len(idx)
            e = max(1, max(len(kept[i]) for i in idx))
            arr = {
                "event_analyte": np.zeros((b, e), np.int64), "event_value": np.zeros((b, e), np.float32),
                "event_censor": np.zeros((b, e), np.int64), "event_time": np.zeros((b, e), np.float32),
                "event_mask": np.zeros((b, e), np.int64),
            }
            for j, i in enumerate(idx):
                ki = kept[i]
                m = len(ki)
                arr["event_analyte"][j, :m] = r.event_analyte[ki]
                arr["event_value"][j, :m] = r.event_value[ki]
                arr["event_censor"][j, :m] = r.event_censor[ki]
                arr["event_time"][j, :m] = r.event_time[ki]
                arr["event_mask"][j, :m] = 1
            k_anchor, k_horizon, k_age, k_sex = (keep[idx, n_ev + c] for c in range(4))
            arr["patient_age"] = np.where(k_age, r.patient_age, np.nan).astype(np.float32)
            arr["patient_sex"] = np.where(k_sex, r.patient_sex, 0).astype(np.int64)
            arr["query_analyte"] = np.full((b, 1), r.query_analyte[0], np.int64)
            arr["query_horizon"] = np.where(k_horizon, r.query_horizon[0], self.reference_horizon).astype(np.float32)[:, None]
            arr["query_anchor_value"] = np.where(k_anchor, r.query_anchor_value[0], 0.0).astype(np.float32)[:, None]
            arr["query_anchor_censor"] = np.where(k_anchor, r.query_anchor_censor[0], 0).astype(np.int64)[:, None]
            arr["query_mask"] = np.ones((b, 1), np.int64)
            # the summary of the analyte's prior results goes with the anchor (its last result)
            arr["query_summary"] = np.where(k_anchor[:, None], r.query_summary[:1], 0.0).astype(np.float32)[:, None, :]
            inputs = {k: torch.from_numpy(v).to(device) for k, v in arr.items()}
            with torch.inference_mode(), autocast:
                z = self.pipeline.model(**inputs).quantiles.float().cpu().numpy()[:, 0, :]  # [batch x n_quantiles]
            codes = [self.code] * b
            if self.pipeline.conformal is not None:
                z = self.pipeline.conformal.apply(codes, z)
            out[idx] = self.pipeline.scaler.denormalise(codes, z)[:, _MEDIAN]
        return out


def _groups(pipeline, row, code: str, max_analyte_groups: int) -> tuple[list[dict], np.ndarray, tuple[int, int, int, int]]:
    """Groups of one encoded row: analytes (target first, then by number of events), time, age, sex.

    Beyond ``max_analyte_groups`` analytes, the least frequent ones share one group
    (``results:other``), so the cost of a permutation stays bounded.
    """
    vocab_codes = pipeline.vocab.codes
    ev_codes = np.array([vocab_codes[a - N_SPECIAL] if a >= N_SPECIAL else "<unk>" for a in row.event_analyte], dtype=object)
    uniq, counts = np.unique(ev_codes, return_counts=True)
    ordered = sorted(zip(uniq.tolist(), counts.tolist()), key=lambda x: (x[0] != code, -x[1], x[0]))
    if code not in [c for c, _ in ordered]:
        ordered.insert(0, (code, 0))  # the anchor alone (events beyond max_events)
    keep, rest = ordered[: max(1, max_analyte_groups)], ordered[max(1, max_analyte_groups):]
    groups, index = [], {}
    for c, n in keep:
        index[c] = len(groups)
        groups.append({"group": f"results:{c}", "analyte_code": c, "n_events": int(n)})
    if rest:
        for c, _ in rest:
            index[c] = len(groups)
        groups.append({"group": "results:other", "analyte_code": None, "n_events": int(sum(n for _, n in rest)),
                       "analytes": [c for c, _ in rest]})
    event_group = np.array([index[c] for c in ev_codes], dtype=np.int64)
    anchor = index[code]
    groups.append({"group": GROUP_TIME, "analyte_code": None, "n_events": 0})
    horizon = len(groups) - 1
    age = sex = -1
    if np.isfinite(row.patient_age):
        groups.append({"group": GROUP_AGE, "analyte_code": None, "n_events": 0})
        age = len(groups) - 1
    if int(row.patient_sex) != 0:
        groups.append({"group": GROUP_SEX, "analyte_code": None, "n_events": 0})
        sex = len(groups) - 1
    return groups, event_group, (anchor, horizon, age, sex)


def _label(g: dict, target: str) -> str:
    from data.catalogue import load_catalogue

    if g["group"] == GROUP_TIME:
        return "Time since the last result"
    if g["group"] == GROUP_AGE:
        return "Age"
    if g["group"] == GROUP_SEX:
        return "Sex"
    if g["group"] == "results:other":
        return f"Other analytes' results ({g['n_events']}, {len(g['analytes'])} analytes)"
    a = load_catalogue().get(g["analyte_code"])
    name = a.name if a is not None else g["analyte_code"]
    extra = ", incl. the last value" if g["analyte_code"] == target else ""
    return f"{name} results ({g['n_events']}{extra})"


def explain_forecast(
    pipeline,
    history: pd.DataFrame,
    patient_id: str,
    analyte_code: str,
    at,
    *,
    forecast_median: float | None = None,
    method: str = "auto",
    max_exact_groups: int = 7,
    max_analyte_groups: int = 10,
    permutations: int = 5,
    reference_horizon_days: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> ForecastExplanation:
    """Shapley values of the forecast median of ``analyte_code`` at ``at`` over event groups.

    Args:
        pipeline: the :class:`model.inference.ForecastPipeline` that made the forecast.
        history: the history contract frame the forecast was made from.
        forecast_median: the median shown to the user (canonical unit); when None it is
            computed with ``pipeline.forecast``. Additivity is checked against it.
        method: 'exact', 'permutation' or 'auto' (exact up to ``max_exact_groups`` groups:
            ``2**G`` evaluations, against ``permutations * (2G + 1)``).
        max_analyte_groups: analytes with their own group; the rest share ``results:other``.
        permutations: antithetic permutations for the Permutation explainer.
        reference_horizon_days: the horizon used when "time since last result" is removed.
        batch_size: most masked inputs in one forward pass (shortest first, each pass padded
            to its own longest row).

    Returns a :class:`ForecastExplanation`; never raises for an explainer failure. Raises
    ``ValueError`` for an unknown ``method`` or a history / query the pipeline rejects.
    """
    q = pd.DataFrame({"patient_id": [str(patient_id)], "analyte_code": [str(analyte_code)], "at": [pd.Timestamp(at)]})
    return explain_forecasts(pipeline, history, q, forecast_medians=None if forecast_median is None else [forecast_median],
                             method=method, max_exact_groups=max_exact_groups, max_analyte_groups=max_analyte_groups,
                             permutations=permutations, reference_horizon_days=reference_horizon_days,
                             batch_size=batch_size, seed=seed)[0]


def explain_forecasts(
    pipeline,
    history: pd.DataFrame,
    queries: pd.DataFrame,
    *,
    forecast_medians=None,
    method: str = "auto",
    max_exact_groups: int = 7,
    max_analyte_groups: int = 10,
    permutations: int = 5,
    reference_horizon_days: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[ForecastExplanation]:
    """:func:`explain_forecast` of every row of ``queries`` (``patient_id, analyte_code, at``), in order.

    The history is validated, forecast and encoded once for all the queries (a busy patient's
    history of thousands of results costs more to prepare than a forecast), then each median is
    explained on its own. ``forecast_medians`` (one per query, canonical unit, or None) are
    the medians shown to the user. Each explanation is the one :func:`explain_forecast` gives
    for that query alone; the arguments are those of :func:`explain_forecast`.
    """
    from model.features import validate_history, validate_queries

    if method not in ("auto", "exact", "permutation"):
        raise ValueError(f"method must be 'exact', 'permutation' or 'auto', got {method!r}")
    t0 = time.perf_counter()
    version = pipeline.model_version
    h = validate_history(history)
    q = validate_queries(queries)
    if forecast_medians is not None and len(forecast_medians) != len(q):
        raise ValueError(f"forecast_medians has {len(forecast_medians)} values for {len(q)} queries")
    fc = pipeline.forecast(h, q)
    config = pipeline.model.config
    enc = encode_queries(h, q, pipeline.vocab, pipeline.scaler, max_events=config.max_events,
                         max_queries=config.max_queries, min_history=MIN_HISTORY, validated=True)
    row_of: dict[int, tuple] = {}
    for row in enc.rows:
        for k, i in enumerate(row.query_index):
            row_of[int(i)] = (row, k)
    prepare_s = time.perf_counter() - t0
    out = []
    for i, f in enumerate(fc.to_dict("records")):
        t1 = time.perf_counter()
        spent = prepare_s / len(q)  # each explanation carries its share of the shared preparation
        base = dict(patient_id=str(f["patient_id"]), analyte_code=str(f["analyte_code"]), at=pd.Timestamp(f["at"]),
                    model_version=version)
        if f["status"] != STATUS_OK or i not in row_of:
            out.append(ForecastExplanation("unavailable", f"No forecast to explain: {f['status']}", unit=f["unit"],
                                           **base, elapsed_s=spent + time.perf_counter() - t1))
            continue
        given = None if forecast_medians is None else forecast_medians[i]
        median = float(f["q50"]) if given is None else float(given)
        row, k = row_of[i]
        one = replace(row, query_analyte=row.query_analyte[k:k + 1], query_horizon=row.query_horizon[k:k + 1],
                      query_anchor_value=row.query_anchor_value[k:k + 1],
                      query_anchor_censor=row.query_anchor_censor[k:k + 1], query_summary=row.query_summary[k:k + 1],
                      query_index=row.query_index[k:k + 1])
        e = _explain_row(pipeline, one, base, f["unit"], median, method=method, max_exact_groups=max_exact_groups,
                         max_analyte_groups=max_analyte_groups, permutations=permutations,
                         reference_horizon_days=reference_horizon_days, batch_size=batch_size, seed=seed)
        e.elapsed_s = spent + time.perf_counter() - t1
        out.append(e)
    return out


def _explain_row(pipeline, row, base: dict, unit, median: float, *, method, max_exact_groups, max_analyte_groups,
                 permutations, reference_horizon_days, batch_size, seed) -> ForecastExplanation:
    """The explanation of one encoded single-query row (see :func:`explain_forecast`)."""
    version, code = base["model_version"], base["analyte_code"]
    groups, event_group, extras = _groups(pipeline, row, code, max_analyte_groups)
    n_groups = len(groups)
    fn = _ValueFunction(pipeline, row, code, reference_horizon_days, batch_size)
    use = method if method != "auto" else ("exact" if n_groups <= max_exact_groups else "permutation")
    try:
        shap = _shap()
        masker = EventGroupMasker(event_group, extras, n_groups)
        x = np.arange(n_groups, dtype=np.float64)[None, :]
        names = [g["group"] for g in groups]
        if use == "exact":
            explainer = shap.explainers.Exact(fn, masker, feature_names=names)
            result = explainer(x, silent=True)
        else:
            explainer = shap.explainers.Permutation(fn, masker, feature_names=names, seed=seed)
            result = explainer(x, max_evals=max(1, permutations) * (2 * n_groups + 1), silent=True)
        values = np.asarray(result.values, dtype=np.float64).reshape(-1)
        base_value = float(np.asarray(result.base_values, dtype=np.float64).reshape(-1)[0])
    except Exception as exc:  # noqa: BLE001 - shap internals (incl. AssertionError) must not reach the user
        log.exception("SHAP explanation failed for model %s (%s %s at %s)", version, base["patient_id"], code,
                      base["at"])
        return ForecastExplanation(
            "failed", f"Explanation not available for this model version (the explainer failed: {type(exc).__name__})",
            unit=unit, method=use, median=median, **base)
    gap = abs(base_value + float(values.sum()) - median)
    tol = 0.01 * max(1.0, abs(median))
    for g, v in zip(groups, values):
        g["label"] = _label(g, code)
        g["value"] = float(v)
    groups.sort(key=lambda g: -abs(g["value"]))
    common = dict(unit=unit, method=use, median=median, base_value=base_value, additivity_gap=gap, tolerance=tol,
                  n_evaluations=fn.n_calls, **base)
    if not gap <= tol:  # also catches NaN
        log.warning("SHAP explanation does not add up for model %s: |base + sum - median| = %.6g > %.6g "
                    "(%s %s at %s)", version, gap, tol, base["patient_id"], code, base["at"])
        for g in groups:
            g["value"] = None
        return ForecastExplanation("not_additive", NOT_ADDITIVE_MESSAGE.format(diff=f"{gap:.3g}"), groups=groups,
                                   **common)
    return ForecastExplanation("ok", None, groups=groups, **common)


def warm_up(pipeline) -> None:
    """Import shap and explain one made-up forecast with each explainer, so that shap's numba kernels
    are compiled before a real explanation is asked for.

    One of them (the masked model's output bookkeeping) takes shap's link function as an
    argument and cannot be cached on disk, so every process compiles it once: seconds of CPU
    (about 8 s on a busy 2-core machine). The history is three results at the analyte's
    training centre; nothing is stored or returned.
    """
    code = pipeline.vocab.codes[0]
    centre = float(pipeline.scaler.denormalise([code], np.zeros(1))[0])
    t = pd.Timestamp("2000-01-01")
    history = pd.DataFrame({"patient_id": "warm-up", "analyte_code": code, "censor": 0, "value": centre,
                            "collected_at": [t + pd.Timedelta(days=d) for d in range(3)]})
    for method in ("exact", "permutation"):
        explain_forecast(pipeline, history, "warm-up", code, t + pd.Timedelta(days=3), method=method, permutations=1)
