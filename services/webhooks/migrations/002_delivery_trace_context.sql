-- The W3C trace context (traceparent) of the work that queued a delivery (the recorded events' consumer span, or
-- the RPC of a replay or test event): each attempt's span joins that trace (services/webhooks/dispatcher.py).
-- NULL: none. Adding a nullable column without a default rewrites nothing.
ALTER TABLE webhooks.deliveries ADD COLUMN traceparent text;
