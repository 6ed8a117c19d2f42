-- 005: patient ids already stored are cleaned by the rule the importers now apply
-- (data/identifiers.py): format characters (zero-width space, direction marks, BOM, soft
-- hyphen) dropped, Unicode spaces trimmed from both ends, NFC. Two ids that looked the same on
-- screen ('L1' and a zero-width space + 'L1') become one patient: results and model outputs
-- move to the cleaned id, the patients rows merge (known sex / birth date kept), exact
-- duplicate results the merge creates are removed, and results with different values for the
-- same analyte and time are flagged conflicting, as an import does. The audit log is history
-- and keeps the ids as they were. An id with nothing left after cleaning is kept as it is.

CREATE TEMP TABLE _id_map AS
SELECT old_id, new_id FROM (
    SELECT patient_id AS old_id, CASE WHEN regexp_full_match(patient_id, '[!-~]+') THEN patient_id ELSE NULLIF(nfc_normalize(regexp_replace(patient_id, '^[\t\n\v\f\r \x{85}\p{Z}\p{Cf}]+|[\t\n\v\f\r \x{85}\p{Z}\p{Cf}]+$|\p{Cf}', '', 'g')), '') END AS new_id FROM patients
)
WHERE new_id IS NOT NULL AND new_id <> old_id;

UPDATE results SET patient_id = m.new_id FROM _id_map m WHERE results.patient_id = m.old_id;
UPDATE model_outputs SET patient_id = m.new_id FROM _id_map m WHERE model_outputs.patient_id = m.old_id;

CREATE TEMP TABLE _merged AS
SELECT COALESCE(m.new_id, p.patient_id) AS patient_id,
       any_value(p.sex) AS sex, any_value(p.birth_date) AS birth_date,
       any_value(p.age_at_ref) AS age_at_ref, any_value(p.ref_date) AS ref_date,
       arg_min(p.source, p.batch_id) AS source, min(p.batch_id) AS batch_id
FROM patients p LEFT JOIN _id_map m ON m.old_id = p.patient_id
WHERE p.patient_id IN (SELECT old_id FROM _id_map) OR p.patient_id IN (SELECT new_id FROM _id_map)
GROUP BY 1;

DELETE FROM patients WHERE patient_id IN (SELECT patient_id FROM _merged) OR patient_id IN (SELECT old_id FROM _id_map);
INSERT INTO patients (patient_id, sex, birth_date, age_at_ref, ref_date, source, batch_id)
SELECT patient_id, sex, birth_date, age_at_ref, ref_date, source, batch_id FROM _merged;

-- exact duplicates (same analyte as exported, time, result and unit): the first imported stays
CREATE TEMP TABLE _dup AS
SELECT batch_id, source_row FROM (
    SELECT batch_id, source_row,
           row_number() OVER (PARTITION BY patient_id, analyte_code, loinc, analyte_name, unit, collected_at,
                                           value_text, ref_low, ref_high, flag ORDER BY batch_id, source_row) AS rn
    FROM lab_results WHERE patient_id IN (SELECT patient_id FROM _merged)
)
WHERE rn > 1;
DELETE FROM results WHERE EXISTS (
    SELECT 1 FROM _dup d WHERE d.batch_id = results.batch_id AND d.source_row = results.source_row);

-- different values for the same analyte and time (judged on the canonical value, else the text)
CREATE TEMP TABLE _conflict AS
SELECT l.batch_id, l.source_row FROM lab_results l
JOIN (
    SELECT patient_id, analyte_code, collected_at FROM lab_results
    WHERE patient_id IN (SELECT patient_id FROM _merged)
    GROUP BY ALL HAVING count(DISTINCT COALESCE(value_canonical::VARCHAR, value_text)) > 1
) c USING (patient_id, analyte_code, collected_at);
UPDATE results SET conflicting = true WHERE EXISTS (
    SELECT 1 FROM _conflict c WHERE c.batch_id = results.batch_id AND c.source_row = results.source_row);

DROP TABLE _conflict;
DROP TABLE _dup;
DROP TABLE _merged;
DROP TABLE _id_map;
