"""Clinical outputs: anomalies, recommendations, stored outputs and expert verdicts.

* :mod:`clinical.flags` - the flag of every result (H, L, HH, LL, A) from the right limits: the
  critical list, the file's flag, the file's limits, the catalogue's interval for sex and age;
  one rule in Python and in the Patients list's SQL.
* :mod:`clinical.format` - one rounding rule for every printed number: the analyte's reporting
  precision.
* :mod:`clinical.anomalies` - review-worthy anomalies (critical value, delta check beyond the RCV
  and a cited minimum change, model surprise beyond the calibrated interval, multivariate
  inconsistency, named pre-analytical patterns), a run of consecutive flags of one analyte in one
  episode as one item, each saying which rule fired, on what evidence and from which source.
  Pure functions over the timeline frame (:data:`data.queries.TIMELINE_COLUMNS`).
* :mod:`clinical.recommendations` - a versioned YAML rule file evaluated with a small
  structured condition language (no ``eval``); each recommendation lists what triggered it.
* :mod:`clinical.outputs` - deterministic output ids, ``model_outputs`` and the append-only
  ``annotations`` table, agreement statistics and export.
* :mod:`clinical.predict` - the ``labtrend predict`` pipeline (forecasts, anomalies, SHAP
  explanations, recommendations, stored as outputs).

Wording is decision support ("consider ..."): the product informs a clinician, it does not
order anything.
"""
