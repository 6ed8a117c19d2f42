-- 010: state of the batch job that computes and stores every patient's outputs (labtrend score).
--
-- scoring_state: one row per patient and scoring key (a hash of the model version and of every
-- setting that changes the outputs: see labtrend.scoring). A patient needs scoring when it has no
-- row for the current key, or when its results changed since (a newer import batch, or a different
-- number of results). The row is written in the same transaction as the patient's outputs, so a
-- killed run leaves every patient either done (outputs and state) or not started.
-- scoring_runs: one row per run, updated after every write batch (an interrupted run keeps
-- finished_at NULL).

CREATE TABLE scoring_state (
    patient_id      VARCHAR NOT NULL,
    scoring_key     VARCHAR NOT NULL,
    model_version   VARCHAR NOT NULL,
    last_batch_id   INTEGER NOT NULL,   -- newest import batch among the patient's results when scored
    n_results       BIGINT NOT NULL,    -- the patient's results when scored
    forecast_at     TIMESTAMP,          -- the forecast time used
    n_outputs       INTEGER NOT NULL,
    status          VARCHAR NOT NULL,   -- 'ok', or 'failed: <reason>' (retried by the next run)
    scored_at       TIMESTAMP NOT NULL, -- UTC
    run_id          VARCHAR NOT NULL,
    PRIMARY KEY (patient_id, scoring_key)
);

CREATE TABLE scoring_runs (
    run_id          VARCHAR PRIMARY KEY,
    started_by      VARCHAR NOT NULL,   -- the operating-system account that ran it
    started_at      TIMESTAMP NOT NULL, -- UTC
    finished_at     TIMESTAMP,          -- UTC; NULL while running or when interrupted
    engine          VARCHAR NOT NULL,
    workers         INTEGER NOT NULL,
    model_version   VARCHAR NOT NULL,
    scoring_key     VARCHAR NOT NULL,
    selected        INTEGER NOT NULL,
    scored          INTEGER NOT NULL,
    failed          INTEGER NOT NULL,
    summary         JSON
);
