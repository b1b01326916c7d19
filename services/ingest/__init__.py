"""The ingest service: the public gRPC edge (API keys, scopes, forwarding) and the accept path for emails and their
attachments (``services/ingest/README.md`` lists its behaviours; entry point :mod:`services.ingest.server`)."""
