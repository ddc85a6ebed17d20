"""Registry persistence: every operation runs in one transaction that also writes its change
record to the outbox, so an audit entry exists exactly when the change does."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm_common import pagination
from arm_common.auth import Principal, actor_of, hash_api_key, new_api_key, parse_api_key
from arm_common.canonical import canonical_json
from arm_common.change_records import change_record
from arm_common.db import Database, is_unique_violation
from arm_common.errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument, NotFound
from arm_common.idempotency import run_idempotent
from arm_common.ids import new_id
from arm_common.notify import ChangeChannel
from arm_common.outbox import TOPIC_CHANGE_RECORD, OutboxRelay, enqueue
from arm_common.tables import utcnow
from arm_registry import domain, models
from arm_registry.models import IDEMPOTENCY, OUTBOX

M = TypeVar("M", bound=models.Base)
R = TypeVar("R", bound=Message)
T = TypeVar("T")

CR = common_pb2.ChangeRecordType


class RegistryStore:
    """Data access for the registry. Reads are scoped to a tenant: a row of another tenant is
    indistinguishable from a missing one (NOT_FOUND)."""

    def __init__(self, db: Database, relay: OutboxRelay | None = None,
                 changes: ChangeChannel | None = None) -> None:
        self.db = db
        self.relay = relay
        self.changes = changes

    # --- transactions ------------------------------------------------------------------------

    async def write(self, principal: Principal, method: str, request: Message,
                    response_type: type[R], fn: Callable[[AsyncSession], Awaitable[R]],
                    stored_form: Callable[[R], R] | None = None) -> R:
        """Runs a mutation once per request_id, then wakes the outbox relay."""
        result = await run_idempotent(self.db, IDEMPOTENCY, tenant_id=principal.tenant_id,
                                      method=method, request=request, response_type=response_type,
                                      write=fn, stored_form=stored_form)
        if self.relay is not None:
            self.relay.notify()
        return result

    async def read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await self.db.read(fn)

    # --- helpers -----------------------------------------------------------------------------

    async def get(self, session: AsyncSession, model: type[M], ident: str, tenant_id: str,
                  kind: str, *, for_update: bool = False) -> M:
        query = select(model).where(model.id == ident)  # type: ignore[attr-defined]
        if model is not models.Tenant:
            query = query.where(model.tenant_id == tenant_id)  # type: ignore[attr-defined]
        elif tenant_id:
            query = query.where(models.Tenant.id == tenant_id)
        if for_update:
            query = query.with_for_update()
        row = (await session.execute(query)).scalar_one_or_none()
        if row is None:
            raise NotFound.of(kind, ident)
        return row

    @staticmethod
    def check_etag(row: Any, etag: str) -> None:
        if etag and etag != str(row.revision):
            raise Aborted(f"etag {etag!r} does not match the current {row.revision!s}; re-read and retry",
                          reason="ETAG_MISMATCH", metadata={"current_etag": str(row.revision)})

    @staticmethod
    def apply_present(row: Any, request: Message, *fields: str) -> None:
        """Copies the optional fields an update request sets onto the row."""
        for name in fields:
            if request.HasField(name):
                setattr(row, name, getattr(request, name))

    @staticmethod
    def touch(row: Any) -> None:
        row.updated_at = utcnow()
        row.revision += 1

    async def record(self, session: AsyncSession, principal: Principal, type_: int, *,
                     target_type: str, target_id: str, summary: str,
                     project_id: str = "", template_id: str = "", version_id: str = "",
                     instance_id: str = "", payload: dict[str, Any] | None = None,
                     before: dict[str, Any] | None = None, after: dict[str, Any] | None = None,
                     reason: str = "", tenant_id: str = "") -> None:
        """Writes a change record to the outbox in the caller's transaction."""
        rec = change_record(
            type_, tenant_id=tenant_id or principal.tenant_id, actor=actor_of(principal),
            target_type=target_type, target_id=target_id, project_id=project_id, template_id=template_id,
            version_id=version_id, instance_id=instance_id, summary=summary, payload=payload,
            before=before, after=after, reason=reason, source="registry")
        await enqueue(session, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id=rec.tenant_id,
                      message_id=rec.record_id, message=rec)

    async def agent_changed(self, session: AsyncSession, kind: int, tenant_id: str, *,
                            instance_id: str = "", version_id: str = "",
                            legacy_agent_id: str | None = "", api_key_id: str = "",
                            operator_id: str = "") -> None:
        """Announces (on commit) a change that makes cached agent resolutions or principals
        stale (WatchAgentChanges streams it; every registry process's authenticator follows it)."""
        if self.changes is not None:
            notice: dict[str, Any] = {"k": kind, "t": tenant_id, "i": instance_id,
                                      "v": version_id, "l": legacy_agent_id or ""}
            if api_key_id:
                notice["a"] = api_key_id
            if operator_id:
                notice["o"] = operator_id
            await self.changes.send(session, notice)

    async def page(self, session: AsyncSession, query: Select[Any], id_column: Any, size: int,
                   after: str | None) -> tuple[Sequence[Any], str | None]:
        """Keyset page on the (time-ordered) id; returns rows and the last id when more follow."""
        if after is not None:
            if not isinstance(after, str):
                raise InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                                      violations=[FieldViolation("page_token", "is malformed")])
            query = query.where(id_column > after)
        rows = (await session.execute(query.order_by(id_column).limit(size + 1))).scalars().all()
        page, more = pagination.split_page(rows, size)
        return page, (page[-1].id if more and page else None)

    @staticmethod
    async def flush_unique(session: AsyncSession, what: str, detail: dict[str, str]) -> None:
        """Flushes pending inserts, turning a unique-constraint violation into ALREADY_EXISTS (the
        transaction is rolled back either way)."""
        try:
            await session.flush()
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            raise AlreadyExists(f"{what} already exists: " + ", ".join(
                f"{k}={v!r}" for k, v in detail.items()), reason=f"{what.upper().replace(' ', '_')}_EXISTS",
                metadata=detail) from None

    # --- tenants and roles -------------------------------------------------------------------

    async def create_tenant_rows(self, session: AsyncSession, principal: Principal, *, slug: str,
                                 name: str, description: str, system: bool = False) -> models.Tenant:
        now = utcnow()
        tenant = models.Tenant(id=new_id("tnt"), slug=slug, name=name, description=description,
                               active=True, system=system, created_at=now, updated_at=now,
                               revision=1)
        session.add(tenant)
        await self.flush_unique(session, "tenant", {"slug": slug})
        for role_name, (desc, perms) in domain.BUILT_IN_ROLES.items():
            extra = domain.SYSTEM_ADMIN_EXTRA if system and role_name == "admin" else []
            session.add(models.Role(id=new_id("rol"), tenant_id=tenant.id, name=role_name,
                                    description=desc, permissions=sorted([*perms, *extra]),
                                    built_in=True, created_at=now))
        await self.record(session, principal, CR.CHANGE_RECORD_TYPE_TENANT_CREATED,
                          target_type="tenant", target_id=tenant.id, tenant_id=tenant.id,
                          summary=f"tenant {slug} created", after={"slug": slug, "name": name})
        return tenant

    async def role_by_name(self, session: AsyncSession, tenant_id: str, name: str) -> models.Role:
        row = (await session.execute(select(models.Role).where(
            models.Role.tenant_id == tenant_id, models.Role.name == name))).scalar_one_or_none()
        if row is None:
            raise NotFound.of("role", name)
        return row

    async def create_operator_row(self, session: AsyncSession, principal: Principal, tenant_id: str,
                                  *, email: str, name: str, external_subject: str = "") -> models.Operator:
        now = utcnow()
        op = models.Operator(id=new_id("opr"), tenant_id=tenant_id, email=email.lower(), name=name,
                             external_subject=external_subject, active=True, created_at=now,
                             updated_at=now, revision=1)
        session.add(op)
        await self.flush_unique(session, "operator", {"email": email.lower()})
        await self.record(session, principal, CR.CHANGE_RECORD_TYPE_OPERATOR_CREATED,
                          target_type="operator", target_id=op.id, tenant_id=tenant_id,
                          summary=f"operator {op.email} created", after={"email": op.email})
        return op

    async def assign_role_row(self, session: AsyncSession, principal: Principal, tenant_id: str,
                              operator_id: str, role: models.Role, *, scope_type: str = "TENANT",
                              scope_id: str = "", expires_at: datetime | None = None) -> models.RoleAssignment:
        row = models.RoleAssignment(id=new_id("ras"), tenant_id=tenant_id, operator_id=operator_id,
                                    role_id=role.id, scope_type=scope_type, scope_id=scope_id,
                                    expires_at=expires_at, created_at=utcnow())
        session.add(row)
        await self.record(session, principal, CR.CHANGE_RECORD_TYPE_ROLE_ASSIGNED,
                          target_type="operator", target_id=operator_id, tenant_id=tenant_id,
                          summary=f"role {role.name} assigned",
                          payload={"role_id": role.id, "role": role.name, "scope_type": scope_type,
                                   "scope_id": scope_id})
        return row

    async def create_key_row(self, session: AsyncSession, principal: Principal, tenant_id: str, *,
                             operator_id: str | None = None, instance_id: str | None = None,
                             display_name: str = "", expires_at: datetime | None = None,
                             preset: str | None = None, parent_key_id: str | None = None
                             ) -> tuple[models.ApiKey, str]:
        """A new key; with `preset` (a well-formed key minted by `genkey`), that key."""
        if preset is None:
            key_id, secret, key_hash = new_api_key()
        else:
            key_id, secret, key_hash = parse_api_key(preset), preset, hash_api_key(preset)
        row = models.ApiKey(id=key_id, tenant_id=tenant_id, operator_id=operator_id,
                            instance_id=instance_id, key_hash=key_hash, display_name=display_name,
                            created_at=utcnow(), expires_at=expires_at, revoked_at=None,
                            parent_key_id=parent_key_id)
        session.add(row)
        await self.record(session, principal, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED,
                          target_type="api_key", target_id=key_id, tenant_id=tenant_id,
                          instance_id=instance_id or "",
                          summary="session key created" if parent_key_id else "API key created",
                          payload={"operator_id": operator_id or "", "instance_id": instance_id or "",
                                   **({"parent_key_id": parent_key_id} if parent_key_id else {})})
        return row, secret

    # --- genome ------------------------------------------------------------------------------

    @staticmethod
    def genome_text(genome: dict[str, Any]) -> tuple[str, str]:
        normalized = domain.normalize_genome(genome)
        return canonical_json(normalized), domain.genome_hash(normalized)

    @staticmethod
    def legacy_slug(legacy_agent_id: str) -> str:
        base = re.sub(r"[^a-z0-9-]+", "-", legacy_agent_id.lower()).strip("-")[:40] or "agent"
        # A short hash keeps distinct legacy ids (e.g. "A_1" and "a-1") on distinct slugs.
        from arm_common.canonical import sha256_hex
        return f"legacy-{base}-{sha256_hex(legacy_agent_id)[:8]}"

    @staticmethod
    def legacy_genome(legacy_agent_id: str, name: str) -> dict[str, Any]:
        return {"modelConfig": {"provider": "legacy", "modelId": "mission-control"},
                "promptBundleHash": f"legacy:{legacy_agent_id}",
                "toolManifestHash": f"legacy:{legacy_agent_id}",
                "provenance": {"createdBy": "arm-compat", "source": "mission-control.legacy",
                               "createdAt": 0},
                "legacyAgentId": legacy_agent_id, "name": name}

    @staticmethod
    def genome_dict(text: str) -> dict[str, Any]:
        return json.loads(text)
