"""Genomes and versions over gRPC: the SPEC §2 genome-hash test vector (camelCase and snake_case
spellings), server-assigned version numbers (also under concurrency), integrity reporting after
the stored genome is altered behind the service's back, and where evaluations may be recorded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from sqlalchemy import text

from arm.common.v1 import common_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_common.db import rowcount
from tests.conftest import RegistryServer, TenantContext
from tests.helpers import expect_failure, genome, walk_version

VECTOR_JSON = ('{"modelConfig":{"provider":"openai","modelId":"gpt-4.1","temperature":0.2,'
               '"maxTokens":4096},"promptBundleHash":"prompt-123456","toolManifestHash":'
               '"tools-123456","provenance":{"createdBy":"mission-control-ui","source":'
               '"directory.bootstrap","createdAt":1700000000000}}')
VECTOR_HASH = "759d5f5e7b9fb9419f35aa9aa8ad5f9c874fa42a05ecb958490fdc9d87095688"
VECTOR_SNAKE: dict[str, Any] = {
    "model_config": {"provider": "openai", "model_id": "gpt-4.1", "temperature": 0.2,
                     "max_tokens": 4096},
    "prompt_bundle_hash": "prompt-123456",
    "tool_manifest_hash": "tools-123456",
    "provenance": {"created_by": "mission-control-ui", "source": "directory.bootstrap",
                   "created_at": 1700000000000},
}

CR = common_pb2.ChangeRecordType


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def expected_hash(value: dict[str, Any]) -> str:
    """SPEC §2 canonical JSON, for values whose numbers are ints or floats Python and JavaScript
    print alike."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


async def change_records(registry: RegistryServer, tenant_id: str) -> list[common_pb2.ChangeRecord]:
    """The tenant's change records as the registry wrote them to its outbox, in order."""
    async with registry.db.transaction() as s:
        rows = (await s.execute(text(
            "select payload from outbox_messages where tenant_id = :t and topic = 'change_record' "
            "order by position"), {"t": tenant_id})).all()
    return [common_pb2.ChangeRecord.FromString(bytes(r.payload)) for r in rows]


async def new_template(tenant: TenantContext) -> agents_pb2.AgentTemplate:
    admin = tenant.admin
    suffix = secrets.token_hex(4)
    project = (await admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{suffix}", name="Project"))).project
    return (await admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=project.id, slug=f"tpl-{suffix}", name="Agent"))).agent_template


async def create_version(tenant: TenantContext, template_id: str,
                         value: struct_pb2.Struct | None = None) -> agents_pb2.AgentVersion:
    return (await tenant.admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=template_id, genome=value if value is not None else genome()))).agent_version


async def get_version(tenant: TenantContext, version_id: str) -> agents_pb2.AgentVersion:
    return (await tenant.admin.agents.GetAgentVersion(
        agents_pb2.GetAgentVersionRequest(id=version_id))).agent_version


# --- genome hash -------------------------------------------------------------------------------

async def test_spec_vector_in_camel_case(tenant: TenantContext) -> None:
    template = await new_template(tenant)
    # The test's own canonicalisation agrees with the vector, so expected_hash is trustworthy.
    assert expected_hash(json.loads(VECTOR_JSON)) == VECTOR_HASH
    version = await create_version(tenant, template.id, struct(json.loads(VECTOR_JSON)))
    assert version.genome_hash == VECTOR_HASH
    stored = await get_version(tenant, version.id)
    assert stored.genome_hash == VECTOR_HASH
    assert stored.integrity == agents_pb2.INTEGRITY_VERIFIED
    assert json_format.MessageToDict(stored.genome) == json.loads(VECTOR_JSON)


async def test_spec_vector_in_snake_case_has_the_same_hash(tenant: TenantContext) -> None:
    template = await new_template(tenant)
    version = await create_version(tenant, template.id, struct(VECTOR_SNAKE))
    assert version.genome_hash == VECTOR_HASH
    # The genome is kept under the older platform's key names.
    assert json_format.MessageToDict(version.genome) == json.loads(VECTOR_JSON)


