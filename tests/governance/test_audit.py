"""The audit trail over gRPC: change records from registry's and governance's outboxes and from
trusted callers, each stored once, numbered and hash-chained per tenant; VerifyChain finds the
exact record that was tampered with; the PostgreSQL trigger refuses UPDATE and DELETE; lists
filter and paginate; exports re-verify offline; RBAC and tenant isolation."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, policy_pb2
from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient
from arm_common.chain import parse_export_lines, record_hash, verify_records
from arm_common.outbox import OutboxMessage
from tests.conftest import GovernanceServer, TenantContext, make_tenant
from tests.helpers import expect_failure, operator_with_roles

CR = common_pb2
APPENDED, DUPLICATE, REJECTED = (audit_pb2.APPEND_STATUS_APPENDED, audit_pb2.APPEND_STATUS_DUPLICATE,
                                 audit_pb2.APPEND_STATUS_REJECTED)


def task_record(n: int, **fields: object) -> common_pb2.ChangeRecord:
    """A TASK_TRANSITIONED record as the older platform's task engine sends it."""
    occur = timestamp_pb2.Timestamp()
    occur.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=n))
    payload = struct_pb2.Struct()
    payload.update({"task": f"task-{n}", "attempt": n, "ratio": 0.5, "ok": True, "tags": ["a", n]})
    values: dict[str, object] = dict(
        record_id=f"task-{n}-{secrets.token_hex(4)}", type=CR.CHANGE_RECORD_TYPE_TASK_TRANSITIONED,
        actor=CR.Actor(type=CR.ACTOR_TYPE_SYSTEM, id="mission-control"), target_type="task",
        target_id=f"task-{n}", summary=f"task {n} moved", payload=payload,
        before=struct_pb2.Struct(fields={"state": struct_pb2.Value(string_value="TODO")}),
        after=struct_pb2.Struct(fields={"state": struct_pb2.Value(string_value="DONE")}),
        reason="done", occur_time=occur, source="mission-control")
    values.update(fields)
    return common_pb2.ChangeRecord(**values)  # type: ignore[arg-type]


async def all_records(client: ArmClient, flt: audit_pb2.ChangeRecordFilter | None = None,
                      page_size: int = 0, newest_first: bool = False) -> list[common_pb2.ChangeRecord]:
    out: list[common_pb2.ChangeRecord] = []
    token = ""
    while True:
        page = await client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            page_size=page_size, page_token=token, filter=flt, newest_first=newest_first))
        out += page.records
        token = page.next_page_token
        if not token:
            return out


async def wait_for_record(client: ArmClient, type_: int, target_id: str) -> common_pb2.ChangeRecord:
    """Outboxes deliver asynchronously: wait (bounded) until the record arrives."""
    deadline = time.monotonic() + 20
    flt = audit_pb2.ChangeRecordFilter(types=[type_], target_id=target_id)  # type: ignore[list-item]
    while True:
        found = await all_records(client, flt)
        if found:
            assert len(found) == 1, f"{len(found)} records for one change"
            return found[0]
        assert time.monotonic() < deadline, f"no {CR.ChangeRecordType.Name(type_)} record for {target_id}"
        await asyncio.sleep(0.05)


