-- The W3C trace context (traceparent) of the work that wrote the row — an accepted email's SEND task and ACCEPTED event — so the
-- published message carries it and its consumers' spans join that trace (libs/common/outbox.py). NULL: none.
-- Adding a nullable column without a default rewrites nothing.
ALTER TABLE ingest.outbox ADD COLUMN traceparent text;
