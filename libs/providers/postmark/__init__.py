"""Postmark provider: send side in ``send.py`` (no imports here, so importing the webhook side stays light)."""
