"""The campaigns service, being built for issue 17 (bulk sending: templates, recipients, schedule, pause, cancel).

Today it holds the template engine (:mod:`services.campaigns.templates`) and recipient parsing
(:mod:`services.campaigns.recipients`); there is no server yet.
"""
