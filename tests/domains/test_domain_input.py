"""Bad input to DomainService gets a clear status: invalid names, public suffixes, a domain another tenant has
verified (without saying who), a duplicate add (the existing domain back), unknown domains — and another tenant
never sees a domain."""

from __future__ import annotations

import grpc
import pytest
from esp.v1 import domains_pb2 as D
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dev.dns_server import AuthoritativeDns
from tests.domains.conftest import Router, create, get, new_tenant, published, verify


def _reason(error: grpc.aio.AioRpcError) -> str:
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


@pytest.mark.parametrize("name", ["", "not a domain", "-bad.example", "a..b", "x" * 64 + ".test",
                                  "1.2.3.4", "under_score.test"])
async def test_a_name_that_is_no_domain_is_an_invalid_argument(router: Router, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(router, new_tenant(), name)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(refused.value) == "INVALID_DOMAIN"


@pytest.mark.parametrize("name", ["com", "co.uk", "github.io", "localhost"])
async def test_a_public_suffix_is_refused(router: Router, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(router, new_tenant(), name)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(refused.value) == "PUBLIC_SUFFIX"


async def test_a_name_is_normalised_to_lower_case_without_the_final_dot(router: Router) -> None:
    domain = await create(router, new_tenant(), "News.Acme.TEST.")
    assert domain.name == "domains/news.acme.test" and domain.domain == "news.acme.test"


async def test_adding_a_domain_twice_returns_the_existing_one(router: Router) -> None:
    tenant = new_tenant()
    first = await create(router, tenant, "twice.acme.test")
    again = await create(router, tenant, "twice.acme.test")
    assert again == first  # same token, same keys


async def test_a_domain_another_tenant_verified_is_refused_without_naming_it(
        router: Router, dns_server: AuthoritativeDns) -> None:
    owner, other = new_tenant(), new_tenant()
    domain = await create(router, owner, "taken.test")
    dns_server.publish("taken.test", published(domain))
    assert (await verify(router, owner, "taken.test")).state == D.DOMAIN_STATE_VERIFIED

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(router, other, "taken.test")

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(refused.value) == "DOMAIN_TAKEN"
    trailers = b"".join(v if isinstance(v, bytes) else v.encode()
                        for _, v in refused.value.trailing_metadata() or ())
    assert owner not in (refused.value.details() or "") and owner.encode() not in trailers


async def test_an_unknown_domain_is_not_found(router: Router) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await get(router, new_tenant(), "nobody.acme.test")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_another_tenants_domain_is_not_found_for_every_method(router: Router) -> None:
    owner, other = new_tenant(), new_tenant()
    await create(router, owner, "mine.acme.test")
    name = "domains/mine.acme.test"
    calls = [router.stub.GetDomain(D.GetDomainRequest(name=name), metadata=router.as_tenant(other)),
             router.stub.VerifyDomain(D.VerifyDomainRequest(name=name), metadata=router.as_tenant(other)),
             router.stub.RotateDomainKey(D.RotateDomainKeyRequest(name=name), metadata=router.as_tenant(other)),
             router.stub.DeleteDomain(D.DeleteDomainRequest(name=name), metadata=router.as_tenant(other))]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await router.stub.ListDomains(D.ListDomainsRequest(), metadata=router.as_tenant(other))
    assert list(listed.domains) == []
    assert (await get(router, owner, "mine.acme.test")).domain == "mine.acme.test"  # still there


async def test_a_deleted_domain_is_gone(router: Router) -> None:
    tenant = new_tenant()
    await create(router, tenant, "gone.acme.test")
    await router.stub.DeleteDomain(D.DeleteDomainRequest(name="domains/gone.acme.test"),
                                   metadata=router.as_tenant(tenant))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await get(router, tenant, "gone.acme.test")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_domains_are_listed_in_name_order_a_page_at_a_time(router: Router) -> None:
    tenant = new_tenant()
    for name in ("c.acme.test", "a.acme.test", "b.acme.test"):
        await create(router, tenant, name)
    first = await router.stub.ListDomains(D.ListDomainsRequest(page_size=2), metadata=router.as_tenant(tenant))
    rest = await router.stub.ListDomains(D.ListDomainsRequest(page_size=2, page_token=first.next_page_token),
                                         metadata=router.as_tenant(tenant))
    assert [d.domain for d in [*first.domains, *rest.domains]] == ["a.acme.test", "b.acme.test", "c.acme.test"]
    assert rest.next_page_token == ""
