"""The background event sender: opEvents leave in batches, off the tool call's path.

- `emit` never blocks and never waits on the network: it appends to a bounded queue (thread
  safe, so plain threads of `ArmSync` use it too). When the queue is full the event is counted in
  `dropped` and logged, never lost silently.
- One task sends batches of up to `batch_size` with `IngestEvents`. A batch that fails is resent
  as it was (same event ids, same request id: telemetry deduplicates), after the server's
  `RetryInfo` delay on RESOURCE_EXHAUSTED or an exponential backoff otherwise, before anything
  queued after it, so a run's events keep their order.
- `flush` waits until everything queued so far is acknowledged; `close` flushes (bounded) and
  counts what is left as dropped; `drain_blocking` sends what is left with a plain blocking
  channel, for interpreter exit when the event loop is gone."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from arm.telemetry.v1 import events_pb2, telemetry_pb2, telemetry_pb2_grpc
from arm_client.errors import ArmError, from_rpc_error

log = logging.getLogger("arm_client.events")

Send = Callable[[list[events_pb2.OpEvent], str], Awaitable[telemetry_pb2.IngestEventsResponse]]

# Codes after which resending the same batch can succeed.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.CANCELLED}


class EventSender:
    """See the module docstring. `send` ingests one batch under a request id."""

    def __init__(self, send: Send, *, max_queue: int = 10_000, batch_size: int = 500,
                 flush_interval_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        self._send = send
        self.max_queue = max_queue
        self.batch_size = min(batch_size, 1000)
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._queue: deque[events_pb2.OpEvent] = deque()
        self._batch: list[events_pb2.OpEvent] = []
        self._batch_id = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._stopping = False
        self._flushing = 0  # flush() calls waiting: send partial batches at once
        self.dropped = 0
        """Events that could not be kept: queue full, rejected by telemetry, or left at close."""
        self.sent = 0
        """Events telemetry acknowledged (stored or already stored)."""
        self.failed_attempts = 0
        """Batch sends that failed and were retried."""
        self.last_error: ArmError | None = None
        """The last error a batch send met (kept for diagnostics)."""

    # --- producer side (any thread) --------------------------------------------------------------

    def emit(self, event: events_pb2.OpEvent) -> bool:
        """Queues one event; False (and counted in `dropped`) when the queue is full or closed."""
        with self._lock:
            if self._closed or len(self._queue) >= self.max_queue:
                self._drop(1, "the event queue is full" if not self._closed else "the sender is closed")
                return False
            self._queue.append(event)
            full = len(self._queue) >= self.batch_size
        if full:
            self._poke()
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._batch)

    def _drop(self, n: int, why: str) -> None:
        before = self.dropped
        self.dropped += n
        # The first drop, then one line per thousand: counted always, logged without flooding.
        if before == 0 or before // 1000 != self.dropped // 1000:
            log.warning("dropped %d opEvent(s) (%s); %d dropped in all", n, why, self.dropped)

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed meanwhile; the exit flush sends what is left
                pass

    # --- the sending task ------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the sending task on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="arm-event-sender")

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = 0.05
        while not self._stopping:
            if not self._batch:
                # Wait for a full batch, a flush or the interval: at most one partial batch per
                # interval, so a slow agent does not pay one IngestEvents per event.
                with self._lock:
                    queued = len(self._queue)
                # Never loops without awaiting: with nothing queued it always waits.
                if queued < self.batch_size and not (self._flushing and queued):
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                    except TimeoutError:
                        pass
                    self._wake.clear()
                with self._lock:
                    n = min(len(self._queue), self.batch_size)
                    self._batch = [self._queue.popleft() for _ in range(n)]
                    self._batch_id = f"batch-{secrets.token_hex(8)}" if n else ""
                if not self._batch:
                    continue
            try:
                resp = await self._send(self._batch, self._batch_id)
            except ArmError as exc:
                self.last_error = exc
                if exc.code in RETRYABLE:
                    self.failed_attempts += 1
                    delay = exc.retry_delay_s if exc.retry_delay_s is not None else backoff
                    backoff = min(backoff * 2, self.max_backoff_s)
                    log.info("sending %d opEvent(s) failed (%s); retrying in %.2fs", len(self._batch),
                             exc.reason, delay)
                    await asyncio.sleep(delay)
                    continue
                log.error("telemetry refused a batch of %d opEvent(s): %s", len(self._batch), exc)
                with self._lock:
                    self._drop(len(self._batch), f"refused: {exc.reason}")
                    self._batch = []
                continue
            backoff = 0.05
            with self._lock:
                if resp.rejected:
                    for r in resp.rejected:
                        log.error("telemetry rejected opEvent %s (#%d): %s %s", r.event_id, r.index, r.reason,
                                  r.message)
                    self._drop(len(resp.rejected), "rejected by telemetry")
                self.sent += resp.accepted_count + resp.duplicate_count
                self._batch = []

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits until every event queued before the call is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._flushing += 1
        try:
            while self.pending():
                if self._task is None or self._task.done() or time.monotonic() >= deadline:
                    return False
                self._poke()
                await asyncio.sleep(0.005)
            return True
        finally:
            self._flushing -= 1

    async def close(self, timeout_s: float = 5.0) -> None:
        """Flushes (bounded by `timeout_s`), stops the task; what is left is counted as dropped."""
        await self.flush(timeout_s)
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: the task ends at its next step even if a cancellation got lost in a call.
            await asyncio.wait([self._task], timeout=1.0)
            self._task = None
        self._abandon()

    def _abandon(self) -> None:
        with self._lock:
            self._closed = True
            left = len(self._queue) + len(self._batch)
            self._queue.clear()
            self._batch = []
            if left:
                self._drop(left, "not sent before close")

    def drain_blocking(self, target: str, metadata: list[tuple[str, str]], timeout_s: float = 5.0) -> None:
        """Sends what is left over a blocking channel (interpreter exit: no event loop to use)."""
        with self._lock:
            events = self._batch + list(self._queue)
            self._batch, self._queue = [], deque()
            self._closed = True
        if not events:
            return
        deadline = time.monotonic() + timeout_s
        channel = grpc.insecure_channel(target)
        try:
            stub: Any = telemetry_pb2_grpc.TelemetryServiceStub(channel)
            while events and time.monotonic() < deadline:
                batch = events[:self.batch_size]
                try:
                    resp = stub.IngestEvents(
                        telemetry_pb2.IngestEventsRequest(request_id=f"batch-{secrets.token_hex(8)}", events=batch),
                        metadata=metadata, timeout=max(0.1, deadline - time.monotonic()))
                except grpc.RpcError as exc:
                    err = from_rpc_error(exc)
                    if err.code not in RETRYABLE:
                        break
                    time.sleep(min(err.retry_delay_s or 0.2, max(0.0, deadline - time.monotonic())))
                    continue
                self.sent += resp.accepted_count + resp.duplicate_count
                if resp.rejected:
                    self._drop(len(resp.rejected), "rejected by telemetry")
                events = events[len(batch):]
        finally:
            channel.close()
            if events:
                self._drop(len(events), "not sent before exit")
