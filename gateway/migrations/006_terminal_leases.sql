-- Every open terminal's shell, leased by the gateway that holds its WebSocket and renewed while it
-- is open. A gateway killed with -9 leaves its shells running in their sandboxes (Docker does not hang
-- up an exec whose client went away); their leases run out, and any gateway's reaper hangs them up.
CREATE TABLE terminal_leases (
    run_id      text PRIMARY KEY,
    user_id     text NOT NULL,
    renewed_at  timestamptz NOT NULL DEFAULT now()
);
