-- Whether reports.messages.provider was named by a SENT event (the provider that took the message) rather than
-- by a delivery report that arrived first. The consumer merges a whole batch of messages in one statement, and
-- ON CONFLICT DO UPDATE sees only the target table's columns, so this fact has to be one of them.
ALTER TABLE reports.messages ADD COLUMN provider_from_sent boolean NOT NULL DEFAULT false;
