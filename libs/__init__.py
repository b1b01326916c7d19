"""Code shared by the services, the dev tools and the client; no service's own code lives here.

``common`` is the plumbing every service shares, ``providers`` the upstream email providers behind one adapter
contract (and their delivery webhooks), ``routing`` the provider catalog, shared health and ranking that the router
and sender use, and ``client`` the ``esp`` command line. Each package maps its modules in its docstring.
"""
