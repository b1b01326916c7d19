-- Provider webhook payloads we could not read, kept for inspection instead of lost. An authentic callback whose
-- body cannot be read at all is refused (400) and kept here whole (scope 'body'); an item of an authentic callback
-- that cannot be read (one event of a SendGrid batch, a Mailgun event-data without an event name ...) is kept here
-- (scope 'item') while the callback's good events are used and the provider is answered 2xx. Requests that fail
-- authentication are never kept: anyone can send those.
--
-- payload is the exact bytes: the request body for 'body', the item's JSON for 'item'. A provider's retries of the
-- same payload land on the same row (payload_sha256) and count up in times_received instead of adding rows.
--
-- Retention: 30 days after a payload was last received. The webhook receiver deletes expired rows a few at a time
-- whenever it keeps a new one (services/reports/webhook_receiver.py, REJECTED_ITEMS_RETENTION), so the table only
-- grows while providers send what we cannot read; rows are evidence for fixing a parser, not a record to keep.
CREATE TABLE reports.rejected_webhook_items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider text NOT NULL,
    provider_type text NOT NULL,
    scope text NOT NULL CHECK (scope IN ('body', 'item')),
    item_index integer,
    reason text NOT NULL,
    payload bytea NOT NULL,
    payload_sha256 bytea NOT NULL,
    first_received_at timestamptz NOT NULL DEFAULT now(),
    last_received_at timestamptz NOT NULL DEFAULT now(),
    times_received integer NOT NULL DEFAULT 1,
    UNIQUE (provider, payload_sha256)
);
-- The retention sweep, oldest first.
CREATE INDEX rejected_webhook_items_by_age ON reports.rejected_webhook_items (last_received_at);
