"""Notification webhooks: a tenant's HTTP(S) endpoints for approval requests, escalations and
decisions (docs/webhooks.md has the format and the signature).

- `WebhookStore` (its edge is `servicer.py`): create, read, rotate the secret of and delete webhooks
  (`operators:admin`, idempotent on request_id, change records through the outbox). The signing
  secret is shown once and stored encrypted (`SecretBox`, a Fernet key kept outside the database).
- `enqueue_notification` / `notification_message`: in the transaction of the approval change, an
  `ApprovalNotification` goes into the outbox (topic `approval_notification`). Delivery (fan-out
  per webhook, signed POSTs, retries) is `arm_governance.webhooks.delivery`.
- `signature_header` / `verify_signature`: the `X-ARM-Signature` scheme, `t=<unix>,v1=<hex>`
  where hex is HMAC-SHA256(secret, "<t>.<body>")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf import json_format
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import webhooks_pb2 as wpb
from arm_common import pagination
from arm_common import validation as val
from arm_common.auth import Principal, actor_of
from arm_common.change_records import change_record
from arm_common.config import ConfigError, ServiceConfig
from arm_common.db import Database
from arm_common.errors import Aborted, NotFound, Violations
from arm_common.ids import new_id
from arm_common.messages import ts
from arm_common.outbox import TOPIC_CHANGE_RECORD, enqueue
from arm_common.tables import utcnow
from arm_governance import models
from arm_governance.models import OUTBOX

log = logging.getLogger(__name__)
E = wpb.WebhookEventType
CR = common_pb2.ChangeRecordType

TOPIC_NOTIFICATION = "approval_notification"
PERMISSION = "operators:admin"  # the tenant admin's; webhooks send approval data out of ARM
MAX_WEBHOOKS_PER_TENANT = 20
MAX_URL = 2048
MAX_DESCRIPTION = 500
SECRET_MIN, SECRET_MAX = 24, 256
SIGNATURE_TOLERANCE_S = 300
KEY_FILE_NAME = "webhook-secret-key"
EVENT_NAMES: dict[int, str] = {
    E.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED: "approval.requested",
    E.WEBHOOK_EVENT_TYPE_APPROVAL_ESCALATED: "approval.escalated",
    E.WEBHOOK_EVENT_TYPE_APPROVAL_DECIDED: "approval.decided",
    E.WEBHOOK_EVENT_TYPE_APPROVAL_EXPIRED: "approval.expired",
    E.WEBHOOK_EVENT_TYPE_APPROVAL_CANCELLED: "approval.cancelled",
}
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


# --- secrets and signatures ------------------------------------------------------------------------

def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the secret>`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, *, tolerance_s: float = SIGNATURE_TOLERANCE_S,
                     now: float | None = None) -> bool:
    """What a receiver does (docs/webhooks.md shows the same in a few lines): the header's
    timestamp is recent and one of its v1 signatures matches the body."""
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k.strip() == "t"]
    macs = [v for k, v in parts if k.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit() or not macs:
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(want, m.strip()) for m in macs)


class SecretBox:
    """Encrypts webhook secrets for storage (Fernet: AES-128-CBC with HMAC-SHA256). The key
    lives outside the database, so a copy of the database does not sign notifications."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def open(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise ValueError("the webhook's secret does not decrypt with this governance's key "
                             "(ARM_WEBHOOK_SECRET_KEY_FILE or ARM_SERVICE_API_KEY changed, or differs "
                             "between replicas); rotate the webhook's secret") from None


def load_secret_box(config: ServiceConfig) -> SecretBox:
    """The key from ARM_WEBHOOK_SECRET_KEY_FILE; unset, one derived from ARM_SERVICE_API_KEY
    (HKDF-SHA256: every replica has that key, the database does not), else one kept under the
    data dir, generated on first start (development). The key is never logged."""
    if not config.webhook_secret_key_file and config.service_api_key:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=b"arm webhook secret key v1").derive(config.service_api_key.encode())
        return SecretBox(base64.urlsafe_b64encode(derived))
    if config.webhook_secret_key_file:
        path = Path(config.webhook_secret_key_file)
        try:
            return SecretBox(path.read_bytes().strip())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ARM_WEBHOOK_SECRET_KEY_FILE: cannot read a Fernet key from {path} "
                              f"({type(exc).__name__})") from None
    path = Path(config.data_dir) / KEY_FILE_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
            log.warning("generated the webhook secret key at %s; outside development set "
                        "ARM_WEBHOOK_SECRET_KEY_FILE (the same key on every replica)", path)
    try:
        return SecretBox(path.read_bytes().strip())
    except ValueError:
        raise ConfigError(f"{path} does not hold a Fernet key; set ARM_WEBHOOK_SECRET_KEY_FILE") from None