async def test_extra_fields_are_hashed_canonically(tenant: TenantContext) -> None:
    """Other fields are allowed and hashed: nested keys sorted, arrays kept in order, non-ASCII
    written as UTF-8, integral numbers without a fraction."""
    template = await new_template(tenant)
    value = json.loads(VECTOR_JSON)
    value["zeta"] = {"b": [3, 1, 2], "a": "Grüße, エージェント"}
    value["alpha"] = [{"y": 1.5, "x": True}, None, "z"]
    version = await create_version(tenant, template.id, struct(value))
    assert version.genome_hash == expected_hash(value)
    assert version.genome_hash != VECTOR_HASH
    value["zeta"]["b"] = [1, 2, 3]  # array order is part of the genome
    reordered = await create_version(tenant, template.id, struct(value))
    assert reordered.genome_hash == expected_hash(value)
    assert reordered.genome_hash != version.genome_hash


@pytest.mark.parametrize(("field", "bad"), [
    ("genome.model_config.provider", {"model_config": {"model_id": "gpt-4.1"}}),
    ("genome.prompt_bundle_hash", {"prompt_bundle_hash": ""}),
    ("genome.provenance", {"provenance": "nope"}),
    ("genome.model_config.temperature",
     {"model_config": {"provider": "openai", "model_id": "m", "temperature": 7}}),
], ids=["no-provider", "empty-prompt-hash", "provenance-not-object", "temperature-out-of-range"])
async def test_invalid_genome_is_refused_with_the_field(tenant: TenantContext, registry: RegistryServer,
                                                       field: str, bad: dict[str, Any]) -> None:
    template = await new_template(tenant)
    before = await change_records(registry, tenant.tenant.id)
    got = await expect_failure(tenant.admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=template.id, genome=genome(**bad))), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in got.violations, got.violations
    assert await change_records(registry, tenant.tenant.id) == before
    # Nothing was numbered: the next version is still number 1.
    assert (await create_version(tenant, template.id)).number == 1


# --- version numbers ---------------------------------------------------------------------------

async def test_version_numbers_count_per_template(tenant: TenantContext) -> None:
    first, second = await new_template(tenant), await new_template(tenant)
    numbers: dict[str, list[int]] = {first.id: [], second.id: []}
    for template_id in (first.id, first.id, second.id, first.id, second.id):
        numbers[template_id].append((await create_version(tenant, template_id)).number)
    assert numbers == {first.id: [1, 2, 3], second.id: [1, 2]}
    listed = (await tenant.admin.agents.ListAgentVersions(agents_pb2.ListAgentVersionsRequest(
        template_id=first.id))).agent_versions
    assert sorted(v.number for v in listed) == [1, 2, 3]


async def test_a_refused_version_uses_no_number(tenant: TenantContext) -> None:
    template, other = await new_template(tenant), await new_template(tenant)
    foreign = await create_version(tenant, other.id)
    assert (await create_version(tenant, template.id)).number == 1
    await expect_failure(tenant.admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=template.id, genome=genome(), parent_version_id=foreign.id)),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert (await create_version(tenant, template.id)).number == 2


async def test_concurrent_versions_get_numbers_without_gaps(tenant: TenantContext,
                                                            registry: RegistryServer) -> None:
    template = await new_template(tenant)
    clients = [registry.client(tenant.admin_key) for _ in range(10)]
    try:
        results = await asyncio.gather(*(
            c.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
                template_id=template.id, genome=genome())) for c in clients), return_exceptions=True)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    versions = [r for r in results if not isinstance(r, BaseException)]
    assert sorted(v.agent_version.number for v in versions) == list(range(1, 11))
    assert len({v.agent_version.id for v in versions}) == 10
    listed = (await tenant.admin.agents.ListAgentVersions(agents_pb2.ListAgentVersionsRequest(
        template_id=template.id))).agent_versions
    assert sorted(v.number for v in listed) == list(range(1, 11))
    assert (await create_version(tenant, template.id)).number == 11


async def test_version_created_record_carries_the_hash(tenant: TenantContext,
                                                       registry: RegistryServer) -> None:
    template = await new_template(tenant)
    version = await create_version(tenant, template.id, struct(json.loads(VECTOR_JSON)))
    records = [r for r in await change_records(registry, tenant.tenant.id) if r.target_id == version.id]
    assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_VERSION_CREATED]
    rec = records[0]
    assert rec.after["genome_hash"] == VECTOR_HASH
    assert rec.version_id == version.id
    assert rec.template_id == template.id
    assert rec.project_id == template.project_id
    assert rec.actor.id == tenant.admin_operator_id
    assert rec.actor.type == common_pb2.ACTOR_TYPE_OPERATOR


# --- integrity ---------------------------------------------------------------------------------