async def test_append_stores_each_record_once_and_rejects_bad_ones_alone(
        governance: GovernanceServer, tenant: TenantContext) -> None:
    async with governance.client(tenant.admin_key) as client:
        good = [task_record(i) for i in range(3)]
        bad = [task_record(9, record_id=""), task_record(10, type=0),
               task_record(11, actor=CR.Actor(type=CR.ACTOR_TYPE_SYSTEM)), task_record(12, target_type="x" * 65)]
        batch = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]]
        resp = await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(records=batch))
        assert [r.status for r in resp.results] == [APPENDED, REJECTED, APPENDED, REJECTED, REJECTED,
                                                    APPENDED, REJECTED]
        assert [r.reason for r in resp.results if r.status == REJECTED] == [
            "MISSING_RECORD_ID", "INVALID_TYPE", "INVALID_ACTOR", "FIELD_TOO_LONG"]
        appended = [r for r in resp.results if r.status == APPENDED]
        sequences = [r.sequence for r in appended]
        assert sequences == sorted(sequences) and len(set(sequences)) == 3
        assert sequences == list(range(sequences[0], sequences[0] + 3)), "no gap for rejected records"

        # The same records again (and one twice in a batch): duplicates, nothing new.
        again = await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[good[1], good[0], good[0]]))
        assert [r.status for r in again.results] == [DUPLICATE] * 3
        assert [(r.sequence, r.hash) for r in again.results] == [
            (appended[1].sequence, appended[1].hash), (appended[0].sequence, appended[0].hash),
            (appended[0].sequence, appended[0].hash)]
        stored = await all_records(client, audit_pb2.ChangeRecordFilter(
            types=[CR.CHANGE_RECORD_TYPE_TASK_TRANSITIONED]))
        assert sorted(r.record_id for r in stored) == sorted(r.record_id for r in good)

        # A record in the batch duplicated inside one call is stored once.
        twin = task_record(20)
        resp = await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(records=[twin, twin]))
        assert [r.status for r in resp.results] == [APPENDED, DUPLICATE]

        # request_id: a replay returns the first response, byte for byte.
        req = audit_pb2.AppendChangeRecordsRequest(request_id="batch-1", records=[task_record(30)])
        first = await client.audit.AppendChangeRecords(req)
        replay = await client.audit.AppendChangeRecords(req)
        assert replay == first and first.results[0].status == APPENDED

        got = await client.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(record_id=good[2].record_id))
        rec = got.record
        assert rec.tenant_id == tenant.tenant.id and rec.payload == good[2].payload
        assert rec.occur_time == good[2].occur_time and rec.before == good[2].before
        assert rec.sequence == appended[2].sequence and rec.hash == appended[2].hash
        assert rec.HasField("record_time")


async def test_records_arrive_from_registry_and_governance_outboxes(
        governance: GovernanceServer, tenant: TenantContext) -> None:
    async with governance.client(tenant.admin_key) as client:
        # The registry's own records for this tenant (created by the fixture) and a new one.
        await wait_for_record(client, CR.CHANGE_RECORD_TYPE_TENANT_CREATED, tenant.tenant.id)
        project = (await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
            slug="audited", name="Audited"))).project
        rec = await wait_for_record(client, CR.CHANGE_RECORD_TYPE_PROJECT_CREATED, project.id)
        assert rec.source == "registry" and rec.actor.id == tenant.admin_operator_id
        assert rec.actor.type == CR.ACTOR_TYPE_OPERATOR
        # Governance's own: a policy change and a denial.
        env = (await client.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
            envelope=policy_pb2.PolicyEnvelope(name="audited", scope=policy_pb2.POLICY_SCOPE_TENANT,
                                               mode=policy_pb2.POLICY_MODE_ENFORCE, active=True,
                                               default_effect=policy_pb2.DECISION_DENY)))).envelope
        rec = await wait_for_record(client, CR.CHANGE_RECORD_TYPE_POLICY_CREATED, env.envelope_id)
        assert rec.source == "governance"
        report = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
        assert report.ok and report.records_checked == report.last_sequence >= 3


async def test_chain_verifies_and_export_reverifies_offline(
        governance: GovernanceServer, tenant: TenantContext) -> None:
    async with governance.client(tenant.admin_key) as client:
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(25)]))
        # Mixed workload: concurrent appends and records from both services.
        await asyncio.gather(*(client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(100 + i)])) for i in range(20)))
        project = (await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
            slug="mixed", name="Mixed"))).project
        await wait_for_record(client, CR.CHANGE_RECORD_TYPE_PROJECT_CREATED, project.id)

        report = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
        records = await all_records(client, page_size=7)
        assert report.ok, report.message
        assert [r.sequence for r in records] == list(range(1, len(records) + 1))
        assert report.last_sequence == len(records) and report.last_hash == records[-1].hash
        assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:], strict=False))

        lines: list[bytes] = []
        count = 0
        async for chunk in client.audit.ExportChangeRecords(audit_pb2.ExportChangeRecordsRequest()):
            lines += chunk.data.splitlines(keepends=True)
            count += chunk.record_count
        assert count == len(lines) == len(records)
        offline = verify_records(parse_export_lines(lines))
        assert offline.ok and offline.last_hash == report.last_hash

        # Editing one exported line is caught offline at that record.
        victim = 10
        edited = lines[victim - 1].replace(b'"summary":"', b'"summary":"not ')
        assert edited != lines[victim - 1]
        broken = verify_records(parse_export_lines(lines[:victim - 1] + [edited] + lines[victim:]))
        assert not broken.ok and broken.first_broken_sequence == victim and broken.reason == "HASH_MISMATCH"