# --- notifications (written in the approval change's transaction) ---------------------------------

def notification(event_type: int, approval: apb.Approval, actor: common_pb2.Actor,
                 reason: str = "") -> wpb.ApprovalNotification:
    return wpb.ApprovalNotification(event_id=new_id("ntf"), event_type=event_type,  # type: ignore[arg-type]
                                    occur_time=ts(utcnow()), approval=approval, actor=actor, reason=reason)


def notification_message(event_type: int, approval: apb.Approval, actor: common_pb2.Actor,
                         reason: str = "") -> tuple[str, str, wpb.ApprovalNotification]:
    """(topic, message id, message), for writers that batch their outbox rows (Check)."""
    n = notification(event_type, approval, actor, reason)
    return TOPIC_NOTIFICATION, n.event_id, n


async def enqueue_notification(s: AsyncSession, event_type: int, approval: apb.Approval,
                               actor: common_pb2.Actor, reason: str = "") -> None:
    """Adds the notification to the outbox inside the caller's transaction."""
    n = notification(event_type, approval, actor, reason)
    await enqueue(s, OUTBOX, topic=TOPIC_NOTIFICATION, tenant_id=approval.tenant_id,
                  message_id=n.event_id, message=n)


def console_link(console_url: str, approval_id: str) -> str:
    return f"{console_url.rstrip('/')}/approvals/{approval_id}"


