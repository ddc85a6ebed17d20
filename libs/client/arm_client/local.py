"""Local decisions (`Arm(..., local_decisions=True)`): the runtime decides its own tool calls with
the engine library governance uses (`arm_engine`), from the inputs governance streams to it
(`DecisionService.WatchDecisionInputs`: envelopes of its scope chain, operator controls,
instance, version and tenant state, risk overrides, budgets' spend totals; a new snapshot on
every change, heartbeats in between).

Every local decision is appended to a spool before it is returned (so before the tool runs):
one write() of its record to an append-only segment file, so a crash of the runtime process
(kill -9 included) loses no decision; the file is fdatasync'ed in the background every
`fsync_interval_ms` (default 5), so a power loss or kernel crash loses at most the decisions of
that last window (see `Spool`). A background task ships the spool to governance
(`RecordLocalDecisions`, idempotent on the decision id) and deletes segments governance
acknowledged; on start the spool is read back and shipped first.

`decide` answers None — "ask governance's Check" — for what is not decided locally: a call
presenting an approval (grants), a NEEDS_APPROVAL (Check creates the approval), a call of an
agent a budget applies to whose headroom is not known locally (the inputs carry the instance's
ledger totals for the UTC day, month and its runs, renewed on every spend governance records:
the call's day must be theirs and its run listed, or the list complete), inputs not heard from for longer than
`stale_after_s` (the stream is down), and a spool holding `max_spool` decisions governance has not
acknowledged yet (shipping is down or behind)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import struct
import time
import zlib
from collections import deque
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
    risk_classifier,
)
from arm_common.wire import SMALL_VARINTS, encode_varint, repeated, varint
from arm_engine import engine

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock against a second process on the spool
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
_FROM_REQUEST: Any = object()
_RECORD = struct.Struct("<II")  # a spool record's header: the body's length, its CRC-32


class Spool:
    """The durable spool of decisions governance has not acknowledged yet (see the module).

    A directory of append-only segment files (`<n>.log`, n increasing). A record is a 4-byte
    length, the CRC-32 of the body, and the body (a `LocalDecision`'s bytes); `append` hands it to
    the OS with one `write()` on the calling thread before it returns, so a crash of the process
    (kill -9 included) loses nothing. A background task `fdatasync`s the active segment every
    `fsync_interval_s` when something was written since its last sync: a power loss (or a kernel
    crash) loses at most the records written since the last sync that completed. A segment is
    deleted once every record in it was acknowledged; on open every segment left is read back
    (up to a torn or corrupt tail, which only a power loss leaves) and shipped first, then
    appends go to a new segment. Governance skips decision ids it already logged, so a record
    shipped twice (its segment outlived its acknowledgment) is logged once."""

    def __init__(self, path: Path, *, fsync_interval_s: float = 0.005, segment_bytes: int = 16 << 20) -> None:
        if not fsync_interval_s > 0:
            raise ValueError("fsync_interval_s must be > 0")
        self.path = path
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="arm-spool-sync")
        self._lock_fd = -1
        self._fd = -1
        self._segment = 0
        self._segment_size = 0
        self._counts: dict[int, int] = {}  # segment -> records not acknowledged yet
        self._queue: deque[tuple[int, bytes]] = deque()  # (segment, body) not handed to shipping yet
        self._written = 0  # bytes appended to the active segment ...
        self._synced = 0  # ... and of those, made durable by fdatasync
        self._retired: list[int] = []  # rolled segments' fds, synced and closed by the sync task
        self._dir_dirty = False
        self._syncer: asyncio.Task[None] | None = None
        self.pending = 0
        """Decisions in the spool governance has not acknowledged."""
        self.syncs = 0
        """fdatasyncs made (the background task)."""
        self.appended = asyncio.Event()

    def _read_segment(self, segment: int) -> list[bytes]:
        data = (self.path / f"{segment:012d}.log").read_bytes()
        bodies: list[bytes] = []
        at = 0
        while at + _RECORD.size <= len(data):
            size, crc = _RECORD.unpack_from(data, at)
            body = data[at + _RECORD.size:at + _RECORD.size + size]
            if len(body) < size or zlib.crc32(body) != crc:
                log.warning("decision spool %s: segment %d ends in a torn record (after %d records); "
                            "the records before it are shipped", self.path, segment, len(bodies))
                break
            bodies.append(body)
            at += _RECORD.size + size
        return bodies

    async def open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self._lock_fd)
                raise SpoolError(f"the decision spool {self.path} is in use by another process") from None
        segments = sorted(int(p.stem) for p in self.path.glob("*.log") if p.stem.isdigit())
        for segment in segments:
            bodies = self._read_segment(segment)
            if not bodies:
                (self.path / f"{segment:012d}.log").unlink()
                continue
            self._counts[segment] = len(bodies)
            self._queue.extend((segment, body) for body in bodies)
        self.pending = len(self._queue)
        self._segment = segments[-1] if segments else 0
        self._roll()
        self._syncer = asyncio.create_task(self._sync_loop(), name="arm-spool-sync")
        if self.pending:
            self.appended.set()

    def _roll(self) -> None:
        """Appends go to a new segment from now on (the old one is synced and closed in the background)."""
        if self._fd >= 0:
            self._retired.append(self._fd)
            if not self._counts.get(self._segment):
                self._counts.pop(self._segment, None)
                self._retired_empty(self._segment)
        self._segment += 1
        self._fd = os.open(self.path / f"{self._segment:012d}.log",
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        self._segment_size = 0
        self._written = self._synced = 0
        self._dir_dirty = True

    def _retired_empty(self, segment: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / f"{segment:012d}.log").unlink()

    def append(self, body: bytes) -> None:
        """Hands the record to the OS (one write(); no fsync: see the class). Raises SpoolError
        when it could not be written (the decision must not be used)."""
        if self._fd < 0:
            raise SpoolError(f"the decision spool {self.path} is not open")
        record = _RECORD.pack(len(body), zlib.crc32(body)) + body
        try:
            if self._segment_size >= self.segment_bytes:
                self._roll()
            written = os.write(self._fd, record)
            while written < len(record):  # a short write (rare: a signal, a full disk) continues
                written += os.write(self._fd, record[written:])
        except OSError as exc:
            raise SpoolError(f"the decision spool {self.path} could not be written: {exc}") from exc
        self._segment_size += len(record)
        self._written += len(record)
        self._counts[self._segment] = self._counts.get(self._segment, 0) + 1
        self._queue.append((self._segment, body))
        self.pending += 1
        if not self.appended.is_set():
            self.appended.set()

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.fsync_interval_s)
            try:
                await self._sync(loop)
            except OSError:
                log.exception("decision spool %s: fdatasync failed (retrying)", self.path)

    async def _sync(self, loop: asyncio.AbstractEventLoop) -> None:
        retired, self._retired = self._retired, []
        for fd in retired:
            await loop.run_in_executor(self._executor, _sync_close, fd)
        if self._dir_dirty:
            self._dir_dirty = False
            await loop.run_in_executor(self._executor, _sync_dir, str(self.path))
        if self._written != self._synced:
            target, fd = self._written, self._fd
            await loop.run_in_executor(self._executor, os.fdatasync, fd)
            self.syncs += 1
            if fd == self._fd:
                self._synced = target

    def take(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` of the oldest records not handed out yet: (segment, body)."""
        queue = self._queue
        n = min(limit, len(queue))
        return [queue.popleft() for _ in range(n)]

    def acknowledge(self, records: list[tuple[int, bytes]]) -> None:
        """Governance logged these records: a segment all acknowledged (and rolled) is deleted."""
        for segment, _ in records:
            left = self._counts[segment] - 1
            if left or segment == self._segment:
                self._counts[segment] = left
            else:
                del self._counts[segment]
                self._retired_empty(segment)
        self.pending = max(0, self.pending - len(records))

    async def close(self) -> None:
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
        loop = asyncio.get_running_loop()
        if self._fd >= 0:
            self._retired.append(self._fd)
            self._fd = -1
            self._written = self._synced = 0
        with contextlib.suppress(OSError):
            await self._sync(loop)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._executor.shutdown(wait=True)


def _sync_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    epoch_field: bytes
    """CheckResponse.policy_epoch (field 15) encoded, appended to every response of the epoch."""
    spend: decision_pb2.AgentSpend | None = None
    """The instance's ledger totals, when a budget applies (else None)."""

    def spend_for(self, run_id: str, today: str) -> engine.Spend | None:
        """The totals Check would read for a call of `run_id` on the UTC day `today`; None when
        they are not known here (no snapshot, another day, a run the snapshot does not list)."""
        spend = self.spend
        if spend is None or spend.day != today:
            return None
        run_usd = 0.0
        if run_id:
            listed = spend.run_usd.get(run_id)
            if listed is None and not spend.runs_complete:
                return None
            run_usd = listed or 0.0
        return engine.Spend(run_usd=run_usd, day_usd=spend.day_usd, month_usd=spend.month_usd)


def _compile(inputs: decision_pb2.DecisionInputs, default: engine.Classifier) -> _Inputs:
    agent = agent_from_message(inputs.agent)
    policy = engine.compile_policy([envelope_to_engine(e) for e in inputs.envelopes], tenant_id=agent.tenant_id,
                                   project_id=agent.project_id, version_id=agent.version_id)
    classifier = risk_classifier(inputs.risk_overrides, inputs.argument_triggers) or default
    return _Inputs(agent, policy, engine.Controls(control_mode_name(inputs.tenant_control),
                                                  control_mode_name(inputs.project_control)),
                   classifier, inputs.policy_epoch,
                   inputs.budgets_apply, b"\x78" + varint(inputs.policy_epoch) if inputs.policy_epoch else b"",
                   inputs.spend if inputs.budgets_apply and inputs.HasField("spend") else None)


@dataclass(frozen=True)
class ResultParts:
    """What a response says that depends on the engine's result alone, built once per result."""

    response: bytes
    """The CheckResponse part, serialized."""
    decision: str
    reasons: tuple[Reason, ...]
    risk: str


_RISKS = {int(r): r for r in engine.Risk}
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

    def __init__(self, governance: grpc.aio.Channel, inputs_stub: Any, instance_id: str, *, spool_dir: str | Path,
                 stale_after_s: float = 3.0, max_spool: int = 100_000, ship_batch: int = 1000, ship_in_flight: int = 8,
                 heartbeat_ms: int = 500, fsync_interval_ms: float = 5.0,
                 metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple) -> None:
        if not instance_id:
            raise ValueError("local decisions need the agent's instance id (instance_id= or ARM_INSTANCE_ID)")
        # RecordLocalDecisions taking the request's serialized bytes.
        self.record = governance.unary_unary(
            "/arm.governance.v1.DecisionService/RecordLocalDecisions", request_serializer=None,
            response_deserializer=decision_pb2.RecordLocalDecisionsResponse.FromString)
        self.inputs_stub = inputs_stub  # WatchDecisionInputs, on a channel of its own
        self.instance_id = instance_id
        self.spool = Spool(Path(spool_dir) / f"decisions-{instance_id}", fsync_interval_s=fsync_interval_ms / 1000)
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
        self._yielded = 0.0  # monotonic time decide() last let the event loop run
        self._second, self._second_field = 0, b""  # decide_time.seconds, encoded, for this second
        self._day, self._day_ends = "", 0.0  # the UTC day and when it ends (epoch seconds)
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

    async def caught_up(self, epoch: int, timeout_s: float) -> bool:
        """Waits until the inputs are at the tenant's policy `epoch` or later, so that what the
        caller read from governance at that epoch (say, ListDeniedTools) and what is decided
        here agree; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._inputs is None or self._inputs.epoch < epoch:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
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
        if (inputs is None or request.approval_id
                or time.monotonic() - self._heard > self.stale_after_s or self.spool.pending >= self.max_spool):
            self.remote += 1
            return None
        spend = engine.NO_SPEND
        if inputs.budgets_apply:
            known = inputs.spend_for(request.run_id, self._today())
            if known is None:
                self.remote += 1
                return None
            spend = known
        if arguments is _FROM_REQUEST:
            arguments = json_format.MessageToDict(request.arguments) if request.HasField("arguments") else None
        call = engine.Call(tool=request.tool_name, arguments=arguments,
                           declared_risk=(_RISKS.get(request.declared_risk) or engine.Risk(request.declared_risk))
                           if request.declared_risk else None,
                           estimated_cost_usd=request.estimated_cost_usd, is_run_start=request.is_run_start)
        result = engine.decide(inputs.policy, inputs.agent, call, controls=inputs.controls, spend=spend,
                               classifier=inputs.classifier)
        if result.effect is engine.Effect.NEEDS_APPROVAL:
            self.remote += 1
            return None
        self._seq += 1
        decision_id = f"{self._prefix}{self._seq:010d}"
        parts = self._parts.get(result)
        # The response's bytes: the result's (cached) + decision_id, policy_epoch, decide_time.
        seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
        if seconds != self._second:
            self._second, self._second_field = seconds, b"\x08" + varint(seconds)
        stamp = self._second_field + b"\x10" + encode_varint(nanos) if nanos else self._second_field
        encoded_id = decision_id.encode()
        id_field = SMALL_VARINTS[len(encoded_id)] + encoded_id
        response_bytes = b"".join((parts.response, b"\x6a", id_field, inputs.epoch_field,
                                   b"\x8a\x01", SMALL_VARINTS[len(stamp)], stamp))
        # A LocalDecision's bytes (fields 1-3), without copying the request into a new message.
        request_bytes = request.SerializeToString()
        self.spool.append(b"".join((b"\x0a", id_field,
                                    b"\x12", varint(len(request_bytes)), request_bytes,
                                    b"\x1a", varint(len(response_bytes)), response_bytes)))
        self.local += 1
        clock = time.monotonic()
        if clock - self._yielded > 0.001:
            # The record is already with the OS; a caller deciding in a tight loop still lets
            # the spool's fsync task and shipping run at least every millisecond.
            self._yielded = clock
            await asyncio.sleep(0)
        return decision_pb2.CheckResponse.FromString(response_bytes), parts

    def _today(self) -> str:
        """The UTC day, "YYYY-MM-DD" (formatted once a day)."""
        now = time.time()
        if now >= self._day_ends:
            self._day = time.strftime("%Y-%m-%d", time.gmtime(now))
            self._day_ends = (now // 86400 + 1) * 86400
        return self._day

    # --- shipping -------------------------------------------------------------------------------

    async def _ship(self) -> None:
        """Ships the spool oldest first, up to `ship_in_flight` batches at a time (governance
        logs one while the next is read and sent); a batch is deleted from the spool only once
        governance acknowledged it, and a failed one is retried (with backoff) until it is."""
        slots = asyncio.Semaphore(self.ship_in_flight)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                records = self.spool.take(self.ship_batch)
                if not records:
                    slots.release()
                    self.spool.appended.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.spool.appended.wait(), 0.5)
                    continue
                task = asyncio.create_task(self._ship_batch(records, slots))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def _ship_batch(self, records: list[tuple[int, bytes]], slots: asyncio.Semaphore) -> None:
        # A RecordLocalDecisionsRequest is its LocalDecisions as field 1: their concatenation is
        # the request's wire form, sent as it is (no parsing and re-serializing per decision).
        request = repeated(b"\x0a", (body for _, body in records))
        delay = 0.05
        try:
            while True:
                try:
                    await self.record(request, timeout=30, metadata=self.metadata())
                    break
                except grpc.RpcError as exc:
                    code = exc.code() if hasattr(exc, "code") else None
                    log.warning("shipping %d local decisions failed (%s); they stay in the spool, retrying",
                                len(records), getattr(code, "name", code))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self.spool.acknowledge(records)
            self.shipped += len(records)
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
