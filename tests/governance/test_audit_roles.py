"""Least privilege on PostgreSQL: `python -m arm_governance migrate` runs as the schema's owner
(ARM_GOVERNANCE_MIGRATE_DATABASE_URL) and grants the runtime URL's role only what the service
needs. Governance then works normally as that application role, and the role cannot edit,
delete or truncate audit rows, nor disable, drop or bypass the append-only triggers: PostgreSQL
itself refuses."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, policy_pb2
from arm_common import roles
from arm_common.config import ServiceConfig
from arm_common.server import Host
from arm_governance import app as governance_app
from tests.conftest import PG_URL, RegistryServer, make_tenant
from tests.governance.test_audit import task_record, wait_for_record

CR = common_pb2


def as_user(user: str) -> str:
    return make_url(PG_URL).set(username=user).render_as_string(hide_password=False)


@dataclass
class Roles:
    owner: str
    app: str
    schema: str


@pytest.fixture
async def pg_roles(registry: RegistryServer) -> AsyncIterator[Roles]:
    """An owner role owning a fresh schema and an application role, both without privileges
    beyond that, dropped afterwards."""
    if registry.backend != "postgres":
        pytest.skip("roles and grants are PostgreSQL's")
    suffix = secrets.token_hex(4)
    r = Roles(f"arm_owner_{suffix}", f"arm_app_{suffix}", f"arm_test_roles_{suffix}")
    su = await asyncpg.connect(PG_URL)
    try:
        await su.execute(f'CREATE ROLE "{r.owner}" LOGIN NOSUPERUSER; CREATE ROLE "{r.app}" LOGIN NOSUPERUSER; '
                         f'CREATE SCHEMA "{r.schema}" AUTHORIZATION "{r.owner}"')
        yield r
    finally:
        await su.execute(f'DROP SCHEMA IF EXISTS "{r.schema}" CASCADE')
        for role in (r.app, r.owner):
            await su.execute(f'DROP OWNED BY "{role}"; DROP ROLE IF EXISTS "{role}"')
        await su.close()


REFUSED = [
    "UPDATE change_records SET summary = 'nothing happened'",
    "DELETE FROM change_records",
    "TRUNCATE change_records",
    "ALTER TABLE change_records DISABLE TRIGGER change_records_append_only",
    "ALTER TABLE change_records DISABLE TRIGGER ALL",
    "DROP TRIGGER change_records_append_only ON change_records",
    "DROP TRIGGER change_records_no_truncate ON change_records",
    "CREATE OR REPLACE FUNCTION change_records_append_only() RETURNS trigger LANGUAGE plpgsql "
    "AS $$ BEGIN RETURN NEW; END $$",
    "DROP FUNCTION change_records_append_only() CASCADE",
    "DROP TABLE change_records",
    "ALTER TABLE change_records RENAME TO old_records",
    "SET session_replication_role = replica",
    "UPDATE change_record_heads SET last_sequence = 0 WHERE false; DELETE FROM change_record_heads",
    "UPDATE audit_checkpoints SET head_hash = ''",
    "DELETE FROM audit_checkpoints",
    "ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_append_only",
    "UPDATE alembic_version SET version_num = '0001'",
]


async def test_the_application_role_serves_but_cannot_touch_the_audit_trail(
        registry: RegistryServer, system_admin, pg_roles: Roles, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {"ARM_GOVERNANCE_DATABASE_URL": as_user(pg_roles.app),
           "ARM_GOVERNANCE_MIGRATE_DATABASE_URL": as_user(pg_roles.owner),
           "ARM_DATABASE_SCHEMA": pg_roles.schema, "ARM_DATA_DIR": str(tmp_path),
           "ARM_GOVERNANCE_LISTEN": "127.0.0.1:0", "ARM_REGISTRY_ADDRESS": registry.address,
           "ARM_SERVICE_API_KEY": registry.admin_key}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arm_governance", "migrate", env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()
    assert f"granted {pg_roles.app}" in out.decode()

    config = ServiceConfig.from_env("governance", env)
    db = governance_app.database(config)
    assert not await roles.warn_if_privileged(db, "change_records"), "the app role can switch triggers off"
    component = governance_app.GovernanceComponent(db, config)
    assert component.authenticator is not None
    host = Host([component], component.authenticator, config.listen)
    port = await host.start()
    try:
        assert component.agents is not None and await component.agents.wait_live()
        ctx = await make_tenant(registry, system_admin)
        from arm_client import ArmClient
        async with ArmClient(f"127.0.0.1:{port}", ctx.admin_key) as client:
            # Normal work as the app role: appends, governance's own records through its outbox
            # (delivered and marked done), checkpoints, verification.
            await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
                records=[task_record(i) for i in range(5)]))
            env_ = (await client.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
                envelope=policy_pb2.PolicyEnvelope(name="least", scope=policy_pb2.POLICY_SCOPE_TENANT,
                                                   mode=policy_pb2.POLICY_MODE_ENFORCE, active=True,
                                                   default_effect=policy_pb2.DECISION_DENY)))).envelope
            await wait_for_record(client, CR.CHANGE_RECORD_TYPE_POLICY_CREATED, env_.envelope_id)
            cp = (await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())).checkpoint
            before = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest(checkpoints=[cp]))
            assert before.ok and before.records_checked >= 6, before.message

            # The same role, straight at the database: PostgreSQL refuses every way to rewrite.
            conn = await asyncpg.connect(as_user(pg_roles.app), server_settings={"search_path": pg_roles.schema})
            try:
                for sql in REFUSED:
                    # Refused for want of privilege or ownership, before any trigger runs (the
                    # triggers' own refusal says "append-only").
                    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied|must be owner"):
                        async with conn.transaction():
                            await conn.execute(sql)
                # Reading and appending stay allowed (what the service does).
                assert await conn.fetchval("select count(*) from change_records") == before.records_checked
            finally:
                await conn.close()

            after = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest(checkpoints=[cp]))
            assert after.ok and after.last_hash == before.last_hash
        await ctx.admin.close()
    finally:
        await host.stop(0)
        await db.dispose()

    # The check that warns about a privileged connection does see one: the test's superuser.
    su = governance_app.database(ServiceConfig.from_env("governance", {
        "ARM_GOVERNANCE_DATABASE_URL": PG_URL, "ARM_DATABASE_SCHEMA": pg_roles.schema}))
    try:
        assert await roles.warn_if_privileged(su, "change_records")
    finally:
        await su.dispose()
