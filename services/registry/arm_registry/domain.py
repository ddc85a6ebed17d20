"""Registry domain rules, free of I/O: the permission catalogue and built-in roles, the version
and instance lifecycles, genome normalisation and validation, legacy status mapping."""

from __future__ import annotations

import json
import math
from typing import Any

from arm_common.canonical import canonical_hash, canonical_json, sha256_hex
from arm_common.errors import FailedPrecondition, Violations

# --- Permissions -------------------------------------------------------------------------------

PERMISSIONS: dict[str, str] = {
    "tenants:admin": "Create and manage tenants (system tenant only).",
    "registry:read": "Read tenants, environments, projects, templates, versions, instances.",
    "registry:write": "Create and change environments, projects, templates, versions, instances.",
    "operators:admin": "Manage operators, roles, role assignments and API keys.",
    "versions:approve": "Approve a CANDIDATE version (CANDIDATE → APPROVED).",
    "instances:transition": "Move instances between lifecycle states.",
    "policies:read": "Read policy envelopes and operator controls.",
    "policies:write": "Create and change policy envelopes and operator controls.",
    "approvals:request": "Request approvals.",
    "approvals:decide": "Approve or deny approval requests.",
    "deployments:write": "Create and roll back deployments.",
    "deployments:activate": "Activate deployments.",
    "audit:read": "Read and export the audit trail.",
    "audit:write": "Append change records from trusted external systems.",
    "telemetry:read": "Query and tail opEvents.",
    "telemetry:write": "Ingest opEvents.",
    "decisions:check": "Ask for a decision before a tool call.",
}

_ALL_TENANT = sorted(p for p in PERMISSIONS if p != "tenants:admin")
BUILT_IN_ROLES: dict[str, tuple[str, list[str]]] = {
    "admin": ("Everything in the tenant.", _ALL_TENANT),
    "approver": ("Decides approvals and approves versions.",
                 ["registry:read", "approvals:request", "approvals:decide", "versions:approve",
                  "policies:read", "audit:read", "telemetry:read"]),
    "operator": ("Runs agents day to day.",
                 ["registry:read", "registry:write", "instances:transition", "policies:read",
                  "approvals:request", "deployments:write", "telemetry:read", "audit:read"]),
    "auditor": ("Reads everything, changes nothing.",
                ["registry:read", "policies:read", "audit:read", "telemetry:read"]),
    "agent": ("Agent runtimes: decisions, events, their own approvals.",
              ["decisions:check", "telemetry:write", "approvals:request"]),
}
SYSTEM_ADMIN_EXTRA = ["tenants:admin"]

# --- Lifecycles --------------------------------------------------------------------------------

VERSION_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "DRAFT": ("TESTING",),
    "TESTING": ("CANDIDATE", "DRAFT"),
    "CANDIDATE": ("APPROVED", "DRAFT"),
    "APPROVED": ("DEPRECATED",),
    "DEPRECATED": ("RETIRED",),
    "RETIRED": (),
}

INSTANCE_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "PROVISIONING": ("ACTIVE", "RETIRED"),
    "ACTIVE": ("PAUSED", "READONLY", "DRAINING", "QUARANTINED", "RETIRED"),
    "PAUSED": ("ACTIVE", "RETIRED"),
    "READONLY": ("ACTIVE", "RETIRED"),
    "QUARANTINED": ("ACTIVE", "READONLY", "RETIRED"),
    "DRAINING": ("RETIRED", "ACTIVE"),
    "RETIRED": (),
}


def check_transition(kind: str, table: dict[str, tuple[str, ...]], current: str, target: str) -> None:
    """Raises FAILED_PRECONDITION naming the allowed targets when current → target is not allowed."""
    allowed = table[current]
    if target not in allowed:
        names = ", ".join(allowed) or "none (final state)"
        raise FailedPrecondition(
            f"{kind} cannot go from {current} to {target}; allowed from {current}: {names}",
            reason="INVALID_TRANSITION",
            metadata={"from": current, "to": target, "allowed": ",".join(allowed)})


# --- Legacy compatibility ----------------------------------------------------------------------

LEGACY_TO_INSTANCE = {"ACTIVE": "ACTIVE", "PAUSED": "PAUSED", "DRAINED": "DRAINING",
                      "QUARANTINED": "QUARANTINED", "OFFLINE": "READONLY"}
INSTANCE_TO_LEGACY = {"ACTIVE": "ACTIVE", "PAUSED": "PAUSED", "DRAINING": "DRAINED",
                      "QUARANTINED": "QUARANTINED", "READONLY": "OFFLINE",
                      "PROVISIONING": "PROVISIONING", "RETIRED": "RETIRED"}


