"""A client cancelling a stream is routine: no ERROR record, no traceback, on any service's
streams (issue 10 item 10). Cancelling while the server is busy sending (a tail replaying a
backlog) closes the handler's generator mid-send, the case that used to log "unexpected error"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2, audit_pb2
from arm.registry.v1 import agents_pb2, compat_pb2
from arm.telemetry.v1 import telemetry_pb2
from tests.helpers import approved_version
from tests.telemetry.conftest import event

INTERCEPTOR_LOG = "arm_common.interceptors"


def ended_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the interceptor said at the end of each cancelled call: quiet DEBUG, or an error."""
    return [r for r in caplog.records if r.name == INTERCEPTOR_LOG and (
        "cancelled by the client" in r.getMessage() or r.levelno >= logging.ERROR)]


async def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


async def test_cancelled_streams_log_no_error(registry, governance, telemetry, tenant,  # type: ignore[no-untyped-def]
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=INTERCEPTOR_LOG)
    agent = await approved_version(tenant.admin)
    instance = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agent.version.id, environment_id=agent.environment.id, name="watched"))).agent_instance
    gov = governance.client(tenant.admin_key)
    tel = telemetry.client(tenant.admin_key)
    approval = (await gov.approvals.RequestApproval(approvals_pb2.RequestApprovalRequest(
        action_type=approvals_pb2.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, instance_id=instance.id,
        tool_name="shell", risk=common_pb2.RISK_LEVEL_HIGH, justification="cancel test",
        run_id="run-c", tool_call_id="call-c"))).approval
    for _ in range(3):  # a backlog for the tail to replay: the server is mid-send when we cancel
        await tel.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[event() for _ in range(100)]))

    opens: list[Callable[[], Any]] = [
        lambda: gov.approvals.WatchApproval(approvals_pb2.WatchApprovalRequest(approval_id=approval.approval_id)),
        lambda: tenant.admin.compat.WatchAgentChanges(compat_pb2.WatchAgentChangesRequest()),
        lambda: gov.audit.ExportChangeRecords(audit_pb2.ExportChangeRecordsRequest()),
        *[lambda: tel.telemetry.TailEvents(telemetry_pb2.TailEventsRequest(after_cursor="0"))] * 5,
    ]
    streams = 0
    for i, open_stream in enumerate(opens):
        stream = open_stream()
        await asyncio.wait_for(stream.read(), 10)  # the handler is running and has sent
        if stream.done():  # a finite stream (the export) that already ended: nothing to cancel
            continue
        stream.cancel()
        # The export is finite: it may end on the server before the cancellation arrives, so it
        # is cancelled (and must log no error) but not counted among the cancellations awaited.
        streams += i != 2
    # Every cancellation reached the server's interceptor; then nothing may have been an error.
    await wait_for(lambda: len(ended_records(caplog)) >= streams)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage(), r.exc_info and r.exc_info[0]) for r in errors]
    await gov.close()
    await tel.close()
