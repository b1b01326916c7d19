"""The ``esp`` command-line client (``libs.client.cli.main``, installed as the ``esp`` script).

Its public surface is the command line itself; ``cli`` declares ``main`` and ``connection`` (where the endpoint and
API key come from) in ``__all__``. The modules behind it:

- ``cli``: the parser, ``esp send`` and ``esp status``.
- ``campaigns``: ``esp campaign create|add-recipients|start|pause|resume|cancel|status|list``.
- ``webhooks``: ``esp webhook create|list|get|update|delete|rotate|test|replay|log``.
- ``events``: ``esp events list``.
- ``exports``: ``esp events export`` and ``esp stats export``, CSV streamed to a file or standard output.
- ``recipient_files``: a CSV or JSON Lines recipient list read row by row into ``AddCampaignRecipients`` frames.
- ``progress``: the live progress bar of ``esp campaign status --watch`` (rich, else tqdm, else a plain line).
- ``rpc``: what every command shares: endpoint and API key, error messages, the attachment upload.
"""
