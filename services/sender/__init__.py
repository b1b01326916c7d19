"""The sender service: delivers queued emails through the providers, a pool per message class over JetStream
(entry point :mod:`services.sender.server`)."""
