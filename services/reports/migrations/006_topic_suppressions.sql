-- Suppressions scoped to a topic (a list such as 'weekly-deals'): a one-click unsubscribe from a campaign whose
-- unsubscribe policy names a topic suppresses the address for that topic only. '' is every topic: every existing
-- row, and every suppression from a bounce or complaint.

-- A constant default: no table rewrite.
ALTER TABLE reports.suppressions ADD COLUMN topic text NOT NULL DEFAULT '';
-- An address may now have one suppression per topic beside its one for every topic. The new key is built once, under
-- this migration's lock, over the existing rows (an index build, no rewrite); it serves every lookup the old one did
-- (tenant, email) and the listing's (tenant, email, topic) order.
ALTER TABLE reports.suppressions
    DROP CONSTRAINT suppressions_pkey,
    ADD PRIMARY KEY (tenant_id, email, topic);
-- Topics are lower-cased names without '~', '@', ':' or '/' (libs/common/suppressions.py is_topic), so the
-- resource name suppressions/{email}~{topic} and the Redis keys stay unambiguous; a topic-scoped suppression is an
-- unsubscribe or a manual one (a bounce or complaint is about the address, for every topic). NOT VALID, as in 004:
-- every existing row has topic '' and passes, and validating would scan the table under this migration's lock.
ALTER TABLE reports.suppressions ADD CONSTRAINT suppressions_topic_check
    CHECK (topic = '' OR (topic ~ '^[a-z0-9][a-z0-9._-]{0,63}$' AND reason IN ('unsubscribe', 'manual'))) NOT VALID;
-- ListSuppressions filtered by topic, without reading the tenant's other suppressions. Partial: empty today, and
-- suppressions of every topic (bounces, complaints) maintain no entry.
CREATE INDEX suppressions_by_topic ON reports.suppressions (tenant_id, topic, email) WHERE topic <> '';
