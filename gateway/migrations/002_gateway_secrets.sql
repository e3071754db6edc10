-- Secrets the gateway itself signs with (preview sessions), shared by every gateway process on the
-- database. Created on first use; the user tokens' key stays in configuration.
CREATE TABLE gateway_secrets (
    name       text PRIMARY KEY,
    value      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
