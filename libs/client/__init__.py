"""The ``esp`` command-line client (``libs.client.cli.main``, installed as the ``esp`` script).

Its public surface is the command line itself; ``cli`` declares ``main`` and ``connection`` (where the endpoint and
API key come from) in ``__all__``, everything else is private to it.
"""
