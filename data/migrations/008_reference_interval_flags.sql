-- 008: a result outside its reference interval is a flag on the result (clinical.flags: chart, table,
-- Patients list), not an output for expert review (issue 11: 4,518 of the demo's 5,625 review items).
-- Reference-interval anomaly outputs stored by earlier versions that no expert has judged are removed:
-- nobody reviewed them and the flags are computed from the results themselves. Those with a verdict stay,
-- with their verdicts (the review queue ranks them last, clinical.outputs.PRIORITY_TIERS 6).

DELETE FROM model_outputs
WHERE kind = 'anomaly' AND rule = 'reference_interval'
  AND output_id NOT IN (SELECT output_id FROM annotations);
