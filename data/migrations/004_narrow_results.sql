-- 004: lab results stored narrow, read through the view lab_results (same columns as 001).
--
-- Everything that is the same for every row of one analyte as exported (analyte code, LOINC,
-- display name, unit as given, canonical unit, conversion factor, unit missing) moves to
-- result_keys, one row per distinct combination; results keeps what differs per result.
-- The canonical value and canonical reference limits are value x factor, computed by the
-- view. A 10-million-row import writes about half the bytes, and one patient's timeline
-- reads about half the columns (benchmarks/ingest.py).

CREATE TYPE result_comparator AS ENUM ('=', '<', '<=', '>', '>=');
CREATE TYPE result_kind AS ENUM ('numeric', 'censored', 'text', 'empty');

CREATE TABLE result_keys (
    key_id          INTEGER PRIMARY KEY,
    analyte_code    VARCHAR NOT NULL,   -- LOINC code when known, else 'source:code'
    loinc           VARCHAR,            -- as given (trimmed)
    analyte_name    VARCHAR,            -- display name as given (trimmed)
    unit            VARCHAR,            -- as given
    unit_canonical  VARCHAR,            -- UCUM
    factor          DOUBLE,             -- value in unit x factor = value in unit_canonical (NULL: no conversion)
    unit_missing    BOOLEAN NOT NULL    -- a dimensioned analyte reported with no unit
);

CREATE TABLE results (
    patient_id    VARCHAR NOT NULL,
    collected_at  TIMESTAMP NOT NULL,
    key_id        INTEGER NOT NULL,     -- result_keys
    result_kind   result_kind NOT NULL,
    comparator    result_comparator,    -- NULL for text and empty results
    value_num     DOUBLE,               -- number as given, in the unit as given
    value_text    VARCHAR,              -- the result exactly as given
    specimen_id   VARCHAR,
    reported_at   TIMESTAMP,
    ref_low       DOUBLE,               -- reference interval as given (unit as given)
    ref_high      DOUBLE,
    flag          VARCHAR,              -- abnormal flag as given
    comment       VARCHAR,
    implausible   BOOLEAN NOT NULL,     -- outside the catalogue's plausible limits when imported
    conflicting   BOOLEAN NOT NULL,     -- another value for the same patient, analyte and time
    batch_id      INTEGER NOT NULL,
    source_row    BIGINT NOT NULL       -- 1-based data row in the source file
);

-- Existing stores: one key per distinct combination; the factor is the one the stored
-- canonical values were computed with (value_canonical / value_num, else the reference
-- limits' ratio; 1 when the unit is already canonical).
INSERT INTO result_keys
SELECT row_number() OVER (ORDER BY analyte_code, loinc, analyte_name, unit)::INTEGER,
       analyte_code, loinc, analyte_name, unit, unit_canonical,
       COALESCE(f_value, f_low, f_high, CASE WHEN unit IS NOT DISTINCT FROM unit_canonical AND NOT unit_missing THEN 1.0 END),
       unit_missing
FROM (
    SELECT analyte_code, loinc, analyte_name, unit, any_value(unit_canonical) AS unit_canonical,
           bool_or(unit_missing) AS unit_missing,
           any_value(value_canonical / value_num) FILTER (WHERE value_num <> 0 AND value_canonical IS NOT NULL) AS f_value,
           any_value(ref_low_canonical / ref_low) FILTER (WHERE ref_low <> 0 AND ref_low_canonical IS NOT NULL) AS f_low,
           any_value(ref_high_canonical / ref_high) FILTER (WHERE ref_high <> 0 AND ref_high_canonical IS NOT NULL) AS f_high
    FROM lab_results
    GROUP BY analyte_code, loinc, analyte_name, unit
);

INSERT INTO results
SELECT l.patient_id, l.collected_at, k.key_id, l.result_kind::result_kind, l.comparator::result_comparator,
       l.value_num, l.value_text, l.specimen_id, l.reported_at, l.ref_low, l.ref_high, l.flag, l.comment,
       l.implausible, l.conflicting, l.batch_id, l.source_row
FROM lab_results l
JOIN result_keys k ON k.analyte_code = l.analyte_code AND k.loinc IS NOT DISTINCT FROM l.loinc
     AND k.analyte_name IS NOT DISTINCT FROM l.analyte_name AND k.unit IS NOT DISTINCT FROM l.unit
ORDER BY l.patient_id, l.batch_id, l.source_row;

DROP TABLE lab_results;

CREATE VIEW lab_results AS
SELECT (r.batch_id::BIGINT << 32) + r.source_row AS result_id,
       r.patient_id, r.specimen_id, r.collected_at, r.reported_at,
       k.analyte_code, k.loinc, k.analyte_name,
       r.value_text, r.comparator::VARCHAR AS comparator, r.value_num, k.unit,
       CASE WHEN r.comparator IS NOT NULL AND NOT k.unit_missing THEN r.value_num * k.factor END AS value_canonical,
       k.unit_canonical, r.ref_low, r.ref_high,
       CASE WHEN NOT k.unit_missing THEN r.ref_low * k.factor END AS ref_low_canonical,
       CASE WHEN NOT k.unit_missing THEN r.ref_high * k.factor END AS ref_high_canonical,
       r.flag, r.comment, r.result_kind::VARCHAR AS result_kind, r.implausible,
       k.unit_missing AND r.comparator IS NOT NULL AS unit_missing,
       r.conflicting, r.batch_id, r.source_row
FROM results r JOIN result_keys k ON k.key_id = r.key_id;
