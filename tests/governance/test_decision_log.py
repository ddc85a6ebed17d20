"""The decision log's error path: one item that cannot be written must not take the others of
its batch down with it — they are retried one by one, and only the bad one fails."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest
from sqlalchemy import func, select

from arm.governance.v1 import decision_pb2
from arm.telemetry.v1 import events_pb2
from arm_common.db import Database, driver_connection
from arm_common.errors import Unavailable
from arm_common.ids import new_id
from arm_common.outbox import TOPIC_OP_EVENT
from arm_common.tables import utcnow
from arm_engine.engine import Spend
from arm_governance import models
from arm_governance.decisions.log import GATHER_BATCH, DecisionLog, PendingDecision
from arm_governance.decisions.service import SpendBook
from tests.conftest import PG_URL


def pending(decision_id: str, tenant_id: str) -> PendingDecision:
    record = dict(id=decision_id, tenant_id=tenant_id, request_id=None, instance_id="", legacy_agent_id="",
                  version_id="", project_id="", run_id="", tool_call_id="", tool_name="fs.read", decision=1,
                  step=6, risk=1, policy_epoch=0, approval_id="", request=b"", agent=b"",
                  decided_at=utcnow())
    return PendingDecision(record=record, response=decision_pb2.CheckResponse(decision_id=decision_id))


async def test_a_bad_item_fails_alone(governance) -> None:  # type: ignore[no-untyped-def]
    tenant = new_id("tnt")
    log = DecisionLog(governance.db, [])
    await log.start()
    try:
        taken = new_id("dec")
        assert (await log.append(pending(taken, tenant))).decision_id == taken
        good = [new_id("dec") for _ in range(3)]
        # Queued together, so they share a batch; the duplicate primary key breaks that batch.
        results = await asyncio.gather(*(log.append(pending(d, tenant)) for d in [good[0], taken, *good[1:]]),
                                       return_exceptions=True)
    finally:
        await log.stop()
    assert [r.decision_id for r in results if not isinstance(r, BaseException)] == good
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], Unavailable)
    assert failures[0].reason == "DECISION_LOG_UNAVAILABLE"

    async def count(s):  # type: ignore[no-untyped-def]
        return (await s.execute(select(func.count()).select_from(models.DecisionRecord)
                                .where(models.DecisionRecord.tenant_id == tenant))).scalar_one()
    assert await governance.db.read(count) == 4



async def test_a_decision_commits_with_its_messages_or_not_at_all(governance) -> None:  # type: ignore[no-untyped-def]
    """The decision row and its outbox rows share one transaction: when the message cannot be
    written (its id is already in the outbox), the decision is not logged either."""
    tenant = new_id("tnt")
    message_id = new_id("evt")
    first, second = pending(new_id("dec"), tenant), pending(new_id("dec"), tenant)
    for item in (first, second):
        item.messages.append((TOPIC_OP_EVENT, message_id, events_pb2.OpEvent(event_id=message_id)))
    log = DecisionLog(governance.db, [])
    await log.start()
    try:
        assert (await log.append(first)).decision_id == first.record["id"]
        with pytest.raises(Unavailable):
            await log.append(second)
    finally:
        await log.stop()

    async def logged(s):  # type: ignore[no-untyped-def]
        return set((await s.execute(select(models.DecisionRecord.id)
                                    .where(models.DecisionRecord.tenant_id == tenant))).scalars())
    assert await governance.db.read(logged) == {first.record["id"]}


def approval_row(approval_id: str, decision_id: str, tenant_id: str, **drop: bool) -> dict[str, object]:
    now = utcnow()
    row: dict[str, object] = dict(
        id=approval_id, tenant_id=tenant_id, project_id="prj", instance_id="ins", version_id="ver",
        action_type=1, tool_name="payments.send", tool_call_id=None, run_id="", argument_digest="d" * 64,
        risk=3, estimated_cost_usd=1.5, required_decisions=1, escalation_level=0, status=1,
        decision_id=decision_id, requested_by="usr", body=b"", created_at=now,
        expires_at=now + timedelta(hours=1), consumed_at=None, revision=1)
    return {k: v for k, v in row.items() if k not in drop}


async def test_approvals_are_logged_with_their_decisions(governance) -> None:  # type: ignore[no-untyped-def]
    """A NEEDS_APPROVAL decision's approval goes in with it; a row that leaves columns to their
    defaults (here escalation_level and revision) is inserted too."""
    tenant = new_id("tnt")
    items = []
    for drop in ({}, {"escalation_level": True, "revision": True}):
        item = pending(new_id("dec"), tenant)
        approval_id = new_id("apr")
        item.record["approval_id"] = approval_id
        item.approval = approval_row(approval_id, item.record["id"], tenant, **drop)
        items.append(item)
    log = DecisionLog(governance.db, [])
    await log.start()
    try:
        await asyncio.gather(*(log.append(item) for item in items))
    finally:
        await log.stop()

    async def approvals(s):  # type: ignore[no-untyped-def]
        a = models.Approval
        return {(r.id, r.decision_id, r.escalation_level, r.revision, r.estimated_cost_usd) for r in
                (await s.execute(select(a).where(a.tenant_id == tenant))).scalars()}
    assert await governance.db.read(approvals) == {
        (i.approval["id"], i.record["id"], 0, 1, 1.5) for i in items}  # type: ignore[index]


async def test_a_dead_pooled_connection_costs_no_decision(governance) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL: a pooled connection that died since its last use fails the batch, is dropped
    from the pool, and the retry on a fresh connection logs the decision."""
    if not governance.db.is_postgres:
        pytest.skip("server-side connection termination is PostgreSQL's")
    db = Database(governance.spec.url, schema=governance.spec.schema, pool_size=1)  # one pooled connection
    tenant = new_id("tnt")
    log = DecisionLog(db, [])
    await log.start()
    try:
        await log.append(pending(new_id("dec"), tenant))
        async with db.engine.connect() as conn:
            pid = (await driver_connection(conn)).get_server_pid()
        killer = await asyncpg.connect(PG_URL)
        try:
            assert await killer.fetchval("select pg_terminate_backend($1)", pid)
        finally:
            await killer.close()
        for _ in range(2):
            item = pending(new_id("dec"), tenant)
            assert (await log.append(item)).decision_id == item.record["id"]
    finally:
        await log.stop()
        await db.dispose()


