"""API keys and the principal's permission checks (SPEC §2 RoleAssignment scopes, §5 Auth)."""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import re

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from arm_common.auth import (
    SCOPE_ENVIRONMENT,
    SCOPE_PROJECT,
    SCOPE_TENANT,
    Grant,
    Principal,
    current_principal,
    hash_api_key,
    new_api_key,
    parse_api_key,
)
from arm_common.errors import PermissionDenied, Unauthenticated

from ._strategies import PROPERTY

# --- API keys ----------------------------------------------------------------------------------------

def test_new_api_key_round_trip() -> None:
    key_id, full, stored_hash = new_api_key()
    assert parse_api_key(full) == key_id
    assert hash_api_key(full) == stored_hash
    assert stored_hash == hashlib.sha256(full.encode()).hexdigest()
    assert full.startswith("arm_")
    assert key_id in full


def test_new_api_key_secret_is_not_stored() -> None:
    key_id, full, stored_hash = new_api_key()
    secret = full[len(f"arm_{key_id}_"):]
    assert len(secret) >= 43  # at least 256 bits of base64url
    assert secret not in stored_hash
    assert re.fullmatch(r"[0-9a-f]{64}", stored_hash)


def test_new_api_keys_are_distinct() -> None:
    keys = [new_api_key() for _ in range(200)]
    assert len({k[0] for k in keys}) == 200
    assert len({k[1] for k in keys}) == 200
    assert len({k[2] for k in keys}) == 200
    # Secrets are base64url and often contain "_" or "-": parsing must still find the id.
    for key_id, full, _ in keys:
        assert parse_api_key(full) == key_id


def test_hash_differs_for_any_change() -> None:
    _, full, stored_hash = new_api_key()
    assert hash_api_key(full[:-1]) != stored_hash
    assert hash_api_key(full + "x") != stored_hash
    assert hash_api_key(full.upper()) != stored_hash


@PROPERTY
@given(st.text(alphabet="0123456789abcdef", min_size=1, max_size=40),
       st.text(alphabet="ABCxyz0189-_", min_size=1, max_size=60))
def test_parse_any_well_formed_key(id_part: str, secret: str) -> None:
    assert parse_api_key(f"arm_key_{id_part}_{secret}") == f"key_{id_part}"


MALFORMED_KEYS = {
    "empty": "",
    "prefix only": "arm",
    "no id": "arm_key",
    "no secret": "arm_key_0190a1b2c3d4",
    "empty secret": "arm_key_0190a1b2c3d4_",
    "wrong prefix": "xrm_key_0190a1b2c3d4_secret",
    "upper-case prefix": "ARM_key_0190a1b2c3d4_secret",
    "wrong kind": "arm_usr_0190a1b2c3d4_secret",
    "bearer included": "Bearer arm_key_0190a1b2c3d4_secret",
    "leading space": " arm_key_0190a1b2c3d4_secret",
    "other separator": "arm-key-0190a1b2c3d4-secret",
    "random text": "hello world",
}


