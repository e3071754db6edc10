-- Each user's preview origin is <label>.<preview domain>: a random DNS label, made once and kept, so
-- that it is stable across restarts and gateways, hard to guess, and never shared by two users (user
-- names may hold capitals, '.' and '_', which a DNS label folds together or cannot carry).
CREATE TABLE preview_labels (
    user_id    text PRIMARY KEY,
    label      text NOT NULL UNIQUE CHECK (label ~ '^[a-z][a-z2-7]{15,62}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Share links of a preview. The link carries a secret; only its SHA-256 is kept. Revoking sets
-- revoked_at; gateways re-read a share at most a second after they last looked.
CREATE TABLE preview_shares (
    id          text PRIMARY KEY,
    user_id     text NOT NULL,
    secret_hash bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    can_wake    boolean NOT NULL DEFAULT false
);

CREATE INDEX preview_shares_by_user ON preview_shares (user_id, created_at);
