"""Legacy references: events carrying only a legacy agent id come out with instance and version
(filled on ingest through the registry); events stored before the registry knew the agent are
filled by the backfill, which survives an interruption, finishes with GetMigrationHealth at
zero and changes no event twice."""

from __future__ import annotations

import asyncio
import secrets
import time

import grpc
import pytest
from sqlalchemy import text

from arm.registry.v1 import agents_pb2, compat_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_common.db import Database
from arm_telemetry.references import AgentRefs, ReferenceResolver, RegistryUnavailable
from tests.conftest import new_database_spec
from tests.helpers import approved_version, expect_failure
from tests.telemetry.conftest import event, start_telemetry, stop_telemetry

T = events_pb2


async def ensure(client, legacy: str) -> compat_pb2.EnsureInstanceForLegacyAgentResponse:  # type: ignore[no-untyped-def]
    return await client.compat.EnsureInstanceForLegacyAgent(
        compat_pb2.EnsureInstanceForLegacyAgentRequest(legacy_agent_id=legacy, name=legacy))


async def test_legacy_only_events_are_filled_on_ingest(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    legacy = f"legacy-{secrets.token_hex(4)}"
    known = await ensure(tenant.admin, legacy)
    async with telemetry.client(tenant.admin_key) as c:
        evs = [event(legacy_agent_id=legacy) for _ in range(3)] + [event(legacy_agent_id="never-registered")]
        resp = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=evs))
        assert resp.accepted_count == 4
        got = {e.event_id: e for e in (await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest())).events}
        for ev in evs[:3]:
            out = got[ev.event_id]
            assert out.instance_id == known.agent_instance.id
            assert out.version_id == known.agent_instance.version_id and out.version_id
            assert out.template_id == known.agent_template.id
            assert out.project_id == known.agent_instance.project_id
            assert out.environment_id == known.agent_instance.environment_id
        unknown = got[evs[3].event_id]
        assert (unknown.instance_id, unknown.version_id) == ("", "")
        health = await c.telemetry.GetMigrationHealth(telemetry_pb2.GetMigrationHealthRequest())
        assert (health.total_events, health.legacy_events, health.missing_instance_count,
                health.missing_version_count) == (4, 4, 1, 1)


async def wait_state(c, backfill_id: str, states: set[int], *, min_processed: int = 0,  # type: ignore[no-untyped-def]
                     limit: int = 600) -> telemetry_pb2.Backfill:
    for _ in range(limit):
        bf = (await c.telemetry.GetBackfillStatus(telemetry_pb2.GetBackfillStatusRequest(backfill_id=backfill_id))).backfill
        if bf.state in states and bf.processed_count >= min_processed:
            return bf
        await asyncio.sleep(0.05)
    raise AssertionError(f"backfill never reached {states}: {bf}")


async def test_backfill_interrupted_and_restarted_fills_every_event_once(registry, tenant, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = new_database_spec(registry.backend, tmp_path, "telemetry")
    # Small batches, so the backfill is interrupted mid-way.
    env = {"ARM_TELEMETRY_BACKFILL_BATCH": "7", "ARM_TELEMETRY_BACKFILL_PAUSE_S": "0.1"}
    server = await start_telemetry(spec, registry, extra_env=env)
    legacies = [f"legacy-{secrets.token_hex(4)}" for _ in range(3)]
    agents = await approved_version(tenant.admin)
    native = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="native"))).agent_instance
    try:
        async with server.client(tenant.admin_key) as c:
            # Stored before the registry knows the agents: nothing to fill them with.
            evs = [event(legacy_agent_id=legacies[i % 3]) for i in range(120)]
            evs += [event(instance_id=native.id, version_id=native.version_id) for _ in range(10)]
            resp = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=evs))
            assert resp.accepted_count == 130
            health = await c.telemetry.GetMigrationHealth(telemetry_pb2.GetMigrationHealthRequest())
            assert (health.missing_instance_count, health.missing_version_count) == (120, 120)
            await expect_failure(c.telemetry.GetBackfillStatus(telemetry_pb2.GetBackfillStatusRequest()),
                                 grpc.StatusCode.NOT_FOUND)
            created = {leg: await ensure(tenant.admin, leg) for leg in legacies}
            started = (await c.telemetry.StartBackfill(telemetry_pb2.StartBackfillRequest(request_id="bf-1"))).backfill
            again = (await c.telemetry.StartBackfill(telemetry_pb2.StartBackfillRequest(request_id="bf-2"))).backfill
            assert again.backfill_id == started.backfill_id, "a running backfill is returned, not doubled"
            mid = await wait_state(c, started.backfill_id,
                                   {telemetry_pb2.BACKFILL_STATE_RUNNING}, min_processed=14, limit=2000)
            assert mid.processed_count < 130
        await stop_telemetry(server, drop=False)  # interrupted mid-way
        db = Database(spec.url, schema=spec.schema)
        try:
            async with db.transaction() as s:
                state, processed = (await s.execute(text("select state, processed_count from backfills"))).one()
        finally:
            await db.dispose()
        assert state == telemetry_pb2.BACKFILL_STATE_RUNNING and 14 <= processed < 130

        server = await start_telemetry(spec, registry, extra_env=env, migrate=False)
        async with server.client(tenant.admin_key) as c:
            # It resumes by itself on start; StartBackfill (a new request id) returns it.
            resumed = (await c.telemetry.StartBackfill(telemetry_pb2.StartBackfillRequest(request_id="bf-3"))).backfill
            assert resumed.backfill_id == started.backfill_id
            done = await wait_state(c, started.backfill_id, {telemetry_pb2.BACKFILL_STATE_COMPLETED}, limit=2000)
            assert done.processed_count == 130, "every event examined exactly once across the restart"
            assert done.updated_count == 120, "every legacy event changed exactly once"
            assert done.unresolved_count == 0 and done.remaining_count == 0
            health = await c.telemetry.GetMigrationHealth(telemetry_pb2.GetMigrationHealthRequest())
            assert (health.missing_instance_count, health.missing_version_count) == (0, 0)
            assert health.legacy_events == 120
            stored = (await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(page_size=500))).events
            for e in stored:
                if e.legacy_agent_id:
                    inst = created[e.legacy_agent_id].agent_instance
                    assert (e.instance_id, e.version_id) == (inst.id, inst.version_id)
                else:
                    assert (e.instance_id, e.version_id) == (native.id, native.version_id)
            # A new pass from the start changes nothing.
            rerun = (await c.telemetry.StartBackfill(telemetry_pb2.StartBackfillRequest(from_start=True))).backfill
            assert rerun.backfill_id != started.backfill_id
            rerun = await wait_state(c, rerun.backfill_id, {telemetry_pb2.BACKFILL_STATE_COMPLETED}, limit=2000)
            assert (rerun.processed_count, rerun.updated_count) == (130, 0)
    finally:
        await stop_telemetry(server)


