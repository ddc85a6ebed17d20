"""Session keys (CreateSessionKey, RevokeCallerKey): what the web console signs in with instead
of keeping an operator's own key. Any operator makes one of itself, without a permission: the
same operator and roles, expiring after its ttl and never after the key it was made from;
revoking that key revokes it (also one made from a session key); the holder revokes it by
calling with it. Agent keys cannot make one; a bad ttl is INVALID_ARGUMENT on `ttl`."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import duration_pb2

from arm.registry.v1 import access_pb2
from arm_client import ArmClient
from tests.conftest import RegistryServer, TenantContext
from tests.helpers import approved_version, expect_failure, operator_key
from tests.registry.test_lifecycles import records_for


def ttl(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


async def principal(registry: RegistryServer, key: str) -> access_pb2.Principal:
    async with ArmClient(registry.address, key) as client:
        return (await client.access.Authenticate(access_pb2.AuthenticateRequest())).principal


async def refused(registry: RegistryServer, key: str) -> None:
    async with ArmClient(registry.address, key) as client:
        await expect_failure(client.access.Authenticate(access_pb2.AuthenticateRequest()),
                             grpc.StatusCode.UNAUTHENTICATED)


async def test_an_operator_makes_a_session_key_of_itself(registry: RegistryServer, tenant: TenantContext) -> None:
    auditor_id, key = await operator_key(tenant.admin, "auditor")  # no operators:admin
    parent = await principal(registry, key)
    async with ArmClient(registry.address, key) as auditor:
        request = access_pb2.CreateSessionKeyRequest(ttl=ttl(3600), display_name="console session",
                                                     request_id=secrets.token_hex(8))
        made = await auditor.access.CreateSessionKey(request)
        replay = await auditor.access.CreateSessionKey(request)
    assert made.secret and made.api_key.operator_id == auditor_id and not made.api_key.instance_id
    assert made.api_key.parent_key_id == parent.api_key_id != made.api_key.id
    assert replay.api_key == made.api_key and not replay.secret  # the secret is shown once
    expires = made.api_key.expire_time.ToDatetime(tzinfo=UTC)
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    session = await principal(registry, made.secret)
    assert session.actor == parent.actor and list(session.grants) == list(parent.grants)
    assert session.api_key_id == made.api_key.id
    listed = (await tenant.admin.access.ListApiKeys(access_pb2.ListApiKeysRequest(operator_id=auditor_id))).api_keys
    assert {k.id: k.parent_key_id for k in listed} == {parent.api_key_id: "", made.api_key.id: parent.api_key_id}
    # The audit trail tells a sign-in's key from an API key an admin made.
    made_record, = await records_for(registry, tenant.tenant.id, made.api_key.id)
    assert made_record.summary == "session key created"
    assert made_record.payload["parent_key_id"] == parent.api_key_id
    parent_record, = await records_for(registry, tenant.tenant.id, parent.api_key_id)
    assert parent_record.summary == "API key created"


async def test_a_session_key_never_outlives_its_parent(registry: RegistryServer, tenant: TenantContext) -> None:
    op_id, _ = await operator_key(tenant.admin)
    soon = datetime.now(UTC) + timedelta(minutes=10)
    request = access_pb2.CreateApiKeyRequest(operator_id=op_id)
    request.expire_time.FromDatetime(soon)
    parent = await tenant.admin.access.CreateApiKey(request)
    async with ArmClient(registry.address, parent.secret) as client:
        made = await client.access.CreateSessionKey(access_pb2.CreateSessionKeyRequest(ttl=ttl(7 * 86400)))
    assert made.api_key.expire_time == parent.api_key.expire_time


async def test_revoking_the_parent_revokes_its_session_keys(registry: RegistryServer, tenant: TenantContext) -> None:
    op_id, key = await operator_key(tenant.admin, "auditor")
    parent_id = (await principal(registry, key)).api_key_id
    async with ArmClient(registry.address, key) as client:
        child = await client.access.CreateSessionKey(access_pb2.CreateSessionKeyRequest(ttl=ttl(3600)))
    async with ArmClient(registry.address, child.secret) as client:  # made from a session key
        grandchild = await client.access.CreateSessionKey(access_pb2.CreateSessionKeyRequest(ttl=ttl(3600)))
    assert grandchild.api_key.parent_key_id == parent_id  # the root: one revocation reaches both
    _, other_key = await operator_key(tenant.admin, "auditor")
    async with ArmClient(registry.address, other_key) as client:
        unrelated = await client.access.CreateSessionKey(access_pb2.CreateSessionKeyRequest(ttl=ttl(3600)))
    revoked = await tenant.admin.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(id=parent_id))
    assert revoked.api_key.revoke_time.seconds
    for secret in (key, child.secret, grandchild.secret):
        await refused(registry, secret)
    assert (await principal(registry, unrelated.secret)).actor.id != op_id  # another operator's: untouched
    keys = {k.id: k for k in (await tenant.admin.access.ListApiKeys(
        access_pb2.ListApiKeysRequest(operator_id=op_id))).api_keys}
    assert all(k.revoke_time.seconds for k in keys.values()) and len(keys) == 3


async def test_the_holder_revokes_the_key_it_calls_with(registry: RegistryServer, tenant: TenantContext) -> None:
    _, key = await operator_key(tenant.admin, "auditor")
    async with ArmClient(registry.address, key) as client:
        made = await client.access.CreateSessionKey(access_pb2.CreateSessionKeyRequest(ttl=ttl(3600)))
    async with ArmClient(registry.address, made.secret) as session:
        gone = await session.access.RevokeCallerKey(access_pb2.RevokeCallerKeyRequest())
        assert gone.api_key.id == made.api_key.id and gone.api_key.revoke_time.seconds
    await refused(registry, made.secret)
    assert (await principal(registry, key)).actor.id  # signing out leaves the operator's own key alone


async def test_agent_keys_and_bad_ttls_are_refused(registry: RegistryServer, tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    from arm.registry.v1 import agents_pb2
    instance = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="a"))).agent_instance
    agent_key = (await tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
        instance_id=instance.id))).secret
    async with ArmClient(registry.address, agent_key) as agent:
        await expect_failure(agent.access.CreateSessionKey(access_pb2.CreateSessionKeyRequest(ttl=ttl(60))),
                             grpc.StatusCode.PERMISSION_DENIED, "OPERATOR_KEY_REQUIRED")
    for bad in (None, ttl(0.5), ttl(31 * 86400), ttl(-5)):
        request = access_pb2.CreateSessionKeyRequest()
        if bad is not None:
            request.ttl.CopyFrom(bad)
        got = await expect_failure(tenant.admin.access.CreateSessionKey(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert "ttl" in got.violations, (bad, got)
