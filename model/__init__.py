"""LabTrend's forecasting model: network, training, inference, explanations.

Shared data contracts (pandas long frames) used across ``model/``:

* **history / cohort** — one row per result: ``patient_id`` (str), ``collected_at``
  (datetime64, naive), ``analyte_code`` (LOINC or local code), ``value`` (float, canonical
  unit), ``censor`` (int8: -1 for '<'/'<=', 0 exact, +1 for '>'/'>='), ``unit_canonical``
  (UCUM), ``sex`` ('F', 'M' or None), ``age_years`` (float, NaN when unknown). This is what
  ``data.queries.cohort`` returns; text, implausible and unit-missing results never appear.
* **queries** — ``patient_id``, ``analyte_code``, ``at`` (datetime64): forecast the value of
  that analyte at that time from results collected strictly before ``at``.
* **forecasts** — the queries' columns plus ``q05, q10, q25, q50, q75, q90, q95`` (float,
  canonical unit; monotone), ``unit``, ``n_history`` (prior results of that analyte),
  ``status`` ('ok' or the reason there is no forecast) and ``model_version``.
"""

QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
QUANTILE_COLUMNS = ("q05", "q10", "q25", "q50", "q75", "q90", "q95")
HISTORY_COLUMNS = ("patient_id", "collected_at", "analyte_code", "value", "censor", "unit_canonical", "sex", "age_years")
QUERY_COLUMNS = ("patient_id", "analyte_code", "at")
# Results of the analyte needed before a forecast is made (FC-12). One is enough: with a single
# prior result the forecast leans on the population (the pretrained dynamics, age, sex, the
# patient's other analytes) and its interval is calibrated on single-result forecasts apart
# (model.conformal strata), so it comes out as wide as that evidence warrants.
MIN_HISTORY = 1


def history_basis(n_history: int) -> str:
    """What a forecast rests on, in words: 'based on 1 measurement', 'based on 5 measurements'."""
    n = int(n_history)
    return f"based on {n} measurement{'' if n == 1 else 's'}"


def history_stratum(n_history) -> "numpy.ndarray":
    """Calibration stratum of forecasts by their prior results (``(n,)`` ints -> ``(n,)`` str):
    'single' for one prior result, '' (the default stratum) for more."""
    import numpy as np

    n = np.asarray(n_history)
    return np.where(n <= 1, "single", "").astype(object)
