"""The transactional outbox on real databases: messages go out in order, a failing receiver gets
retries with backoff and nothing is lost, a rolled-back transaction leaves no message, and two
relays on one PostgreSQL never deliver a message twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import MetaData, select

from arm.common.v1 import common_pb2
from arm_common.db import Database
from arm_common.outbox import TOPIC_CHANGE_RECORD, OutboxMessage, OutboxRelay, enqueue
from arm_common.tables import add_shared_tables
from tests.conftest import drop_schema, new_database_spec

METADATA = MetaData()
add_shared_tables(METADATA)
OUTBOX = METADATA.tables["outbox_messages"]


@pytest.fixture
async def db(backend: str, tmp_path: Path) -> AsyncIterator[Database]:
    spec = new_database_spec(backend, tmp_path, "outbox")
    database = Database(spec.url, schema=spec.schema)
    if spec.schema:
        async with database.engine.begin() as conn:
            await conn.exec_driver_sql(f'CREATE SCHEMA "{spec.schema}"')
    async with database.engine.begin() as conn:
        await conn.run_sync(METADATA.create_all)
    yield database
    await database.dispose()
    if spec.schema:
        await drop_schema(spec.schema)


async def put(db: Database, ids: Sequence[str]) -> None:
    async def write(s):  # type: ignore[no-untyped-def]
        for i in ids:
            await enqueue(s, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id="t1", message_id=i,
                          message=common_pb2.ChangeRecord(record_id=i, tenant_id="t1"))
    await db.run(write)


async def test_messages_are_delivered_in_order_exactly_once(db: Database) -> None:
    got: list[str] = []

    async def deliver(batch: Sequence[OutboxMessage]) -> None:
        got.extend(common_pb2.ChangeRecord.FromString(m.payload).record_id for m in batch)

    ids = [f"m{i:03d}" for i in range(250)]
    await put(db, ids)
    relay = OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, deliver, batch_size=100)
    while await relay.relay_once():
        pass
    assert got == ids
    assert await relay.relay_once() == 0  # nothing is delivered twice


async def test_failing_receiver_gets_retries_with_backoff_and_nothing_is_lost(db: Database) -> None:
    attempts = 0
    got: list[str] = []

    async def flaky(batch: Sequence[OutboxMessage]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 3:
            raise ConnectionError("receiver down")
        got.extend(m.message_id for m in batch)

    await put(db, ["a", "b", "c"])
    relay = OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, flaky, poll_interval_s=0.05, max_backoff_s=0.2)
    await relay.start()
    try:
        for _ in range(200):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
    assert got == ["a", "b", "c"]
    assert attempts == 4
    async with db.transaction() as s:
        rows = (await s.execute(select(OUTBOX.c.attempts, OUTBOX.c.delivered_at, OUTBOX.c.last_error))).all()
    assert all(r.attempts == 4 and r.delivered_at is not None and r.last_error is None for r in rows)


async def test_a_relay_not_keeping_delivered_rows_deletes_each_with_its_delivery(db: Database) -> None:
    """keep_delivered=False (a receiver that keeps what it gets, e.g. governance's own audit
    trail): a delivered message's row is deleted in the pass that delivered it; a failed pass
    (the receiver down, or the process gone before the pass committed) deletes nothing, and the
    messages go out again, in order."""
    got: list[list[str]] = []
    fail = True

    async def deliver(batch: Sequence[OutboxMessage]) -> None:
        got.append([m.message_id for m in batch])  # received, then the pass fails
        if fail:
            raise ConnectionError("gone before the pass committed")

    ids = [f"m{i:03d}" for i in range(150)]
    await put(db, ids)
    relay = OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, deliver, batch_size=100, first_backoff_s=0,
                        keep_delivered=False)
    assert await relay.relay_once() == 0
    async with db.transaction() as s:
        rows = (await s.execute(select(OUTBOX.c.message_id, OUTBOX.c.attempts).order_by(OUTBOX.c.position))).all()
    assert [r.message_id for r in rows] == ids and [r.attempts for r in rows[:100]] == [1] * 100
    fail = False
    while await relay.relay_once():
        pass
    assert got == [ids[:100], ids[:100], ids[100:]]
    async with db.transaction() as s:
        assert (await s.execute(select(OUTBOX.c.message_id))).all() == []
    assert await relay.relay_once() == 0


async def test_backing_off_message_is_not_overtaken(db: Database) -> None:
    """After a failure nothing is delivered until the backoff passes, so order is kept."""
    calls: list[list[str]] = []

    async def fail_once(batch: Sequence[OutboxMessage]) -> None:
        calls.append([m.message_id for m in batch])
        if len(calls) == 1:
            raise RuntimeError("boom")

    await put(db, ["first"])
    # A first backoff of 15-30 s: one of a few hundred ms could pass before the next pass on a
    # loaded machine, and "second" would then rightly follow "first" out.
    relay = OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, fail_once, first_backoff_s=30, max_backoff_s=30)
    assert await relay.relay_once() == 0
    await put(db, ["second"])
    assert await relay.relay_once() == 0  # "first" is backing off; "second" must wait behind it
    assert calls == [["first"]]


async def test_rolled_back_transaction_leaves_no_message(db: Database) -> None:
    async def write_then_fail(s):  # type: ignore[no-untyped-def]
        await enqueue(s, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id="t1", message_id="ghost",
                      message=common_pb2.ChangeRecord(record_id="ghost"))
        raise ValueError("the change failed")

    with pytest.raises(ValueError):
        await db.run(write_then_fail)
    async with db.transaction() as s:
        assert (await s.execute(select(OUTBOX.c.message_id))).all() == []


async def test_two_relays_never_deliver_a_message_twice(db: Database) -> None:
    if not db.is_postgres:
        pytest.skip("concurrent relays are a PostgreSQL deployment (SQLite has one process)")
    delivered: list[str] = []

    async def slow(batch: Sequence[OutboxMessage]) -> None:
        await asyncio.sleep(0.01)
        delivered.extend(m.message_id for m in batch)

    ids = [f"m{i:03d}" for i in range(300)]
    await put(db, ids)
    relays = [OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, slow, batch_size=20) for _ in range(3)]

    async def drain(relay: OutboxRelay) -> None:
        # A relay that finds the topic's lock taken delivers nothing and tries again.
        deadline = asyncio.get_running_loop().time() + 60
        while len(delivered) < len(ids) and asyncio.get_running_loop().time() < deadline:
            if not await relay.relay_once():
                await asyncio.sleep(0.005)

    await asyncio.gather(*(drain(r) for r in relays))
    assert delivered == ids  # each once, and in order: one relay holds the topic at a time


async def test_relays_in_other_schemas_do_not_wait_on_each_other(backend: str, tmp_path: Path) -> None:
    """Advisory locks are per database: a relay busy delivering in one schema must not stop
    the same topic's relay of another schema (another service, another test run)."""
    if backend != "postgres":
        pytest.skip("schemas sharing one database are a PostgreSQL deployment")
    dbs = []
    for name in ("outbox_a", "outbox_b"):
        spec = new_database_spec(backend, tmp_path, name)
        database = Database(spec.url, schema=spec.schema)
        async with database.engine.begin() as conn:
            await conn.exec_driver_sql(f'CREATE SCHEMA "{spec.schema}"')
            await conn.run_sync(METADATA.create_all)
        dbs.append((database, spec.schema))
    release = asyncio.Event()
    try:
        (a, _), (b, _) = dbs
        await put(a, ["a1"])
        await put(b, ["b1"])
        entered = asyncio.Event()

        async def held(batch: Sequence[OutboxMessage]) -> None:
            entered.set()
            await release.wait()

        busy = asyncio.create_task(OutboxRelay(a, OUTBOX, TOPIC_CHANGE_RECORD, held).relay_once())
        await asyncio.wait_for(entered.wait(), 30)  # schema a's relay holds its lock, mid-delivery
        got: list[str] = []

        async def collect(batch: Sequence[OutboxMessage]) -> None:
            got.extend(m.message_id for m in batch)

        assert await OutboxRelay(b, OUTBOX, TOPIC_CHANGE_RECORD, collect).relay_once() == 1
        assert got == ["b1"]
        release.set()
        assert await busy == 1
    finally:
        release.set()  # never leave schema a's delivery (and its connection) hanging
        for database, schema in dbs:
            await database.dispose()
            assert schema is not None
            await drop_schema(schema)


async def test_notifies_under_load_are_coalesced_and_none_is_lost(db: Database) -> None:
    """Messages enqueued (and notified) while a pass runs go out in a next pass without waiting
    a poll; under a stream of notifies, passes come at most every min_interval_s."""
    passes: list[list[str]] = []
    delivering = asyncio.Event()
    release = asyncio.Event()

    async def deliver(batch: Sequence[OutboxMessage]) -> None:
        passes.append([m.message_id for m in batch])
        delivering.set()
        await release.wait()

    relay = OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, deliver, poll_interval_s=60, min_interval_s=0.2)
    await relay.start()
    try:
        await put(db, ["a"])
        relay.notify()
        await asyncio.wait_for(delivering.wait(), 10)
        for i in range(5):  # enqueued and notified while the first pass is still delivering
            await put(db, [f"b{i}"])
            relay.notify()
        release.set()
        for _ in range(200):
            if sum(map(len, passes)) == 6:
                break
            await asyncio.sleep(0.02)
    finally:
        await relay.stop()
    assert passes == [["a"], ["b0", "b1", "b2", "b3", "b4"]]  # no poll needed, one pass for the five
