"""Edge validation of registry requests: every bad field is reported at once as INVALID_ARGUMENT
with field violations, before any permission check or database work."""

from __future__ import annotations

from google.protobuf.message import Message

from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2
from arm_common import validation as val
from arm_common.errors import Violations

ENV_TYPES = set(tenancy_pb2.EnvironmentType.values()) - {0}
VERSION_STATES = set(agents_pb2.VersionState.values()) - {0}
INSTANCE_STATES = set(agents_pb2.InstanceState.values()) - {0}
EVAL_STATUSES = set(agents_pb2.EvalStatus.values()) - {0}
SCOPE_TYPES = set(access_pb2.RoleScopeType.values())
MAX_SESSION_TTL_S = 30 * 86400


def check(request: Message, *rules: tuple[str, str], prefix: str = "") -> None:
    """Validates `request` with the shared checks plus the given (kind, field) rules.
    kinds: id (required id), id? (optional id), name, name?, text?, slug, email, enum, enum?,
    list, long? (up to 200,000 characters), session_ttl (a required Duration, 1 s to 30 days). `prefix` names a nested message, e.g.
    "agent_identity.", in the field violations."""
    v = Violations()
    val.standard_fields(v, request)
    for kind, name in rules:
        value = getattr(request, name)
        field = prefix + name
        if kind == "id":
            val.resource_id(v, field, value)
        elif kind == "id?":
            val.resource_id(v, field, value, required_=False)
        elif kind == "name":
            val.required(v, field, value)
        elif kind == "name?":
            val.optional(v, field, value)
        elif kind == "text?":
            val.optional(v, field, value, val.MAX_TEXT)
        elif kind == "slug":
            val.slug(v, field, value)
        elif kind == "email":
            val.email(v, field, value)
        elif kind == "long?":
            val.optional(v, field, value, 200_000)
        elif kind.startswith("enum"):
            enum_type = {f.name: f for f in request.DESCRIPTOR.fields}[name].enum_type
            assert enum_type is not None, f"{name} is not an enum field"
            enum_values = enum_type.values_by_number
            if kind == "enum?" and value == 0:
                continue
            val.enum_set(v, field, value, set(enum_values) - {0})
        elif kind == "list":
            val.string_list(v, field, list(value))
        elif kind == "session_ttl":
            seconds = value.ToTimedelta().total_seconds() if request.HasField(name) else 0.0
            if not 1 <= seconds <= MAX_SESSION_TTL_S:
                v.add(field, "is required: from 1 second to 30 days")
        else:  # pragma: no cover - a programming error in a rule table
            raise ValueError(kind)
    v.raise_if_any()


def check_present(request: Message, *rules: tuple[str, str]) -> None:
    """check() for the optional fields an update request actually sets."""
    check(request, *[rule for rule in rules if request.HasField(rule[1])])
