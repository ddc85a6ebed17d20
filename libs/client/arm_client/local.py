"""Local decisions (`Arm(..., local_decisions=True)`): the runtime decides its own tool calls with
the engine library governance uses (`arm_engine`), from the inputs governance streams to it
(`DecisionService.WatchDecisionInputs`: envelopes of its scope chain, operator controls,
instance, version and tenant state, risk overrides, whether budgets apply; a new snapshot on
every change, heartbeats in between).

Every local decision is appended to a durable spool before it is returned (so before the tool
runs): a SQLite file in WAL mode with synchronous=FULL, one writer thread, one commit (one fsync)
for all the decisions that arrived while the previous commit ran. A background task ships the
spool to governance (`RecordLocalDecisions`, idempotent on the decision id) and deletes what
governance acknowledged; on start the spool is shipped first, so a crash loses no decision.

`decide` answers None — "ask governance's Check" — for what is not decided locally: a call
presenting an approval (grants), a NEEDS_APPROVAL (Check creates the approval), an agent a
budget applies to (its headroom is not known locally), inputs not heard from for longer than
`stale_after_s` (the stream is down), and a spool holding `max_spool` decisions governance has not
acknowledged yet (shipping is down or behind)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from arm.governance.v1 import decision_pb2
from arm_client.errors import Reason
from arm_common.decision_inputs import (
    agent_from_message,
    control_mode_name,
    envelope_to_engine,
    result_fields,
    risk_overrides_to_engine,
)
from arm_engine import engine

log = logging.getLogger(__name__)
_FROM_REQUEST: Any = object()


class Spool:
    """The durable spool of decisions not yet acknowledged by governance (see the module)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="arm-spool")
        self._conn: sqlite3.Connection | None = None
        self._batch: list[tuple[str, bytes]] = []
        self._batch_done: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.pending = 0
        """Decisions in the file governance has not acknowledged."""
        self.appended = asyncio.Event()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                     "body BLOB NOT NULL)")
        self._conn = conn
        return int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.pending = await loop.run_in_executor(self._executor, self._open)
        self._writer = asyncio.create_task(self._write_loop(), name="arm-spool-writer")

    async def append(self, decision_id: str, body: bytes) -> None:
        """Returns once the decision is committed to the file (fsynced)."""
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
            self._wake.set()
        done = self._batch_done
        self._batch.append((decision_id, body))
        await done

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, done = self._batch, self._batch_done
            self._batch, self._batch_done = [], None
            if done is None:
                continue
            try:
                await loop.run_in_executor(self._executor, self._insert, batch)
            except Exception as exc:  # noqa: BLE001 - every waiter of the batch learns it
                done.set_exception(SpoolError(f"the decision spool {self.path} could not be written: {exc}"))
                continue
            self.pending += len(batch)
            done.set_result(None)
            self.appended.set()

    def _insert(self, rows: list[tuple[str, bytes]]) -> None:
        assert self._conn is not None
        with self._conn:  # one transaction: one WAL commit, one fsync
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR IGNORE INTO spool (id, body) VALUES (?, ?)", rows)

    async def after(self, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """The oldest decisions after `seq`: (seq, LocalDecision bytes)."""
        def read() -> list[tuple[int, bytes]]:
            assert self._conn is not None
            return self._conn.execute("SELECT seq, body FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                                      (seq, limit)).fetchall()
        return await asyncio.get_running_loop().run_in_executor(self._executor, read)

    async def acknowledge(self, first_seq: int, last_seq: int, count: int) -> None:
        """Deletes a shipped batch (seqs first..last; the spool only grows above them)."""
        def delete() -> None:
            assert self._conn is not None
            with self._conn:
                self._conn.execute("BEGIN")
                self._conn.execute("DELETE FROM spool WHERE seq BETWEEN ? AND ?", (first_seq, last_seq))
        await asyncio.get_running_loop().run_in_executor(self._executor, delete)
        self.pending = max(0, self.pending - count)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


class SpoolError(RuntimeError):
    """The spool file could not be written: the decision is not durable, so it is not used."""


@dataclass(frozen=True)
class _Inputs:
    agent: engine.Agent
    policy: engine.CompiledPolicy
    controls: engine.Controls
    classifier: engine.Classifier
    epoch: int
    budgets_apply: bool


def _compile(inputs: decision_pb2.DecisionInputs, default: engine.Classifier) -> _Inputs:
    agent = agent_from_message(inputs.agent)
    policy = engine.compile_policy([envelope_to_engine(e) for e in inputs.envelopes], tenant_id=agent.tenant_id,
                                   project_id=agent.project_id, version_id=agent.version_id)
    overrides = risk_overrides_to_engine(inputs.risk_overrides)
    return _Inputs(agent, policy, engine.Controls(control_mode_name(inputs.tenant_control),
                                                  control_mode_name(inputs.project_control)),
                   engine.Classifier(overrides=overrides) if overrides else default, inputs.policy_epoch,
                   inputs.budgets_apply)


@dataclass(frozen=True)
class ResultParts:
    """What a response says that depends on the engine's result alone, built once per result."""

    response: bytes
    """The CheckResponse part, serialized."""
    decision: str
    reasons: tuple[Reason, ...]
    risk: str


_EFFECTS = {engine.Effect.ALLOW: "ALLOW", engine.Effect.DENY: "DENY", engine.Effect.NEEDS_APPROVAL: "NEEDS_APPROVAL"}


class _ResultParts:
    """Per engine result (the engine memoises them, so few distinct objects recur), its parts."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[engine.Result, ResultParts]] = {}

    def get(self, result: engine.Result) -> ResultParts:
        entry = self._entries.get(id(result))
        if entry is None or entry[0] is not result:
            if len(self._entries) >= 4096:
                self._entries.clear()
            parts = ResultParts(result_fields(result).SerializeToString(), _EFFECTS[result.effect],
                                tuple(Reason(r.code, r.message) for r in result.reasons), result.risk.name)
            entry = self._entries[id(result)] = (result, parts)
        return entry[1]


class LocalDecider:
    """Subscribes, decides, spools and ships for one agent instance (see the module)."""

    def __init__(self, decisions_stub: Any, inputs_stub: Any, instance_id: str, *, spool_dir: str | Path,
                 stale_after_s: float = 3.0, max_spool: int = 100_000, ship_batch: int = 1000, ship_in_flight: int = 2,
                 heartbeat_ms: int = 500, metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple) -> None:
        if not instance_id:
            raise ValueError("local decisions need the agent's instance id (instance_id= or ARM_INSTANCE_ID)")
        self.stub = decisions_stub  # RecordLocalDecisions
        self.inputs_stub = inputs_stub  # WatchDecisionInputs, on a channel of its own
        self.instance_id = instance_id
        self.spool = Spool(Path(spool_dir) / f"decisions-{instance_id}.sqlite")
        self.stale_after_s = stale_after_s
        self.max_spool = max_spool
        self.ship_batch = ship_batch
        self.ship_in_flight = ship_in_flight
        self.heartbeat_ms = heartbeat_ms
        self.metadata = metadata
        self._inputs: _Inputs | None = None
        self._heard = -1e18  # monotonic time of the stream's last message
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._parts = _ResultParts()
        self._prefix = "dec_" + secrets.token_hex(6)
        self._seq = 0
        self.shipped = 0
        self.local = 0
        self.remote = 0

    async def start(self) -> None:
        await self.spool.open()
        self._tasks = [asyncio.create_task(self._watch(), name="arm-local-inputs"),
                       asyncio.create_task(self._ship(), name="arm-local-ship")]

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def live(self) -> bool:
        """Inputs heard from within `stale_after_s`."""
        return self._inputs is not None and time.monotonic() - self._heard <= self.stale_after_s

    # --- the stream -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        delay = 0.1
        while True:
            try:
                call = self.inputs_stub.WatchDecisionInputs(decision_pb2.WatchDecisionInputsRequest(
                    instance_id=self.instance_id, heartbeat_interval_ms=self.heartbeat_ms), metadata=self.metadata())
                async for message in call:
                    if message.HasField("inputs"):
                        self._inputs = _compile(message.inputs, engine.DEFAULT_CLASSIFIER)
                        self._ready.set()
                    self._heard = time.monotonic()
                    delay = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                log.warning("decision inputs stream lost (%s); deciding through Check after %.1f s",
                            getattr(code, "name", code), self.stale_after_s)
            except Exception:  # noqa: BLE001 - never let the subscription die
                log.exception("decision inputs stream failed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # --- deciding -------------------------------------------------------------------------------

    async def decide(self, request: decision_pb2.CheckRequest, arguments: Any = _FROM_REQUEST
                     ) -> tuple[decision_pb2.CheckResponse, ResultParts] | None:
        """The response to `request` (which names this instance, no approval, no request id),
        spooled, and its result's parts; None when governance's Check must decide it.
        `arguments`: the request's arguments as the engine sees them on the server (the JSON of
        the Struct: numbers as floats), when the caller has them at hand."""
        inputs = self._inputs
        if (inputs is None or inputs.budgets_apply or request.approval_id
                or time.monotonic() - self._heard > self.stale_after_s or self.spool.pending >= self.max_spool):
            self.remote += 1
            return None
        if arguments is _FROM_REQUEST:
            arguments = json_format.MessageToDict(request.arguments) if request.HasField("arguments") else None
        call = engine.Call(tool=request.tool_name, arguments=arguments,
                           declared_risk=engine.Risk(request.declared_risk) if request.declared_risk else None,
                           estimated_cost_usd=request.estimated_cost_usd, is_run_start=request.is_run_start)
        result = engine.decide(inputs.policy, inputs.agent, call, controls=inputs.controls,
                               classifier=inputs.classifier)
        if result.effect == engine.Effect.NEEDS_APPROVAL:
            self.remote += 1
            return None
        self._seq += 1
        decision_id = f"{self._prefix}{self._seq:010d}"
        parts = self._parts.get(result)
        response = decision_pb2.CheckResponse.FromString(parts.response)
        response.decision_id = decision_id
        response.policy_epoch = inputs.epoch
        response.decide_time.GetCurrentTime()
        # A LocalDecision's bytes (fields 1-3), without copying the request into a new message.
        request_bytes, response_bytes = request.SerializeToString(), response.SerializeToString()
        body = b"".join((b"\x0a", _varint(len(decision_id)), decision_id.encode(),
                         b"\x12", _varint(len(request_bytes)), request_bytes,
                         b"\x1a", _varint(len(response_bytes)), response_bytes))
        await self.spool.append(decision_id, body)
        self.local += 1
        return response, parts

    # --- shipping -------------------------------------------------------------------------------

    async def _ship(self) -> None:
        """Ships the spool oldest first, up to `ship_in_flight` batches at a time (governance
        logs one while the next is read and sent); a batch is deleted from the spool only once
        governance acknowledged it, and a failed one is retried (with backoff) until it is."""
        cursor = 0  # the last seq handed to a batch
        slots = asyncio.Semaphore(self.ship_in_flight)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                rows = await self.spool.after(cursor, self.ship_batch)
                if not rows:
                    slots.release()
                    self.spool.appended.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.spool.appended.wait(), 0.5)
                    continue
                cursor = rows[-1][0]
                task = asyncio.create_task(self._ship_batch(rows, slots))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def _ship_batch(self, rows: list[tuple[int, bytes]], slots: asyncio.Semaphore) -> None:
        # A RecordLocalDecisionsRequest is its LocalDecisions as field 1: concatenate them.
        request = decision_pb2.RecordLocalDecisionsRequest.FromString(
            b"".join(b"\x0a" + _varint(len(body)) + body for _, body in rows))
        delay = 0.05
        try:
            while True:
                try:
                    await self.stub.RecordLocalDecisions(request, timeout=30, metadata=self.metadata())
                    break
                except grpc.RpcError as exc:
                    code = exc.code() if hasattr(exc, "code") else None
                    log.warning("shipping %d local decisions failed (%s); they stay in the spool, retrying",
                                len(rows), getattr(code, "name", code))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            await self.spool.acknowledge(rows[0][0], rows[-1][0], len(rows))
            self.shipped += len(rows)
        finally:
            slots.release()

    async def drain(self, timeout_s: float) -> bool:
        """Waits until governance acknowledged every spooled decision; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.spool.pending:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self, timeout_s: float) -> None:
        """Ships what it can within `timeout_s`; the rest stays in the spool for the next start."""
        await self.drain(timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.spool.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
