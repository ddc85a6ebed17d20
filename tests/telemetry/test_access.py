"""Access: every call authenticated, telemetry:read for reads (an operator without it is
PERMISSION_DENIED), agents may ingest (their own events) but not read, tenants never see each
other's events, and bad input is INVALID_ARGUMENT with field violations."""

from __future__ import annotations

import asyncio
import secrets

import grpc

from arm.registry.v1 import agents_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_client import ArmClient
from tests.conftest import make_tenant
from tests.helpers import approved_version, expect_failure, operator_with_roles
from tests.telemetry.conftest import event
from tests.telemetry.test_ingest import stored_ids

T = events_pb2
Code = grpc.StatusCode


def reads(client: ArmClient, run: str = "r") -> list:  # type: ignore[type-arg]
    return [
        client.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest()),
        client.telemetry.GetEventStats(telemetry_pb2.GetEventStatsRequest()),
        client.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(run_id=run)),
        client.telemetry.GetMigrationHealth(telemetry_pb2.GetMigrationHealthRequest()),
        client.telemetry.GetBackfillStatus(telemetry_pb2.GetBackfillStatusRequest()),
    ]


async def first_of_tail(client: ArmClient, **kw) -> None:  # type: ignore[no-untyped-def]
    async for _ in client.telemetry.TailEvents(telemetry_pb2.TailEventsRequest(**kw)):
        return


async def test_every_call_needs_a_key(telemetry) -> None:  # type: ignore[no-untyped-def]
    async with telemetry.client(None) as anon, telemetry.client("arm_key_forged_secret") as forged:
        for c in (anon, forged):
            await expect_failure(c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[event()])),
                                 Code.UNAUTHENTICATED)
            for call in reads(c):
                await expect_failure(call, Code.UNAUTHENTICATED)
            await expect_failure(first_of_tail(c), Code.UNAUTHENTICATED)


async def test_reads_need_telemetry_read(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    # A custom role with everything an operator has except telemetry:read.
    from arm.registry.v1 import access_pb2

    role = (await tenant.admin.access.CreateRole(access_pb2.CreateRoleRequest(
        name=f"no-telemetry-{secrets.token_hex(3)}", permissions=["registry:read", "telemetry:write"]))).role
    op = (await tenant.admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
        email=f"op-{secrets.token_hex(4)}@example.com", name="No telemetry"))).operator
    await tenant.admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(operator_id=op.id, role_id=role.id))
    key = (await tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(operator_id=op.id))).secret
    async with telemetry.client(key) as c:
        for call in reads(c):
            got = await expect_failure(call, Code.PERMISSION_DENIED, "MISSING_PERMISSION")
            assert got.metadata["permission"] == "telemetry:read"
        await expect_failure(first_of_tail(c), Code.PERMISSION_DENIED, "MISSING_PERMISSION")
    # The built-in auditor role reads.
    _, auditor = await operator_with_roles(tenant.admin, telemetry.address, "auditor")
    async with auditor:
        await auditor.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest())
        # ... but may not ingest.
        await expect_failure(auditor.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[event()])),
                             Code.PERMISSION_DENIED, "MISSING_PERMISSION")
        await expect_failure(auditor.telemetry.StartBackfill(telemetry_pb2.StartBackfillRequest()),
                             Code.PERMISSION_DENIED, "MISSING_PERMISSION")


async def test_agents_ingest_their_own_events_only_and_cannot_read(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="a"))).agent_instance
    from arm.registry.v1 import access_pb2

    key = (await tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=inst.id))).secret
    async with telemetry.client(key) as agent:
        mine, unnamed, foreign = event(instance_id=inst.id), event(), event(instance_id="ins_someone_else")
        resp = await agent.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[mine, unnamed, foreign]))
        assert resp.accepted_count == 2
        assert [(r.index, r.reason) for r in resp.rejected] == [(2, "NOT_YOUR_AGENT")]
        for call in reads(agent):
            await expect_failure(call, Code.PERMISSION_DENIED)
    async with telemetry.client(tenant.admin_key) as admin:
        stored = (await admin.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            filter=telemetry_pb2.EventFilter(instance_id=inst.id)))).events
        assert sorted(e.event_id for e in stored) == sorted([mine.event_id, unnamed.event_id])


