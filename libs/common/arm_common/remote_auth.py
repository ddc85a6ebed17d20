"""Authentication for services other than the registry: the caller's key is checked by the
registry (AccessService.Authenticate, over gRPC) and the answer cached, so a hot path does not pay
a registry round trip per call. A revoked key, a deactivated operator or tenant, a retired
instance reach the cache through the registry's change feed (WatchAgentChanges, followed with the
service key); a key's expiry is checked against the clock on every call; the TTL is the fallback
when the feed is not connected."""

from __future__ import annotations

import logging

import grpc
from google.rpc import error_details_pb2, status_pb2

from arm.registry.v1 import access_pb2, access_pb2_grpc, compat_pb2, compat_pb2_grpc
from arm_common.agent_feed import AgentChangeFeed
from arm_common.auth import Grant, Principal
from arm_common.auth_cache import PrincipalCache
from arm_common.errors import Unauthenticated, Unavailable

log = logging.getLogger(__name__)
_ACTOR = {1: "OPERATOR", 2: "AGENT", 3: "SYSTEM"}
_SCOPE = {0: "TENANT", 1: "TENANT", 2: "PROJECT", 3: "ENVIRONMENT"}


def principal_from_proto(p: access_pb2.Principal) -> Principal:
    return Principal(
        tenant_id=p.tenant_id, actor_type=_ACTOR.get(p.actor.type, "SYSTEM"), actor_id=p.actor.id,
        api_key_id=p.api_key_id, tenant_active=p.tenant_active, system_tenant=p.system_tenant,
        grants=tuple(Grant(g.permission, _SCOPE.get(g.scope_type, "TENANT"), g.scope_id) for g in p.grants),
        key_expires_at=p.key_expire_time.ToNanoseconds() / 1e9 if p.HasField("key_expire_time") else None,
        grants_expire_at=(p.grants_expire_time.ToNanoseconds() / 1e9
                          if p.HasField("grants_expire_time") else None))


def _reason(exc: grpc.aio.AioRpcError, default: str) -> str:
    """The ErrorInfo reason of a failed call (e.g. API_KEY_REVOKED, TENANT_INACTIVE)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 - a garbled detail only loses the reason
                return default
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason or default
    return default


class RemoteAuthenticator:
    """Asks the registry who a key belongs to; caches answers (and refusals) for `ttl_s` at most,
    and drops them when the registry's change feed says they changed (see `start`)."""

    def __init__(self, channel: grpc.aio.Channel, ttl_s: float = 5.0) -> None:
        self.stub = access_pb2_grpc.AccessServiceStub(channel)
        self.compat = compat_pb2_grpc.CompatServiceStub(channel)
        self.ttl_s = ttl_s
        self._cache = PrincipalCache(ttl_s)
        self.feed = AgentChangeFeed(
            self.compat, apply=self.apply_change, on_lost=self._cache.clear, task_name="watch-auth-changes",
            lost_message="auth change feed lost; cached keys are trusted for the TTL only")

    @property
    def live(self) -> bool:
        return self.feed.live

    async def authenticate(self, api_key: str) -> Principal:
        answer = self._cache.get(api_key)
        if answer is None:
            generation = self._cache.generation
            try:
                # wait_for_ready: a registry that is (re)starting gets up to the timeout to come
                # back, instead of the channel's reconnect backoff failing calls at once.
                resp = await self.stub.Authenticate(
                    access_pb2.AuthenticateRequest(), metadata=(("authorization", f"Bearer {api_key}"),),
                    timeout=5, wait_for_ready=True)
                answer = principal_from_proto(resp.principal)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise Unavailable(f"the registry could not authenticate the key: {exc.code().name}",
                                      reason="REGISTRY_UNAVAILABLE") from None
                answer = Unauthenticated(exc.details() or "the API key is not valid",
                                         reason=_reason(exc, "INVALID_API_KEY"))
            self._cache.put(api_key, answer, generation)
        if isinstance(answer, Unauthenticated):
            # A fresh exception each time: re-raising one object would grow its traceback.
            raise Unauthenticated(answer.message, reason=answer.reason)
        return answer

    def invalidate(self) -> None:
        self._cache.clear()

    def apply_change(self, change: compat_pb2.AgentChange) -> int:
        return self._cache.apply_change(change.kind, change.tenant_id, instance_id=change.instance_id,
                                        api_key_id=change.api_key_id, operator_id=change.operator_id)

    # --- the change feed -------------------------------------------------------------------------

    async def start(self, service_key: str | None) -> None:
        """Follows the registry's change feed with `service_key` (which needs tenants:admin to
        hear every tenant). Without one, only the TTL bounds how long a change takes."""
        if not service_key:
            log.warning("no ARM_SERVICE_API_KEY: a revoked key or deactivated tenant is refused "
                        "here only after the auth cache TTL (%.1f s)", self.ttl_s)
            return
        self.feed.start(service_key)

    async def stop(self) -> None:
        await self.feed.stop()

    async def wait_live(self, timeout_s: float = 10) -> bool:
        """Waits until the change feed is connected."""
        return await self.feed.wait_live(timeout_s)
