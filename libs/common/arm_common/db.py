"""Async SQLAlchemy engine and transactions for SQLite (aiosqlite, the embedded default) and
PostgreSQL (asyncpg), with the same code on both."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import CursorResult, Result, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from arm_common.errors import ArmError, DatabaseUnavailable

log = logging.getLogger(__name__)


class _QuietCancelledReset(logging.Filter):
    """A client that cancels a stream (or a deadline that ends a call) can cancel a task while
    its pooled connection is being returned; SQLAlchemy then discards that connection correctly
    but logs "Exception during reset or similar" at ERROR with the CancelledError. That is a
    cancellation, not a fault: logged at DEBUG instead, like the interceptor's own cancellations."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError) and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


for _pool in ("AsyncAdaptedQueuePool", "QueuePool", "NullPool", "StaticPool", "SingletonThreadPool"):
    logging.getLogger(f"sqlalchemy.pool.impl.{_pool}").addFilter(_QuietCancelledReset())
T = TypeVar("T")

# Seconds to open a PostgreSQL connection, and to wait for a free pooled one, before the call
# answers UNAVAILABLE.
CONNECT_TIMEOUT_S = 5.0
POOL_TIMEOUT_S = 10.0

# Retried whole-transaction failures: PostgreSQL serialization failure / deadlock, SQLite busy.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}


def normalize_url(url: str) -> str:
    """Accepts plain `postgresql://` / `sqlite://` URLs and picks the async drivers."""
    parsed = make_url(url)
    driver = parsed.drivername
    if driver in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif driver == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError) and "database is locked" in str(exc):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:  # the server closed the connection (restart, failover)
            return True
        orig = getattr(exc, "orig", None)
        code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
        return code in _RETRYABLE_SQLSTATES
    return False


