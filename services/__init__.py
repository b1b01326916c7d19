"""The services of the mesh, one package each, run as ``python -m services.<name>``.

``ingest`` (the public gRPC edge: API keys, accept, attachments), ``gateway`` (REST/JSON in front of it),
``router`` (the provider registry and RouteEmail), ``sender`` (delivers queued emails through the providers),
``ledger`` (credits and holds) and ``reports`` (message status, stats, suppressions, provider webhooks). They talk
over gRPC and JetStream and share code only through ``libs``: no service imports another's package.
"""
