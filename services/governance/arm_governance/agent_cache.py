"""Agent resolutions for the decision path: asked of the registry over gRPC, kept in memory, and
dropped when the registry's WatchAgentChanges feed says they changed. While the feed is not
connected nothing is cached, so a stale resolution is never used."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeAlias

import grpc

from arm.registry.v1 import compat_pb2, compat_pb2_grpc
from arm_common.agent_feed import AgentChangeFeed
from arm_common.auth import auth_metadata
from arm_common.errors import PermissionDenied, Unavailable
from arm_common.tagged_cache import TaggedCache

log = logging.getLogger(__name__)
Resolved: TypeAlias = compat_pb2.ResolvedAgent
_LIMIT = 100_000


class ResolutionCache:
    """Resolutions by (tenant, ref kind, ref), None for an agent the registry does not know, and
    which of them a registry change notice makes stale. Entries are tagged by tenant, instance
    and version, so a notice costs what it drops, not a scan of every cached agent."""

    def __init__(self, limit: int = _LIMIT) -> None:
        self._cache: TaggedCache[tuple[str, str, str], Resolved | None] = TaggedCache(limit)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: tuple[str, str, str]) -> tuple[bool, Resolved | None]:
        return self._cache.get(key)

    def put(self, key: tuple[str, str, str], found: Resolved | None) -> None:
        tenant = key[0]
        tags: list[tuple[str, ...]] = [("tenant", tenant)]
        if found is not None:
            tags += [("instance", tenant, found.instance_id), ("version", tenant, found.version_id)]
        self._cache.put(key, found, tags)

    def invalidate(self, change: compat_pb2.AgentChange) -> None:
        """Drops what `change` may have made stale: the whole tenant for a tenant change; else
        the refs it names, every ref resolving to its instance, and for a version change every
        ref resolving to that version."""
        kind, tenant = change.kind, change.tenant_id
        if kind == compat_pb2.AGENT_CHANGE_KIND_RESET:
            self._cache.clear()
        elif kind == compat_pb2.AGENT_CHANGE_KIND_TENANT:
            self._cache.drop_tagged(("tenant", tenant))
        else:
            self._cache.drop((tenant, "instance_id", change.instance_id))
            if change.legacy_agent_id:
                self._cache.drop((tenant, "legacy_agent_id", change.legacy_agent_id))
            tags = [("instance", tenant, change.instance_id)]
            if kind == compat_pb2.AGENT_CHANGE_KIND_VERSION:
                tags.append(("version", tenant, change.version_id))
            self._cache.drop_tagged(*tags)


class AgentDirectory:
    def __init__(self, channel: grpc.aio.Channel, service_key: str | None) -> None:
        self.stub = compat_pb2_grpc.CompatServiceStub(channel)
        self.service_key = service_key
        self._cache = ResolutionCache()
        self._generation = 0  # bumped by every invalidation; guards against caching stale answers
        self.on_change: list[Callable[[compat_pb2.AgentChange], None]] = []
        self.feed = AgentChangeFeed(
            self.stub, apply=self._invalidate, task_name="watch-agent-changes",
            on_lost=lambda: self._invalidate(compat_pb2.AgentChange(kind=compat_pb2.AGENT_CHANGE_KIND_RESET)),
            lost_message="agent change feed lost; resolving without cache")

    @property
    def live(self) -> bool:
        return self.feed.live

    async def resolve(self, api_key: str, tenant_id: str, kind: str, ref: str) -> Resolved | None:
        """kind: instance_id or legacy_agent_id. None means the registry does not know the agent
        (in the caller's tenant)."""
        key = (tenant_id, kind, ref)
        if self.live:
            hit, cached = self._cache.get(key)
            if hit:
                return cached
        generation = self._generation
        try:
            resp = await self.stub.ResolveAgentRef(
                compat_pb2.ResolveAgentRefRequest(**{kind: ref}),
                metadata=auth_metadata(api_key), timeout=5)
            found: Resolved | None = resp.agent
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                found = None
            elif exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise PermissionDenied(exc.details() or "not allowed to resolve this agent",
                                       reason="AGENT_NOT_ACCESSIBLE") from None
            else:
                raise Unavailable(f"the registry could not resolve the agent: {exc.code().name}",
                                  reason="REGISTRY_UNAVAILABLE") from None
        if self.live and generation == self._generation:
            self._cache.put(key, found)
        return found

    def _invalidate(self, change: compat_pb2.AgentChange) -> None:
        self._generation += 1
        self._cache.invalidate(change)
        for callback in self.on_change:
            callback(change)

    async def start(self) -> None:
        if not self.service_key:
            log.warning("no ARM_SERVICE_API_KEY: agent resolutions are not cached (one registry "
                        "call per decision)")
            return
        self.feed.start(self.service_key)

    async def stop(self) -> None:
        await self.feed.stop()

    async def wait_live(self, timeout_s: float = 10) -> bool:
        """Waits until the change feed is connected (resolutions are cached from then on)."""
        return await self.feed.wait_live(timeout_s)
