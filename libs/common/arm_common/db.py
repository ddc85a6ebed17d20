"""Async SQLAlchemy engine and transactions for SQLite (aiosqlite, the embedded default) and
PostgreSQL (asyncpg), with the same code on both."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.engine import CursorResult, Result, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

T = TypeVar("T")

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
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            connect_args: dict[str, Any] = {}
            if schema:
                connect_args["server_settings"] = {"search_path": schema}
            # No pre-ping (a round trip per transaction on the hot path): a connection found dead
            # is invalidated by SQLAlchemy and run() retries the transaction on a fresh one.
            kwargs.update(connect_args=connect_args, pool_size=pool_size, max_overflow=pool_size,
                          pool_recycle=1800)
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

    async def run(self, fn: Callable[[AsyncSession], Awaitable[T]], *, attempts: int = 8) -> T:
        """Runs fn in a transaction, retrying the whole transaction on transient conflicts."""
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
        """Runs a read-only function in its own session."""
        async with self.sessions() as session:
            await session.connection(execution_options={"arm_readonly": True})
            try:
                return await fn(session)
            finally:
                await session.rollback()

    async def dispose(self) -> None:
        await self.engine.dispose()


def open_database(url: str, schema: str | None) -> Database:
    """A Database with OpenTelemetry spans per statement (when an OTLP endpoint is set)."""
    from arm_common import otel

    db = Database(url, schema=schema)
    otel.instrument_engine(db.engine)
    return db
