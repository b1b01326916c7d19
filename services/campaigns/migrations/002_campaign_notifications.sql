-- Campaign notifications (issue 18): each time a campaign becomes paused (or its pause reason changes) it gets the
-- next number here, in the transaction of that transition, so the AccountEvent written to the outbox with it has an
-- id of its own that a re-publish keeps (Nats-Msg-Id campaign-<id>-paused-<n>). Constant default: no rewrite.
ALTER TABLE campaigns.campaigns ADD COLUMN pauses integer NOT NULL DEFAULT 0;