async def test_spend_totals_read_across_a_spend_notice_are_not_cached(governance) -> None:  # type: ignore[no-untyped-def]
    """A spend notice that arrives while totals are being read means they may miss that spend:
    they answer this decision but are not cached, so the next decision reads again (else a
    budget could be overrun from the cache until the instance's next spend)."""
    book = SpendBook(governance.db)
    tenant, instance, now = new_id("tnt"), new_id("ins"), utcnow()
    reading = asyncio.create_task(book.totals(tenant, instance, "run-1", now))
    await asyncio.sleep(0)  # the task is now inside its database read
    book.invalidate(instance)
    assert await reading == Spend()
    assert book._cache.get((tenant, instance, "run-1", now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")))[0] is False
    await book.totals(tenant, instance, "run-1", now)  # undisturbed: cached
    assert len(book._cache) == 1


async def test_a_lone_decision_never_waits_for_company(governance) -> None:  # type: ignore[no-untyped-def]
    """The writer gathers only when decisions queued up while it wrote the last batch: a lone
    caller is written at once, even with a gathering window far longer than the test may take."""
    tenant = new_id("tnt")
    log = DecisionLog(governance.db, [], gather_s=600)
    await log.start()
    try:
        for _ in range(3):
            item = pending(new_id("dec"), tenant)
            assert (await asyncio.wait_for(log.append(item), 30)).decision_id == item.record["id"]
    finally:
        await log.stop()


async def test_a_busy_writer_waits_for_a_full_batch_or_its_window(governance) -> None:  # type: ignore[no-untyped-def]
    """_gather, without the writer (nothing takes from the queue), while other work keeps the
    loop busy (as calls being decided do): it waits while fewer than GATHER_BATCH decisions are
    there, ends as soon as the last one needed arrives (not at its 600 s window), and with a
    short window ends at the window."""
    tenant = new_id("tnt")
    log = DecisionLog(governance.db, [], gather_s=600)
    first = [pending(new_id("dec"), tenant)]
    appends = [asyncio.create_task(log.append(pending(new_id("dec"), tenant))) for _ in range(3)]
    stop = False

    async def busy() -> None:
        while not stop:
            await asyncio.sleep(0)
    spinning = asyncio.create_task(busy())
    try:
        await asyncio.sleep(0)
        gathering = asyncio.create_task(log._gather(first))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not gathering.done()  # 1 + 3 of GATHER_BATCH
        appends += [asyncio.create_task(log.append(pending(new_id("dec"), tenant)))
                    for _ in range(GATHER_BATCH - 1 - 3)]
        await asyncio.wait_for(gathering, 30)
        assert log._queue.qsize() == GATHER_BATCH - 1

        short = DecisionLog(governance.db, [], gather_s=0.05)
        appends.append(asyncio.create_task(short.append(pending(new_id("dec"), tenant))))
        await asyncio.sleep(0)
        await asyncio.wait_for(short._gather([pending(new_id("dec"), tenant)]), 30)
        assert short._queue.qsize() == 1
    finally:
        stop = True
        await spinning
        for task in appends:
            task.cancel()
        await asyncio.gather(*appends, return_exceptions=True)


async def test_a_gathering_writer_stops_waiting_when_nothing_else_runs(governance) -> None:  # type: ignore[no-untyped-def]
    """With no other work in the process (a few callers, all waiting on the log), no decision
    can join the batch: _gather ends though fewer than GATHER_BATCH are queued and its window
    (600 s) is far from over."""
    tenant = new_id("tnt")
    log = DecisionLog(governance.db, [], gather_s=600)
    appends = [asyncio.create_task(log.append(pending(new_id("dec"), tenant))) for _ in range(3)]
    try:
        await asyncio.sleep(0)
        await asyncio.wait_for(log._gather([pending(new_id("dec"), tenant)]), 30)
        assert log._queue.qsize() == 3
    finally:
        for task in appends:
            task.cancel()
        await asyncio.gather(*appends, return_exceptions=True)


async def test_decisions_arriving_during_commits_are_all_logged_once(governance) -> None:  # type: ignore[no-untyped-def]
    """Decisions trickling in while batches are written (so the writer gathers): every one is
    answered with its own response and logged exactly once."""
    tenant = new_id("tnt")
    log = DecisionLog(governance.db, [], gather_s=0.01)
    await log.start()
    items = [pending(new_id("dec"), tenant) for _ in range(200)]
    tasks = []
    try:
        for item in items:
            tasks.append(asyncio.create_task(log.append(item)))
            await asyncio.sleep(0)
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await log.stop()
    assert [a.decision_id for a in answers] == [i.record["id"] for i in items]

    async def logged(s):  # type: ignore[no-untyped-def]
        d = models.DecisionRecord
        return (await s.execute(select(d.id).where(d.tenant_id == tenant))).scalars().all()
    ids = await governance.db.read(logged)
    assert sorted(ids) == sorted(i.record["id"] for i in items)
