"""The services of the mesh, one package each, run as ``python -m services.<name>``.

``ingest`` (the public gRPC edge: API keys, accept, attachments), ``gateway`` (REST/JSON in front of it),
``router`` (the provider registry and RouteEmail), ``sender`` (delivers queued emails through the providers),
``ledger`` (credits and holds), ``reports`` (message status, stats, suppressions, provider webhooks, one-click
unsubscribe) and ``campaigns`` (being built: today its template engine and recipient parsing, no server yet).
They talk over gRPC and JetStream and share code only through ``libs``: no service imports another's package
(``tests/common/test_import_graph.py`` holds this).
"""
