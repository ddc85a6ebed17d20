"""ORM rows → protobuf messages, and protobuf enum values → the names rows store, in one place."""

from __future__ import annotations

import json

from arm.registry.v1 import access_pb2, agents_pb2, compat_pb2, tenancy_pb2
from arm_common.messages import struct, ts
from arm_registry import domain, models


def env_type_name(value: int) -> str:
    return tenancy_pb2.EnvironmentType.Name(value).removeprefix("ENVIRONMENT_TYPE_")


def version_state_name(value: int) -> str:
    return agents_pb2.VersionState.Name(value).removeprefix("VERSION_STATE_")


def instance_state_name(value: int) -> str:
    return agents_pb2.InstanceState.Name(value).removeprefix("INSTANCE_STATE_")


def eval_status_name(value: int) -> str:
    return agents_pb2.EvalStatus.Name(value).removeprefix("EVAL_STATUS_")


def scope_type_name(value: int) -> str:
    """Unset (0) means the whole tenant."""
    return "TENANT" if value == 0 else access_pb2.RoleScopeType.Name(value).removeprefix("ROLE_SCOPE_TYPE_")


def tenant(row: models.Tenant) -> tenancy_pb2.Tenant:
    return tenancy_pb2.Tenant(
        id=row.id, slug=row.slug, name=row.name, description=row.description, active=row.active,
        system=row.system, create_time=ts(row.created_at), update_time=ts(row.updated_at),
        etag=str(row.revision))


def environment(row: models.Environment) -> tenancy_pb2.Environment:
    return tenancy_pb2.Environment(
        id=row.id, tenant_id=row.tenant_id, name=row.name,
        type=tenancy_pb2.EnvironmentType.Value(f"ENVIRONMENT_TYPE_{row.type}"),
        require_active_deployment=row.require_active_deployment, create_time=ts(row.created_at),
        update_time=ts(row.updated_at), etag=str(row.revision))


def project(row: models.Project) -> tenancy_pb2.Project:
    return tenancy_pb2.Project(
        id=row.id, tenant_id=row.tenant_id, slug=row.slug, name=row.name,
        description=row.description, create_time=ts(row.created_at),
        update_time=ts(row.updated_at), etag=str(row.revision))


def operator(row: models.Operator) -> access_pb2.Operator:
    return access_pb2.Operator(
        id=row.id, tenant_id=row.tenant_id, email=row.email, name=row.name,
        external_subject=row.external_subject, active=row.active, create_time=ts(row.created_at),
        update_time=ts(row.updated_at), etag=str(row.revision))


def role(row: models.Role) -> access_pb2.Role:
    return access_pb2.Role(
        id=row.id, tenant_id=row.tenant_id, name=row.name, description=row.description,
        permissions=sorted(row.permissions), built_in=row.built_in, create_time=ts(row.created_at))


def role_assignment(row: models.RoleAssignment) -> access_pb2.RoleAssignment:
    return access_pb2.RoleAssignment(
        id=row.id, tenant_id=row.tenant_id, operator_id=row.operator_id, role_id=row.role_id,
        scope_type=access_pb2.RoleScopeType.Value(f"ROLE_SCOPE_TYPE_{row.scope_type}"),
        scope_id=row.scope_id, expire_time=ts(row.expires_at), create_time=ts(row.created_at))


def api_key(row: models.ApiKey) -> access_pb2.ApiKey:
    return access_pb2.ApiKey(
        id=row.id, tenant_id=row.tenant_id, operator_id=row.operator_id or "",
        instance_id=row.instance_id or "", display_name=row.display_name,
        create_time=ts(row.created_at), expire_time=ts(row.expires_at),
        revoke_time=ts(row.revoked_at), parent_key_id=row.parent_key_id or "")


def template(row: models.AgentTemplate) -> agents_pb2.AgentTemplate:
    return agents_pb2.AgentTemplate(
        id=row.id, tenant_id=row.tenant_id, project_id=row.project_id, slug=row.slug,
        name=row.name, description=row.description, owners=row.owners, tags=row.tags,
        active=row.active, create_time=ts(row.created_at), update_time=ts(row.updated_at),
        etag=str(row.revision))


def version(row: models.AgentVersion) -> agents_pb2.AgentVersion:
    verified = domain.verify_genome(row.genome_json, row.genome_hash)
    try:
        genome = struct(json.loads(row.genome_json))
    except ValueError:
        genome = None  # unreadable genome: reported as TAMPERED, not a server error
    return agents_pb2.AgentVersion(
        id=row.id, tenant_id=row.tenant_id, template_id=row.template_id,
        project_id=row.project_id, number=row.number, genome=genome,
        genome_hash=row.genome_hash, state=agents_pb2.VersionState.Value(f"VERSION_STATE_{row.state}"),
        eval_status=agents_pb2.EvalStatus.Value(f"EVAL_STATUS_{row.eval_status}"),
        eval_summary=row.eval_summary, parent_version_id=row.parent_version_id, notes=row.notes,
        created_by=row.created_by, approved_by=row.approved_by,
        integrity=agents_pb2.INTEGRITY_VERIFIED if verified else agents_pb2.INTEGRITY_TAMPERED,
        create_time=ts(row.created_at), update_time=ts(row.updated_at), etag=str(row.revision))


def instance(row: models.AgentInstance) -> agents_pb2.AgentInstance:
    return agents_pb2.AgentInstance(
        id=row.id, tenant_id=row.tenant_id, template_id=row.template_id,
        version_id=row.version_id, environment_id=row.environment_id, project_id=row.project_id,
        name=row.name, state=agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{row.state}"),
        legacy_agent_id=row.legacy_agent_id or "", last_heartbeat_time=ts(row.last_heartbeat_at),
        activate_time=ts(row.activated_at), retire_time=ts(row.retired_at),
        create_time=ts(row.created_at), update_time=ts(row.updated_at), etag=str(row.revision))


def identity(row: models.AgentIdentity) -> agents_pb2.AgentIdentity:
    return agents_pb2.AgentIdentity(
        id=row.id, tenant_id=row.tenant_id, name=row.name, soul_content=row.soul_content,
        soul_hash=row.soul_hash, tools_notes=row.tools_notes,
        validation_status=agents_pb2.IdentityValidationStatus.Value(
            f"IDENTITY_VALIDATION_STATUS_{row.validation_status}"),
        template_id=row.template_id, instance_id=row.instance_id,
        legacy_agent_id=row.legacy_agent_id, description=row.description,
        create_time=ts(row.created_at), update_time=ts(row.updated_at), etag=str(row.revision))


def resolved(inst: models.AgentInstance, ver: models.AgentVersion, env: models.Environment,
             ten: models.Tenant) -> compat_pb2.ResolvedAgent:
    return compat_pb2.ResolvedAgent(
        tenant_id=ten.id, tenant_active=ten.active, project_id=inst.project_id,
        environment_id=env.id, environment_name=env.name,
        environment_type=tenancy_pb2.EnvironmentType.Value(f"ENVIRONMENT_TYPE_{env.type}"),
        template_id=inst.template_id, version_id=ver.id, instance_id=inst.id,
        legacy_agent_id=inst.legacy_agent_id or "",
        instance_state=agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{inst.state}"),
        version_state=agents_pb2.VersionState.Value(f"VERSION_STATE_{ver.state}"))