async def test_an_agent_registered_later_resolves_at_once(registry, tenant, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An unknown legacy id is cached as unknown (here for an hour); registering it in the registry
    drops that entry through the registry's change feed, so the next event is filled."""
    spec = new_database_spec(registry.backend, tmp_path, "telemetry")
    server = await start_telemetry(spec, registry, extra_env={"ARM_TELEMETRY_UNKNOWN_REFERENCE_TTL_S": "3600"})
    legacy = f"legacy-{secrets.token_hex(4)}"
    try:
        async with server.client(tenant.admin_key) as c:
            first = event(legacy_agent_id=legacy)
            await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[first]))
            created = await ensure(tenant.admin, legacy)
            filled = None
            for i in range(100):
                ev = event(legacy_agent_id=legacy, event_id=f"{legacy}-{i}")
                await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[ev]))
                got = (await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
                    filter=telemetry_pb2.EventFilter(legacy_agent_id=legacy), page_size=1))).events[0]
                if got.instance_id:
                    filled = got
                    break
                await asyncio.sleep(0.05)
            assert filled is not None, "the unknown entry was never dropped"
            assert (filled.instance_id, filled.version_id) == (created.agent_instance.id,
                                                               created.agent_instance.version_id)
            stored_first = (await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
                filter=telemetry_pb2.EventFilter(legacy_agent_id=legacy), page_size=500))).events
            assert [e.instance_id for e in stored_first if e.event_id == first.event_id] == [""]
    finally:
        await stop_telemetry(server)


async def test_an_instance_change_drops_its_references_even_without_the_legacy_id() -> None:
    """Cached references are filed under the instance they name: a change notice for that
    instance drops them (its version may have moved) even when the notice carries no legacy id,
    and leaves other instances' and other tenants' references alone."""
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never called: only the cache is used
    resolver = ReferenceResolver(channel, None)
    try:
        mine = AgentRefs("prj_1", "env_1", "tpl_1", "ver_1", "ins_1")
        other = AgentRefs("prj_1", "env_1", "tpl_1", "ver_1", "ins_2")
        now = time.monotonic()
        resolver._remember(("t1", "legacy-a"), mine, now)
        resolver._remember(("t1", "legacy-b"), other, now)
        resolver._remember(("t2", "legacy-a"), mine, now)
        resolver._remember(("t1", "legacy-unknown"), None, now)
        resolver.invalidate(compat_pb2.AgentChange(kind=compat_pb2.AGENT_CHANGE_KIND_INSTANCE, tenant_id="t1",
                                                   instance_id="ins_1", version_id="ver_2"))
        assert await resolver.resolve("t1", "legacy-b") == other  # still cached: no registry call
        assert await resolver.resolve("t2", "legacy-a") == mine
        assert await resolver.resolve("t1", "legacy-unknown") is None
        with pytest.raises(RegistryUnavailable):  # dropped: resolving it needs the registry
            await resolver.resolve("t1", "legacy-a")
    finally:
        await channel.close()