async def set_column(registry: RegistryServer, version_id: str, column: str, value: str) -> None:
    assert column in ("genome_json", "genome_hash")
    async with registry.db.transaction() as s:
        result = await s.execute(text(f"update agent_versions set {column} = :v where id = :id"),
                                 {"v": value, "id": version_id})
        assert rowcount(result) == 1


async def read_column(registry: RegistryServer, version_id: str, column: str) -> str:
    async with registry.db.transaction() as s:
        return (await s.execute(text(f"select {column} from agent_versions where id = :id"),
                                {"id": version_id})).scalar_one()


async def test_altered_genome_reads_as_tampered(tenant: TenantContext, registry: RegistryServer) -> None:
    template = await new_template(tenant)
    version = await create_version(tenant, template.id, struct(json.loads(VECTOR_JSON)))
    untouched = await create_version(tenant, template.id)
    assert (await get_version(tenant, version.id)).integrity == agents_pb2.INTEGRITY_VERIFIED

    stored = json.loads(await read_column(registry, version.id, "genome_json"))
    stored["modelConfig"]["temperature"] = 0.9
    await set_column(registry, version.id, "genome_json",
                     json.dumps(stored, sort_keys=True, separators=(",", ":")))

    tampered = await get_version(tenant, version.id)
    assert tampered.integrity == agents_pb2.INTEGRITY_TAMPERED
    assert tampered.genome_hash == VECTOR_HASH  # the hash recorded at creation is kept
    listed = {v.id: v.integrity for v in (await tenant.admin.agents.ListAgentVersions(
        agents_pb2.ListAgentVersionsRequest(template_id=template.id))).agent_versions}
    assert listed == {version.id: agents_pb2.INTEGRITY_TAMPERED,
                      untouched.id: agents_pb2.INTEGRITY_VERIFIED}


async def test_unreadable_genome_reads_as_tampered(tenant: TenantContext, registry: RegistryServer) -> None:
    template = await new_template(tenant)
    version = await create_version(tenant, template.id)
    await set_column(registry, version.id, "genome_json", '{"modelConfig": {broken')
    assert (await get_version(tenant, version.id)).integrity == agents_pb2.INTEGRITY_TAMPERED


async def test_altered_hash_reads_as_tampered(tenant: TenantContext, registry: RegistryServer) -> None:
    template = await new_template(tenant)
    version = await create_version(tenant, template.id)
    await set_column(registry, version.id, "genome_hash", "0" * 64)
    assert (await get_version(tenant, version.id)).integrity == agents_pb2.INTEGRITY_TAMPERED


# --- evaluations -------------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["DRAFT", "CANDIDATE", "APPROVED", "DEPRECATED", "RETIRED"])
async def test_evaluations_are_recorded_only_in_testing(tenant: TenantContext, registry: RegistryServer,
                                                        state: str) -> None:
    template = await new_template(tenant)
    version = await create_version(tenant, template.id)
    version = await walk_version(tenant.admin, version.id, agents_pb2.VersionState.Value(f"VERSION_STATE_{state}"))
    before = await change_records(registry, tenant.tenant.id)
    got = await expect_failure(tenant.admin.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
        id=version.id, eval_status=agents_pb2.EVAL_STATUS_FAIL, summary="late")),
        grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_IN_TESTING")
    assert state in got.message
    stored = await get_version(tenant, version.id)
    assert stored.eval_status == version.eval_status
    assert stored.eval_summary == version.eval_summary
    assert await change_records(registry, tenant.tenant.id) == before


@pytest.mark.parametrize("status", ["RUNNING", "PASS", "FAIL"])
async def test_evaluation_recorded_in_testing(tenant: TenantContext, status: str) -> None:
    template = await new_template(tenant)
    version = await create_version(tenant, template.id)
    assert version.eval_status == agents_pb2.EVAL_STATUS_NOT_RUN
    await walk_version(tenant.admin, version.id, agents_pb2.VERSION_STATE_TESTING)
    value = agents_pb2.EvalStatus.Value(f"EVAL_STATUS_{status}")
    recorded = (await tenant.admin.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
        id=version.id, eval_status=value, summary=f"suite says {status}"))).agent_version
    assert recorded.eval_status == value
    stored = await get_version(tenant, version.id)
    assert stored.eval_status == value
    assert stored.eval_summary == f"suite says {status}"
    assert stored.state == agents_pb2.VERSION_STATE_TESTING
