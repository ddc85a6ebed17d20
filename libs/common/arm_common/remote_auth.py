"""Authentication for services other than the registry: the caller's key is checked by the
registry (AccessService.Authenticate, over gRPC) and the principal cached for a few seconds, so
a hot path does not pay a registry round trip per call."""

from __future__ import annotations

import time

import grpc

from arm.registry.v1 import access_pb2, access_pb2_grpc
from arm_common.auth import Grant, Principal
from arm_common.errors import Unauthenticated, Unavailable

_CACHE_LIMIT = 10_000
_ACTOR = {1: "OPERATOR", 2: "AGENT", 3: "SYSTEM"}
_SCOPE = {0: "TENANT", 1: "TENANT", 2: "PROJECT", 3: "ENVIRONMENT"}


def principal_from_proto(p: access_pb2.Principal) -> Principal:
    return Principal(
        tenant_id=p.tenant_id, actor_type=_ACTOR.get(p.actor.type, "SYSTEM"), actor_id=p.actor.id,
        api_key_id=p.api_key_id, tenant_active=p.tenant_active, system_tenant=p.system_tenant,
        grants=tuple(Grant(g.permission, _SCOPE.get(g.scope_type, "TENANT"), g.scope_id) for g in p.grants))


class RemoteAuthenticator:
    """Asks the registry who a key belongs to; caches answers (and refusals) for `ttl_s`."""

    def __init__(self, channel: grpc.aio.Channel, ttl_s: float = 5.0) -> None:
        self.stub = access_pb2_grpc.AccessServiceStub(channel)
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | Unauthenticated]] = {}

    async def authenticate(self, api_key: str) -> Principal:
        now = time.monotonic()
        hit = self._cache.get(api_key)
        if hit is None or hit[0] <= now:
            try:
                # wait_for_ready: a registry that is (re)starting gets up to the timeout to come
                # back, instead of the channel's reconnect backoff failing calls at once.
                resp = await self.stub.Authenticate(
                    access_pb2.AuthenticateRequest(), metadata=(("authorization", f"Bearer {api_key}"),),
                    timeout=5, wait_for_ready=True)
                answer: Principal | Unauthenticated = principal_from_proto(resp.principal)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise Unavailable(f"the registry could not authenticate the key: {exc.code().name}",
                                      reason="REGISTRY_UNAVAILABLE") from None
                answer = Unauthenticated(exc.details() or "the API key is not valid", reason="INVALID_API_KEY")
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            hit = (now + self.ttl_s, answer)
            self._cache[api_key] = hit
        if isinstance(hit[1], Unauthenticated):
            # A fresh exception each time: re-raising one object would grow its traceback.
            raise Unauthenticated(hit[1].message, reason=hit[1].reason)
        return hit[1]

    def invalidate(self) -> None:
        self._cache.clear()
