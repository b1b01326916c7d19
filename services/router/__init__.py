"""The router service: the provider registry (Postgres, broadcast through a JetStream KV bucket) and RouteEmail
(entry point :mod:`services.router.server`)."""
