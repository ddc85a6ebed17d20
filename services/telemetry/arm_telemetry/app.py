"""Wiring of telemetry: its component for a gRPC host (servicer, event writer, readers, the
reference resolver and backfills, retention, the spend outbox relay to governance) and its
migrations."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc

from arm.telemetry.v1 import telemetry_pb2_grpc
from arm_common import migrations, tls
from arm_common.config import ConfigError, ServiceConfig, settings
from arm_common.db import Database, open_database
from arm_common.health import DatabaseProbe, PeerProbe, Probe, Readiness
from arm_common.housekeeping import Housekeeping
from arm_common.outbox import OutboxRelay
from arm_common.remote_auth import RemoteAuthenticator
from arm_telemetry.backfill import Backfills
from arm_telemetry.ingest import TOPIC_SPEND, EventWriter
from arm_telemetry.models import IDEMPOTENCY, OUTBOX
from arm_telemetry.queries import EventReader
from arm_telemetry.references import ReferenceChecker, ReferenceResolver
from arm_telemetry.retention import Retention
from arm_telemetry.servicers import TelemetryServicer
from arm_telemetry.spend import SpendReporter

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
SERVICES = ["arm.telemetry.v1.TelemetryService"]


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class TelemetrySettings:
    """Telemetry's own settings, next to the shared ServiceConfig."""

    retention_days: float
    """Events that occurred longer ago are deleted (`ARM_TELEMETRY_RETENTION_DAYS`, default 30)."""
    retention_interval_s: float
    """How often the retention pass runs (`ARM_TELEMETRY_RETENTION_INTERVAL_S`, default 300)."""
    max_pending_events: int
    """Events accepted into memory and not yet committed before ingest answers
    RESOURCE_EXHAUSTED (`ARM_TELEMETRY_MAX_PENDING_EVENTS`, default 50000)."""
    backfill_batch: int
    """Events per backfill transaction (`ARM_TELEMETRY_BACKFILL_BATCH`, default 500)."""
    backfill_pause_s: float
    """Pause between backfill batches, to leave the database to ingest
    (`ARM_TELEMETRY_BACKFILL_PAUSE_S`, default 0)."""
    reference_ttl_s: float
    """How long a resolved legacy agent id is cached (`ARM_TELEMETRY_REFERENCE_TTL_S`, default 60)."""
    unknown_reference_ttl_s: float
    """How long an unknown legacy agent id is cached (`ARM_TELEMETRY_UNKNOWN_REFERENCE_TTL_S`,
    default 5)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TelemetrySettings:
        env = settings(env)  # X_FILE forms too, as for every setting
        return cls(
            retention_days=_number(env, "ARM_TELEMETRY_RETENTION_DAYS", 30.0, 0.001),
            retention_interval_s=_number(env, "ARM_TELEMETRY_RETENTION_INTERVAL_S", 300.0, 0.1),
            max_pending_events=int(_number(env, "ARM_TELEMETRY_MAX_PENDING_EVENTS", 50_000, 1000)),
            backfill_batch=int(_number(env, "ARM_TELEMETRY_BACKFILL_BATCH", 500, 1)),
            backfill_pause_s=_number(env, "ARM_TELEMETRY_BACKFILL_PAUSE_S", 0.0, 0.0),
            reference_ttl_s=_number(env, "ARM_TELEMETRY_REFERENCE_TTL_S", 60.0, 0.0),
            unknown_reference_ttl_s=_number(env, "ARM_TELEMETRY_UNKNOWN_REFERENCE_TTL_S", 5.0, 0.0))


def database(config: ServiceConfig) -> Database:
    return open_database(config.database_url, config.database_schema)


async def migrate(db: Database) -> None:
    await migrations.upgrade(db, MIGRATIONS)


class TelemetryComponent:
    """Telemetry for a gRPC host. The registry (authentication, reference resolution) is
    ARM_REGISTRY_ADDRESS, or the host's own address in the all-in-one server (see `bound`).
    Spend reports go to ARM_GOVERNANCE_ADDRESS; unset, they wait in the outbox."""

    def __init__(self, db: Database, config: ServiceConfig, settings: TelemetrySettings | None = None, *,
                 in_process_registry: bool = False, in_process_governance: bool = False) -> None:
        if not config.registry_address and not in_process_registry:
            raise ConfigError("ARM_REGISTRY_ADDRESS must be set: telemetry authenticates callers through the registry")
        self.db = db
        self.config = config
        self.in_process_governance = in_process_governance
        self.settings = settings or TelemetrySettings.from_env()
        self.retention_period = timedelta(days=self.settings.retention_days)
        self.channel = tls.open_channel(config.registry_address, config.tls) if config.registry_address else None
        self.authenticator = RemoteAuthenticator(self.channel, config.auth_cache_ttl_s) if self.channel else None
        self.reader = EventReader(db)
        self.spend = (SpendReporter(config.governance_address, config.service_api_key, config.tls)
                      if config.governance_address and config.service_api_key else None)
        self.relay = OutboxRelay(db, OUTBOX, TOPIC_SPEND, self.spend, poll_interval_s=config.outbox_poll_s)
        self.writer = EventWriter(db, max_pending=self.settings.max_pending_events,
                                  on_commit=[self.reader.committed, self.relay.notify])
        self.retention = Retention(db, self.retention_period, interval_s=self.settings.retention_interval_s)
        self.housekeeping = Housekeeping(db, OUTBOX, IDEMPOTENCY)
        self.resolver: ReferenceResolver | None = None
        self.backfills: Backfills | None = None
        # Ready while its database and the registry (authentication, references) answer; a
        # registry in this same process is covered by its own database probe.
        probes: list[Probe] = [DatabaseProbe(db)]
        if not in_process_registry:
            probes.append(PeerProbe(f"registry at {config.registry_address}", lambda: self.channel))
        self.readiness = Readiness(probes, config.health_probe_s)

    def bound(self, address: str) -> None:
        """The host's own address: the registry (and governance) when hosted in this process."""
        if self.channel is None:
            self.channel = tls.open_channel(address, self.config.tls)
        if self.in_process_governance and self.spend is None and self.config.service_api_key:
            self.spend = SpendReporter(address, self.config.service_api_key, self.config.tls)
            self.relay.deliver = self.spend

    def attach(self, server: grpc.aio.Server) -> list[str]:
        assert self.channel is not None, "bound() must run before attach() without ARM_REGISTRY_ADDRESS"
        self.resolver = ReferenceResolver(self.channel, self.config.service_api_key,
                                          ttl_s=self.settings.reference_ttl_s,
                                          negative_ttl_s=self.settings.unknown_reference_ttl_s)
        self.backfills = Backfills(self.db, self.resolver, batch_size=self.settings.backfill_batch,
                                   pause_s=self.settings.backfill_pause_s)
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(
            TelemetryServicer(self.db, self.writer, self.reader, self.resolver, self.backfills,
                              self.retention_period,
                              ReferenceChecker(self.channel, self.config.service_api_key)), server)
        return list(SERVICES)

    async def start(self) -> None:
        await migrations.check_at_head(self.db, MIGRATIONS, "telemetry")
        if self.spend is None:
            log.warning("ARM_GOVERNANCE_ADDRESS or ARM_SERVICE_API_KEY unset: COST_TICK spend "
                        "reports wait in telemetry's outbox")
        await self.writer.start()
        await self.relay.start()
        await self.retention.start()
        await self.housekeeping.start()
        assert self.backfills is not None and self.resolver is not None
        await self.resolver.start()
        await self.backfills.resume_all()
        if self.authenticator is not None:
            await self.authenticator.start(self.config.service_api_key)

    async def draining(self) -> None:
        # The agent-change feed is a call that never ends by itself; in the all-in-one server it
        # is served by this very server, whose graceful stop would wait for it.
        if self.resolver is not None:
            await self.resolver.stop()
        if self.authenticator is not None:
            await self.authenticator.stop()

    async def stop(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.stop()
        if self.resolver is not None:
            await self.resolver.stop()
        if self.backfills is not None:
            await self.backfills.stop()
        await self.housekeeping.stop()
        await self.retention.stop()
        await self.relay.stop()
        await self.writer.stop()
        if self.spend is not None:
            await self.spend.close()
        if self.channel is not None:
            await self.channel.close()
