-- Scheduled single sends (SendEmailRequest.send_time) and CancelMessage.

-- A scheduled email's SEND task waits in the outbox until deliver_after; NULL (every other row) means at once.
-- Adding a nullable column without a default rewrites nothing.
ALTER TABLE ingest.outbox ADD COLUMN deliver_after timestamptz;
-- The due pass (every 200 ms) reads the rows that came due; partial, so the rows published at once (nearly all)
-- maintain no entry.
CREATE INDEX outbox_due ON ingest.outbox (deliver_after) WHERE deliver_after IS NOT NULL;
-- CancelMessage withdraws a scheduled SEND task by its message id.
CREATE INDEX outbox_scheduled_by_msg_id ON ingest.outbox (msg_id) WHERE deliver_after IS NOT NULL;
-- The reconciling pass takes the rows left behind in id order among the unscheduled ones only: scheduled rows
-- (which may wait months, and be many) would otherwise be walked past on every pass.
CREATE INDEX outbox_unscheduled ON ingest.outbox (id) WHERE deliver_after IS NULL;

ALTER TABLE ingest.messages
    -- When the message is handed to the senders; NULL when it was at once.
    ADD COLUMN send_time timestamptz,
    -- The last CancelMessage that changed or inspected the message: its request_id (a retry answers as it did)
    -- and the esp.v1.MessageState it answered (8 = CANCELLED when it withdrew the SEND task).
    ADD COLUMN cancel_request_id text,
    ADD COLUMN cancel_state smallint;
