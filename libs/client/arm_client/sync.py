"""`ArmSync`: the runtime SDK for plain threads. It owns an event loop in a background thread,
where its `Arm` lives (channels, event sender); calls from any thread are handed to that loop.

    arm = ArmSync()                               # ARM_ADDRESS, ARM_API_KEY, ARM_INSTANCE_ID

    @arm.governed(risk="HIGH")
    def send_payment(to: str, amount: float) -> str: ...

    with arm.run("invoice-42"):
        send_payment("acct-7", 120)
    arm.close()                                   # or `with ArmSync() as arm:`; also at exit
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar, overload

from arm.governance.v1 import approvals_pb2
from arm.telemetry.v1 import events_pb2
from arm_client.sdk import (
    Arm,
    Decision,
    Run,
    ToolOptions,
    _current_run,
    _resume_approval,
    _signature,
    bind_arguments,
)
from arm_client.stubs import ArmClient

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class ArmSync:
    """Same arguments as `Arm` (addresses, key, agent, defaults; the rest from the environment).
    Every method blocks the calling thread, never the others; governed tools run in the caller's
    thread, so their thread-locals and context variables are the caller's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="arm-sdk", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> Arm:
            arm = Arm(*args, **kwargs)
            arm._managed = True
            await arm._ensure_started()
            return arm

        self.arm: Arm = self._wait(make())
        """The `Arm` on the background loop (its coroutines must run there: use `submit`)."""
        atexit.register(_close_at_exit, weakref.ref(self))

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting for an approval
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs any coroutine (e.g. of `self.arm`) on the SDK's loop and waits for its result."""
        return self._wait(coro)

    def call(self, rpc: Callable[[ArmClient], Callable[..., Awaitable[T]]], request: Any, *,
             timeout_s: float | None = None) -> T:
        """One unary RPC with typed errors: `arm.call(lambda s: s.approvals.GetApproval, request)`."""
        async def go() -> T:
            return await self.arm.call(rpc(self.arm.stubs), request, timeout_s=timeout_s)
        return self._wait(go())

    @property
    def settings(self) -> Any:
        return self.arm.settings

    # --- decisions -------------------------------------------------------------------------------

    def check(self, tool: str, arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> Decision:
        """`Arm.check`, blocking; the run id defaults to the calling thread's current run."""
        run = _current_run.get()
        if run is not None:
            kwargs.setdefault("run_id", run.run_id)
        return self._wait(self.arm.check(tool, arguments, **kwargs))

    def get_approval(self, approval_id: str) -> approvals_pb2.Approval:
        return self._wait(self.arm.get_approval(approval_id))

    def wait_for_approval(self, approval_id: str, timeout_s: float | None = None) -> approvals_pb2.Approval:
        """`Arm.wait_for_approval`, blocking."""
        return self._wait(self.arm.wait_for_approval(approval_id, timeout_s))

    approval = staticmethod(Arm.approval)

    # --- governed tools --------------------------------------------------------------------------

    @overload
    def governed(self, fn: F, /, *, name: str | None = None, risk: str | int | None = None,
                 cost_usd: float = 0.0, wait: bool = True, approval_timeout_s: float | None = None,
                 fail_open: bool | None = None, context: Mapping[str, Any] | None = None,
                 on_pending: Callable[[str], None] | None = None) -> F: ...

    @overload
    def governed(self, fn: None = None, /, *, name: str | None = None, risk: str | int | None = None,
                 cost_usd: float = 0.0, wait: bool = True, approval_timeout_s: float | None = None,
                 fail_open: bool | None = None, context: Mapping[str, Any] | None = None,
                 on_pending: Callable[[str], None] | None = None) -> Callable[[F], F]: ...

    def governed(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
                 risk: str | int | None = None, cost_usd: float = 0.0, wait: bool = True,
                 approval_timeout_s: float | None = None, fail_open: bool | None = None,
                 context: Mapping[str, Any] | None = None, on_pending: Callable[[str], None] | None = None) -> Any:
        """`Arm.governed` for threads: a plain function stays plain (the call blocks while
        governance decides or an approval is awaited); an async function stays async (awaited on
        the caller's loop, the decision made on the SDK's)."""
        def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
            opts = ToolOptions(name or str(getattr(f, "__name__", "tool")), risk, cost_usd, wait,
                               approval_timeout_s, fail_open, context, on_pending)
            sig = _signature(f)
            arm = self.arm

            if inspect.iscoroutinefunction(f):
                @functools.wraps(f)
                async def governed_async(*args: Any, **kwargs: Any) -> Any:
                    arguments = bind_arguments(sig, args, kwargs)
                    run = _current_run.get()
                    auth = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                        arm.authorize(opts, arguments, run.run_id if run else "", _resume_approval.get()), self._loop))
                    started = arm._tool_started(opts, auth, run)
                    try:
                        result = await f(*args, **kwargs)
                    except BaseException as exc:
                        arm._tool_finished(opts, auth, run, started, exc)
                        raise
                    arm._tool_finished(opts, auth, run, started, None)
                    return result

                governed_async.arm_tool = opts  # type: ignore[attr-defined]
                return governed_async

            @functools.wraps(f)
            def governed_sync(*args: Any, **kwargs: Any) -> Any:
                arguments = bind_arguments(sig, args, kwargs)
                run = _current_run.get()
                auth = self._wait(arm.authorize(opts, arguments, run.run_id if run else "", _resume_approval.get()))
                started = arm._tool_started(opts, auth, run)
                try:
                    result = f(*args, **kwargs)
                except BaseException as exc:
                    arm._tool_finished(opts, auth, run, started, exc)
                    raise
                arm._tool_finished(opts, auth, run, started, None)
                return result

            governed_sync.arm_tool = opts  # type: ignore[attr-defined]
            return governed_sync

        return wrap if fn is None else wrap(fn)

    # --- runs and events -------------------------------------------------------------------------

    def run(self, name: str = "run", *, run_id: str | None = None, metadata: Mapping[str, Any] | None = None) -> Run:
        """`with arm.run("triage") as run:` — see `Arm.run`."""
        return self.arm.run(name, run_id=run_id, metadata=metadata)

    def report_cost(self, usd: float, *, run_id: str | None = None, tool_call_id: str = "", note: str = "") -> None:
        """`Arm.report_cost`; never blocks."""
        self.arm.report_cost(usd, run_id=run_id, tool_call_id=tool_call_id, note=note)

    def emit(self, event_type: int, *, run_id: str | None = None, tool_call_id: str = "",
             payload: Mapping[str, Any] | None = None) -> str:
        return self.arm.emit(event_type, run_id=run_id, tool_call_id=tool_call_id, payload=payload)

    def run_trace(self, run_id: str) -> list[events_pb2.OpEvent]:
        return self._wait(self.arm.run_trace(run_id))

    @property
    def events_dropped(self) -> int:
        return self.arm.events_dropped

    @property
    def events_sent(self) -> int:
        return self.arm.events_sent

    def flush(self, timeout_s: float | None = None) -> bool:
        return self._wait(self.arm.flush(timeout_s))

    def close(self) -> None:
        """Flushes the events (bounded), closes the channels and stops the background loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wait(self.arm.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._loop.is_running():
                self._loop.close()

    def __enter__(self) -> ArmSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_at_exit(ref: weakref.ReferenceType[ArmSync]) -> None:
    arm = ref()
    if arm is not None:
        with contextlib.suppress(Exception, concurrent.futures.CancelledError):
            arm.close()


__all__ = ["ArmSync", "events_pb2"]
