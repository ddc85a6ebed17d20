"""The error reasons are part of the contract: every reason the code under services/ and libs/ can
raise is a value of `arm.common.v1.ErrorReason` (proto/arm/common/v1/error_reason.proto), and the
SDK decodes a real server's reason to it."""

from __future__ import annotations

import grpc
import pytest

from arm.common.v1 import error_reason_pb2
from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient, from_rpc_error
from arm_telemetry.references import CHECKED_COLUMNS
from tests.reason_scan import scan

CATALOGUE = {name.removeprefix("ERROR_REASON_") for name in error_reason_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}

# Reasons computed at run time, each site with the reasons it can produce. A new computed reason
# fails the test below until it is listed here (and its reasons are in the catalogue).
DYNAMIC: dict[tuple[str, str], set[str]] = {
    ("services/governance/arm_governance/policy/store.py", "NotFound.of(kind)"):
        {"PROJECT_NOT_FOUND", "AGENT_VERSION_NOT_FOUND"},
    ("services/governance/arm_governance/registry_calls.py", "NotFound.of(kind)"):
        {"ENVIRONMENT_NOT_FOUND", "PROJECT_NOT_FOUND", "AGENT_TEMPLATE_NOT_FOUND", "AGENT_VERSION_NOT_FOUND"},
    ("services/registry/arm_registry/store.py", "NotFound.of(kind)"): set(),  # the kinds of get(…), scanned
    ("services/registry/arm_registry/store.py", 'f"{what.upper().replace(\' \', \'_\')}_EXISTS"'): set(),  # scanned
    ("services/telemetry/arm_telemetry/servicers.py", "NotFound.of(CHECKED_COLUMNS[column])"):
        {f"{kind.upper()}_NOT_FOUND" for kind in CHECKED_COLUMNS.values()},
    # The registry's own reason, passed on by the services that ask it about a key.
    ("libs/common/arm_common/remote_auth.py", "_reason(exc, 'INVALID_API_KEY')"): {"INVALID_API_KEY"},
    ("libs/common/arm_common/remote_auth.py", "answer.reason"): set(),
    ("services/registry/arm_registry/authn.py", "answer.reason"): set(),
    # _require(what, reason): called with literal reasons only.
    ("services/registry/arm_registry/governance.py", "reason"):
        {"DEPLOYMENT_CHECK_UNAVAILABLE", "APPROVAL_CHECK_UNAVAILABLE"},
    # The CLI's own not-found for a name it could not resolve.
    ("libs/cli/arm_cli/registry_cmds.py", "f'{what.upper()}_NOT_FOUND'"): set(),
}


def test_every_raised_reason_is_in_the_catalogue() -> None:
    found = scan()
    assert len(found.reasons) > 60  # the scan itself works
    missing = {r: found.reasons[r][2] for r in found.reasons if r not in CATALOGUE}
    assert missing == {}, f"reasons raised but not in proto/arm/common/v1/error_reason.proto: {missing}"


def test_every_computed_reason_site_is_known_and_catalogued() -> None:
    found = scan()
    unknown = found.dynamic - set(DYNAMIC)
    assert unknown == set(), f"reasons computed at run time, not listed in DYNAMIC: {unknown}"
    produced = set().union(*DYNAMIC.values())
    assert produced - CATALOGUE == set()


def test_the_catalogue_has_no_stale_names_and_stable_numbers() -> None:
    numbers = list(error_reason_pb2.ErrorReason.values())
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    found = scan()
    known = set(found.reasons) | set().union(*DYNAMIC.values())
    # Every catalogued reason is still raised somewhere (a retired one keeps its number only
    # with a `reserved` line, not as a live value).
    assert CATALOGUE - known == set()


@pytest.mark.asyncio
async def test_the_sdk_decodes_a_servers_reason_to_the_catalogue(system_admin: ArmClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await system_admin.tenancy.GetTenant(tenancy_pb2.GetTenantRequest(id="ten_doesnotexist0000000000"))
    err = from_rpc_error(info.value)
    assert err.code == grpc.StatusCode.NOT_FOUND and err.reason == "TENANT_NOT_FOUND"
    assert err.error_reason == error_reason_pb2.ERROR_REASON_TENANT_NOT_FOUND
    assert err.metadata["resource"] == "tenant"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await system_admin.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(name=""))
    err = from_rpc_error(info.value)
    assert err.error_reason == error_reason_pb2.ERROR_REASON_INVALID_FIELDS
    assert err.field_violations and all(v.field for v in err.field_violations)