async def tamper(governance: GovernanceServer, sql: str, **params: object) -> None:
    """Edits the trail behind the API's back, switching the append-only trigger off for this
    session where there is one (only a superuser can)."""
    async def run(s):  # type: ignore[no-untyped-def]
        if governance.db.is_postgres:
            await s.execute(text("SET LOCAL session_replication_role = replica"))
        await s.execute(text(sql), params)
    await governance.db.run(run)


@pytest.mark.parametrize("how", ["alter", "delete-middle", "delete-last", "relink", "rewind-head"])
async def test_verify_chain_names_the_tampered_record(
        governance: GovernanceServer, registry, system_admin, how: str) -> None:  # type: ignore[no-untyped-def]
    ctx = await make_tenant(registry, system_admin)
    async with governance.client(ctx.admin_key) as client:
        await wait_for_record(client, CR.CHANGE_RECORD_TYPE_TENANT_CREATED, ctx.tenant.id)
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(12)]))
        records = await all_records(client)
        assert (await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())).ok
        tid = ctx.tenant.id
        victim = records[5].sequence
        if how == "alter":
            await tamper(governance, "update change_records set summary = 'nothing happened' "
                         "where tenant_id = :t and sequence = :s", t=tid, s=victim)
            want = audit_pb2.CHAIN_BREAK_HASH_MISMATCH
        elif how == "delete-middle":
            await tamper(governance, "delete from change_records where tenant_id = :t and sequence = :s",
                         t=tid, s=victim)
            want = audit_pb2.CHAIN_BREAK_SEQUENCE_GAP
        elif how == "delete-last":
            victim = records[-1].sequence
            await tamper(governance, "delete from change_records where tenant_id = :t and sequence = :s",
                         t=tid, s=victim)
            want = audit_pb2.CHAIN_BREAK_SEQUENCE_GAP
        elif how == "rewind-head":
            # The head row moved back to hide the records after it (the records stay): the
            # chain up to the head is intact, but records lie beyond it.
            await tamper(governance, "update change_record_heads set last_sequence = :s, last_hash = :h "
                         "where tenant_id = :t", s=victim, h=records[victim - 1].hash, t=tid)
            victim += 1
            want = audit_pb2.CHAIN_BREAK_SEQUENCE_GAP
        else:
            # A forger who rewrites a record *and* recomputes its hash: the record checks out on
            # its own, but the next one no longer links to it.
            forged = common_pb2.ChangeRecord()
            forged.CopyFrom(records[5])
            forged.summary = "nothing happened"
            await tamper(governance, "update change_records set summary = :m, hash = :h "
                         "where tenant_id = :t and sequence = :s",
                         m=forged.summary, h=record_hash(forged), t=tid, s=victim)
            victim += 1
            want = audit_pb2.CHAIN_BREAK_PREV_HASH_MISMATCH
        report = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
        assert not report.ok
        assert (report.first_broken_sequence, report.reason) == (victim, want), report.message
        await ctx.admin.close()


async def test_postgres_trigger_refuses_update_and_delete(governance: GovernanceServer,
                                                          tenant: TenantContext) -> None:
    if not governance.db.is_postgres:
        pytest.skip("the append-only trigger is PostgreSQL's")
    async with governance.client(tenant.admin_key) as client:
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(records=[task_record(1)]))
    for sql in ("update change_records set summary = 'x' where tenant_id = :t",
                "delete from change_records where tenant_id = :t",
                "truncate change_records"):
        async def run(s, sql=sql):  # type: ignore[no-untyped-def]
            await s.execute(text(sql), {"t": tenant.tenant.id})
        with pytest.raises(DBAPIError, match="append-only"):
            await governance.db.run(run)


