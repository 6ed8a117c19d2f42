-- 003: the dashboard's append-only audit log.
--
-- One row per patient view, per write (upload, expert verdict, user added) and per login.
-- The application only ever INSERTs (dashboard/audit.py is the one writer and has no
-- update or delete); DuckDB has no triggers or grants to enforce that inside the file, so
-- the database file itself must be protected by file permissions.

CREATE SEQUENCE audit_log_seq START 1;

CREATE TABLE audit_log (
    audit_id   BIGINT PRIMARY KEY DEFAULT nextval('audit_log_seq'),
    logged_at  TIMESTAMP NOT NULL,  -- UTC, when the action happened
    username   VARCHAR NOT NULL,    -- login name ('' only for a failed login with no name)
    role       VARCHAR,             -- role(s) held at the time, comma-separated
    action     VARCHAR NOT NULL,    -- 'view_patient', 'upload', 'verdict', 'login', 'login_failed', 'logout',
                                    -- 'download_quarantine', 'export_audit', 'user_add', 'denied'
    patient_id VARCHAR,             -- the patient concerned, when there is one
    detail     JSON                 -- what else identifies the action (file, batch, output id, page, ...)
);

CREATE INDEX audit_log_logged_at ON audit_log (logged_at);
