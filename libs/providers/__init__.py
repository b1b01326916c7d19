"""The upstream email providers behind one adapter contract, and their delivery webhooks. Each module declares its
public names in ``__all__``; a name not listed there is private to its module.

The package imports none of its modules, and neither does any provider folder's ``__init__``: ingest and the router
read the capabilities table without httpx, boto3 or aiosmtplib, and the reports service loads a webhook module
without the send stack. Adding a provider: ``docs/ADDING_PROVIDERS.md``.

Sending
    ``base``          the ``ProviderAdapter`` protocol the sender calls, ``BaseAdapter`` (the shared send algorithm),
                      ``HttpAdapter`` and the HTTP failure classification
    ``model``         the email (``OutboundEmail``, ``Address``, ``Attachment``), ``SendResult`` and its ``Outcome``,
                      ``ProviderConfig``, our message and tenant ids, ``personalize``
    ``errors``        the ``ProviderError`` tree: what is found before any network call
    ``capabilities``  what each provider type can take (``DEFAULT_CAPABILITIES``) and ``provider_size_cap``;
                      imports no send code
    ``mime``          MIME documents and streamed HTTP bodies, and the sizes the caps compare
    ``dkim``          DKIM signatures (RFC 6376, RSA and Ed25519) of raw MIME, signed with OpenSSL; the body hash
                      fed in chunks, as a document streams
    ``registry``      ``create_adapter(config)``: the adapter of ``config.type``, its module imported on first use

Delivery webhooks
    ``webhooks``      ``WebhookVerifier``: authenticate, freshness window, parse, replay guard; handlers by type
    ``webhook_model`` what a handler receives, returns and raises (the ``WebhookError`` tree)
    ``events``        ``DeliveryEvent``: the one normalised shape of every provider's callbacks

One folder per provider type (``mailgun``, ``postmark``, ``sendgrid``, ``ses``, ``smtp``)
    ``send``          the adapter, ``ADAPTER``, found by the registry
    ``webhook``       ``create_handler``, found by the verifier (``smtp`` has no webhooks and says so)
"""
