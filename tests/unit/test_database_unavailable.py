"""Which database errors mean "unavailable, retry" (UNAVAILABLE with RetryInfo) and which do not,
the outage said once, and the interceptor's mapping of such errors that reach it unwrapped
(issue 10 item 3; the PostgreSQL outage itself is tests/test_database_outage.py)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from arm_common.auth import Principal
from arm_common.db import Database, is_connection_error
from arm_common.errors import DatabaseUnavailable, NotFound
from arm_common.server import Host
from tests.processes import free_port
from tests.test_database_outage import unavailable_with_retry


def _sqlite_errors(tmp_path: Path) -> dict[str, BaseException]:
    """Real sqlite3 errors: a locked file, a constraint, a syntax error, a bad parameter."""
    path = tmp_path / "x.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("create table t (id integer primary key)")
    holder.execute("insert into t values (1)")
    holder.execute("begin immediate")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    out: dict[str, BaseException] = {}
    for name, sql, args in [("locked", "begin immediate", ()), ("syntax", "selec 1", ()),
                            ("binding", "select ?", (object(),))]:
        try:
            other.execute(sql, args)
        except sqlite3.Error as exc:
            out[name] = exc
    holder.execute("rollback")
    try:
        other.execute("insert into t values (1)")
    except sqlite3.Error as exc:
        out["unique"] = exc
    holder.close()
    other.close()
    return out


def test_classifies_errors_of_an_unusable_database_and_only_those(tmp_path: Path) -> None:
    sqlite = _sqlite_errors(tmp_path)
    assert set(sqlite) == {"locked", "syntax", "binding", "unique"}

    def wrapped(cls: type[sa_exc.DBAPIError], orig: BaseException, **kw: bool) -> sa_exc.DBAPIError:
        return cls("statement", {}, orig, **kw)  # type: ignore[arg-type]

    unavailable = [
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        OSError(113, "No route to host"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.TooManyConnectionsError("too many clients"),
        asyncpg.InterfaceError("connection is closed"),
        sa_exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached"),
        wrapped(sa_exc.DBAPIError, Exception("terminated"), connection_invalidated=True),
        wrapped(sa_exc.OperationalError, sqlite["locked"]),
        sqlite["locked"],
    ]
    usable = [
        ValueError("bad"),
        NotFound.of("project", "p1"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        wrapped(sa_exc.OperationalError, sqlite["syntax"]),
        wrapped(sa_exc.InterfaceError, sqlite["binding"]),
        wrapped(sa_exc.IntegrityError, sqlite["unique"]),
        OSError(2, "No such file or directory"),
    ]
    assert [e for e in unavailable if not is_connection_error(e)] == []
    assert [e for e in usable if is_connection_error(e)] == []
    # A cause counts: what a wrapper raised `from` a connection error.
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("could not open a connection") from inner
    except RuntimeError as outer:
        assert is_connection_error(outer)


async def test_unreachable_database_raises_unavailable_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    db = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    caplog.set_level(logging.INFO, logger="arm_common.db")

    async def one(s):  # type: ignore[no-untyped-def]
        return (await s.execute(text("select 1"))).scalar()

    try:
        for call in (db.read, db.run, db.read, db.run):
            with pytest.raises(DatabaseUnavailable) as caught:
                await call(one)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert caught.value.reason == "DATABASE_UNAVAILABLE" and caught.value.retry_delay_s
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "is unavailable" in warnings[0].getMessage()
        assert db.outage.down and db.outage.failures == 4
        assert not any(r.exc_info for r in caplog.records)
    finally:
        await db.dispose()


class AcceptEveryKey:
    async def authenticate(self, api_key: str) -> Principal:
        return Principal(tenant_id="t", actor_type="OPERATOR", actor_id="op", api_key_id="k")


async def test_interceptor_answers_unavailable_for_a_raw_connection_error(caplog: pytest.LogCaptureFixture) -> None:
    """A connection error that did not pass through a Database (which wraps its own) still
    answers UNAVAILABLE with RetryInfo, not INTERNAL with a traceback."""

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")

    host = Host([], AcceptEveryKey(), "127.0.0.1:0")
    host.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Outage", {"Call": grpc.unary_unary_rpc_method_handler(refuse)})])
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Outage/Call")
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(b"", metadata=(("authorization", "Bearer k"),))
                assert unavailable_with_retry(caught.value)[0] == "DATABASE_UNAVAILABLE"
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    finally:
        await host.stop(0)
