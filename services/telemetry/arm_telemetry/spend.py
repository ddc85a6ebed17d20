"""The budget feed: COST_TICK events, stored with a spend report in telemetry's outbox (topic
`spend`, same transaction), are relayed to governance's DecisionService.ReportSpend with the
service key acting for the event's tenant. The ledger is idempotent on the entry's key (the
event_id), so redelivery after a crash adds nothing. A report governance refuses for good (an
agent it does not know, invalid fields) is logged and not resent; anything else is retried."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from arm.governance.v1 import decision_pb2, decision_pb2_grpc
from arm_common import tls
from arm_common.auth import auth_metadata
from arm_common.outbox import OutboxMessage

log = logging.getLogger(__name__)
_PERMANENT = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}


class SpendReporter:
    def __init__(self, address: str, api_key: str, tls_settings: tls.TlsSettings | None = None) -> None:
        self.channel = tls.open_channel(address, tls_settings)
        self.stub = decision_pb2_grpc.DecisionServiceStub(self.channel)
        self.api_key = api_key

    async def __call__(self, messages: Sequence[OutboxMessage]) -> None:
        for m in messages:
            request = decision_pb2.ReportSpendRequest.FromString(m.payload)
            try:
                await self.stub.ReportSpend(request, metadata=auth_metadata(self.api_key, m.tenant_id),
                                            timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _PERMANENT:
                    raise
                log.error("governance refused the spend of event %s (tenant %s): %s %s; not resent",
                          request.entry.idempotency_key, m.tenant_id, exc.code().name, exc.details())

    async def close(self) -> None:
        await self.channel.close()
