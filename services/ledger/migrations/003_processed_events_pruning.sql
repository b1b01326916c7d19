-- Applied outcome events are forgotten once older than the EVENTS stream's retention (a redelivery of one can no
-- longer happen, and a late duplicate still finds its hold resolved). Rows arrive in time order, so a BRIN index
-- finds the old ones for almost nothing per insert.
CREATE INDEX processed_events_by_time ON ledger.processed_events USING brin (processed_at);
