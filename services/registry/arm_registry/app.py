"""Wiring of the registry: its component for a gRPC host, migrations, and the bootstrap that
creates the system tenant with its first admin and key."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, audit_pb2_grpc
from arm.registry.v1 import access_pb2_grpc, agents_pb2_grpc, compat_pb2_grpc, tenancy_pb2_grpc
from arm_common import migrations, tls
from arm_common.auth import Principal, hash_api_key, new_api_key, parse_api_key
from arm_common.chain import raise_on_rejected
from arm_common.config import ConfigError, ServiceConfig
from arm_common.db import Database, open_database
from arm_common.health import DatabaseProbe, Readiness
from arm_common.housekeeping import Housekeeping
from arm_common.notify import ChangeChannel
from arm_common.outbox import TOPIC_CHANGE_RECORD, OutboxMessage, OutboxRelay
from arm_common.tasks import cancel_and_wait
from arm_registry import models
from arm_registry.access import Access
from arm_registry.agents import Agents
from arm_registry.authn import LocalAuthenticator
from arm_registry.compat import Compat
from arm_registry.governance import Governance
from arm_registry.models import IDEMPOTENCY, OUTBOX
from arm_registry.servicers import AccessServicer, AgentServicer, CompatServicer, TenancyServicer
from arm_registry.store import RegistryStore
from arm_registry.tenancy import Tenancy

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
SYSTEM = Principal(tenant_id="", actor_type="SYSTEM", actor_id="arm-bootstrap", api_key_id="")


def database(config: ServiceConfig) -> Database:
    return open_database(config.database_url, config.database_schema)


async def migrate(db: Database) -> None:
    await migrations.upgrade(db, MIGRATIONS)


class RegistryComponent:
    """The registry's servicers, authenticator and change-record outbox relay. Governance is
    asked over gRPC at ARM_GOVERNANCE_ADDRESS, or, with in_process_governance (the all-in-one
    server), at this host's own address once bound."""

    def __init__(self, db: Database, config: ServiceConfig, *, in_process_governance: bool = False) -> None:
        self.db = db
        self.in_process_governance = in_process_governance
        self.config = config
        self.governance = Governance(config.governance_address, config.tls)
        # Change records go to governance's audit trail (ARM_GOVERNANCE_ADDRESS) on a channel of
        # their own, with the service key; without one they wait in the outbox, nothing is dropped.
        self.relay = OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, deliver=None,
                                 poll_interval_s=config.outbox_poll_s)
        self.audit_channel: grpc.aio.Channel | None = None
        self._started = False
        self._auth_follower: asyncio.Task[None] | None = None
        self.changes = ChangeChannel(db, "registry_agents")
        self.store = RegistryStore(db, self.relay, self.changes)
        self.authenticator = LocalAuthenticator(db, config.auth_cache_ttl_s)
        self.housekeeping = Housekeeping(db, OUTBOX, IDEMPOTENCY)
        self.readiness = Readiness([DatabaseProbe(db)], config.health_probe_s)

    def bound(self, address: str) -> None:
        """In one process with governance (the all-in-one server) its address is our own."""
        if self.in_process_governance:
            if self.governance.channel is None:
                self.governance.connect(address)
            self._deliver_to(address)

    def attach(self, server: grpc.aio.Server) -> list[str]:
        agents = Agents(self.store, self.config.compat_mode, self.authenticator, self.governance)
        tenancy_pb2_grpc.add_TenancyServiceServicer_to_server(TenancyServicer(Tenancy(self.store, self.authenticator)), server)
        access_pb2_grpc.add_AccessServiceServicer_to_server(
            AccessServicer(Access(self.store, self.authenticator)), server)
        agents_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(agents), server)
        compat_pb2_grpc.add_CompatServiceServicer_to_server(
            CompatServicer(Compat(self.store, agents, self.config.compat_mode), self.store), server)
        return ["arm.registry.v1.TenancyService", "arm.registry.v1.AccessService",
                "arm.registry.v1.AgentService", "arm.registry.v1.CompatService"]

    def _deliver_to(self, address: str, api_key: str | None = None) -> None:
        """Makes the outbox relay deliver change records to governance's audit trail."""
        api_key = api_key or self.config.service_api_key
        if not api_key:
            log.warning("ARM_SERVICE_API_KEY is not set: change records wait in the outbox")
            return
        self.audit_channel = tls.open_channel(address, self.config.tls)
        audit = audit_pb2_grpc.AuditServiceStub(self.audit_channel)
        auth = (("authorization", f"Bearer {api_key}"),)

        async def deliver(messages: Sequence[OutboxMessage]) -> None:
            request = audit_pb2.AppendChangeRecordsRequest(
                records=[common_pb2.ChangeRecord.FromString(m.payload) for m in messages])
            response = await audit.AppendChangeRecords(request, timeout=30, metadata=auth)
            raise_on_rejected(response.results)

        self.relay.deliver = deliver

    async def deliver_change_records_to(self, address: str, api_key: str) -> None:
        """Starts delivering change records to governance at `address` (late wiring, tests);
        the registry's own questions to governance are not affected."""
        self._deliver_to(address, api_key)
        if self._started:
            await self.relay.start()

    async def start(self) -> None:
        await migrations.check_at_head(self.db, MIGRATIONS, "registry")
        await provision_keys(self.store, self.config)
        if self.config.governance_address and self.audit_channel is None:
            self._deliver_to(self.config.governance_address)
        await self.changes.start()
        queue = self.changes.subscribe()

        async def follow() -> None:
            # Changes made by other registry processes (on PostgreSQL) reach this one's auth cache.
            while True:
                self.authenticator.apply_notice(await queue.get())

        self._auth_follower = asyncio.create_task(follow(), name="registry-auth-notices")
        await self.relay.start()
        await self.housekeeping.start()
        self._started = True

    async def stop(self) -> None:
        await self.housekeeping.stop()
        await self.relay.stop()
        await cancel_and_wait(self._auth_follower)
        await self.changes.stop()
        await self.governance.close()
        if self.audit_channel is not None:
            await self.audit_channel.close()


