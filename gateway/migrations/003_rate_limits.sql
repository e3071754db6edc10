-- Per-user rate limits, shared by every gateway on the database: one row per user and action holding
-- the GCRA "theoretical arrival time" (gateway/ratelimit.py). Rows far in the past mean a full bucket
-- and are deleted by the reaper.
CREATE TABLE rate_limits (
    user_id text NOT NULL,
    action  text NOT NULL,
    tat     timestamptz NOT NULL,
    PRIMARY KEY (user_id, action)
);
