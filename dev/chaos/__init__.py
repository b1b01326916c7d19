"""Fault injection with a history checker: ``python -m dev.chaos`` (``make chaos``) breaks a private mesh one
fault (or pair) at a time under a mixed load and checks that no email, event or credit was lost or doubled."""