def legacy_status_to_state(status: str) -> str:
    """SPEC §2 mapping; anything unknown is PROVISIONING."""
    return LEGACY_TO_INSTANCE.get(status.strip().upper(), "PROVISIONING")


# --- Genome ------------------------------------------------------------------------------------

# Required fields are stored under the older platform's names so hashes match its hashes.
_TOP_ALIASES = {"model_config": "modelConfig", "prompt_bundle_hash": "promptBundleHash",
                "tool_manifest_hash": "toolManifestHash"}
_MODEL_ALIASES = {"model_id": "modelId", "max_tokens": "maxTokens"}
_PROVENANCE_ALIASES = {"created_by": "createdBy", "created_at": "createdAt"}
MAX_GENOME_BYTES = 256 * 1024


def _rename(obj: dict[str, Any], aliases: dict[str, str], path: str, v: Violations) -> dict[str, Any]:
    out = dict(obj)
    for snake, camel in aliases.items():
        if snake in out:
            if camel in out:
                v.add(f"{path}{snake}", f"given twice (as {snake} and {camel})")
            out[camel] = out.pop(snake)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalize_genome(genome: dict[str, Any]) -> dict[str, Any]:
    """Validates a genome and returns it with the required fields under their legacy names.
    Field violations name the field as the request spells it (snake_case), e.g.
    `genome.model_config.provider`."""
    v = Violations()
    g = _rename(genome, _TOP_ALIASES, "genome.", v)
    mc = g.get("modelConfig")
    if not isinstance(mc, dict):
        v.add("genome.model_config", "is required and must be an object")
    else:
        mc = _rename(mc, _MODEL_ALIASES, "genome.model_config.", v)
        g["modelConfig"] = mc
        for name, path in (("provider", "provider"), ("modelId", "model_id")):
            if not isinstance(mc.get(name), str) or not mc[name].strip():
                v.add(f"genome.model_config.{path}", "is required and must be a non-empty string")
        if "temperature" in mc and (not _number(mc["temperature"]) or not 0 <= mc["temperature"] <= 2):
            v.add("genome.model_config.temperature", "must be a number from 0 to 2")
        if "maxTokens" in mc and (not _number(mc["maxTokens"]) or mc["maxTokens"] != int(mc["maxTokens"])
                                  or mc["maxTokens"] <= 0):
            v.add("genome.model_config.max_tokens", "must be a positive integer")
    for name, path in (("promptBundleHash", "prompt_bundle_hash"),
                       ("toolManifestHash", "tool_manifest_hash")):
        if not isinstance(g.get(name), str) or not g[name].strip():
            v.add(f"genome.{path}", "is required and must be a non-empty string")
    prov = g.get("provenance")
    if not isinstance(prov, dict):
        v.add("genome.provenance", "is required and must be an object")
    else:
        prov = _rename(prov, _PROVENANCE_ALIASES, "genome.provenance.", v)
        g["provenance"] = prov
        for name, path in (("createdBy", "created_by"), ("source", "source")):
            if not isinstance(prov.get(name), str) or not prov[name].strip():
                v.add(f"genome.provenance.{path}", "is required and must be a non-empty string")
        created = prov.get("createdAt")
        if not (_number(created) or (isinstance(created, str) and created.strip())):
            v.add("genome.provenance.created_at", "is required (epoch milliseconds or a timestamp)")
    if not v:
        try:
            size = len(canonical_json(g).encode())
        except (ValueError, TypeError) as exc:  # NaN, Infinity: no JSON form, so no hash
            v.add("genome", f"has a value with no JSON form ({exc})")
        else:
            if size > MAX_GENOME_BYTES:
                v.add("genome", f"must be at most {MAX_GENOME_BYTES} bytes as canonical JSON")
    v.raise_if_any("the genome is invalid")
    return g


def genome_hash(genome: dict[str, Any]) -> str:
    """SPEC §2: lowercase hex SHA-256 of the canonical JSON of the genome."""
    return canonical_hash(genome)


def verify_genome(genome_json: str, stored_hash: str) -> bool:
    """Recomputes the hash of a stored genome; False means it was altered after creation."""
    try:
        return genome_hash(json.loads(genome_json)) == stored_hash
    except (ValueError, TypeError):
        return False


# --- Identities --------------------------------------------------------------------------------

def identity_status(soul_content: str, given_soul_hash: str, tools_notes: str) -> tuple[str, str]:
    """Returns (validation status, soul hash). A given hash that disagrees with the content is
    INVALID; no soul is MISSING; a soul without tools notes is PARTIAL; else VALID."""
    if not soul_content:
        return ("INVALID" if given_soul_hash else "MISSING"), ""
    actual = sha256_hex(soul_content)
    if given_soul_hash and given_soul_hash.lower() != actual:
        return "INVALID", actual
    if not tools_notes.strip():
        return "PARTIAL", actual
    return "VALID", actual
