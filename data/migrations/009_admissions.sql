-- 009: admissions (inpatient episodes) where the source has them: MIMIC-IV hosp admissions.csv.
--
-- The timeline opens on the patient's latest episode: the admission that holds the newest result,
-- else the last 90 days (dashboard.services.latest_episode). Times are in the same time base as the
-- results' collection times of the same import. Re-importing adds nothing (primary key).

CREATE TABLE admissions (
    patient_id     VARCHAR NOT NULL,
    admission_id   VARCHAR NOT NULL,   -- the source's id (MIMIC-IV hadm_id)
    admitted_at    TIMESTAMP NOT NULL,
    discharged_at  TIMESTAMP,          -- NULL: not discharged (yet) in the export
    admission_type VARCHAR,            -- as given (MIMIC-IV admission_type)
    batch_id       INTEGER NOT NULL,
    PRIMARY KEY (patient_id, admission_id)
);