@dataclass(frozen=True)
class Bootstrap:
    """The system tenant's first admin; `api_key` is set only when a key was created now."""

    tenant_id: str
    operator_id: str
    api_key: str | None


async def bootstrap(store: RegistryStore, *, new_key_if_exists: bool = False) -> Bootstrap:
    """Creates the system tenant `default`, its admin operator and an admin API key, once.
    With new_key_if_exists, an existing system admin gets a fresh key (for a lost dev key)."""

    async def run(s):  # type: ignore[no-untyped-def]
        tenant = (await s.execute(select(models.Tenant).where(models.Tenant.system.is_(True)))).scalar_one_or_none()
        if tenant is not None:
            op = (await s.execute(select(models.Operator).where(
                models.Operator.tenant_id == tenant.id).order_by(models.Operator.id).limit(1))).scalar_one()
            key = None
            if new_key_if_exists:
                _, key = await store.create_key_row(s, SYSTEM, tenant.id, operator_id=op.id,
                                                    display_name="dev admin key")
            return Bootstrap(tenant.id, op.id, key)
        tenant = await store.create_tenant_rows(s, SYSTEM, slug="default", name="Default tenant",
                                                description="System tenant created at bootstrap",
                                                system=True)
        op = await store.create_operator_row(s, SYSTEM, tenant.id, email="admin@localhost",
                                             name="Administrator")
        await store.assign_role_row(s, SYSTEM, tenant.id, op.id,
                                    await store.role_by_name(s, tenant.id, "admin"))
        _, key = await store.create_key_row(s, SYSTEM, tenant.id, operator_id=op.id,
                                            display_name="bootstrap admin key")
        return Bootstrap(tenant.id, op.id, key)

    return await store.db.run(run)


def genkey() -> str:
    """A fresh API key string (`python -m arm_registry genkey`), for ARM_BOOTSTRAP_ADMIN_KEY_FILE
    or ARM_SERVICE_API_KEY_FILE; nothing is stored until a registry provisions it."""
    return new_api_key()[1]


_PRESET_KEY_RE = re.compile(r"^arm_key_[0-9a-f]{32}_[A-Za-z0-9_-]{32,}$")


async def _system_admin(store: RegistryStore, s):  # type: ignore[no-untyped-def]
    """The system tenant and its first operator, created (as `bootstrap` does) if missing."""
    tenant = (await s.execute(select(models.Tenant).where(models.Tenant.system.is_(True)))).scalar_one_or_none()
    if tenant is not None:
        op = (await s.execute(select(models.Operator).where(
            models.Operator.tenant_id == tenant.id).order_by(models.Operator.id).limit(1))).scalar_one()
        return tenant, op
    tenant = await store.create_tenant_rows(s, SYSTEM, slug="default", name="Default tenant",
                                            description="System tenant created at bootstrap", system=True)
    op = await store.create_operator_row(s, SYSTEM, tenant.id, email="admin@localhost", name="Administrator")
    await store.assign_role_row(s, SYSTEM, tenant.id, op.id, await store.role_by_name(s, tenant.id, "admin"))
    return tenant, op


async def provision_keys(store: RegistryStore, config: ServiceConfig) -> list[str]:
    """Makes ARM_BOOTSTRAP_ADMIN_KEY and ARM_SERVICE_API_KEY (when set) admin keys of the system
    tenant, creating the tenant and its admin on a first start; only their hashes are stored.
    Idempotent: a key already there is left alone (a revoked one stays revoked). Returns the
    variables whose key was created now. A malformed key, or a key id taken with another secret,
    stops the start with a message naming the variable, never the key."""
    wanted = [(name, key) for name, key in (("ARM_BOOTSTRAP_ADMIN_KEY", config.bootstrap_admin_key),
                                             ("ARM_SERVICE_API_KEY", config.service_api_key)) if key]
    for name, key in wanted:
        if not _PRESET_KEY_RE.match(key):
            raise ConfigError(f"{name} is not a key minted by `python -m arm_registry genkey`")
    if not wanted:
        return []

    async def run(s):  # type: ignore[no-untyped-def]
        created = []
        op = None
        for name, key in wanted:
            key_id = parse_api_key(key)
            row = await s.get(models.ApiKey, key_id)
            if row is not None:
                if not hmac.compare_digest(row.key_hash, hash_api_key(key)):
                    raise ConfigError(f"{name}: key id {key_id} already exists with another secret; "
                                      "mint a new key with `python -m arm_registry genkey`")
                owner = await s.get(models.Tenant, row.tenant_id)
                if owner is None or not owner.system:
                    raise ConfigError(f"{name}: key {key_id} is not a system-tenant key")
                if row.revoked_at is not None:
                    log.warning("%s: key %s was revoked; it is not restored", name, key_id)
                continue
            if op is None:
                tenant, op = await _system_admin(store, s)
            await store.create_key_row(s, SYSTEM, tenant.id, operator_id=op.id, preset=key,
                                       display_name=f"{name} (provisioned at start)")
            created.append(name)
        return created

    for attempt in range(2):
        try:
            created = await store.db.run(run)
            break
        except IntegrityError:  # another replica provisioned the same keys at the same moment
            if attempt:
                raise
    for name in created:
        log.info("%s provisioned as a system-tenant admin key", name)
    return created
