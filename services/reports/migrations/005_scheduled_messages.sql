-- Scheduled single sends (SendEmailRequest.send_time): a message state and the time the message is handed over.

-- The state check gains 'scheduled'. NOT VALID, as in 004: every existing row passed the narrower check, and
-- validating would scan the table while this migration holds its lock. New rows are checked.
ALTER TABLE reports.messages DROP CONSTRAINT messages_state_check;
ALTER TABLE reports.messages ADD CONSTRAINT messages_state_check CHECK (state IN
    ('accepted', 'deferred', 'sent', 'delivered', 'bounced', 'failed', 'complained', 'cancelled', 'scheduled'))
    NOT VALID;
-- From the ACCEPTED event; NULL for messages sent at once. Nullable without a default: no table rewrite.
ALTER TABLE reports.messages ADD COLUMN send_time timestamptz;
