-- Delivery reports to customers (issue 18). Every recorded event gets a number within its message, in the order
-- events were recorded: messages.event_seq is the last number given (bumped by the merge, under the row's lock),
-- events.seq the event's own. Constant defaults: no table rewrite; existing events keep 0 (recorded before
-- numbering).
ALTER TABLE reports.messages ADD COLUMN event_seq integer NOT NULL DEFAULT 0;
ALTER TABLE reports.events ADD COLUMN seq integer NOT NULL DEFAULT 0;

-- The events API lists a tenant's events by time (with filters applied on the way); the timeline index serves
-- one message's events only.
CREATE INDEX events_by_tenant_time ON reports.events (tenant_id, event_time, event_id);

-- Transactional outbox (libs/common/outbox.py): each recorded batch's events, one row per tenant
-- (esp.internal.v1.RecordedEvents), committed with the batch and deleted once JetStream acknowledged the publish
-- to esp.notify.<tenant>, where the webhook dispatcher consumes them.
CREATE TABLE reports.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
