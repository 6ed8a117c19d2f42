-- 006: dashboard accounts and server-side sessions, beside the audit log.
--
-- users: one row per account. Passwords are bcrypt hashes only. An account is never deleted
-- (the audit log names it); it is disabled. roles: clinician, expert, analyst, admin.
--
-- sessions: one row per password sign-in. The browser holds an opaque random token in an
-- HttpOnly cookie; only its SHA-256 is stored here, so reading this table gives no way in.
-- A session ends when it is revoked (sign-out, account disabled, password reset), when it has
-- seen no activity for the idle timeout, or at its absolute end (expires_at); the server checks
-- this row on every page run, so an ended session's cookie shows the sign-in form. The one-time
-- grant (grant_hash, two minutes' life) is what the page exchanges for that cookie; the token
-- itself never passes through page scripts. Times are UTC.

CREATE TABLE users (
    username             VARCHAR PRIMARY KEY,  -- login name, lower case
    name                 VARCHAR NOT NULL,     -- as shown in the audit log
    roles                VARCHAR[] NOT NULL,
    password_hash        VARCHAR NOT NULL,     -- bcrypt ($2b$...), never the password
    must_change_password BOOLEAN NOT NULL DEFAULT false,  -- set by a password reset
    disabled_at          TIMESTAMP,            -- NULL: the account may sign in
    disabled_by          VARCHAR,
    created_at           TIMESTAMP NOT NULL,
    created_by           VARCHAR,
    updated_at           TIMESTAMP NOT NULL,
    password_changed_at  TIMESTAMP,
    last_login_at        TIMESTAMP
);

CREATE TABLE sessions (
    session_id       VARCHAR PRIMARY KEY,  -- random; names the session in the audit log, grants nothing
    username         VARCHAR NOT NULL,
    created_at       TIMESTAMP NOT NULL,   -- the password sign-in
    last_seen_at     TIMESTAMP NOT NULL,   -- last page run (updated at most once a minute)
    expires_at       TIMESTAMP NOT NULL,   -- absolute end, whatever the activity
    revoked_at       TIMESTAMP,
    revoked_reason   VARCHAR,              -- 'signed out', 'idle', 'lifetime', 'account disabled', ...
    token_hash       VARCHAR,              -- SHA-256 (hex) of the cookie token; NULL until issued
    grant_hash       VARCHAR,              -- SHA-256 (hex) of the one-time cookie grant
    grant_expires_at TIMESTAMP
);
