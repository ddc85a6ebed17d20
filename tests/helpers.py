"""Helpers for tests: reading google.rpc error details off a failed call, building genomes,
walking agents through their lifecycle."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2

from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2
from arm_client import ArmClient, from_rpc_error


@dataclass
class RpcFailure:
    """What a failed call said: the code, the ErrorInfo reason and metadata, field violations."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)


def failure(exc: grpc.aio.AioRpcError) -> RpcFailure:
    """The failure as tests compare it; the decoding is the SDK's (`arm_client.from_rpc_error`)."""
    err = from_rpc_error(exc)
    return RpcFailure(exc.code(), exc.details() or "", err.error_info.reason if err.error_info is not None else "",
                      dict(err.metadata), {v.field: v.description for v in err.field_violations})


async def expect_failure(call, code: grpc.StatusCode, reason: str | None = None) -> RpcFailure:  # type: ignore[no-untyped-def]
    """Awaits a call that must fail with `code` (and `reason`, when given)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        got = failure(exc)
        assert got.code == code, f"expected {code}, got {got.code}: {got.message} ({got.reason})"
        if reason is not None:
            assert got.reason == reason, f"expected reason {reason}, got {got.reason}: {got.message}"
        return got
    raise AssertionError(f"the call succeeded; expected {code}")


async def refused_within(make_call, code: grpc.StatusCode, reason: str,  # type: ignore[no-untyped-def]
                         timeout_s: float = 15.0) -> RpcFailure:
    """Repeats `make_call()` until it fails with `code` and `reason`, for at most `timeout_s`
    (a bounded wait for a change notice to reach another service's cache)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "it kept succeeding"
    while True:
        try:
            await make_call()
        except grpc.aio.AioRpcError as exc:
            got = failure(exc)
            if got.code == code and got.reason == reason:
                return got
            last = f"{got.code} {got.reason}: {got.message}"
        if loop.time() > deadline:
            raise AssertionError(f"not refused with {code} {reason} within {timeout_s} s; {last}")
        await asyncio.sleep(0.02)


def genome(**overrides: object) -> struct_pb2.Struct:
    """A valid genome (snake_case input), unique unless overridden."""
    value: dict[str, Any] = {
        "model_config": {"provider": "openai", "model_id": "gpt-4.1", "temperature": 0.2,
                         "max_tokens": 4096},
        "prompt_bundle_hash": f"prompt-{secrets.token_hex(4)}",
        "tool_manifest_hash": "tools-123456",
        "provenance": {"created_by": "tests", "source": "pytest", "created_at": 1700000000000},
    }
    value.update(overrides)
    out = struct_pb2.Struct()
    out.update(value)
    return out


@dataclass
class AgentSet:
    project: tenancy_pb2.Project
    environment: tenancy_pb2.Environment
    template: agents_pb2.AgentTemplate
    version: agents_pb2.AgentVersion


async def approved_version(client: ArmClient, env_type: int = tenancy_pb2.ENVIRONMENT_TYPE_DEV,
                           require_active_deployment: bool = False) -> AgentSet:
    """Project, environment, template and a version walked to APPROVED."""
    suffix = secrets.token_hex(4)
    project = (await client.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{suffix}", name="Project"))).project
    env = (await client.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
        name=f"env-{suffix}", type=env_type, require_active_deployment=require_active_deployment))).environment
    template = (await client.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=project.id, slug=f"tpl-{suffix}", name="Agent"))).agent_template
    version = (await client.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=template.id, genome=genome()))).agent_version
    version = await walk_version(client, version.id, agents_pb2.VERSION_STATE_APPROVED)
    return AgentSet(project, env, template, version)


async def walk_version(client: ArmClient, version_id: str, target: int) -> agents_pb2.AgentVersion:
    """Moves a DRAFT version along DRAFT → TESTING → (PASS) CANDIDATE → APPROVED → … to target."""
    path = [agents_pb2.VERSION_STATE_TESTING, agents_pb2.VERSION_STATE_CANDIDATE,
            agents_pb2.VERSION_STATE_APPROVED, agents_pb2.VERSION_STATE_DEPRECATED,
            agents_pb2.VERSION_STATE_RETIRED]
    version = (await client.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=version_id))).agent_version
    for state in path:
        if version.state == target:
            break
        if state == agents_pb2.VERSION_STATE_CANDIDATE:
            await client.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
                id=version_id, eval_status=agents_pb2.EVAL_STATUS_PASS, summary="ok"))
        version = (await client.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=version_id, to_state=state, reason="test"))).agent_version
    assert version.state == target
    return version


async def operator_with_roles(admin: ArmClient, address: str, *role_names: str,
                              scope_type: int = 0, scope_id: str = "") -> tuple[str, ArmClient]:
    """Creates an operator holding the given built-in roles; returns its id and a client."""
    op_id, key = await operator_key(admin, *role_names, scope_type=scope_type, scope_id=scope_id)
    return op_id, ArmClient(address, key)


async def operator_key(admin: ArmClient, *role_names: str, scope_type: int = 0,
                       scope_id: str = "") -> tuple[str, str]:
    """Creates an operator holding the given built-in roles; returns its id and API key."""
    suffix = secrets.token_hex(4)
    op = (await admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
        email=f"op-{suffix}@example.com", name=f"Operator {suffix}"))).operator
    roles = {r.name: r.id for r in (await admin.access.ListRoles(access_pb2.ListRolesRequest())).roles}
    for name in role_names:
        await admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
            operator_id=op.id, role_id=roles[name], scope_type=scope_type, scope_id=scope_id))
    key = (await admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(operator_id=op.id))).secret
    return op.id, key


async def governance_change_records(db: Any, tenant_id: str | None = None) -> list[Any]:
    """The change records governance wrote to its outbox, in the order written: those its relay
    delivered (it deletes their outbox rows) read back from its audit trail without the fields
    the trail adds (sequence, record time, hashes), then those still waiting in the outbox."""
    from sqlalchemy import select

    from arm.common.v1 import common_pb2
    from arm_common.outbox import TOPIC_CHANGE_RECORD
    from arm_governance.audit.trail import to_proto
    from arm_governance.models import OUTBOX, ChangeRecord

    async def read(s: Any) -> list[common_pb2.ChangeRecord]:
        waiting_q = select(OUTBOX.c.payload).where(OUTBOX.c.topic == TOPIC_CHANGE_RECORD)
        trail_q = select(ChangeRecord).where(ChangeRecord.source == "governance")
        if tenant_id is not None:
            waiting_q = waiting_q.where(OUTBOX.c.tenant_id == tenant_id)
            trail_q = trail_q.where(ChangeRecord.tenant_id == tenant_id)
        # The outbox first: a record delivered between the two reads is then in both, never in neither.
        waiting = [common_pb2.ChangeRecord.FromString(bytes(p)) for p in
                   (await s.execute(waiting_q.order_by(OUTBOX.c.position))).scalars()]
        delivered = [to_proto(r) for r in (await s.execute(trail_q.order_by(
            ChangeRecord.record_time, ChangeRecord.tenant_id, ChangeRecord.sequence))).scalars()]
        for record in delivered:
            for name in ("sequence", "record_time", "prev_hash", "hash"):
                record.ClearField(name)  # type: ignore[arg-type]
        ids = {r.record_id for r in delivered}
        return delivered + [r for r in waiting if r.record_id not in ids]
    return list(await db.read(read))
