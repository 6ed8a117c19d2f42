-- 001: patients, lab results, analyte catalogue, import batches and quarantine.

CREATE TABLE patients (
    patient_id      VARCHAR PRIMARY KEY,
    sex             VARCHAR,          -- 'F', 'M' or NULL (unknown)
    birth_date      DATE,             -- when the source gives it
    age_at_ref      DOUBLE,           -- age in years at ref_date, when only an age is given
    ref_date        DATE,             -- the date age_at_ref refers to
    source          VARCHAR NOT NULL, -- format of the import that first created the patient
    batch_id        INTEGER NOT NULL
);

CREATE TABLE analytes (
    code                  VARCHAR PRIMARY KEY, -- LOINC code
    name                  VARCHAR NOT NULL,
    panel                 VARCHAR NOT NULL,
    canonical_unit        VARCHAR NOT NULL,    -- UCUM
    molar_mass_g_per_mol  DOUBLE,
    valence               INTEGER,
    plausible_low         DOUBLE,              -- canonical unit
    plausible_high        DOUBLE,
    skewed                BOOLEAN,
    source                VARCHAR NOT NULL,    -- citation for the row's numbers
    catalogue_version     VARCHAR NOT NULL
);

CREATE TABLE import_batches (
    batch_id          INTEGER PRIMARY KEY,
    file_name         VARCHAR NOT NULL,
    sha256            VARCHAR NOT NULL,
    format            VARCHAR NOT NULL,
    options           JSON,
    rows_read         BIGINT,
    rows_loaded       BIGINT,
    rows_quarantined  BIGINT,
    rows_skipped      BIGINT,
    rows_duplicate    BIGINT,   -- exact copies (a subset of rows_skipped)
    rows_conflicting  BIGINT,   -- same patient, analyte and time, different value (all loaded)
    rows_censored     BIGINT,
    rows_text         BIGINT,
    rows_implausible  BIGINT,
    rows_unit_missing BIGINT,
    patients          INTEGER,
    skipped_reasons   JSON,     -- {"reason": count}
    started_at        TIMESTAMP NOT NULL,
    finished_at       TIMESTAMP,
    status            VARCHAR NOT NULL  -- 'complete' (a failed import leaves no row: it is one transaction)
);

CREATE TABLE lab_results (
    result_id          BIGINT NOT NULL,   -- batch_id * 2^32 + source_row
    patient_id         VARCHAR NOT NULL,
    specimen_id        VARCHAR,
    collected_at       TIMESTAMP NOT NULL,
    reported_at        TIMESTAMP,
    analyte_code       VARCHAR NOT NULL,  -- LOINC code when known, else 'source:code'
    loinc              VARCHAR,
    analyte_name       VARCHAR,           -- display name as given
    value_text         VARCHAR,           -- the result exactly as given
    comparator         VARCHAR,           -- '=', '<', '<=', '>', '>=' (NULL for text results)
    value_num          DOUBLE,            -- number as given, in the unit as given
    unit               VARCHAR,           -- unit as given
    value_canonical    DOUBLE,            -- value_num in unit_canonical (NULL: text, unit missing)
    unit_canonical     VARCHAR,           -- UCUM
    ref_low            DOUBLE,            -- reference interval as given (unit as given)
    ref_high           DOUBLE,
    ref_low_canonical  DOUBLE,
    ref_high_canonical DOUBLE,
    flag               VARCHAR,           -- abnormal flag as given
    comment            VARCHAR,
    result_kind        VARCHAR NOT NULL,  -- 'numeric', 'censored', 'text', 'empty'
    implausible        BOOLEAN NOT NULL,  -- outside the catalogue's plausible limits: possible entry error
    unit_missing       BOOLEAN NOT NULL,  -- a dimensioned analyte reported with no unit
    conflicting        BOOLEAN NOT NULL,  -- another value for the same patient, analyte and time
    batch_id           INTEGER NOT NULL,
    source_row         BIGINT NOT NULL    -- 1-based data row in the source file
);

CREATE TABLE quarantine (
    batch_id    INTEGER NOT NULL,
    source_row  BIGINT NOT NULL,
    column_name VARCHAR,
    reason      VARCHAR NOT NULL,
    raw_row     JSON
);