async def test_list_filters_and_pages(governance: GovernanceServer, tenant: TenantContext) -> None:
    async with governance.client(tenant.admin_key) as client:
        recs = [task_record(i, actor=CR.Actor(type=CR.ACTOR_TYPE_AGENT if i % 3 == 0 else CR.ACTOR_TYPE_SYSTEM,
                                              id=f"actor-{i % 3}")) for i in range(30)]
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(records=recs))
        tasks = audit_pb2.ChangeRecordFilter(types=[CR.CHANGE_RECORD_TYPE_TASK_TRANSITIONED])

        oldest_first = await all_records(client, tasks, page_size=4)
        assert [r.record_id for r in oldest_first] == [r.record_id for r in recs]
        newest_first = await all_records(client, tasks, page_size=4, newest_first=True)
        assert newest_first == oldest_first[::-1]

        by_actor = await all_records(client, audit_pb2.ChangeRecordFilter(actor_id="actor-1"), page_size=3)
        assert [r.record_id for r in by_actor] == [r.record_id for r in recs if r.actor.id == "actor-1"]
        agents = await all_records(client, audit_pb2.ChangeRecordFilter(actor_type=CR.ACTOR_TYPE_AGENT))
        assert {r.actor.id for r in agents} == {"actor-0"} and len(agents) == 10
        by_target = await all_records(client, audit_pb2.ChangeRecordFilter(target_type="task", target_id="task-7"))
        assert [r.record_id for r in by_target] == [recs[7].record_id]
        window = audit_pb2.ChangeRecordFilter(types=tasks.types, start_time=recs[5].occur_time,
                                              end_time=recs[9].occur_time)
        assert [r.record_id for r in await all_records(client, window)] == [r.record_id for r in recs[5:9]]

        # Pages stay exact while records are appended between them.
        first = await client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(page_size=10, filter=tasks))
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(records=[task_record(99)]))
        rest = await all_records(client, tasks, page_size=10)
        second = await client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            page_size=10, filter=tasks, page_token=first.next_page_token))
        assert [r.sequence for r in second.records] == [r.sequence for r in rest[10:20]]

        # A token only works with the filters it was issued for.
        await expect_failure(client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            page_token=first.next_page_token, newest_first=True, filter=tasks)),
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_bad_input_is_invalid_argument_with_fields(governance: GovernanceServer,
                                                         tenant: TenantContext) -> None:
    async with governance.client(tenant.admin_key) as client:
        bad = await expect_failure(client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest()),
                                   grpc.StatusCode.INVALID_ARGUMENT)
        assert "records" in bad.violations
        too_many = audit_pb2.AppendChangeRecordsRequest(records=[task_record(i) for i in range(1001)])
        bad = await expect_failure(client.audit.AppendChangeRecords(too_many), grpc.StatusCode.INVALID_ARGUMENT)
        assert "records" in bad.violations
        bad = await expect_failure(client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            page_size=-1, filter=audit_pb2.ChangeRecordFilter(types=[999], actor_type=77))),  # type: ignore[list-item]
            grpc.StatusCode.INVALID_ARGUMENT)
        assert {"page_size", "filter.types[0]", "filter.actor_type"} <= set(bad.violations)
        start = timestamp_pb2.Timestamp(seconds=2000)
        bad = await expect_failure(client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            filter=audit_pb2.ChangeRecordFilter(start_time=start, end_time=timestamp_pb2.Timestamp(seconds=1000)))),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert "filter.end_time" in bad.violations
        await expect_failure(client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(page_token="%%%")),
                             grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        await expect_failure(client.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest()),
                             grpc.StatusCode.INVALID_ARGUMENT)