# SQLSTATEs of a database that cannot be used right now: connection exceptions (class 08),
# shutting down / crashed / starting up (57P01-57P03), too many connections (53300).
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53300"}
_UNAVAILABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                       errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN}
# SQLite's own words for a file that cannot be used now (a writer holding the lock past the busy
# timeout, a file that cannot be opened); a constraint or syntax error is never among them.
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file", "disk i/o error")


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` (or what it wraps) says the database cannot be reached or used right now:
    a refused, reset or timed-out connection, a connection the server closed, a pool timeout, a
    server shutting down or starting up, SQLite locked or unopenable. Never for an error a retry
    would repeat (bad SQL, a constraint)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or isinstance(e, ArmError):
            continue
        seen.add(id(e))
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sa_exc.TimeoutError, sa_exc.DisconnectionError)) or (
                isinstance(e, (sa_exc.InterfaceError, asyncpg.InterfaceError)) and "closed" in str(e).lower()):
            return True
        if isinstance(e, (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                          asyncpg.TooManyConnectionsError)):
            return True
        code = getattr(e, "sqlstate", None)
        if isinstance(code, str) and (code.startswith("08") or code in _UNAVAILABLE_SQLSTATES):
            return True
        if isinstance(e, (sqlite3.OperationalError, OperationalError)) and \
                any(words in str(e).lower() for words in _SQLITE_UNAVAILABLE):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)) or (
                isinstance(e, OSError) and e.errno in _UNAVAILABLE_ERRNOS):
            return True
        todo.extend((getattr(e, "orig", None), e.__cause__))
    return False


def unreachable_at_start(exc: BaseException, service: str) -> str | None:
    """The message a process prints instead of a traceback when its database cannot be reached
    as it starts (None for any other error)."""
    cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else exc
    if cause is None or not (isinstance(exc, DatabaseUnavailable) or is_connection_error(exc)):
        return None
    detail = str(cause).splitlines()[0][:300] if str(cause) else ""
    return (f"cannot reach the database ({type(cause).__name__}: {detail}); is it running, and is "
            f"ARM_{service.upper()}_DATABASE_URL (or ARM_DATABASE_URL) right?")


class OutageLog:
    """Says an outage once: a warning when the first call fails, an info line when a call
    succeeds again. Not a line (nor a traceback) per failed call."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.failures = 0
        # Called when an outage starts or ends (health readiness follows them).
        self.listeners: list[Callable[[], None]] = []

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self.failures = 1
            log.warning("%s is unavailable (%s: %s); calls that need it answer UNAVAILABLE until "
                        "it is back", self.what, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            for listener in self.listeners:
                listener()

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s is available again after %.1f s (%d calls failed meanwhile)", self.what,
                     time.monotonic() - self.since, self.failures)
            self.since = None
            for listener in self.listeners:
                listener()


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (execute() is typed as returning a plain Result)."""
    return cast(CursorResult[Any], result).rowcount


async def driver_connection(conn: AsyncConnection | AsyncSession) -> Any:
    """The asyncpg (or aiosqlite) connection under a SQLAlchemy connection or session, inside
    its transaction: for COPY and other driver-level calls."""
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    driver = (await conn.get_raw_connection()).driver_connection
    if driver is None:
        raise RuntimeError("the database connection is closed")
    return driver


def is_unique_violation(exc: BaseException) -> bool:
    """True for a unique-constraint violation (not a foreign-key or other integrity error)."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    if code:
        return bool(code == "23505")
    return "UNIQUE constraint failed" in str(exc)


class Database:
    """One engine and session factory. `transaction()` yields a session inside a transaction that
    commits on success; `run()` retries a whole transaction function on transient conflicts."""

    def __init__(self, url: str, *, schema: str | None = None, pool_size: int = 10) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        self.schema = schema
        where = parsed.render_as_string(hide_password=True)
        self.outage = OutageLog(f"database {where}" + (f" (schema {schema})" if schema else ""))
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # A server that does not answer fails the call in seconds, not after asyncpg's 60.
            connect_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_S}
            if schema:
                connect_args["server_settings"] = {"search_path": schema}
            # No pre-ping (a round trip per transaction on the hot path): a connection found dead
            # is invalidated by SQLAlchemy and run() retries the transaction on a fresh one.
            # After an outage SQLAlchemy invalidates the whole pool on the first dead connection
            # it meets (run() and read() retry that once), so recovery needs no restart.
            kwargs.update(connect_args=connect_args, pool_size=pool_size, max_overflow=pool_size,
                          pool_recycle=1800, pool_timeout=POOL_TIMEOUT_S)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            self._configure_sqlite()
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time. Queueing writers here, instead of on SQLite's busy
        # handler, keeps them fair and fast: with several connections waiting on BEGIN IMMEDIATE,
        # failed transactions were seen to leave the others waiting out the full busy timeout.
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None

    def _configure_sqlite(self) -> None:
        sync_engine = self.engine.sync_engine

        @event.listens_for(sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, open transactions; see _on_begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, so concurrent writers queue on busy_timeout
            # instead of failing when a read transaction later tries to write. Reads (see read())
            # begin DEFERRED and never block each other under WAL.
            if conn.get_execution_options().get("arm_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
            yield session

    def unavailable(self, exc: BaseException) -> DatabaseUnavailable | None:
        """For a connection or timeout error: notes the outage (logged once) and returns the
        DatabaseUnavailable to raise instead. None for any other error."""
        if isinstance(exc, DatabaseUnavailable):
            return exc
        if not is_connection_error(exc):
            return None
        self.outage.failed(exc)
        return DatabaseUnavailable()

    @asynccontextmanager
    async def watched(self) -> AsyncIterator[None]:
        """Around any use of the database outside run() and read(): a connection or timeout
        error leaves as DatabaseUnavailable, a success ends an outage."""
        try:
            yield
        except Exception as exc:
            err = self.unavailable(exc)
            if err is None or err is exc:
                raise
            raise err from exc
        self.outage.ok()

    async def run(self, fn: Callable[[AsyncSession], Awaitable[T]], *, attempts: int = 8) -> T:
        """Runs fn in a transaction, retrying the whole transaction on transient conflicts (and
        once on a connection found dead). A database that cannot be reached raises
        DatabaseUnavailable."""
        async with self.watched():
            for attempt in range(attempts):
                try:
                    if self._write_lock is not None:
                        async with self._write_lock, self.transaction() as session:
                            return await fn(session)
                    async with self.transaction() as session:
                        return await fn(session)
                except DBAPIError as exc:
                    if attempt == attempts - 1 or not _is_retryable(exc):
                        raise
                    await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    async def read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Runs a read-only function in its own session (again once on a connection found dead,
        e.g. the first after a database restart). A database that cannot be reached raises
        DatabaseUnavailable."""
        async with self.watched():
            for attempt in range(2):
                try:
                    async with self.sessions() as session:
                        await session.connection(execution_options={"arm_readonly": True})
                        try:
                            return await fn(session)
                        finally:
                            await session.rollback()
                except DBAPIError as exc:
                    if attempt or not exc.connection_invalidated:
                        raise
        raise AssertionError("unreachable")

    async def dispose(self) -> None:
        await self.engine.dispose()


def open_database(url: str, schema: str | None) -> Database:
    """A Database with OpenTelemetry spans per statement (when an OTLP endpoint is set)."""
    from arm_common import otel

    db = Database(url, schema=schema)
    otel.instrument_engine(db.engine)
    return db
