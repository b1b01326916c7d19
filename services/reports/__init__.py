"""The reports service: message status and timelines, stats, suppression lists, provider delivery webhooks.

Other services import :func:`services.reports.suppressions.is_suppressed` (ingest, at accept).
"""
