"""Which RPCs the public edge serves: the one table the edge (ingest) enforces and the REST facade (gateway) routes
and documents.

Customers reach the mesh through one endpoint, ingest. It answers the sending RPCs itself and forwards the rest to
the service that owns them; an RPC missing from ``EDGE_METHODS`` stays mesh-internal (the credit holds: the
contracts annotate them with HTTP routes, yet no customer may reserve, commit or release credits). The table lives
here, not in ``services.ingest``, because services share code only through ``libs``
(``tests/common/test_import_graph.py``): written once, the edge and the gateway cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.auth import PLATFORM_ADMIN

__all__ = ["ADMIN", "EDGE_METHODS", "READ", "SEND", "EdgeMethod", "fronts_service", "serves_method"]

READ, SEND, ADMIN = "read", "send", "admin"


@dataclass(frozen=True)
class EdgeMethod:
    """Who may call a public method and which service answers it."""

    scope: str
    """"send", "read", "admin" (tenant admin) or PLATFORM_ADMIN."""
    owner: str | None = None
    """The service that answers it (the name of the channel to forward to); None means ingest answers itself."""
    lasts_as_its_work: bool = False
    """Forwarded with the client's own deadline, not the upstream timeout of a unary call: a call that takes as long
    as the work it does (an import of a million recipients). Client-streaming calls always are."""


EDGE_METHODS: dict[str, dict[str, EdgeMethod]] = {
    "esp.v1.MessageService": {
        "SendEmail": EdgeMethod(SEND), "BatchSendEmails": EdgeMethod(SEND), "CancelMessage": EdgeMethod(SEND),
        "GetMessage": EdgeMethod(READ, "reports"), "ListMessages": EdgeMethod(READ, "reports"),
        "ListMessageEvents": EdgeMethod(READ, "reports"),
    },
    "esp.v1.AttachmentService": {
        "UploadAttachment": EdgeMethod(SEND), "GetAttachment": EdgeMethod(READ), "DeleteAttachment": EdgeMethod(SEND),
    },
    "esp.v1.TenantService": {
        "CreateTenant": EdgeMethod(PLATFORM_ADMIN), "ListTenants": EdgeMethod(PLATFORM_ADMIN),
        "UpdateTenant": EdgeMethod(PLATFORM_ADMIN), "GetTenant": EdgeMethod(ADMIN),
        "CreateApiKey": EdgeMethod(ADMIN), "ListApiKeys": EdgeMethod(ADMIN), "RevokeApiKey": EdgeMethod(ADMIN),
    },
    # Holds (reserve/commit/release) are internal to the mesh and deliberately not exposed.
    "esp.v1.CreditService": {
        "GetBalance": EdgeMethod(READ, "ledger"), "ListTransactions": EdgeMethod(READ, "ledger"),
        "GetPriceBook": EdgeMethod(READ, "ledger"), "TopUp": EdgeMethod(PLATFORM_ADMIN, "ledger"),
        "SetLowBalanceThreshold": EdgeMethod(ADMIN, "ledger"),
        "UpdatePriceBook": EdgeMethod(PLATFORM_ADMIN, "ledger"),
    },
    "esp.v1.ProviderService": {
        name: EdgeMethod(PLATFORM_ADMIN, "router")
        for name in ("CreateProvider", "GetProvider", "ListProviders", "UpdateProvider", "DeleteProvider",
                     "RouteEmail")
    },
    "esp.v1.DomainService": {
        **{name: EdgeMethod(ADMIN, "router")
           for name in ("CreateDomain", "VerifyDomain", "DeleteDomain", "RotateDomainKey")},
        **{name: EdgeMethod(READ, "router") for name in ("GetDomain", "ListDomains")},
    },
    "esp.v1.StatsService": {
        "GetStats": EdgeMethod(READ, "reports"), "ExportStats": EdgeMethod(READ, "reports"),
        "CompareProviders": EdgeMethod(PLATFORM_ADMIN, "reports"),
    },
    "esp.v1.CampaignService": {
        **{name: EdgeMethod(SEND, "campaigns")
           for name in ("CreateCampaign", "AddCampaignRecipients", "StartCampaign", "PauseCampaign",
                        "ResumeCampaign", "CancelCampaign")},
        "ImportCampaignRecipients": EdgeMethod(SEND, "campaigns", lasts_as_its_work=True),
        "GetCampaign": EdgeMethod(READ, "campaigns"), "ListCampaigns": EdgeMethod(READ, "campaigns"),
    },
    "esp.v1.WebhookService": {
        **{name: EdgeMethod(ADMIN, "webhooks")
           for name in ("CreateWebhookEndpoint", "UpdateWebhookEndpoint", "DeleteWebhookEndpoint",
                        "RotateWebhookSecret", "ReplayWebhookEvents", "SendTestWebhookEvent")},
        **{name: EdgeMethod(READ, "webhooks")
           for name in ("GetWebhookEndpoint", "ListWebhookEndpoints", "ListWebhookAttempts")},
    },
    "esp.v1.EventService": {"ListEvents": EdgeMethod(READ, "reports"), "ExportEvents": EdgeMethod(READ, "reports")},
    "esp.v1.SuppressionService": {
        "ListSuppressions": EdgeMethod(READ, "reports"), "GetSuppression": EdgeMethod(READ, "reports"),
        "CreateSuppression": EdgeMethod(ADMIN, "reports"), "DeleteSuppression": EdgeMethod(ADMIN, "reports"),
    },
}
"""Public methods by full service name, then by method name. A method not listed answers UNIMPLEMENTED at the
edge, and has no REST route."""


def fronts_service(service: str) -> bool:
    """Whether the edge serves any method of ``service`` (a full name, ``esp.v1.CreditService``)."""
    return service in EDGE_METHODS


def serves_method(service: str, method: str) -> bool:
    """Whether the edge serves ``method`` (its short name, ``GetBalance``) of ``service`` (a full name)."""
    return method in EDGE_METHODS.get(service, {})
