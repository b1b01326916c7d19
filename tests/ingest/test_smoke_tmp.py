from tests.ingest.conftest import IngestHarness, send_request


async def test_smoke(harness: IngestHarness):
    tenant = await harness.new_tenant()
    message = await harness.send(tenant, send_request())
    assert message.id
    assert (await harness.balance(tenant)).held == message.credits
