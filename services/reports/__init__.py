"""The reports service: message status and timelines, stats, suppression lists, provider delivery webhooks.

Nothing here is imported by other services. The suppression list's Redis mirror, which ingest reads at accept,
is shared through :mod:`libs.common.suppressions`.
"""