@pytest.mark.parametrize("key", list(MALFORMED_KEYS.values()), ids=list(MALFORMED_KEYS))
def test_malformed_keys_are_unauthenticated(key: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        parse_api_key(key)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "INVALID_API_KEY"


def test_key_with_empty_id_is_malformed() -> None:
    with pytest.raises(Unauthenticated):
        parse_api_key("arm_key__secret")


@PROPERTY
@given(st.text(max_size=80))
def test_parse_never_fails_any_other_way(text: str) -> None:
    try:
        key_id = parse_api_key(text)
    except Unauthenticated as err:
        assert err.reason == "INVALID_API_KEY"
    else:
        assert key_id.startswith("key_")
        assert text.startswith(f"arm_{key_id}_")


# --- principals and grants ---------------------------------------------------------------------------

def principal(*grants: Grant, actor_type: str = "OPERATOR") -> Principal:
    return Principal(tenant_id="ten_1", actor_type=actor_type, actor_id="opr_1",
                     api_key_id="key_1", grants=tuple(grants))


def test_no_grants_no_permissions() -> None:
    p = principal()
    assert not p.has("audit:read")
    assert not p.has("audit:read", project_id="prj_1", environment_id="env_1")


def test_tenant_grant_covers_everything_in_the_tenant() -> None:
    p = principal(Grant("policies:write"))
    assert p.has("policies:write")
    assert p.has("policies:write", project_id="prj_1")
    assert p.has("policies:write", environment_id="env_1")
    assert p.has("policies:write", project_id="prj_2", environment_id="env_2")
    assert not p.has("policies:read")
    assert not p.has("policies")


def test_explicit_tenant_scope_type() -> None:
    p = principal(Grant("audit:read", SCOPE_TENANT, "ten_1"))
    assert p.has("audit:read")
    assert p.has("audit:read", project_id="prj_9")


def test_project_grant_covers_only_that_project() -> None:
    p = principal(Grant("instances:transition", SCOPE_PROJECT, "prj_1"))
    assert p.has("instances:transition", project_id="prj_1")
    assert p.has("instances:transition", project_id="prj_1", environment_id="env_1")
    assert not p.has("instances:transition")
    assert not p.has("instances:transition", project_id="prj_2")
    # Scope types are not interchangeable, even with equal ids.
    assert not p.has("instances:transition", environment_id="prj_1")


def test_environment_grant_covers_only_that_environment() -> None:
    p = principal(Grant("deployments:activate", SCOPE_ENVIRONMENT, "env_1"))
    assert p.has("deployments:activate", environment_id="env_1")
    assert p.has("deployments:activate", project_id="prj_1", environment_id="env_1")
    assert not p.has("deployments:activate")
    assert not p.has("deployments:activate", environment_id="env_2")
    assert not p.has("deployments:activate", project_id="env_1")


def test_several_grants_for_one_permission() -> None:
    p = principal(Grant("registry:write", SCOPE_PROJECT, "prj_1"),
                  Grant("registry:write", SCOPE_ENVIRONMENT, "env_1"),
                  Grant("audit:read", SCOPE_PROJECT, "prj_2"))
    assert p.has("registry:write", project_id="prj_1")
    assert p.has("registry:write", environment_id="env_1")
    assert p.has("registry:write", project_id="prj_2", environment_id="env_1")
    assert not p.has("registry:write", project_id="prj_2", environment_id="env_2")
    assert not p.has("audit:read", project_id="prj_1")
    assert p.has("audit:read", project_id="prj_2")


def test_require_passes_when_granted() -> None:
    p = principal(Grant("approvals:decide", SCOPE_PROJECT, "prj_1"))
    p.require("approvals:decide", project_id="prj_1")  # raises PermissionDenied when refused


@pytest.mark.parametrize(("grants", "permission", "scope"), [
    ((), "audit:read", {}),
    ((Grant("audit:read"),), "audit:write", {}),
    ((Grant("operators:admin", SCOPE_PROJECT, "prj_1"),), "operators:admin", {}),
    ((Grant("operators:admin", SCOPE_PROJECT, "prj_1"),), "operators:admin", {"project_id": "prj_2"}),
    ((Grant("telemetry:read", SCOPE_ENVIRONMENT, "env_1"),), "telemetry:read",
     {"environment_id": "env_2", "project_id": "prj_1"}),
])
def test_require_refuses_with_missing_permission(grants: tuple[Grant, ...], permission: str,
                                                 scope: dict[str, str]) -> None:
    p = principal(*grants)
    with pytest.raises(PermissionDenied) as caught:
        p.require(permission, **scope)
    err = caught.value
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.reason == "MISSING_PERMISSION"
    assert err.metadata["permission"] == permission
    assert permission in err.message


def test_is_agent() -> None:
    assert principal(actor_type="AGENT").is_agent
    assert not principal(actor_type="OPERATOR").is_agent
    assert not principal(actor_type="SYSTEM").is_agent


def test_principals_do_not_share_grants() -> None:
    a = principal(Grant("policies:write"))
    b = principal()
    assert a.has("policies:write")
    assert not b.has("policies:write")


def test_replace_does_not_leak_grants() -> None:
    original = principal(Grant("audit:read"))
    narrowed = dataclasses.replace(original, grants=())
    widened = dataclasses.replace(original, grants=(Grant("policies:write"),))
    assert not original.has("policies:write")
    assert not narrowed.has("audit:read")
    assert widened.has("policies:write")


def test_current_principal_without_a_caller() -> None:
    with pytest.raises(Unauthenticated) as caught:
        contextvars.Context().run(current_principal)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "UNAUTHENTICATED"
