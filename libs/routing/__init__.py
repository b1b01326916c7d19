"""Choosing a provider for an email, shared by the router and the sender. Each module declares its public names in
``__all__``; a name not listed there is private to its module. The package imports none of its modules.

    ``catalog``   ``ProviderCatalog``: the providers (``ProviderSpec``) every replica holds in memory, hot-reloaded
                  from the JetStream KV bucket the router writes
    ``health``    ``HealthBoard``: per-provider breaker, latency, Retry-After pause, rate limit and quotas in Redis,
                  shared by every replica; ``acquire`` before a call, ``record`` after it
    ``scoring``   ``rank``: the eligible providers for one email as a fallback chain, best first, with the reasons
"""
