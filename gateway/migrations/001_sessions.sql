-- One row per user: the state of their sandbox. The row outlives the container so that
-- GET /api/sandbox can say why a sandbox stopped; Docker labels carry the same user.
CREATE TABLE sessions (
    user_id       text PRIMARY KEY,
    state         text NOT NULL CHECK (state IN ('starting', 'running', 'stopping', 'stopped')),
    container_id  text,
    host_port     integer CHECK (host_port BETWEEN 1 AND 65535),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_activity timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz,
    stop_reason   text
);

-- The capacity check counts active sessions; the reaper walks them by last_activity.
CREATE INDEX sessions_active_by_activity ON sessions (last_activity)
    WHERE state IN ('starting', 'running');
