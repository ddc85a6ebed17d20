"""Wiring of governance: its component for a gRPC host (servicers, caches, the decision log, the
outbox relays, the change-notice follower) and its migrations."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from arm.governance.v1 import (
    approvals_pb2_grpc,
    audit_pb2_grpc,
    decision_pb2_grpc,
    deployments_pb2_grpc,
    policy_pb2_grpc,
    webhooks_pb2_grpc,
)
from arm_common import migrations, roles, tls
from arm_common.auth import Authenticator
from arm_common.config import ConfigError, ServiceConfig
from arm_common.db import Database, open_database
from arm_common.event_feed import OpEventForwarder
from arm_common.health import DatabaseProbe, PeerProbe, Probe, Readiness
from arm_common.housekeeping import Housekeeping
from arm_common.notify import ChangeChannel
from arm_common.outbox import TOPIC_CHANGE_RECORD, TOPIC_OP_EVENT, OutboxRelay
from arm_common.remote_auth import RemoteAuthenticator
from arm_common.tasks import cancel_and_wait
from arm_governance.agent_cache import AgentDirectory
from arm_governance.approvals.service import ApprovalStore, ApprovalSweeper
from arm_governance.approvals.servicer import ApprovalServicer
from arm_governance.audit.checkpoints import Checkpoints, load_signing_key
from arm_governance.audit.servicer import AuditServicer
from arm_governance.audit.trail import AuditTrail
from arm_governance.decisions.log import DecisionLog
from arm_governance.decisions.op_events import DerivedOpEvents
from arm_governance.decisions.service import Approvals, Decider, SpendBook
from arm_governance.decisions.servicer import DecisionServicer
from arm_governance.deployments.service import DeploymentStore
from arm_governance.deployments.servicer import DeploymentServicer
from arm_governance.models import IDEMPOTENCY, OUTBOX
from arm_governance.policy.cache import PolicyCache
from arm_governance.policy.servicer import PolicyServicer
from arm_governance.policy.store import PolicyStore, RegistryLookup
from arm_governance.registry_calls import RegistryAgents
from arm_governance.webhooks.delivery import WebhookDispatcher
from arm_governance.webhooks.egress import EgressPolicy
from arm_governance.webhooks.service import TOPIC_NOTIFICATION, WebhookStore, load_secret_box
from arm_governance.webhooks.servicer import WebhookServicer

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
SERVICES = ["arm.governance.v1.PolicyService", "arm.governance.v1.DecisionService",
            "arm.governance.v1.ApprovalService", "arm.governance.v1.DeploymentService",
            "arm.governance.v1.AuditService", "arm.governance.v1.WebhookService"]

RELAY_INTERVAL_S = 0.25  # governance's outbox relays pass at most this often while busy (see below)

# What the application role may do to the audit tables (every other table: full DML). Without
# UPDATE or DELETE, and owning nothing, it can neither edit records nor touch the triggers.
RUNTIME_PRIVILEGES = {"change_records": "SELECT, INSERT", "audit_checkpoints": "SELECT, INSERT",
                      "change_record_heads": "SELECT, INSERT, UPDATE"}


def database(config: ServiceConfig) -> Database:
    return open_database(config.database_url, config.database_schema)


async def migrate(db: Database) -> None:
    await migrations.upgrade(db, MIGRATIONS)


class GovernanceComponent:
    """Governance for a gRPC host. `registry_address` defaults to ARM_REGISTRY_ADDRESS; the
    all-in-one server passes its own address once bound (see `bound`)."""

    def __init__(self, db: Database, config: ServiceConfig, *, in_process_registry: bool = False,
                 op_events: OpEventForwarder | None = None) -> None:
        if not config.registry_address and not in_process_registry:
            raise ConfigError("ARM_REGISTRY_ADDRESS must be set: governance resolves agents through the registry")
        self.db = db
        self.config = config
        self.registry_address = config.registry_address
        self.channel = tls.open_channel(self.registry_address, config.tls) if self.registry_address else None
        self.changes = ChangeChannel(db, "governance")
        self.cache = PolicyCache(db, self.changes)
        self.spend = SpendBook(db)
        self.audit = AuditTrail(db)
        self.checkpoints = Checkpoints(self.audit, load_signing_key(config), config.audit_checkpoint_interval_s)
        # Governance's own change records go to its audit trail. opEvents go to telemetry's
        # IngestEvents when ARM_TELEMETRY_ADDRESS is set (or the all-in-one server passes
        # `op_events`); otherwise they wait in the outbox until it is.
        if op_events is None and config.telemetry_address:
            op_events = OpEventForwarder(config.telemetry_address, config.service_api_key, config.tls)
        self.op_events = op_events
        # Every relay pass costs two transactions whatever its size, and under load every decision
        # batch notifies: at most four passes a second (RELAY_INTERVAL_S) per topic lets a pass
        # carry what many decisions wrote. Change records (APPROVAL_REQUESTED, POLICY_DENIED, ...)
        # go to the local audit trail; opEvents, derived from the decision log (each op_event
        # row names a batch of decisions, decisions/op_events.py), to telemetry.
        forward = DerivedOpEvents(db, op_events) if op_events is not None else None
        # A change record delivered is in the audit trail, in this database: its outbox row goes
        # in the pass that delivered it (keep_delivered=False) rather than being rewritten as
        # delivered and kept for housekeeping; a redelivery after a crash is a DUPLICATE.
        self.relays = [OutboxRelay(db, OUTBOX, TOPIC_CHANGE_RECORD, self.audit.deliver,
                                   poll_interval_s=config.outbox_poll_s, min_interval_s=RELAY_INTERVAL_S,
                                   keep_delivered=False),
                       OutboxRelay(db, OUTBOX, TOPIC_OP_EVENT, forward, poll_interval_s=config.outbox_poll_s,
                                   batch_size=50, min_interval_s=RELAY_INTERVAL_S)]
        # Approval notifications: the relay fans each out to the tenant's webhooks
        # (webhook_deliveries), the dispatcher POSTs those (arm_governance.webhooks.delivery).
        self.secret_box = load_secret_box(config)
        self.egress = EgressPolicy(config.webhook_allowed_networks)
        self.webhooks = WebhookDispatcher(db, self.secret_box, console_url=config.console_url,
                                          egress=self.egress, timeout_s=config.webhook_timeout_s,
                                          max_backoff_s=config.webhook_max_backoff_s,
                                          poll_s=config.outbox_poll_s)
        self.relays.append(OutboxRelay(db, OUTBOX, TOPIC_NOTIFICATION, self.webhooks.fan_out,
                                       poll_interval_s=config.outbox_poll_s, min_interval_s=RELAY_INTERVAL_S))
        self.log = DecisionLog(db, self.relays, gather_s=config.decision_gather_ms / 1000)
        self.housekeeping = Housekeeping(db, OUTBOX, IDEMPOTENCY)
        self.store = PolicyStore(db, self.changes)
        self.approvals = ApprovalStore(db, self.changes)
        self.sweeper = ApprovalSweeper(self.approvals, config.approval_sweep_s)
        self.agents: AgentDirectory | None = None
        self._follower: asyncio.Task[None] | None = None
        self.authenticator = RemoteAuthenticator(self.channel, config.auth_cache_ttl_s) if self.channel else None
        self.stream_authenticator: Authenticator | None = None
        # Ready while its database and the registry (agent resolution, authentication) answer;
        # a registry in this same process is covered by its own database probe.
        probes: list[Probe] = [DatabaseProbe(db)]
        if not in_process_registry:
            probes.append(PeerProbe(f"registry at {self.registry_address}", lambda: self.channel))
        self.readiness = Readiness(probes, config.health_probe_s)

    def bound(self, address: str) -> None:
        if self.channel is None:
            self.registry_address = address
            self.channel = tls.open_channel(address, self.config.tls)

    def attach(self, server: grpc.aio.Server) -> list[str]:
        assert self.channel is not None, "bound() must run before attach() without ARM_REGISTRY_ADDRESS"
        self.agents = AgentDirectory(self.channel, self.config.service_api_key)
        self.decider = Decider(self.agents, self.cache, self.log, self.spend, Approvals(self.db))
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(
            PolicyServicer(self.db, self.store, self.cache, self.agents, RegistryLookup(self.channel)), server)
        decisions = DecisionServicer(self.db, self.decider, self.spend, self.changes)
        # WatchDecisionInputs re-checks its caller's key (the all-in-one server's is the registry's).
        decisions.authenticator = self.stream_authenticator or self.authenticator
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(decisions, server)
        registry = RegistryAgents(self.channel)
        approvals_pb2_grpc.add_ApprovalServiceServicer_to_server(
            ApprovalServicer(self.db, self.approvals, self.agents, registry, self.relays), server)
        deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(
            DeploymentServicer(self.db, DeploymentStore(self.db, self.approvals), registry, self.relays), server)
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(self.audit, self.checkpoints), server)
        webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(
            WebhookServicer(self.db, WebhookStore(self.db, self.secret_box), self.relays, self.egress), server)
        return list(SERVICES)

    async def start(self) -> None:
        await migrations.check_at_head(self.db, MIGRATIONS, "governance")
        await roles.warn_if_privileged(self.db, "change_records")
        await self.changes.start()
        queue = self.changes.subscribe()

        async def follow() -> None:
            while True:
                notice = await queue.get()
                if notice.get("reset"):
                    self.cache.invalidate(None)
                    self.spend.invalidate(None)
                elif "tenant" in notice:
                    self.cache.invalidate(notice["tenant"])
                elif "spend" in notice:
                    self.spend.invalidate(notice["spend"])

        self._follower = asyncio.create_task(follow(), name="governance-notices")
        await self.log.start()
        for relay in self.relays:
            await relay.start()
        await self.webhooks.start()
        await self.housekeeping.start()
        await self.sweeper.start()
        await self.checkpoints.start()
        assert self.agents is not None
        await self.agents.start()
        if self.authenticator is not None:
            await self.authenticator.start(self.config.service_api_key)

    async def draining(self) -> None:
        # The agent-change stream is a call that never ends by itself; in the all-in-one server
        # it is served by this very server, whose graceful stop would wait for it.
        if self.agents:
            await self.agents.stop()
        if self.authenticator is not None:
            await self.authenticator.stop()

    async def stop(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.stop()
        if self.agents:
            await self.agents.stop()
        await self.checkpoints.stop()
        await self.sweeper.stop()
        await self.housekeeping.stop()
        await self.webhooks.stop()
        for relay in self.relays:
            await relay.stop()
        await self.log.stop()
        if self.op_events is not None:
            await self.op_events.close()
        await cancel_and_wait(self._follower)
        await self.changes.stop()
        if self.channel is not None:
            await self.channel.close()
