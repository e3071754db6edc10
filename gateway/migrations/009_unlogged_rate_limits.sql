-- Rate limits need no durability: a crash that empties the table only refills every user's bucket.
-- Unlogged, an action's UPSERT writes no WAL and its commit waits for no disk flush, which was a
-- millisecond or more of every run's latency.
ALTER TABLE rate_limits SET UNLOGGED;
