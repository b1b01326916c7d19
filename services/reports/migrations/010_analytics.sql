-- Analytics (issue 19): the events store partitioned by day with retention, and rollups per minute, hour and day
-- keyed by every dimension stats can group by (services/reports/stats.py and rollups.py explain the model).

-- Creates the day partition of a table partitioned by a timestamptz column (events: event_time; rollup_minute:
-- bucket), named <table>_pYYYYMMDD, bounded by UTC midnights. Rows of that day already in the default partition
-- (recorded before the partition existed) move into it first: attaching a partition fails while the default holds
-- rows of its range. Idempotent, and safe for two replicas at once (a transaction-scoped advisory lock per
-- partition). Returns whether it created the partition.
CREATE FUNCTION reports.ensure_day_partition(parent text, time_column text, day date) RETURNS boolean
    LANGUAGE plpgsql AS $$
DECLARE
    child text := parent || '_p' || to_char(day, 'YYYYMMDD');
    low timestamptz := day::timestamp AT TIME ZONE 'UTC';
    high timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('reports.' || child));
    IF to_regclass(format('reports.%I', child)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE reports.%I (LIKE reports.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   child, parent);
    EXECUTE format('WITH moved AS (DELETE FROM reports.%I WHERE %I >= %L AND %I < %L RETURNING *) '
                   'INSERT INTO reports.%I SELECT * FROM moved',
                   parent || '_default', time_column, low, time_column, high, child);
    EXECUTE format('ALTER TABLE reports.%I ATTACH PARTITION reports.%I FOR VALUES FROM (%L) TO (%L)',
                   parent, child, low, high);
    RETURN true;
END
$$;

-- The timeline, partitioned by day. Uniqueness is per (event_id, event_time): an event's time is fixed by its
-- producer and travels with it, so a redelivered event lands in the same partition and is still a duplicate.
ALTER TABLE reports.events RENAME TO events_unpartitioned;
ALTER INDEX reports.events_pkey RENAME TO events_unpartitioned_pkey;
ALTER INDEX reports.events_timeline RENAME TO events_unpartitioned_timeline;
ALTER INDEX reports.events_by_tenant_time RENAME TO events_unpartitioned_by_tenant_time;
CREATE TABLE reports.events (
    event_id text NOT NULL,
    tenant_id text NOT NULL,
    message_id text NOT NULL,
    event_type text NOT NULL,
    event_time timestamptz NOT NULL,
    provider text NOT NULL DEFAULT '',
    provider_message_id text NOT NULL DEFAULT '',
    recipient text NOT NULL DEFAULT '',
    reason text NOT NULL DEFAULT '',
    attempt integer NOT NULL DEFAULT 0,
    outcome text NOT NULL DEFAULT '',
    latency_ms bigint NOT NULL DEFAULT 0,
    bounce_type text NOT NULL DEFAULT '',
    url text NOT NULL DEFAULT '',
    attributes jsonb NOT NULL DEFAULT '{}',
    recorded_at timestamptz NOT NULL DEFAULT now(),
    seq integer NOT NULL DEFAULT 0,
    PRIMARY KEY (event_id, event_time)
) PARTITION BY RANGE (event_time);
CREATE INDEX events_timeline ON reports.events (tenant_id, message_id, event_time, event_id);
CREATE INDEX events_by_tenant_time ON reports.events (tenant_id, event_time, event_id);
-- Events of a day without a partition (further ahead than partitions are made, or older than retention).
CREATE TABLE reports.events_default PARTITION OF reports.events DEFAULT;
INSERT INTO reports.events SELECT event_id, tenant_id, message_id, event_type, event_time, provider,
    provider_message_id, recipient, reason, attempt, outcome, latency_ms, bounce_type, url, attributes, recorded_at, seq
FROM reports.events_unpartitioned;
SELECT reports.ensure_day_partition('events', 'event_time', day::date)
FROM (SELECT DISTINCT (event_time AT TIME ZONE 'UTC')::date AS day FROM reports.events_default) AS days;
DROP TABLE reports.events_unpartitioned;

-- Rollups: counters, cost sums and latency histograms per (tenant, bucket, class, provider, mailbox provider, tag,
-- campaign). tag = '' is the row of all messages; a message with tags is counted once more under each of its tags.
-- Histograms are fixed log-spaced buckets (stats.py) that add up element-wise, so merged rows give true
-- percentiles. rollup_minute serves short ranges and is kept for days; rollup_hour and rollup_day for months.
CREATE TABLE reports.rollup_hour (
    tenant_id text NOT NULL,
    bucket timestamptz NOT NULL,
    message_class text NOT NULL,
    provider text NOT NULL,
    mailbox_provider text NOT NULL,
    tag text NOT NULL,
    campaign_id text NOT NULL,
    accepted bigint NOT NULL DEFAULT 0,
    sent bigint NOT NULL DEFAULT 0,
    delivered bigint NOT NULL DEFAULT 0,
    deferred bigint NOT NULL DEFAULT 0,
    bounced_hard bigint NOT NULL DEFAULT 0,
    bounced_soft bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    complained bigint NOT NULL DEFAULT 0,
    opened bigint NOT NULL DEFAULT 0,
    clicked bigint NOT NULL DEFAULT 0,
    unsubscribed bigint NOT NULL DEFAULT 0,
    cancelled bigint NOT NULL DEFAULT 0,
    suppressed bigint NOT NULL DEFAULT 0,
    provider_calls bigint NOT NULL DEFAULT 0,
    provider_errors bigint NOT NULL DEFAULT 0,
    provider_throttled bigint NOT NULL DEFAULT 0,
    credits_charged bigint NOT NULL DEFAULT 0,
    provider_cost_micros bigint NOT NULL DEFAULT 0,
    call_latency bigint[] NOT NULL DEFAULT '{}',
    send_latency bigint[] NOT NULL DEFAULT '{}',
    delivery_latency bigint[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, bucket, message_class, provider, mailbox_provider, tag, campaign_id)
) WITH (fillfactor = 70);
CREATE TABLE reports.rollup_day (LIKE reports.rollup_hour INCLUDING ALL) WITH (fillfactor = 70);
CREATE TABLE reports.rollup_minute (LIKE reports.rollup_hour INCLUDING DEFAULTS)
    PARTITION BY RANGE (bucket);
ALTER TABLE reports.rollup_minute
    ADD PRIMARY KEY (tenant_id, bucket, message_class, provider, mailbox_provider, tag, campaign_id);
CREATE TABLE reports.rollup_minute_default PARTITION OF reports.rollup_minute DEFAULT;
-- Platform views read every tenant's rows of a range: by bucket first.
CREATE INDEX rollup_hour_by_bucket ON reports.rollup_hour (bucket);
CREATE INDEX rollup_day_by_bucket ON reports.rollup_day (bucket);
-- One campaign's figures without reading the rest of the tenant's rows (partial: traffic of no campaign keeps no
-- entry, and the consumer's updates touch counters only, so they stay HOT).
CREATE INDEX rollup_hour_by_campaign ON reports.rollup_hour (tenant_id, campaign_id, bucket) WHERE campaign_id <> '';
CREATE INDEX rollup_day_by_campaign ON reports.rollup_day (tenant_id, campaign_id, bucket) WHERE campaign_id <> '';

-- The hourly figures recorded so far carry over: their mailbox provider is unknown ('other'), bounces had no type
-- (counted soft, as a bounce of unknown type is), and their latency histogram measured provider calls.
INSERT INTO reports.rollup_hour (tenant_id, bucket, message_class, provider, mailbox_provider, tag, campaign_id,
    accepted, sent, delivered, bounced_soft, failed, complained, opened, clicked, unsubscribed, cancelled,
    call_latency)
SELECT tenant_id, hour, message_class, provider, 'other', tag, campaign_id, accepted, sent, delivered, bounced, failed,
    complained, opened, clicked, unsubscribed, cancelled, latency_buckets
FROM reports.stats_hourly;
INSERT INTO reports.rollup_day (tenant_id, bucket, message_class, provider, mailbox_provider, tag, campaign_id,
    accepted, sent, delivered, bounced_soft, failed, complained, opened, clicked, unsubscribed, cancelled,
    call_latency)
SELECT tenant_id, date_trunc('day', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', message_class, provider, 'other',
    tag, campaign_id, sum(accepted), sum(sent), sum(delivered), sum(bounced), sum(failed), sum(complained),
    sum(opened), sum(clicked), sum(unsubscribed), sum(cancelled), reports.sum_buckets(latency_buckets)
FROM reports.stats_hourly
GROUP BY 1, 2, 3, 4, 6, 7;
DROP TABLE reports.stats_hourly;

-- What events recorded before their message's ACCEPTED event added to the rows of no campaign, no tag and no
-- mailbox provider (the ACCEPTED event names them), per message and minute: the batch recording the ACCEPTED event
-- moves these counts to the message's rows. The charged credits and the accept → sent / delivered latencies need
-- the message's credits and accept time, which only the ACCEPTED event brings: they are counted then, from the
-- times kept here.
DROP TABLE reports.stats_before_accept;
CREATE TABLE reports.rollup_before_accept (
    tenant_id text NOT NULL,
    message_id text NOT NULL,
    bucket timestamptz NOT NULL,
    message_class text NOT NULL,
    provider text NOT NULL,
    accepted bigint NOT NULL DEFAULT 0,
    sent bigint NOT NULL DEFAULT 0,
    delivered bigint NOT NULL DEFAULT 0,
    deferred bigint NOT NULL DEFAULT 0,
    bounced_hard bigint NOT NULL DEFAULT 0,
    bounced_soft bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    complained bigint NOT NULL DEFAULT 0,
    opened bigint NOT NULL DEFAULT 0,
    clicked bigint NOT NULL DEFAULT 0,
    unsubscribed bigint NOT NULL DEFAULT 0,
    cancelled bigint NOT NULL DEFAULT 0,
    suppressed bigint NOT NULL DEFAULT 0,
    provider_calls bigint NOT NULL DEFAULT 0,
    provider_errors bigint NOT NULL DEFAULT 0,
    provider_throttled bigint NOT NULL DEFAULT 0,
    provider_cost_micros bigint NOT NULL DEFAULT 0,
    call_latency bigint[] NOT NULL DEFAULT '{}',
    sent_times timestamptz[] NOT NULL DEFAULT '{}',
    delivered_times timestamptz[] NOT NULL DEFAULT '{}',
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, message_id, bucket, message_class, provider)
);
