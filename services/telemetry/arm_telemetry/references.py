"""Agent references for events that carry only a legacy agent id: resolved through the
registry's ResolveAgentRef over gRPC and cached. Known agents are cached for `ttl_s`; unknown
ones (NOT_FOUND) for a shorter `negative_ttl_s`; the cache holds at most `limit` entries. With a
service key, the registry's WatchAgentChanges feed drops an entry as soon as its instance
changes (a legacy id linked, an instance moved to another version), so the TTLs only bound
staleness while the feed is down. A registry outage resolves nothing (the event is stored as it
came, and the backfill fills it later)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from arm.registry.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    compat_pb2,
    compat_pb2_grpc,
    tenancy_pb2,
    tenancy_pb2_grpc,
)
from arm_common.auth import auth_metadata
from arm_common.tagged_cache import TaggedCache
from arm_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentRefs:
    """What an event gets filled with."""

    project_id: str
    environment_id: str
    template_id: str
    version_id: str
    instance_id: str


class RegistryUnavailable(Exception):
    """The registry could not answer (not: the agent is unknown)."""


class ReferenceResolver:
    def __init__(self, channel: grpc.aio.Channel, service_key: str | None, *, ttl_s: float = 60.0,
                 negative_ttl_s: float = 5.0, limit: int = 50_000) -> None:
        self.stub = compat_pb2_grpc.CompatServiceStub(channel)
        self.service_key = service_key
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.limit = limit
        # (tenant, legacy id) → (expiry, refs); tagged by the instance the refs name.
        self._cache: TaggedCache[tuple[str, str], tuple[float, AgentRefs | None]] = TaggedCache(limit)
        self._generation = 0  # bumped by every invalidation: an answer racing one is not cached
        self._task: asyncio.Task[None] | None = None

    # --- invalidation from the registry's change feed ------------------------------------------

    async def start(self) -> None:
        if self.service_key:
            self._task = asyncio.create_task(self._watch(), name="telemetry-agent-changes")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def invalidate(self, change: compat_pb2.AgentChange) -> None:
        self._generation += 1
        if change.kind == compat_pb2.AGENT_CHANGE_KIND_RESET:
            self._cache.clear()
        elif change.kind == compat_pb2.AGENT_CHANGE_KIND_INSTANCE:
            if change.legacy_agent_id:
                self._cache.drop((change.tenant_id, change.legacy_agent_id))
            self._cache.drop_tagged(("instance", change.tenant_id, change.instance_id))

    async def _watch(self) -> None:
        delay = 0.2
        while True:
            try:
                stream = self.stub.WatchAgentChanges(compat_pb2.WatchAgentChangesRequest(),
                                                     metadata=auth_metadata(self.service_key or "", ""))
                async for msg in stream:
                    self.invalidate(msg.change)
                    delay = 0.2
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("agent change feed lost (%s); cached references expire by TTL", exc.code().name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def resolve(self, tenant_id: str, legacy_agent_id: str, *, caller_key: str = "",
                      use_negative: bool = True) -> AgentRefs | None:
        """None when the registry does not know the legacy id in this tenant. Raises
        RegistryUnavailable when it cannot tell."""
        key = (tenant_id, legacy_agent_id)
        now = time.monotonic()
        _, hit = self._cache.get(key)
        if hit is not None and hit[0] > now and (hit[1] is not None or use_negative):
            return hit[1]
        generation = self._generation
        # The service key acts for the event's tenant; without one, the caller's own key is
        # used (an agent key resolves only itself).
        if self.service_key:
            metadata = auth_metadata(self.service_key, tenant_id)
        elif caller_key:
            metadata = auth_metadata(caller_key, "")
        else:
            raise RegistryUnavailable("no key to ask the registry with (set ARM_SERVICE_API_KEY)")
        try:
            resp = await self.stub.ResolveAgentRef(
                compat_pb2.ResolveAgentRefRequest(legacy_agent_id=legacy_agent_id),
                metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                found = None
            elif exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
                return None  # not ours to know; not cached
            else:
                raise RegistryUnavailable(f"ResolveAgentRef: {exc.code().name}") from None
        else:
            a = resp.agent
            found = AgentRefs(a.project_id, a.environment_id, a.template_id, a.version_id, a.instance_id)
        if generation == self._generation:
            self._remember(key, found, now)
        return found

    def _remember(self, key: tuple[str, str], found: AgentRefs | None, now: float) -> None:
        """Caches an answer until its TTL, filed under the instance it names so a change notice
        for that instance drops it even when the notice does not carry the legacy id."""
        self._cache.put(key, (now + (self.ttl_s if found is not None else self.negative_ttl_s), found),
                        [("instance", key[0], found.instance_id)] if found is not None else [])

    async def resolve_many(self, tenant_id: str, legacy_ids: set[str], *,
                           caller_key: str = "") -> dict[str, AgentRefs]:
        """Resolves each id at most once, concurrently; ids that do not resolve (or cannot be
        resolved now) are left out."""
        ids = sorted(legacy_ids)

        async def one(legacy: str) -> AgentRefs | None:
            try:
                return await self.resolve(tenant_id, legacy, caller_key=caller_key)
            except RegistryUnavailable as exc:
                log.warning("legacy agent %s left unresolved: %s", legacy, exc)
                return None

        found = await asyncio.gather(*(one(i) for i in ids))
        return {i: f for i, f in zip(ids, found, strict=True) if f is not None}


# Event columns that name a registry resource, with the resource kind for NOT_FOUND reasons.
CHECKED_COLUMNS: dict[str, str] = {
    "project_id": "project", "environment_id": "environment", "template_id": "agent_template",
    "version_id": "agent_version", "instance_id": "agent_instance"}


class ReferenceChecker:
    """Whether the registry ids an event names (project, environment, template, version,
    instance) belong to the caller's tenant. Asked of the registry with the service key acting for
    the tenant (else the caller's own key); an id found is remembered for `ttl_s` (ids never move
    between tenants), an id not found is not remembered. Raises RegistryUnavailable when the
    registry cannot tell."""

    def __init__(self, channel: grpc.aio.Channel, service_key: str | None, *, ttl_s: float = 300.0,
                 limit: int = 100_000) -> None:
        self.tenancy = tenancy_pb2_grpc.TenancyServiceStub(channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(channel)
        self.service_key = service_key
        self.ttl_s = ttl_s
        self._known: TaggedCache[tuple[str, str, str], float] = TaggedCache(limit)

    async def _ask(self, column: str, ident: str, metadata: tuple[tuple[str, str], ...]) -> None:
        if column == "project_id":
            await self.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=ident), metadata=metadata, timeout=5)
        elif column == "environment_id":
            await self.tenancy.GetEnvironment(tenancy_pb2.GetEnvironmentRequest(id=ident), metadata=metadata, timeout=5)
        elif column == "template_id":
            await self.agents.GetAgentTemplate(agents_pb2.GetAgentTemplateRequest(id=ident), metadata=metadata, timeout=5)
        elif column == "version_id":
            await self.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=ident), metadata=metadata, timeout=5)
        else:
            await self.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=ident), metadata=metadata, timeout=5)

    async def exists(self, tenant_id: str, column: str, ident: str, caller_key: str) -> bool:
        key = (tenant_id, column, ident)
        _, until = self._known.get(key)
        now = time.monotonic()
        if until is not None and until > now:
            return True
        metadata = (auth_metadata(self.service_key, tenant_id) if self.service_key
                    else auth_metadata(caller_key, ""))
        try:
            await self._ask(column, ident, metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.PERMISSION_DENIED):
                return False  # not in the tenant, or not the caller's to name
            raise RegistryUnavailable(f"checking {column} {ident}: {exc.code().name}") from None
        self._known.put(key, now + self.ttl_s, [("tenant", tenant_id)])
        return True

    async def unknown(self, tenant_id: str, refs: set[tuple[str, str]], caller_key: str) -> set[tuple[str, str]]:
        """The (column, id) pairs of `refs` that are not the tenant's; each asked once, concurrently."""
        ordered = sorted(refs)
        found = await asyncio.gather(*(self.exists(tenant_id, c, i, caller_key) for c, i in ordered))
        return {ref for ref, ok in zip(ordered, found, strict=True) if not ok}
