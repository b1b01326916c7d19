"""The webhooks service: tenants' webhook endpoints, and the dispatcher that delivers their events (a durable
consumer of the EVENTS stream, a per-endpoint queue in Postgres, Standard Webhooks signatures)."""