async def test_tenants_never_see_each_others_events(telemetry, registry, system_admin, tenant) -> None:  # type: ignore[no-untyped-def]
    other = await make_tenant(registry, system_admin)
    run = f"run-{secrets.token_hex(4)}"
    shared_id = f"shared-{secrets.token_hex(4)}"
    async with telemetry.client(tenant.admin_key) as a, telemetry.client(other.admin_key) as b:
        # The same event_id in two tenants is two events (dedupe is per tenant).
        ra = await a.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[
            event(T.OP_EVENT_TYPE_DECISION_MADE, run_id=run, event_id=shared_id, legacy_agent_id="leg-a",
                  payload={"decision_id": "d", "decision": "DECISION_ALLOW"})]))
        rb = await b.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[event(event_id=shared_id)]))
        assert ra.accepted_count == rb.accepted_count == 1
        b_tail = asyncio.create_task(first_of_tail(b, filter=telemetry_pb2.EventFilter(run_id=run), after_cursor="0"))
        assert await stored_ids(b, run_id=run) == []
        assert (await b.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(run_id=run))).events == []
        stats = await b.telemetry.GetEventStats(telemetry_pb2.GetEventStatsRequest())
        assert stats.total == 1
        health = await b.telemetry.GetMigrationHealth(telemetry_pb2.GetMigrationHealthRequest())
        assert (health.total_events, health.legacy_events) == (1, 0)
        await expect_failure(b.telemetry.GetBackfillStatus(telemetry_pb2.GetBackfillStatusRequest()), Code.NOT_FOUND)
        assert await stored_ids(a, run_id=run) == [shared_id]
        await asyncio.sleep(0.5)
        assert not b_tail.done(), "tenant b's tail received tenant a's event"
        b_tail.cancel()
        # The other tenant's event with the shared id stays its own.
        mine = (await b.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest())).events
        assert [(e.event_id, e.tenant_id, e.run_id) for e in mine] == [(shared_id, other.tenant.id, "")]
    await other.admin.close()


async def test_bad_input_is_invalid_argument(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    async with telemetry.client(tenant.admin_key) as c:
        got = await expect_failure(c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(page_size=-1)),
                                   Code.INVALID_ARGUMENT)
        assert "page_size" in got.violations
        got = await expect_failure(c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            filter=telemetry_pb2.EventFilter(types=[0]))), Code.INVALID_ARGUMENT, "INVALID_FIELDS")
        assert "filter.types[0]" in got.violations
        await expect_failure(c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(page_token="garbage!")),
                             Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        bad_window = telemetry_pb2.QueryEventsRequest()
        bad_window.filter.start_time.FromSeconds(2000)
        bad_window.filter.end_time.FromSeconds(1000)
        got = await expect_failure(c.telemetry.QueryEvents(bad_window), Code.INVALID_ARGUMENT, "INVALID_FIELDS")
        assert "filter.end_time" in got.violations
        got = await expect_failure(c.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest()),
                                   Code.INVALID_ARGUMENT, "INVALID_FIELDS")
        assert "run_id" in got.violations
        await expect_failure(first_of_tail(c, after_cursor="not-a-cursor"), Code.INVALID_ARGUMENT, "INVALID_CURSOR")
        # A page token from one filter used with another.
        await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[event(run_id="x"), event(run_id="x")]))
        page = await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            page_size=1, filter=telemetry_pb2.EventFilter(run_id="x")))
        await expect_failure(c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            page_size=1, page_token=page.next_page_token, filter=telemetry_pb2.EventFilter(run_id="y"))),
            Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        # Oversized strings are rejected per event, not per batch.
        resp = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[
            event(run_id="r" * 500), event(), event(event_id="x" * 200)]))
        assert [(r.index, r.reason) for r in resp.rejected] == [(0, "INVALID_FIELD"), (2, "INVALID_EVENT_ID")]
        assert resp.accepted_count == 1


async def test_only_system_admin_keys_act_for_another_tenant(telemetry, registry, system_admin, tenant) -> None:  # type: ignore[no-untyped-def]
    other = await make_tenant(registry, system_admin)
    header = (("x-arm-act-for-tenant", other.tenant.id),)
    async with telemetry.client(tenant.admin_key) as c:
        await expect_failure(c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[event()]),
                                                      metadata=header),
                             Code.PERMISSION_DENIED, "ACT_FOR_TENANT_NOT_ALLOWED")
    # The service key (system admin) stores into the named tenant, which then sees the event.
    ev = event(run_id="acted")
    async with telemetry.client(registry.admin_key) as svc:
        resp = await svc.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[ev]), metadata=header)
        assert resp.accepted_count == 1
    async with telemetry.client(other.admin_key) as c:
        assert await stored_ids(c, run_id="acted") == [ev.event_id]
    async with telemetry.client(tenant.admin_key) as c:
        assert await stored_ids(c, run_id="acted") == []
    await other.admin.close()


async def test_a_project_scoped_reader_reads_that_project_only(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    from arm.registry.v1 import access_pb2, tenancy_pb2

    p1, p2 = [(await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{secrets.token_hex(3)}", name=name))).project for name in ("One", "Two")]
    async with telemetry.client(tenant.admin_key) as admin:
        resp = await admin.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[
            event(project_id=p1.id, event_id=f"in-{p1.id}"), event(project_id=p2.id)]))
        assert resp.accepted_count == 2
    _, reader = await operator_with_roles(tenant.admin, telemetry.address, "auditor",
                                          scope_type=access_pb2.ROLE_SCOPE_TYPE_PROJECT, scope_id=p1.id)
    async with reader:
        await expect_failure(reader.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest()),
                             Code.PERMISSION_DENIED, "MISSING_PERMISSION")
        await expect_failure(reader.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            filter=telemetry_pb2.EventFilter(project_id=p2.id))), Code.PERMISSION_DENIED, "MISSING_PERMISSION")
        got = await reader.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            filter=telemetry_pb2.EventFilter(project_id=p1.id)))
        assert [e.event_id for e in got.events] == [f"in-{p1.id}"]
