"""Registry domain rules (SPEC §2): genome normalisation and hashing, lifecycles, legacy status
mapping, identity validation, the permission catalogue and the built-in roles. The expected
tables here are written from the SPEC, not imported from the code under test."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from arm_common.canonical import canonical_hash, canonical_json
from arm_common.errors import FailedPrecondition, FieldViolation, InvalidArgument
from arm_registry import domain

from ._strategies import PROPERTY, json_values

VECTOR_TEXT = (
    '{"modelConfig":{"provider":"openai","modelId":"gpt-4.1","temperature":0.2,"maxTokens":4096},'
    '"promptBundleHash":"prompt-123456","toolManifestHash":"tools-123456",'
    '"provenance":{"createdBy":"mission-control-ui","source":"directory.bootstrap",'
    '"createdAt":1700000000000}}'
)
VECTOR_HASH = "759d5f5e7b9fb9419f35aa9aa8ad5f9c874fa42a05ecb958490fdc9d87095688"


def camel_genome() -> dict[str, Any]:
    return json.loads(VECTOR_TEXT)


def snake_genome() -> dict[str, Any]:
    return {
        "model_config": {"provider": "openai", "model_id": "gpt-4.1", "temperature": 0.2,
                         "max_tokens": 4096},
        "prompt_bundle_hash": "prompt-123456",
        "tool_manifest_hash": "tools-123456",
        "provenance": {"created_by": "mission-control-ui", "source": "directory.bootstrap",
                       "created_at": 1700000000000},
    }


def mixed_genome() -> dict[str, Any]:
    return {
        "modelConfig": {"provider": "openai", "model_id": "gpt-4.1", "temperature": 0.2,
                        "maxTokens": 4096},
        "prompt_bundle_hash": "prompt-123456",
        "toolManifestHash": "tools-123456",
        "provenance": {"createdBy": "mission-control-ui", "source": "directory.bootstrap",
                       "created_at": 1700000000000},
    }


# --- genome normalisation ------------------------------------------------------------------------

@pytest.mark.parametrize("make", [camel_genome, snake_genome, mixed_genome])
def test_normalized_genome_hashes_to_the_spec_vector(make: Any) -> None:
    normalized = domain.normalize_genome(make())
    assert domain.genome_hash(normalized) == VECTOR_HASH
    assert canonical_hash(normalized) == VECTOR_HASH


def test_snake_and_camel_normalise_to_the_same_dict() -> None:
    from_snake = domain.normalize_genome(snake_genome())
    from_camel = domain.normalize_genome(camel_genome())
    assert from_snake == from_camel
    # Stored under the older platform's names (the SPEC vector's spelling).
    assert from_snake == json.loads(VECTOR_TEXT)
    assert canonical_json(from_snake) == canonical_json(json.loads(VECTOR_TEXT))


def test_struct_style_numbers_hash_the_same() -> None:
    # Genomes arrive as google.protobuf.Struct, where every number is a double.
    genome = snake_genome()
    genome["model_config"]["max_tokens"] = 4096.0
    genome["provenance"]["created_at"] = 1700000000000.0
    assert domain.genome_hash(domain.normalize_genome(genome)) == VECTOR_HASH


def test_normalize_does_not_modify_its_input() -> None:
    genome = snake_genome()
    genome["extra"] = {"nested": [1, {"x": "y"}]}
    before = copy.deepcopy(genome)
    domain.normalize_genome(genome)
    assert genome == before


def test_normalize_is_idempotent() -> None:
    once = domain.normalize_genome(snake_genome())
    assert domain.normalize_genome(once) == once


def test_unknown_fields_are_kept_and_hashed() -> None:
    genome = snake_genome()
    genome["notes"] = "café ☕"
    genome["labels"] = {"team": "core", "tier": 1}
    genome["model_config"]["top_p"] = 0.9
    genome["provenance"]["ticket"] = "ARM-1"
    normalized = domain.normalize_genome(genome)

    expected = json.loads(VECTOR_TEXT)
    expected["notes"] = "café ☕"
    expected["labels"] = {"team": "core", "tier": 1}
    expected["modelConfig"]["top_p"] = 0.9
    expected["provenance"]["ticket"] = "ARM-1"
    assert normalized == expected
    assert domain.genome_hash(normalized) == hashlib.sha256(
        canonical_json(expected).encode("utf-8")).hexdigest()
    assert domain.genome_hash(normalized) != VECTOR_HASH


@pytest.mark.parametrize(("field", "value"), [
    ("notes", "a"), ("notes", "b"), ("notes", 1), ("notes", None), ("notes", [1, 2]), ("notes", [2, 1]),
])
def test_each_unknown_field_value_gives_its_own_hash(field: str, value: Any) -> None:
    genome = camel_genome()
    genome[field] = value
    hashes = {domain.genome_hash(domain.normalize_genome(genome))}
    others = [v for v in ("a", "b", 1, None, [1, 2], [2, 1]) if v != value]
    for other in others:
        genome[field] = other
        hashes.add(domain.genome_hash(domain.normalize_genome(genome)))
    assert len(hashes) == 1 + len(others)


@pytest.mark.parametrize(("field", "value", "stored_as"), [
    ("temperature", 0, "temperature"),
    ("temperature", 2, "temperature"),
    ("temperature", 1.99, "temperature"),
    ("max_tokens", 1, "maxTokens"),
    ("max_tokens", 4096.0, "maxTokens"),
])
def test_boundary_values_are_accepted(field: str, value: Any, stored_as: str) -> None:
    genome = snake_genome()
    genome["model_config"][field] = value
    normalized = domain.normalize_genome(genome)
    assert normalized["modelConfig"][stored_as] == value


def test_optional_model_fields_may_be_left_out() -> None:
    genome = snake_genome()
    del genome["model_config"]["temperature"]
    del genome["model_config"]["max_tokens"]
    normalized = domain.normalize_genome(genome)
    assert normalized["modelConfig"] == {"provider": "openai", "modelId": "gpt-4.1"}


def test_created_at_may_be_a_timestamp_string() -> None:
    genome = snake_genome()
    genome["provenance"]["created_at"] = "2023-11-14T22:13:20Z"
    normalized = domain.normalize_genome(genome)
    assert normalized["provenance"]["createdAt"] == "2023-11-14T22:13:20Z"


def _set(path: str, value: Any) -> Any:
    def patch(genome: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = genome
        for p in parents:
            target = target[p]
        target[last] = value
    return patch


def _delete(path: str) -> Any:
    def patch(genome: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = genome
        for p in parents:
            target = target[p]
        del target[last]
    return patch


# (patch applied to the snake_case genome, the one field violation expected)
BAD_GENOMES = [
    ("no model_config", _delete("model_config"), "genome.model_config"),
    ("model_config not object", _set("model_config", "gpt"), "genome.model_config"),
    ("model_config list", _set("model_config", [{"provider": "x"}]), "genome.model_config"),
    ("no provider", _delete("model_config.provider"), "genome.model_config.provider"),
    ("empty provider", _set("model_config.provider", ""), "genome.model_config.provider"),
    ("blank provider", _set("model_config.provider", "   "), "genome.model_config.provider"),
    ("numeric provider", _set("model_config.provider", 5), "genome.model_config.provider"),
    ("null provider", _set("model_config.provider", None), "genome.model_config.provider"),
    ("no model_id", _delete("model_config.model_id"), "genome.model_config.model_id"),
    ("empty model_id", _set("model_config.model_id", ""), "genome.model_config.model_id"),
    ("temperature below 0", _set("model_config.temperature", -0.01), "genome.model_config.temperature"),
    ("temperature above 2", _set("model_config.temperature", 2.0001), "genome.model_config.temperature"),
    ("temperature 3", _set("model_config.temperature", 3), "genome.model_config.temperature"),
    ("temperature text", _set("model_config.temperature", "0.2"), "genome.model_config.temperature"),
    ("temperature bool", _set("model_config.temperature", True), "genome.model_config.temperature"),
    ("temperature null", _set("model_config.temperature", None), "genome.model_config.temperature"),
    ("temperature nan", _set("model_config.temperature", float("nan")), "genome.model_config.temperature"),
    ("temperature inf", _set("model_config.temperature", float("inf")), "genome.model_config.temperature"),
    ("max_tokens fractional", _set("model_config.max_tokens", 1.5), "genome.model_config.max_tokens"),
    ("max_tokens text", _set("model_config.max_tokens", "4096"), "genome.model_config.max_tokens"),
    ("max_tokens zero", _set("model_config.max_tokens", 0), "genome.model_config.max_tokens"),
    ("max_tokens negative", _set("model_config.max_tokens", -5), "genome.model_config.max_tokens"),
    ("max_tokens bool", _set("model_config.max_tokens", True), "genome.model_config.max_tokens"),
    ("max_tokens inf", _set("model_config.max_tokens", float("inf")), "genome.model_config.max_tokens"),
    ("no prompt_bundle_hash", _delete("prompt_bundle_hash"), "genome.prompt_bundle_hash"),
    ("empty prompt_bundle_hash", _set("prompt_bundle_hash", ""), "genome.prompt_bundle_hash"),
    ("numeric prompt_bundle_hash", _set("prompt_bundle_hash", 123), "genome.prompt_bundle_hash"),
    ("no tool_manifest_hash", _delete("tool_manifest_hash"), "genome.tool_manifest_hash"),
    ("blank tool_manifest_hash", _set("tool_manifest_hash", " \t"), "genome.tool_manifest_hash"),
    ("no provenance", _delete("provenance"), "genome.provenance"),
    ("provenance text", _set("provenance", "ui"), "genome.provenance"),
    ("no created_by", _delete("provenance.created_by"), "genome.provenance.created_by"),
    ("empty created_by", _set("provenance.created_by", ""), "genome.provenance.created_by"),
    ("no source", _delete("provenance.source"), "genome.provenance.source"),
    ("numeric source", _set("provenance.source", 1), "genome.provenance.source"),
    ("no created_at", _delete("provenance.created_at"), "genome.provenance.created_at"),
    ("empty created_at", _set("provenance.created_at", ""), "genome.provenance.created_at"),
    ("null created_at", _set("provenance.created_at", None), "genome.provenance.created_at"),
    ("bool created_at", _set("provenance.created_at", True), "genome.provenance.created_at"),
    ("object created_at", _set("provenance.created_at", {"s": 1}), "genome.provenance.created_at"),
    ("nan created_at", _set("provenance.created_at", float("nan")), "genome.provenance.created_at"),
    ("model_config twice", _set("modelConfig", {"provider": "a", "modelId": "b"}), "genome.model_config"),
    ("prompt_bundle_hash twice", _set("promptBundleHash", "p-2"), "genome.prompt_bundle_hash"),
    ("tool_manifest_hash twice", _set("toolManifestHash", "t-2"), "genome.tool_manifest_hash"),
    ("model_id twice", _set("model_config.modelId", "gpt-4.1"), "genome.model_config.model_id"),
    ("max_tokens twice", _set("model_config.maxTokens", 4096), "genome.model_config.max_tokens"),
    ("created_by twice", _set("provenance.createdBy", "x"), "genome.provenance.created_by"),
    ("created_at twice", _set("provenance.createdAt", 1), "genome.provenance.created_at"),
]


def _expect_invalid(genome: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        domain.normalize_genome(genome)
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_FIELDS"
    assert all(isinstance(v, FieldViolation) and v.description for v in err.violations)
    return err


@pytest.mark.parametrize(("patch", "field"), [(p, f) for _, p, f in BAD_GENOMES],
                         ids=[name for name, _, _ in BAD_GENOMES])
def test_invalid_genome_names_the_field(patch: Any, field: str) -> None:
    genome = snake_genome()
    patch(genome)
    err = _expect_invalid(genome)
    assert [v.field for v in err.violations] == [field]
    assert field in err.message


def test_all_violations_are_reported_together() -> None:
    err = _expect_invalid({})
    assert {v.field for v in err.violations} == {
        "genome.model_config", "genome.prompt_bundle_hash", "genome.tool_manifest_hash",
        "genome.provenance"}


def test_nested_violations_are_reported_together() -> None:
    genome = snake_genome()
    genome["model_config"] = {"temperature": 9, "max_tokens": 0.5}
    genome["provenance"] = {}
    err = _expect_invalid(genome)
    assert {v.field for v in err.violations} == {
        "genome.model_config.provider", "genome.model_config.model_id",
        "genome.model_config.temperature", "genome.model_config.max_tokens",
        "genome.provenance.created_by", "genome.provenance.source", "genome.provenance.created_at"}


def test_oversized_genome_is_refused() -> None:
    genome = snake_genome()
    genome["blob"] = "x" * (300 * 1024)
    err = _expect_invalid(genome)
    assert [v.field for v in err.violations] == ["genome"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_number_in_an_extra_field_is_invalid_argument(bad: float) -> None:
    genome = snake_genome()
    genome["extra"] = {"score": bad}
    err = _expect_invalid(genome)
    assert any(v.field.startswith("genome") for v in err.violations)


@PROPERTY
@given(st.dictionaries(st.text(min_size=1, max_size=10).filter(
    lambda k: k not in {"model_config", "modelConfig", "prompt_bundle_hash", "promptBundleHash",
                        "tool_manifest_hash", "toolManifestHash", "provenance"}),
    json_values(), max_size=4))
def test_extra_fields_survive_normalisation(extra: dict[str, Any]) -> None:
    genome = {**snake_genome(), **extra}
    normalized = domain.normalize_genome(genome)
    for key, value in extra.items():
        assert normalized[key] == value
    assert domain.genome_hash(normalized) == canonical_hash({**camel_genome(), **extra})


# --- genome verification -------------------------------------------------------------------------

def test_verify_genome_accepts_the_stored_text() -> None:
    text = canonical_json(domain.normalize_genome(snake_genome()))
    assert domain.verify_genome(text, VECTOR_HASH) is True


def test_verify_genome_accepts_reformatted_text() -> None:
    text = json.dumps(camel_genome(), indent=3, sort_keys=False)
    assert domain.verify_genome(text, VECTOR_HASH) is True


@pytest.mark.parametrize(("old", "new"), [
    ('"temperature":0.2', '"temperature":0.3'),
    ('"gpt-4.1"', '"gpt-4.2"'),
    ('"maxTokens":4096', '"maxTokens":4097'),
    ('"createdAt":1700000000000', '"createdAt":1700000000001'),
    ('"toolManifestHash":"tools-123456"', '"toolManifestHash":"tools-123456","x":1'),
    ('"promptBundleHash":"prompt-123456"', '"promptBundleHash":"Prompt-123456"'),
])
def test_verify_genome_detects_tampering(old: str, new: str) -> None:
    text = canonical_json(camel_genome())
    assert old in text
    tampered = text.replace(old, new)
    assert domain.verify_genome(tampered, VECTOR_HASH) is False


@pytest.mark.parametrize("text", ["", "{", "not json", '{"a": NaN}', "[1, Infinity]"])
def test_verify_genome_reports_unreadable_text_as_tampered(text: str) -> None:
    assert domain.verify_genome(text, VECTOR_HASH) is False


def test_verify_genome_with_a_different_hash() -> None:
    text = canonical_json(camel_genome())
    assert domain.verify_genome(text, "0" * 64) is False
    assert domain.verify_genome(text, "") is False


# --- lifecycles ------------------------------------------------------------------------------------

# SPEC §2 "Lifecycles", transcribed.
SPEC_VERSION = {
    "DRAFT": {"TESTING"},
    "TESTING": {"CANDIDATE", "DRAFT"},
    "CANDIDATE": {"APPROVED", "DRAFT"},
    "APPROVED": {"DEPRECATED"},
    "DEPRECATED": {"RETIRED"},
    "RETIRED": set(),
}
SPEC_INSTANCE = {
    "PROVISIONING": {"ACTIVE", "RETIRED"},
    "ACTIVE": {"PAUSED", "READONLY", "DRAINING", "QUARANTINED", "RETIRED"},
    "PAUSED": {"ACTIVE", "RETIRED"},
    "READONLY": {"ACTIVE", "RETIRED"},
    "QUARANTINED": {"ACTIVE", "READONLY", "RETIRED"},
    "DRAINING": {"RETIRED", "ACTIVE"},
    "RETIRED": set(),
}
LIFECYCLES = {
    "version": (domain.VERSION_TRANSITIONS, SPEC_VERSION),
    "instance": (domain.INSTANCE_TRANSITIONS, SPEC_INSTANCE),
}
ALL_PAIRS = [(kind, current, target)
             for kind, (_, spec) in LIFECYCLES.items() for current in spec for target in spec]


def test_lifecycle_tables_have_exactly_the_spec_states_and_edges() -> None:
    assert {k: set(v) for k, v in domain.VERSION_TRANSITIONS.items()} == SPEC_VERSION
    assert {k: set(v) for k, v in domain.INSTANCE_TRANSITIONS.items()} == SPEC_INSTANCE


def _named(name: str, text: str) -> bool:
    return re.search(rf"\b{name}\b", text) is not None


@pytest.mark.parametrize(("kind", "current", "target"), ALL_PAIRS,
                         ids=[f"{k}:{c}->{t}" for k, c, t in ALL_PAIRS])
def test_check_transition_for_every_pair(kind: str, current: str, target: str) -> None:
    table, spec = LIFECYCLES[kind]
    allowed = spec[current]
    if target in allowed:
        domain.check_transition(kind, table, current, target)  # raises when refused
        return
    with pytest.raises(FailedPrecondition) as caught:
        domain.check_transition(kind, table, current, target)
    err = caught.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INVALID_TRANSITION"
    assert err.metadata["from"] == current
    assert err.metadata["to"] == target
    assert set(filter(None, err.metadata["allowed"].split(","))) == allowed
    for state in allowed:
        assert _named(state, err.message), (state, err.message)
    # No state other than the two involved and the allowed targets is named.
    for state in set(spec) - allowed - {current, target}:
        assert not _named(state, err.message), (state, err.message)
    if not allowed:
        assert "final" in err.message


@pytest.mark.parametrize(("kind", "current"), [("version", "APPROVED"), ("instance", "ACTIVE")])
def test_unknown_target_state_is_refused(kind: str, current: str) -> None:
    table, spec = LIFECYCLES[kind]
    with pytest.raises(FailedPrecondition) as caught:
        domain.check_transition(kind, table, current, "BOGUS")
    assert caught.value.reason == "INVALID_TRANSITION"
    assert all(_named(s, caught.value.message) for s in spec[current])


@PROPERTY
@given(st.sampled_from(sorted(LIFECYCLES)), st.data())
def test_random_walks_follow_the_spec(kind: str, data: st.DataObject) -> None:
    table, spec = LIFECYCLES[kind]
    state = "DRAFT" if kind == "version" else "PROVISIONING"
    for _ in range(data.draw(st.integers(0, 30), label="steps")):
        target = data.draw(st.sampled_from(sorted(spec)), label="target")
        try:
            domain.check_transition(kind, table, state, target)
        except FailedPrecondition:
            assert target not in spec[state]
        else:
            assert target in spec[state]
            state = target
    if state == "RETIRED":
        for target in spec:
            with pytest.raises(FailedPrecondition):
                domain.check_transition(kind, table, state, target)


@pytest.mark.parametrize("kind", sorted(LIFECYCLES))
def test_every_state_is_reachable_and_retired_is_final(kind: str) -> None:
    table, spec = LIFECYCLES[kind]
    start = "DRAFT" if kind == "version" else "PROVISIONING"
    seen, frontier = {start}, [start]
    while frontier:
        state = frontier.pop()
        for target in spec:
            try:
                domain.check_transition(kind, table, state, target)
            except FailedPrecondition:
                continue
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(spec)


# --- legacy status mapping -------------------------------------------------------------------------

@pytest.mark.parametrize(("legacy", "state"), [
    ("ACTIVE", "ACTIVE"),
    ("PAUSED", "PAUSED"),
    ("DRAINED", "DRAINING"),
    ("QUARANTINED", "QUARANTINED"),
    ("OFFLINE", "READONLY"),
    ("active", "ACTIVE"),
    ("Drained", "DRAINING"),
    (" offline ", "READONLY"),
    ("", "PROVISIONING"),
    ("UNKNOWN", "PROVISIONING"),
    ("RETIRED", "PROVISIONING"),
    ("DRAINING", "PROVISIONING"),
    ("READONLY", "PROVISIONING"),
    ("ERROR", "PROVISIONING"),
    ("ACTIVE_", "PROVISIONING"),
])
def test_legacy_status_to_state(legacy: str, state: str) -> None:
    assert domain.legacy_status_to_state(legacy) == state


@PROPERTY
@given(st.text(alphabet="ACDEFILNOPRSTUVQaeiorst _-", max_size=14))
def test_legacy_status_outside_the_spec_list_is_provisioning(status: str) -> None:
    known = {"ACTIVE": "ACTIVE", "PAUSED": "PAUSED", "DRAINED": "DRAINING",
             "QUARANTINED": "QUARANTINED", "OFFLINE": "READONLY"}
    expected = known.get(status.strip().upper(), "PROVISIONING")
    assert domain.legacy_status_to_state(status) == expected


@pytest.mark.parametrize("legacy", ["ACTIVE", "PAUSED", "DRAINED", "QUARANTINED", "OFFLINE"])
def test_legacy_statuses_map_back(legacy: str) -> None:
    assert domain.INSTANCE_TO_LEGACY[domain.legacy_status_to_state(legacy)] == legacy


def test_every_instance_state_has_a_legacy_status() -> None:
    assert set(domain.INSTANCE_TO_LEGACY) == set(SPEC_INSTANCE)


# --- identities ------------------------------------------------------------------------------------

SOUL = "I am a careful agent. Ünïcödé too."
SOUL_HASH = hashlib.sha256(SOUL.encode("utf-8")).hexdigest()


@pytest.mark.parametrize(("soul", "given_hash", "tools", "expected"), [
    ("", "", "", ("MISSING", "")),
    ("", "", "tools", ("MISSING", "")),
    ("", "abc", "tools", ("INVALID", "")),
    (SOUL, "", "search, browse", ("VALID", SOUL_HASH)),
    (SOUL, SOUL_HASH, "search", ("VALID", SOUL_HASH)),
    (SOUL, SOUL_HASH.upper(), "search", ("VALID", SOUL_HASH)),
    (SOUL, "0" * 64, "search", ("INVALID", SOUL_HASH)),
    (SOUL, SOUL_HASH[:-1], "search", ("INVALID", SOUL_HASH)),
    (SOUL, "", "", ("PARTIAL", SOUL_HASH)),
    (SOUL, SOUL_HASH, "  \n", ("PARTIAL", SOUL_HASH)),
    (SOUL, "f" * 64, "", ("INVALID", SOUL_HASH)),
])
def test_identity_status(soul: str, given_hash: str, tools: str, expected: tuple[str, str]) -> None:
    assert domain.identity_status(soul, given_hash, tools) == expected


# --- permissions and roles -------------------------------------------------------------------------

SPEC_PERMISSIONS = {"policies:write", "approvals:decide", "deployments:activate",
                    "instances:transition", "audit:read", "telemetry:read", "registry:write",
                    "operators:admin", "versions:approve"}


def test_permission_catalogue_contains_the_spec_examples() -> None:
    assert SPEC_PERMISSIONS <= set(domain.PERMISSIONS)


def test_permissions_are_resource_action_pairs_with_descriptions() -> None:
    for name, description in domain.PERMISSIONS.items():
        assert re.fullmatch(r"[a-z]+:[a-z]+", name), name
        assert description.strip(), name


def test_built_in_roles_are_exactly_the_spec_roles() -> None:
    assert set(domain.BUILT_IN_ROLES) == {"admin", "approver", "operator", "auditor", "agent"}


@pytest.mark.parametrize("role", ["admin", "approver", "operator", "auditor", "agent"])
def test_built_in_roles_use_only_catalogue_permissions(role: str) -> None:
    description, permissions = domain.BUILT_IN_ROLES[role]
    assert description.strip()
    assert permissions
    assert set(permissions) <= set(domain.PERMISSIONS)
    assert len(set(permissions)) == len(permissions)


def test_admin_has_every_tenant_permission() -> None:
    _, permissions = domain.BUILT_IN_ROLES["admin"]
    assert SPEC_PERMISSIONS <= set(permissions)
    # Managing tenants is for the system tenant only, not a tenant's own admin.
    assert "tenants:admin" not in permissions
    assert set(permissions) == set(domain.PERMISSIONS) - {"tenants:admin"}


def test_role_duties() -> None:
    roles = {name: set(perms) for name, (_, perms) in domain.BUILT_IN_ROLES.items()}
    assert {"approvals:decide", "versions:approve"} <= roles["approver"]
    assert "instances:transition" in roles["operator"]
    assert {"audit:read", "telemetry:read"} <= roles["auditor"]
    # "Reads everything, changes nothing."
    assert all(p.endswith(":read") for p in roles["auditor"])
    # SPEC §5: agents may only Check, ingest events and deal with their own approvals.
    assert roles["agent"] <= {"decisions:check", "telemetry:write", "approvals:request",
                              "approvals:read"}
    assert {"decisions:check", "telemetry:write"} <= roles["agent"]
    for role in ("approver", "operator", "auditor", "agent"):
        assert "operators:admin" not in roles[role]
        assert "tenants:admin" not in roles[role]
