-- Narrower rollups beside the full-key ones (issue 19's stats latency): a 30-day dashboard grouped by provider read
-- ~175 full-key day rows a day per tenant (class x provider x mailbox provider x campaign) and merged their
-- histograms; these hold the same figures summed over mailbox provider, tag and campaign, ~12 rows a day. A query
-- reads the narrowest table that has every column it groups or filters by (services/reports/stats.py). They hold
-- the row of all messages only (no tag rows). *_platform sum over tenants too, for the platform view.
CREATE TABLE reports.rollup_hour_by_provider (LIKE reports.rollup_hour INCLUDING DEFAULTS) WITH (fillfactor = 70);
ALTER TABLE reports.rollup_hour_by_provider DROP COLUMN mailbox_provider, DROP COLUMN tag, DROP COLUMN campaign_id,
    ADD PRIMARY KEY (tenant_id, bucket, message_class, provider);
CREATE TABLE reports.rollup_day_by_provider (LIKE reports.rollup_hour_by_provider INCLUDING ALL)
    WITH (fillfactor = 70);
CREATE TABLE reports.rollup_hour_platform (LIKE reports.rollup_hour_by_provider INCLUDING DEFAULTS)
    WITH (fillfactor = 70);
ALTER TABLE reports.rollup_hour_platform DROP COLUMN tenant_id, ADD PRIMARY KEY (bucket, message_class, provider);
CREATE TABLE reports.rollup_day_platform (LIKE reports.rollup_hour_platform INCLUDING ALL) WITH (fillfactor = 70);

-- What is recorded so far, summed.
INSERT INTO reports.rollup_hour_by_provider
SELECT tenant_id, bucket, message_class, provider, sum(accepted), sum(sent), sum(delivered), sum(deferred),
    sum(bounced_hard), sum(bounced_soft), sum(failed), sum(complained), sum(opened), sum(clicked), sum(unsubscribed),
    sum(cancelled), sum(suppressed), sum(provider_calls), sum(provider_errors), sum(provider_throttled),
    sum(credits_charged), sum(provider_cost_micros), reports.sum_buckets(call_latency),
    reports.sum_buckets(send_latency), reports.sum_buckets(delivery_latency)
FROM reports.rollup_hour WHERE tag = '' GROUP BY 1, 2, 3, 4;
INSERT INTO reports.rollup_day_by_provider
SELECT tenant_id, bucket, message_class, provider, sum(accepted), sum(sent), sum(delivered), sum(deferred),
    sum(bounced_hard), sum(bounced_soft), sum(failed), sum(complained), sum(opened), sum(clicked), sum(unsubscribed),
    sum(cancelled), sum(suppressed), sum(provider_calls), sum(provider_errors), sum(provider_throttled),
    sum(credits_charged), sum(provider_cost_micros), reports.sum_buckets(call_latency),
    reports.sum_buckets(send_latency), reports.sum_buckets(delivery_latency)
FROM reports.rollup_day WHERE tag = '' GROUP BY 1, 2, 3, 4;
INSERT INTO reports.rollup_hour_platform
SELECT bucket, message_class, provider, sum(accepted), sum(sent), sum(delivered), sum(deferred),
    sum(bounced_hard), sum(bounced_soft), sum(failed), sum(complained), sum(opened), sum(clicked), sum(unsubscribed),
    sum(cancelled), sum(suppressed), sum(provider_calls), sum(provider_errors), sum(provider_throttled),
    sum(credits_charged), sum(provider_cost_micros), reports.sum_buckets(call_latency),
    reports.sum_buckets(send_latency), reports.sum_buckets(delivery_latency)
FROM reports.rollup_hour_by_provider GROUP BY 1, 2, 3;
INSERT INTO reports.rollup_day_platform
SELECT bucket, message_class, provider, sum(accepted), sum(sent), sum(delivered), sum(deferred),
    sum(bounced_hard), sum(bounced_soft), sum(failed), sum(complained), sum(opened), sum(clicked), sum(unsubscribed),
    sum(cancelled), sum(suppressed), sum(provider_calls), sum(provider_errors), sum(provider_throttled),
    sum(credits_charged), sum(provider_cost_micros), reports.sum_buckets(call_latency),
    reports.sum_buckets(send_latency), reports.sum_buckets(delivery_latency)
FROM reports.rollup_day_by_provider GROUP BY 1, 2, 3;
