"""Clinical outputs: anomalies, recommendations, stored outputs and expert verdicts.

* :mod:`clinical.anomalies` - per-result anomalies (reference interval, critical value, delta
  check, model surprise, multivariate inconsistency, named pre-analytical patterns), each
  saying which rule fired, on what evidence and from which source. Pure functions over the
  timeline frame (:data:`data.queries.TIMELINE_COLUMNS`).
* :mod:`clinical.recommendations` - a versioned YAML rule file evaluated with a small
  structured condition language (no ``eval``); each recommendation lists what triggered it.
* :mod:`clinical.outputs` - deterministic output ids, ``model_outputs`` and the append-only
  ``annotations`` table, agreement statistics and export.
* :mod:`clinical.predict` - the ``labtrend predict`` pipeline (forecasts, anomalies, SHAP
  explanations, recommendations, stored as outputs).

Wording is decision support ("consider ..."): the product informs a clinician, it does not
order anything.
"""
