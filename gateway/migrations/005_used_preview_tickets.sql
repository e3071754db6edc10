-- Preview login tickets work once: the first login records the ticket's id until it expires anyway,
-- on whichever gateway it happens, and a second use of the same link is refused.
CREATE TABLE used_preview_tickets (
    id         text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