def _short(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def summary_text(n: wpb.ApprovalNotification, link: str) -> str:
    """One line for chat relays, e.g. "HIGH TOOL_EXECUTION approval requested: db.drop (PENDING,
    0/2 approvals) http://…/approvals/apr_…"."""
    a = n.approval
    risk = _short(common_pb2.RiskLevel.Name(a.risk), "RISK_LEVEL_")
    action = _short(apb.ApprovalActionType.Name(a.action_type), "APPROVAL_ACTION_TYPE_")
    what = a.tool_name or a.target_id or a.instance_id or a.approval_id
    approving = sum(1 for d in a.decisions if d.verdict == apb.APPROVAL_VERDICT_APPROVE)
    status = _short(apb.ApprovalStatus.Name(a.status), "APPROVAL_STATUS_")
    verb = EVENT_NAMES.get(n.event_type, "approval.changed").removeprefix("approval.")
    reason = f": {n.reason}" if n.reason else ""
    return (f"{risk} {action} approval {verb}: {what} ({status}, {approving}/{a.required_decisions} "
            f"approvals){reason} {link}")


def payload(n: wpb.ApprovalNotification, *, delivery_id: str, webhook_id: str, console_url: str) -> bytes:
    """The JSON body of one delivery (docs/webhooks.md). The approval is its proto3 JSON with
    field names as in the contract, without `arguments` (a call's arguments may hold data that
    must not leave ARM; `argument_digest` identifies them)."""
    approval = apb.Approval()
    approval.CopyFrom(n.approval)
    approval.ClearField("arguments")
    link = console_link(console_url, approval.approval_id)
    body = {
        "id": n.event_id,
        "delivery_id": delivery_id,
        "webhook_id": webhook_id,
        "type": EVENT_NAMES.get(n.event_type, "approval.changed"),
        "occurred_at": n.occur_time.ToJsonString(),
        "tenant_id": approval.tenant_id,
        "actor": {"type": _short(common_pb2.ActorType.Name(n.actor.type), "ACTOR_TYPE_"), "id": n.actor.id},
        "reason": n.reason,
        "console_url": link,
        "text": summary_text(n, link),
        "approval": json_format.MessageToDict(approval, preserving_proto_field_name=True),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


# --- validation ------------------------------------------------------------------------------------

def _url(v: Violations, path: str, url: str) -> None:
    if not url:
        v.add(path, "is required")
        return
    if len(url) > MAX_URL:
        v.add(path, f"must be at most {MAX_URL} characters")
        return
    if not url.isprintable() or any(c.isspace() for c in url):
        v.add(path, "must not contain spaces or control characters")
        return
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
    except ValueError:
        v.add(path, "must be an absolute http:// or https:// URL")
        return
    del port
    try:
        httpx.URL(url)  # what the dispatcher will send to
    except Exception:  # noqa: BLE001 - httpx raises several kinds for URLs it cannot use
        v.add(path, "must be an absolute http:// or https:// URL")
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        v.add(path, "must be an absolute http:// or https:// URL")
    elif parts.username is not None or parts.password is not None:
        v.add(path, "must not carry user info (user:password@); receivers check the signature instead")
    elif parts.fragment:
        v.add(path, "must not have a #fragment")


def _secret(v: Violations, path: str, secret: str) -> None:
    if secret and (not SECRET_MIN <= len(secret) <= SECRET_MAX or not _PRINTABLE_ASCII.fullmatch(secret)):
        v.add(path, f"must be {SECRET_MIN} to {SECRET_MAX} printable ASCII characters without spaces "
                    "(or empty to generate one)")


def validate_create(r: wpb.CreateWebhookRequest) -> None:
    v = Violations()
    val.standard_fields(v, r)
    if not r.HasField("webhook"):
        v.add("webhook", "is required")
    else:
        _url(v, "webhook.url", r.webhook.url)
        types = list(r.webhook.event_types)
        if not types:
            v.add("webhook.event_types", "must name at least one event type")
        for i, t in enumerate(types):
            if t not in EVENT_NAMES:
                v.add(f"webhook.event_types[{i}]", "must be a defined WebhookEventType other than UNSPECIFIED")
        if len(set(types)) != len(types):
            v.add("webhook.event_types", "must name each event type once")
        val.optional(v, "webhook.description", r.webhook.description, MAX_DESCRIPTION)
    _secret(v, "secret", r.secret)
    v.raise_if_any()


def validate_id(r: Any, *, extra: bool = True) -> None:
    v = Violations()
    if extra:
        val.standard_fields(v, r)
    val.resource_id(v, "webhook_id", r.webhook_id)
    if isinstance(r, wpb.RotateWebhookSecretRequest):
        _secret(v, "secret", r.secret)
    v.raise_if_any()


# --- the store -------------------------------------------------------------------------------------

def to_proto(row: models.Webhook) -> wpb.Webhook:
    return wpb.Webhook(webhook_id=row.id, tenant_id=row.tenant_id, url=row.url,
                       event_types=[E.Value(t) for t in row.event_types], description=row.description,
                       secret_hint=row.secret_hint, create_time=ts(row.created_at),
                       update_time=ts(row.updated_at), etag=str(row.revision))


def _delivery_proto(row: models.WebhookDelivery) -> wpb.WebhookDelivery:
    return wpb.WebhookDelivery(
        delivery_id=row.id, webhook_id=row.webhook_id, event_id=row.event_id,
        event_type=row.event_type, approval_id=row.approval_id, attempts=row.attempts,  # type: ignore[arg-type]
        last_status=row.last_status, last_error=row.last_error, create_time=ts(row.created_at),
        deliver_time=ts(row.delivered_at),
        next_attempt_time=None if row.delivered_at is not None else ts(row.next_attempt_at))


def _hint(secret: str) -> str:
    return secret[-4:]


class WebhookStore:
    """Webhooks of a tenant. The reads own their session and return messages; the writes take the
    session of the caller's idempotent write (`edge.Writes`); private `_x(s, ...)` combine."""

    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db = db
        self.box = box

    @staticmethod
    async def _record(s: AsyncSession, p: Principal, type_: int, row: models.Webhook, summary: str) -> None:
        rec = change_record(
            type_, tenant_id=p.tenant_id, actor=actor_of(p), target_type="webhook", target_id=row.id,
            summary=summary, source="governance",
            after={"url": row.url, "event_types": list(row.event_types), "secret_hint": row.secret_hint})
        await enqueue(s, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id=p.tenant_id,
                      message_id=rec.record_id, message=rec)

    @staticmethod
    async def _row(s: AsyncSession, tenant_id: str, webhook_id: str, *, for_update: bool = False) -> models.Webhook:
        q = select(models.Webhook).where(models.Webhook.id == webhook_id, models.Webhook.tenant_id == tenant_id)
        if for_update:
            q = q.with_for_update()
        row = (await s.execute(q)).scalar_one_or_none()
        if row is None:
            raise NotFound.of("webhook", webhook_id)
        return row

    async def create(self, s: AsyncSession, p: Principal, r: wpb.CreateWebhookRequest) -> wpb.CreateWebhookResponse:
        count = (await s.execute(select(func.count()).select_from(models.Webhook)
                                 .where(models.Webhook.tenant_id == p.tenant_id))).scalar_one()
        if count >= MAX_WEBHOOKS_PER_TENANT:
            v = Violations()
            v.add("webhook", f"a tenant has at most {MAX_WEBHOOKS_PER_TENANT} webhooks; delete one first")
            v.raise_if_any("too many webhooks")
        secret = r.secret or new_secret()
        now = utcnow()
        row = models.Webhook(id=new_id("whk"), tenant_id=p.tenant_id, url=r.webhook.url,
                             event_types=[E.Name(t) for t in r.webhook.event_types],
                             description=r.webhook.description, secret=self.box.seal(secret),
                             secret_hint=_hint(secret), created_at=now, updated_at=now, revision=1)
        s.add(row)
        await s.flush()
        await self._record(s, p, CR.CHANGE_RECORD_TYPE_WEBHOOK_CREATED, row, f"webhook created for {row.url}")
        return wpb.CreateWebhookResponse(webhook=to_proto(row), secret=secret)

    async def get(self, p: Principal, webhook_id: str) -> wpb.Webhook:
        async def read(s: AsyncSession) -> wpb.Webhook:
            return to_proto(await self._row(s, p.tenant_id, webhook_id))
        return await self.db.read(read)

    async def list(self, p: Principal, r: wpb.ListWebhooksRequest) -> wpb.ListWebhooksResponse:
        size = pagination.page_size(r.page_size)
        after = pagination.decode_token(r.page_token, {}) if r.page_token else None
        m = models.Webhook

        async def read(s: AsyncSession) -> wpb.ListWebhooksResponse:
            q = select(m).where(m.tenant_id == p.tenant_id)
            if after is not None:
                q = q.where(m.id > str(after))
            rows = (await s.execute(q.order_by(m.id).limit(size + 1))).scalars().all()
            page, more = pagination.split_page(rows, size)
            token = pagination.encode_token(page[-1].id, {}) if more else ""
            return wpb.ListWebhooksResponse(webhooks=[to_proto(row) for row in page], next_page_token=token)

        return await self.db.read(read)

    async def rotate(self, s: AsyncSession, p: Principal,
                     r: wpb.RotateWebhookSecretRequest) -> wpb.RotateWebhookSecretResponse:
        row = await self._row(s, p.tenant_id, r.webhook_id, for_update=True)
        if r.etag and r.etag != str(row.revision):
            raise Aborted(f"etag {r.etag!r} does not match the current {row.revision}; re-read and retry",
                          reason="ETAG_MISMATCH", metadata={"current_etag": str(row.revision)})
        secret = r.secret or new_secret()
        row.secret = self.box.seal(secret)
        row.secret_hint = _hint(secret)
        row.revision += 1
        row.updated_at = utcnow()
        await s.flush()
        await self._record(s, p, CR.CHANGE_RECORD_TYPE_WEBHOOK_UPDATED, row, "webhook secret rotated")
        return wpb.RotateWebhookSecretResponse(webhook=to_proto(row), secret=secret)

    async def delete(self, s: AsyncSession, p: Principal, r: wpb.DeleteWebhookRequest) -> wpb.DeleteWebhookResponse:
        row = await self._row(s, p.tenant_id, r.webhook_id, for_update=True)
        d = models.WebhookDelivery
        dropped = (await s.execute(select(func.count()).select_from(d).where(
            d.webhook_id == row.id, d.delivered_at.is_(None)))).scalar_one()
        await s.execute(delete(d).where(d.webhook_id == row.id))
        await self._record(s, p, CR.CHANGE_RECORD_TYPE_WEBHOOK_DELETED, row, f"webhook for {row.url} deleted")
        await s.delete(row)
        return wpb.DeleteWebhookResponse(dropped_deliveries=dropped)

    async def deliveries(self, p: Principal, r: wpb.ListWebhookDeliveriesRequest) -> wpb.ListWebhookDeliveriesResponse:
        size = pagination.page_size(r.page_size)
        filters = {"webhook": r.webhook_id, "pending": r.pending_only}
        after = pagination.decode_token(r.page_token, filters) if r.page_token else None
        if after is not None and not isinstance(after, int):
            after = None
        d = models.WebhookDelivery

        async def read(s: AsyncSession) -> wpb.ListWebhookDeliveriesResponse:
            await self._row(s, p.tenant_id, r.webhook_id)
            q = select(d).where(d.webhook_id == r.webhook_id, d.tenant_id == p.tenant_id)
            if r.pending_only:
                q = q.where(d.delivered_at.is_(None))
            if after is not None:
                q = q.where(d.position < after)
            rows = (await s.execute(q.order_by(d.position.desc()).limit(size + 1))).scalars().all()
            page, more = pagination.split_page(rows, size)
            token = pagination.encode_token(page[-1].position, filters) if more else ""
            return wpb.ListWebhookDeliveriesResponse(deliveries=[_delivery_proto(x) for x in page],
                                                     next_page_token=token)

        return await self.db.read(read)
