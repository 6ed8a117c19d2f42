-- 007: collection times in UTC with the source's offset and their flags; local test codes kept.
--
-- results.collected_at (and reported_at) hold UTC when the source's time zone is known (an ISO
-- offset in the file, the import's --timezone, or the site's LABTREND_TIMEZONE); otherwise the
-- time as written, with utc_offset_min NULL ("zone unknown": MIMIC-IV's shifted dates, and every
-- row stored before this migration). Local time at collection = collected_at + utc_offset_min.
-- time_unknown: the source gave a date without a time; collected_at is then noon of that local
-- date (the middle of the day, at most 12 h off) and is never shown or used as a precise time.
-- time_flag: a local time that falls in the hour skipped by a daylight-saving change (read with the
-- offset before the change) or in the repeated hour (read as its first occurrence).
-- after_import: collected after the import started (a mistyped year such as 9999), for sources
-- that do not declare shifted dates.
-- result_keys.local_code: the source's own test code ('site:K', 'mimic:50971', ...) kept beside the
-- analyte code it was mapped to, so a site mapping can re-key results without a re-import.

CREATE TYPE time_flag AS ENUM ('skipped_hour', 'repeated_hour');

DROP VIEW lab_results;

ALTER TABLE results ADD COLUMN utc_offset_min SMALLINT;
ALTER TABLE results ADD COLUMN time_unknown BOOLEAN DEFAULT false;
ALTER TABLE results ADD COLUMN time_flag time_flag;
ALTER TABLE results ADD COLUMN after_import BOOLEAN DEFAULT false;
ALTER TABLE results ALTER COLUMN time_unknown SET NOT NULL;
ALTER TABLE results ALTER COLUMN after_import SET NOT NULL;

ALTER TABLE result_keys ADD COLUMN local_code VARCHAR;
-- keys stored before 007 kept a local code only as their analyte code
UPDATE result_keys SET local_code = analyte_code
WHERE loinc IS NULL AND NOT starts_with(analyte_code, 'local:') AND NOT regexp_full_match(analyte_code, '[0-9]{1,7}-[0-9]');

ALTER TABLE import_batches ADD COLUMN time_zone VARCHAR;          -- zone the file's local times were read in
ALTER TABLE import_batches ADD COLUMN rows_time_unknown BIGINT;   -- date without a time
ALTER TABLE import_batches ADD COLUMN rows_dst BIGINT;            -- in a skipped or repeated hour
ALTER TABLE import_batches ADD COLUMN rows_after_import BIGINT;   -- collected after the import started
ALTER TABLE import_batches ADD COLUMN unmapped_codes JSON;        -- {"local code": rows} without a LOINC code

-- Every re-keying of results by a local code mapping (data/codemap.py), append-only: who, when,
-- from which analyte code to which, under which mapping row, and how many results moved.
CREATE SEQUENCE code_map_event_seq START 1;
CREATE TABLE code_map_events (
    event_id        BIGINT PRIMARY KEY DEFAULT nextval('code_map_event_seq'),
    logged_at       TIMESTAMP NOT NULL,  -- UTC
    username        VARCHAR NOT NULL,    -- dashboard user, or the OS user of a CLI import / command
    local_code      VARCHAR NOT NULL,
    old_analyte     VARCHAR NOT NULL,
    new_analyte     VARCHAR NOT NULL,
    loinc           VARCHAR,             -- the mapping's LOINC code (NULL: the mapping was withdrawn)
    specimen        VARCHAR,
    mapped_by       VARCHAR,
    mapped_at       VARCHAR,
    source          VARCHAR,             -- the mapping's citation
    map_file        VARCHAR,             -- the site mapping file and its sha256
    results_moved   BIGINT NOT NULL
);

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
       r.conflicting, r.batch_id, r.source_row,
       k.local_code, r.utc_offset_min, r.time_unknown, r.time_flag::VARCHAR AS time_flag, r.after_import
FROM results r JOIN result_keys k ON k.key_id = r.key_id;
