"""Delivering notifications to webhooks, at least once, each webhook on its own.

1. Fan-out: the outbox relay of topic `approval_notification` hands each committed
   `ApprovalNotification` to `WebhookDispatcher.fan_out`, which writes one `webhook_deliveries`
   row per webhook of the tenant subscribed to its event type. A delivery's id is derived from the
   event and the webhook, so a message relayed twice (a crash before the relay marked it) adds
   nothing; the outbox message is marked delivered only after the rows are committed.
2. Dispatch: a worker per webhook with due deliveries POSTs them oldest first (so a webhook sees
   `requested` before `decided`), signed with the webhook's secret. Before each POST the worker
   leases the row (moves its next attempt past the timeout, a compare-and-set), so replicas never
   send the same delivery at once and a process killed mid-POST leaves it due again after the
   lease. A 2xx marks it delivered; anything else (an error status, a redirect, no answer within
   ARM_WEBHOOK_TIMEOUT_S) schedules a retry with exponential backoff (1 s doubling up to
   ARM_WEBHOOK_MAX_BACKOFF_S, jittered) and lets the webhook's later deliveries wait behind it.
   Workers run concurrently (at most MAX_WORKERS, MAX_WORKERS_PER_TENANT per tenant), so a slow
   or failing receiver holds only its own worker, never another webhook's or tenant's.

Receivers deduplicate on X-ARM-Delivery: a crash after the receiver answered 2xx but before the
row was marked sends that delivery again. Delivered rows are deleted after KEEP_DELIVERED."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import httpx
from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import webhooks_pb2 as wpb
from arm_common.db import Database, rowcount
from arm_common.errors import DatabaseUnavailable
from arm_common.outbox import OutboxMessage
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait
from arm_governance import models
from arm_governance.webhooks.egress import EgressPolicy
from arm_governance.webhooks.service import EVENT_NAMES, SecretBox, payload, signature_header

log = logging.getLogger(__name__)
MAX_WORKERS = 64
MAX_WORKERS_PER_TENANT = 4
KEEP_DELIVERED = timedelta(days=7)  # then delivered rows are deleted, in bounded batches
PRUNE_EVERY_S = 600.0
PRUNE_BATCH = 1000
USER_AGENT = "ARM-Webhooks/1"


def delivery_id(event_id: str, webhook_id: str) -> str:
    return "whd_" + hashlib.sha256(f"{event_id}|{webhook_id}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Claimed:
    position: int
    delivery_id: str
    webhook_id: str
    event_type: int
    body: bytes
    url: str
    secret: str
    attempts: int


class WebhookDispatcher:
    def __init__(self, db: Database, box: SecretBox, *, console_url: str, egress: EgressPolicy | None = None,
                 timeout_s: float = 10.0, max_backoff_s: float = 600.0, poll_s: float = 1.0) -> None:
        self.db = db
        self.egress = egress or EgressPolicy()
        self.box = box
        self.console_url = console_url
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.poll_s = poll_s
        self.lease = timedelta(seconds=2 * timeout_s + 5)
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._per_tenant: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._stopping = False

    # --- fan-out (the outbox relay's deliverer) ---------------------------------------------------

    async def fan_out(self, messages: Sequence[OutboxMessage]) -> None:
        notes = [wpb.ApprovalNotification.FromString(m.payload) for m in messages]

        async def write(s: AsyncSession) -> int:
            w, d = models.Webhook, models.WebhookDelivery
            tenants = sorted({n.approval.tenant_id for n in notes})
            hooks = (await s.execute(select(w.id, w.tenant_id, w.event_types)
                                     .where(w.tenant_id.in_(tenants)))).all()
            rows = []
            now = utcnow()
            for n in notes:
                name = wpb.WebhookEventType.Name(n.event_type)
                for hook in hooks:
                    if hook.tenant_id == n.approval.tenant_id and name in hook.event_types:
                        did = delivery_id(n.event_id, hook.id)
                        rows.append(dict(
                            id=did, tenant_id=hook.tenant_id, webhook_id=hook.id, event_id=n.event_id,
                            event_type=int(n.event_type), approval_id=n.approval.approval_id,
                            body=payload(n, delivery_id=did, webhook_id=hook.id, console_url=self.console_url),
                            created_at=now, attempts=0, next_attempt_at=now, delivered_at=None,
                            last_status=0, last_error=""))
            if not rows:
                return 0
            existing = set((await s.execute(select(d.id).where(d.id.in_([r["id"] for r in rows])))).scalars())
            fresh = [r for r in rows if r["id"] not in existing]
            if fresh:
                await s.execute(insert(models.WebhookDelivery), fresh)
            return len(fresh)

        if await self.db.run(write):
            self.notify()

    # --- dispatch ---------------------------------------------------------------------------------

    def notify(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), follow_redirects=False,
                                         transport=self.egress.transport(),
                                         headers={"user-agent": USER_AGENT})
        self._task = asyncio.create_task(self._loop(), name="webhook-dispatcher")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._task)
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        pruned_at = loop.time()
        while not self._stopping:
            self._wake.clear()
            try:
                for webhook_id, tenant_id in await self.db.read(self._due):
                    self._spawn(webhook_id, tenant_id)
                if loop.time() - pruned_at >= PRUNE_EVERY_S:
                    pruned_at = loop.time()
                    await self.prune()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable:
                pass  # said once by the database's outage log
            except Exception:  # noqa: BLE001 - keep dispatching through outages
                log.exception("webhook dispatch pass failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    async def _due(self, s: AsyncSession) -> list[tuple[str, str]]:
        """Webhooks with a delivery due now, the longest waiting first."""
        d = models.WebhookDelivery
        rows = (await s.execute(
            select(d.webhook_id, d.tenant_id).where(and_(d.delivered_at.is_(None), d.next_attempt_at <= utcnow()))
            .group_by(d.webhook_id, d.tenant_id).order_by(func.min(d.position)).limit(4 * MAX_WORKERS))).all()
        return [(r.webhook_id, r.tenant_id) for r in rows]

    async def prune(self, older_than: timedelta = KEEP_DELIVERED) -> int:
        """Deletes delivered rows older than `older_than`, a batch per transaction; returns how many."""
        d = models.WebhookDelivery
        total = 0
        cutoff = utcnow() - older_than

        async def one(s: AsyncSession) -> int:
            batch = select(d.position).where(d.delivered_at.is_not(None), d.delivered_at < cutoff).limit(PRUNE_BATCH)
            result = await s.execute(delete(d).where(d.position.in_(batch.scalar_subquery()))
                                     .execution_options(synchronize_session=False))
            return rowcount(result)

        while True:
            n = await self.db.run(one)
            total += n
            if n < PRUNE_BATCH:
                return total

    def _spawn(self, webhook_id: str, tenant_id: str) -> None:
        if (webhook_id in self._workers or len(self._workers) >= MAX_WORKERS
                or self._per_tenant[tenant_id] >= MAX_WORKERS_PER_TENANT):
            return
        self._per_tenant[tenant_id] += 1
        task = asyncio.create_task(self._work(webhook_id), name=f"webhook-{webhook_id}")
        self._workers[webhook_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._workers.pop(webhook_id, None)
            self._per_tenant[tenant_id] -= 1
            if self._per_tenant[tenant_id] <= 0:
                del self._per_tenant[tenant_id]
            if not self._stopping:
                self._wake.set()  # a freed slot may start a waiting webhook now

        task.add_done_callback(done)

    async def _work(self, webhook_id: str) -> None:
        """Sends the webhook's due deliveries in order; returns at the first failure (its retry
        waits out the backoff) or when none is due."""
        try:
            while not self._stopping:
                claimed = await self.db.run(functools.partial(self._claim, webhook_id=webhook_id))
                if claimed is None:
                    return
                status, error = await self._post(claimed)
                ok = 200 <= status < 300
                await self.db.run(functools.partial(self._mark, c=claimed, status=status, error=error, ok=ok))
                if not ok:
                    return
        except asyncio.CancelledError:
            raise
        except DatabaseUnavailable:
            pass
        except Exception:  # noqa: BLE001 - the lease lapses and the delivery is retried
            log.exception("webhook %s: delivery pass failed", webhook_id)

    async def _claim(self, s: AsyncSession, webhook_id: str) -> _Claimed | None:
        d = models.WebhookDelivery
        head = (await s.execute(select(d).where(d.webhook_id == webhook_id, d.delivered_at.is_(None))
                                .order_by(d.position).limit(1))).scalar_one_or_none()
        now = utcnow()
        if head is None or head.next_attempt_at > now:
            return None
        hook = (await s.execute(select(models.Webhook).where(models.Webhook.id == webhook_id))).scalar_one_or_none()
        if hook is None:  # deleted meanwhile (its deliveries go with it)
            return None
        leased = await s.execute(
            update(d).where(d.position == head.position, d.delivered_at.is_(None),
                            d.next_attempt_at == head.next_attempt_at)
            .values(next_attempt_at=now + self.lease).execution_options(synchronize_session=False))
        if not rowcount(leased):  # another replica took it
            return None
        claimed = _Claimed(head.position, head.id, webhook_id, head.event_type, head.body, hook.url, "",
                           head.attempts)
        try:
            return dataclasses.replace(claimed, secret=self.box.open(hook.secret))
        except ValueError as exc:  # cannot sign: a failed attempt that says why, retried later
            await self._mark(s, claimed, 0, str(exc), False)
            return None

    async def _post(self, c: _Claimed) -> tuple[int, str]:
        """(HTTP status or 0, error text); the response body is not read."""
        assert self._client is not None
        headers = {"content-type": "application/json", "x-arm-delivery": c.delivery_id,
                   "x-arm-event": EVENT_NAMES.get(c.event_type, "approval.changed"),
                   "x-arm-webhook-id": c.webhook_id, "x-arm-signature": signature_header(c.secret, c.body)}
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client.stream("POST", c.url, content=c.body, headers=headers) as resp:
                    status = resp.status_code
        except TimeoutError:
            return 0, f"no answer within {self.timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure to get an answer is a failed attempt
            return 0, f"{type(exc).__name__}: {exc}"[:500]
        return status, "" if 200 <= status < 300 else f"HTTP {status}"

    async def _mark(self, s: AsyncSession, c: _Claimed, status: int, error: str, ok: bool) -> None:
        d = models.WebhookDelivery
        now = utcnow()
        attempts = c.attempts + 1
        if ok:
            values = dict(delivered_at=now, attempts=attempts, last_status=status, last_error="")
        else:
            delay = min(self.max_backoff_s, 2.0 ** (attempts - 1)) * random.uniform(0.5, 1.0)
            values = dict(attempts=attempts, last_status=status, last_error=error,
                          next_attempt_at=now + timedelta(seconds=delay))
            if attempts == 1 or attempts % 10 == 0:
                log.warning("webhook %s: delivery %s failed (attempt %d): %s; retrying with backoff",
                            c.webhook_id, c.delivery_id, attempts, error)
        await s.execute(update(d).where(d.position == c.position, d.delivered_at.is_(None)).values(**values)
                        .execution_options(synchronize_session=False))
