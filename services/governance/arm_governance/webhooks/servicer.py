"""The webhook API's edge: validate, require `operators:admin`, one store call (writes
idempotent on request_id; the secret is shown once, a replay returns the webhook without it)."""

from __future__ import annotations

from typing import Any

from arm.governance.v1 import webhooks_pb2 as wpb
from arm.governance.v1 import webhooks_pb2_grpc
from arm_common import validation as val
from arm_common.auth import Principal, current_principal
from arm_common.db import Database
from arm_common.errors import Violations
from arm_common.idempotency import run_idempotent
from arm_common.messages import without
from arm_common.outbox import OutboxRelay
from arm_common.server import Ctx
from arm_governance.models import IDEMPOTENCY
from arm_governance.webhooks.egress import EgressPolicy
from arm_governance.webhooks.service import PERMISSION, WebhookStore, validate_create, validate_id


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    """The edge: validate, require `operators:admin`, one store call (writes idempotent)."""

    def __init__(self, db: Database, store: WebhookStore, relays: list[OutboxRelay],
                 egress: EgressPolicy | None = None) -> None:
        self.db = db
        self.store = store
        self.relays = relays
        self.egress = egress or EgressPolicy()

    async def _write(self, method: str, request: Any, response_type: Any, fn: Any, *,
                     one_time_secret: bool = False) -> Any:
        p = current_principal()
        result = await run_idempotent(self.db, IDEMPOTENCY, tenant_id=p.tenant_id, method=method,
                                      request=request, response_type=response_type, write=fn,
                                      stored_form=(lambda r: without(r, "secret")) if one_time_secret else None)
        for relay in self.relays:
            relay.notify()
        return result

    @staticmethod
    def _admin() -> Principal:
        p = current_principal()
        p.require(PERMISSION)
        return p

    async def CreateWebhook(self, request: wpb.CreateWebhookRequest, context: Ctx) -> Any:
        validate_create(request)
        refusal = self.egress.literal_refusal(request.webhook.url)
        if refusal is not None:
            v = Violations()
            v.add("webhook.url", refusal)
            v.raise_if_any()
        p = self._admin()
        return await self._write("CreateWebhook", request, wpb.CreateWebhookResponse,
                                 lambda s: self.store.create(s, p, request), one_time_secret=True)

    async def GetWebhook(self, request: wpb.GetWebhookRequest, context: Ctx) -> Any:
        validate_id(request, extra=False)
        p = self._admin()
        return wpb.GetWebhookResponse(webhook=await self.store.get(p, request.webhook_id))

    async def ListWebhooks(self, request: wpb.ListWebhooksRequest, context: Ctx) -> Any:
        v = Violations()
        val.standard_fields(v, request)
        v.raise_if_any()
        p = self._admin()
        return await self.store.list(p, request)

    async def RotateWebhookSecret(self, request: wpb.RotateWebhookSecretRequest, context: Ctx) -> Any:
        validate_id(request)
        p = self._admin()
        return await self._write("RotateWebhookSecret", request, wpb.RotateWebhookSecretResponse,
                                 lambda s: self.store.rotate(s, p, request), one_time_secret=True)

    async def DeleteWebhook(self, request: wpb.DeleteWebhookRequest, context: Ctx) -> Any:
        validate_id(request)
        p = self._admin()
        return await self._write("DeleteWebhook", request, wpb.DeleteWebhookResponse,
                                 lambda s: self.store.delete(s, p, request))

    async def ListWebhookDeliveries(self, request: wpb.ListWebhookDeliveriesRequest, context: Ctx) -> Any:
        validate_id(request)
        p = self._admin()
        return await self.store.deliveries(p, request)