async def test_rbac_and_tenant_isolation(governance: GovernanceServer, registry, system_admin) -> None:  # type: ignore[no-untyped-def]
    a = await make_tenant(registry, system_admin)
    b = await make_tenant(registry, system_admin)
    async with governance.client(a.admin_key) as admin_a, governance.client(b.admin_key) as admin_b:
        mine = task_record(1)
        await admin_a.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(records=[mine]))
        # Another tenant's record does not exist for b; b's lists never show it.
        await expect_failure(admin_b.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(
            record_id=mine.record_id)), grpc.StatusCode.NOT_FOUND)
        assert mine.record_id not in {r.record_id for r in await all_records(admin_b)}
        # A tenant cannot write into another's trail.
        resp = await admin_b.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(2, tenant_id=a.tenant.id)]))
        assert resp.results[0].status == REJECTED and resp.results[0].reason == "TENANT_MISMATCH"

        _, auditor = await operator_with_roles(a.admin, governance.address, "auditor")
        _, runtime = await operator_with_roles(a.admin, governance.address, "agent")
        async with auditor, runtime:
            await auditor.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(record_id=mine.record_id))
            await auditor.audit.VerifyChain(audit_pb2.VerifyChainRequest())
            await expect_failure(auditor.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
                records=[task_record(3)])), grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
            for call in (runtime.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest()),
                         runtime.audit.VerifyChain(audit_pb2.VerifyChainRequest()),
                         runtime.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(record_id=mine.record_id))):
                await expect_failure(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
        async with governance.client(None) as anonymous:
            await expect_failure(anonymous.audit.VerifyChain(audit_pb2.VerifyChainRequest()),
                                 grpc.StatusCode.UNAUTHENTICATED)
    await a.admin.close()
    await b.admin.close()



async def test_verify_and_export_under_concurrent_appends_see_a_consistent_prefix(
        governance: GovernanceServer, tenant: TenantContext) -> None:
    async with governance.client(tenant.admin_key) as client:
        stop = asyncio.Event()

        async def appender() -> int:
            n = 0
            while not stop.is_set():
                await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
                    records=[task_record(1000 + n + i) for i in range(5)]))
                n += 5
            return n

        task = asyncio.create_task(appender())
        try:
            for _ in range(15):
                report = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
                assert report.ok, report.message  # appends racing the walk are not "gaps"
                lines = [line async for chunk in client.audit.ExportChangeRecords(
                    audit_pb2.ExportChangeRecordsRequest()) for line in chunk.data.splitlines()]
                exported = verify_records(parse_export_lines(lines))
                assert exported.ok and exported.records_checked >= report.records_checked
        finally:
            stop.set()
            assert await task > 0


async def test_a_record_the_trail_rejects_is_not_marked_delivered(governance: GovernanceServer,
                                                                  tenant: TenantContext) -> None:
    """A producer's relay gets an error for a rejected record (so it stays in the outbox, with the
    error, and is retried) instead of it being dropped; the good records of the batch are stored."""
    good, bad = task_record(1, tenant_id=tenant.tenant.id), task_record(2, tenant_id=tenant.tenant.id, type=0)
    batch = [OutboxMessage(i, r.record_id or "bad", "change_record", tenant.tenant.id, r.SerializeToString(), 0)
             for i, r in enumerate([good, bad])]
    with pytest.raises(RuntimeError, match="INVALID_TYPE"):
        await governance.component.audit.deliver(batch)
    async with governance.client(tenant.admin_key) as client:
        got = await client.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(record_id=good.record_id))
        assert got.record.sequence > 0
        await expect_failure(client.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(
            record_id=bad.record_id)), grpc.StatusCode.NOT_FOUND)


def test_an_appended_row_is_what_the_orm_form_gives() -> None:
    """`_new_row` (the append path: each Struct converted once) writes the columns and the hash
    that `_row` then `record_hash(to_proto(row))` give, for records with and without structs,
    times and odd numbers."""
    from arm_common.messages import struct
    from arm_governance.audit.trail import _new_row, _row, to_proto

    now = datetime(2026, 12, 7, 12, 30, 1, 123456, tzinfo=UTC)
    full = common_pb2.ChangeRecord(
        record_id="chg_1", type=common_pb2.CHANGE_RECORD_TYPE_POLICY_DENIED,
        actor=common_pb2.Actor(type=common_pb2.ACTOR_TYPE_AGENT, id="ins_1"), target_type="tool_call",
        target_id="tc-1", project_id="prj", template_id="tpl", version_id="ver", instance_id="ins_1",
        summary="db.drop_table denied: ✓ \"quoted\"", reason="r", source="governance", hash="ignored",
        prev_hash="ignored too",
        payload=struct({"n": 7, "x": 0.1, "big": 1e21, "neg": -0.0, "nested": {"a": [1, "b", None, True]}}),
        before=struct({}), after=struct({"consumed": True}))
    full.occur_time.FromNanoseconds(1_765_000_000_123_456_789)
    bare = common_pb2.ChangeRecord(record_id="chg_2", type=common_pb2.CHANGE_RECORD_TYPE_POLICY_DENIED,
                                   actor=common_pb2.Actor(type=common_pb2.ACTOR_TYPE_SYSTEM, id="svc"))
    for record in (full, bare):
        got = _new_row(record, "ten_1", 42, now, "ab" * 32)
        row = _row(record, "ten_1")
        row.sequence, row.record_time, row.prev_hash, row.hash = 42, now, "ab" * 32, ""
        expected = {c: getattr(row, c) for c in got if c != "hash"}
        assert {c: v for c, v in got.items() if c != "hash"} == expected
        assert got["hash"] == record_hash(to_proto(row))
