"""Plumbing every service shares. Each module is one idea and declares its public names in ``__all__``; a name
not listed there is private to its module (``tests/common/test_public_surfaces.py`` fails on an import of one from
``libs``, ``services``, ``dev`` or ``bench``).

The package imports none of its modules: a caller that needs one small piece (the CLI reading the message
classes, say) must not load grpc, NATS, psycopg and boto3 with it.

Serving and calling
    ``grpc_server``   ``serve()`` / ``run()`` a ``ServiceApp``: grpc.aio, health, reflection, auth, errors → Status,
                      tracing, metrics, SIGTERM drain
    ``grpc_client``   channels between services; a failed call → the same domain error
    ``auth``          the principal of the current call (tenant, scopes) and the trusted-header authenticator
    ``public_edge``   which RPCs the public edge serves, with their scopes and owners (ingest enforces it, the
                      gateway routes and documents it)
    ``errors``        the domain's exception tree (``EspError`` and one subclass per gRPC code) ↔ ``google.rpc.Status``
    ``resource_names``  what an id, a resource name, a filter value or a page token may hold (no control characters,
                        bounded length), checked where a request enters a server
    ``pagination``    page sizes (AIP-158: 0 the default, clamped to the maximum, negative refused) and page tokens
    ``field_masks``   which fields an Update RPC changes: its ``update_mask`` read one way (AIP-134)
    ``workers``       child worker processes of a service, supervised (ready before serving, fatal when they die)
    ``priority``      lower CPU priority (nice and autogroup) for background processes
    ``stopping``      how a background loop pauses between rounds

Data and transport
    ``db``            Postgres pools and per-service SQL migrations
    ``redis``         the Redis client and shared Lua scripts (GCRA)
    ``s3``            the S3 client, buckets, streamed reads
    ``jetstream``     streams and consumers declared in code, publishing, pull loops (``Topology`` names them)
    ``batching``      group commit: concurrent calls coalesced into one flush
    ``byte_records``  a byte stream cut into records (lines; CSV records whose quoted fields span lines), in bounded
                      memory whatever the chunk boundaries
    ``outbox``        the transactional outbox's publisher: committed rows reach JetStream at least once
    ``queued_messages``  a queued email's public summary and its ACCEPTED event (ingest, campaigns)
    ``suppressions``  the suppression list's Redis mirror (written by reports, read by ingest)
    ``campaign_halts``  paused and cancelled campaigns, and cancelled messages, as senders see them (Redis)
    ``sending_domains``  which domains a tenant may send from, their DKIM keys (sealed) and each provider's
                         readiness for them, as every replica sees them (NATS KV)

Domain facts and settings
    ``addresses``     what a recipient address and display name may be, and the canonical address (ingest, campaigns)
    ``mailbox_providers``  a recipient's mailbox provider (gmail, yahoo, outlook, apple, other): well-known domains,
                           else MX records looked up in the background (reports' analytics)
    ``message_classes``  the message classes (otp, transactional, bulk) and every per-class policy
    ``event_types``   the event types customers see (webhooks, events API) and what each is made from
    ``content_limits``   the subject and body limits every email keeps, sent or rendered from a template
    ``recipient_lists``  a recipient list's rows (CSV, JSON Lines) as written, or why one cannot be read; row numbers
                         (campaigns' import, the gateway's plain bodies, the CLI)
    ``settings``      frozen settings from ``ESP_*`` variables, every bad key reported at once
    ``secret_box``    secrets sealed at rest (envelope AES-GCM under ``ESP_SECRETS_KEYS``), bound to where they live
    ``timestamps``    datetimes → protobuf Timestamps
    ``unsubscribe``   one-click unsubscribe (RFC 8058): signed, opaque per-recipient tokens and the two headers

Observability
    ``logging``       JSON log lines with trace ids
    ``telemetry``     OpenTelemetry set-up; W3C trace context through gRPC metadata and NATS headers
    ``metrics``       Prometheus metrics shared by every service
"""
