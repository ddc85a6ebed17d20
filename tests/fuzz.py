"""Property-based fuzzing of every RPC of a service, driven by its descriptors (issue 10 item 4).

Requests are random but well-typed: every field of the request message, nested messages, maps,
repeated fields, `Struct` values, `Timestamp` / `Duration`, enums (defined numbers and others),
with hostile values mixed in (NUL characters, 10 000-character strings, integers at and past the
column ranges, NaN and ±Infinity, timestamps and durations past their ranges). About half the
requests are drawn tame instead: plausible values only (slugs, e-mails, ids of real resources,
defined enums, times near now, valid genomes), so the fuzz gets past validation and NOT_FOUND
into the stores. The servers are the real ones, on port 0, in a background thread with their own event
loop (hypothesis drives synchronous tests); calls go through real channels with an admin key.

The property: no call answers INTERNAL or UNKNOWN, and the server still serves afterwards.
ARM_FUZZ_EXAMPLES sets the examples per RPC (default 12; PostgreSQL runs a third of them)."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = TypeVar("T")

EXAMPLES = int(os.environ.get("ARM_FUZZ_EXAMPLES", "12"))
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_DEPTH = 3  # nesting of messages (and of Struct values) generated

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def fuzz_settings(backend: str) -> settings:
    examples = EXAMPLES if backend == "sqlite" else max(2, EXAMPLES // 3)
    return settings(database=None, deadline=None, max_examples=examples, derandomize=False,
                    suppress_health_check=list(HealthCheck))


class Loop:
    """An event loop in a thread: the servers run there while hypothesis calls them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ---- strategies from descriptors -------------------------------------------------------------

def _text(min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    # Surrogates are not UTF-8; protobuf refuses them on the client already.
    return st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=min_size, max_size=max_size)


hostile_strings = st.sampled_from(["\x00", "a\x00b", "x" * 10_000, " ", "*", "%", "../..", "'; drop",
                                   "2147483648", "-1", "9" * 40, "é" * 300, "\u202e", "null"])


def strings(pool: list[str]) -> st.SearchStrategy[str]:
    return _text() | hostile_strings | (st.sampled_from(pool) if pool else st.nothing())


def integers(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = [low, high, -1, 0, 1, 2**31 - 1, 2**31, 2**53 + 1]
    return st.integers(min_value=low, max_value=high) | st.sampled_from([e for e in edges if low <= e <= high])


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324])


def _timestamp_seconds() -> st.SearchStrategy[int]:
    return (st.integers(0, 4_102_444_800) | st.integers(*INT64)
            | st.sampled_from([-62_135_596_801, -62_135_596_800, 253_402_300_799, 253_402_300_800]))


def _nanos() -> st.SearchStrategy[int]:
    return st.integers(0, 999_999_999) | st.sampled_from([-1, 1_000_000_000, INT32[0], INT32[1]])


def json_values(depth: int) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | floats | _text() | hostile_strings
               | st.integers(-(2**53), 2**53).map(float))
    if depth <= 0:
        return scalars
    return scalars | st.lists(json_values(depth - 1), max_size=3) | st.dictionaries(
        _text(max_size=8) | hostile_strings, json_values(depth - 1), max_size=3)


@dataclass
class Generator:
    """Builds request strategies from message descriptors; `pool` holds ids of real resources."""

    pool: list[str] = field(default_factory=list)
    # Tame: plausible values only (slugs, e-mails, ids of real resources, defined non-zero enums,
    # times near now, small finite numbers, valid genomes), so that requests get past validation
    # into the stores; the wild generator mixes in the hostile values.
    tame: bool = False
    cache: dict[tuple[str, int], st.SearchStrategy[Message]] = field(default_factory=dict)

    def message(self, descriptor: Descriptor, depth: int = MAX_DEPTH) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, depth)
        if key not in self.cache:
            self.cache[key] = st.deferred(lambda: self._build(descriptor, depth))
        return self.cache[key]

    def _build(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = GetMessageClass(descriptor)
        name = descriptor.full_name
        if self.tame:
            tame = self._tame_well_known(cls, name)
            if tame is not None:
                return tame
        if name == "google.protobuf.Timestamp":
            return st.builds(lambda s, n: cls(seconds=s, nanos=n), _timestamp_seconds(), _nanos())
        if name == "google.protobuf.Duration":
            return st.builds(lambda s, n: cls(seconds=s, nanos=n),
                             st.integers(-86_400 * 400, 86_400 * 400) | st.integers(*INT64)
                             | st.sampled_from([315_576_000_001, -315_576_000_001]),
                             _nanos())
        if name == "google.protobuf.Struct":
            def struct(values: dict[str, Any]) -> Message:
                out: Any = cls()
                out.update(values)
                return out
            return st.dictionaries(_text(max_size=10) | hostile_strings, json_values(2), max_size=4).map(struct)
        if name == "google.protobuf.FieldMask":
            return st.builds(lambda paths: cls(paths=paths), st.lists(
                st.sampled_from(_all_field_names()) | _text(max_size=10), max_size=3))
        if depth <= 0:
            return st.just(cls())
        fields = {fd.name: self._field(fd, depth) for fd in descriptor.fields}

        @st.composite
        def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
            msg = cls()
            for fd in descriptor.fields:
                value = draw(st.none() | fields[fd.name])
                if value is None:
                    continue
                target = getattr(msg, fd.name)
                if _is_map(fd):
                    for k, item in value.items():
                        if _entry(fd).fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                            target[k].CopyFrom(item)
                        else:
                            target[k] = item
                elif fd.is_repeated:
                    if fd.type == FieldDescriptor.TYPE_MESSAGE:
                        for item in value:
                            target.add().CopyFrom(item)
                    else:
                        target.extend(value)
                elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                    target.CopyFrom(value)
                else:
                    setattr(msg, fd.name, value)
            return msg
        return build()

    def _field(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if _is_map(fd):
            key = _entry(fd).fields_by_name["key"]
            value = _entry(fd).fields_by_name["value"]
            return st.dictionaries(self._single(key, depth), self._single(value, depth), max_size=3)
        single = self._single(fd, depth)
        if fd.is_repeated:
            return st.lists(single, max_size=3)
        return single

    def _tame_well_known(self, cls: Any, name: str) -> st.SearchStrategy[Message] | None:
        now = 1_780_000_000
        if name == "google.protobuf.Timestamp":
            return st.builds(lambda s, n: cls(seconds=s, nanos=n), st.integers(now - 86_400 * 400, now + 86_400 * 400),
                             st.integers(0, 999_999_999))
        if name == "google.protobuf.Duration":
            return st.builds(lambda s: cls(seconds=s), st.integers(1, 86_400 * 40))
        if name == "google.protobuf.Struct":
            def struct(values: dict[str, Any]) -> Message:
                out: Any = cls()
                out.update(values)
                return out
            from tests.helpers import genome
            tame_json = st.recursive(st.none() | st.booleans() | st.floats(-1e6, 1e6) | _text(max_size=12).filter(
                lambda t: "\x00" not in t), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                    _text(max_size=8).filter(lambda t: "\x00" not in t), c, max_size=3), max_leaves=8)
            return (st.builds(genome) | st.dictionaries(_text(max_size=8).filter(lambda t: "\x00" not in t),
                                                         tame_json, max_size=4).map(struct))
        return None

    def _tame_single(self, fd: FieldDescriptor) -> st.SearchStrategy[Any] | None:
        t, name = fd.type, fd.name
        if t == FieldDescriptor.TYPE_STRING:
            if name == "id" or name.endswith(("_id", "_ids")):
                return st.sampled_from(self.pool) if self.pool else st.just("")
            if "slug" in name:
                return st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}", fullmatch=True)
            if "email" in name:
                return st.from_regex(r"[a-z]{1,10}@[a-z]{1,10}\.example", fullmatch=True)
            if name in ("etag", "page_token"):
                return st.sampled_from(["", "1", "2"])
            if "tool" in name or name == "name" or name.endswith("_name"):
                return st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True)
            return _text(max_size=40).filter(lambda t: "\x00" not in t)
        if t == FieldDescriptor.TYPE_ENUM:
            assert fd.enum_type is not None
            return st.sampled_from([v.number for v in fd.enum_type.values if v.number] or [0])
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return st.floats(0, 1000)
        if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
            return st.integers(0, 100)
        return None

    def _single(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        t = fd.type
        if t == FieldDescriptor.TYPE_MESSAGE:
            return self.message(_entry(fd), depth - 1)
        if self.tame:
            tame = self._tame_single(fd)
            if tame is not None:
                return tame
        if t == FieldDescriptor.TYPE_STRING:
            idish = fd.name == "id" or fd.name.endswith(("_id", "_ids", "etag", "page_token"))
            return strings(self.pool) if idish else strings([])
        if t == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=40)
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return floats if t == FieldDescriptor.TYPE_DOUBLE else floats.filter(
                lambda f: not math.isfinite(f) or abs(f) < 3.4e38)
        if t == FieldDescriptor.TYPE_ENUM:
            assert fd.enum_type is not None
            numbers = [v.number for v in fd.enum_type.values]
            return st.sampled_from(numbers) | st.sampled_from([-1, max(numbers) + 1, INT32[1]])
        if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
            return integers(INT64)
        if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            return integers((0, 2**64 - 1))
        if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            return integers((0, 2**32 - 1))
        return integers(INT32)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and _entry(fd).GetOptions().map_entry


def _entry(fd: FieldDescriptor) -> Descriptor:
    """The message type of a message (or map) field."""
    assert fd.message_type is not None
    return fd.message_type


def _all_field_names() -> list[str]:
    return ["name", "description", "labels", "active", "display_name", "tool_rules", "budgets",
            "default_effect", "mode", "priority", "scope", "require_active_deployment", "x"]


# ---- calling -------------------------------------------------------------------------------------

def methods(service: ServiceDescriptor) -> list[MethodDescriptor]:
    return list(service.methods)


def service_descriptors(*full_names: str) -> list[ServiceDescriptor]:
    pool = descriptor_pool.Default()
    return [pool.FindServiceByName(n) for n in full_names]


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str


def call(channel: grpc.Channel, method: MethodDescriptor, requests: list[Message],
         metadata: tuple[tuple[str, str], ...], *, stream_wait_s: float = 0.3) -> Outcome:
    """Calls `method` once: unary calls wait for the answer; a server stream is opened and
    cancelled after `stream_wait_s` if still open (its status then is CANCELLED); a client stream
    sends `requests` and closes."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    ser = GetMessageClass(method.input_type).SerializeToString
    de = GetMessageClass(method.output_type).FromString
    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(path, request_serializer=ser, response_deserializer=de)(
                requests[0], metadata=metadata, timeout=30)
            return Outcome(grpc.StatusCode.OK, "")
        if not method.client_streaming:
            stream = channel.unary_stream(path, request_serializer=ser, response_deserializer=de)(
                requests[0], metadata=metadata, timeout=30)
        else:
            stream = channel.stream_stream(path, request_serializer=ser, response_deserializer=de)(
                iter(requests), metadata=metadata, timeout=30)
        return _drain(stream, stream_wait_s if not method.client_streaming else 30)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")


def _drain(stream: Any, wait_s: float) -> Outcome:
    """Reads the responses in a thread (a stream's status arrives only after its messages are
    read) and cancels the call if it is still open after `wait_s`."""
    done = threading.Event()
    stream.add_done_callback(lambda _c: done.set())

    def read() -> None:
        try:
            for _response in stream:
                pass
        except grpc.RpcError:
            pass
    threading.Thread(target=read, daemon=True).start()
    if not done.wait(wait_s):
        stream.cancel()
        done.wait(10)
    return Outcome(stream.code(), stream.details() or "")


def raw_call(channel: grpc.Channel, method: MethodDescriptor, payloads: list[bytes],
             metadata: tuple[tuple[str, str], ...]) -> Outcome:
    """Sends raw bytes as the request (or as the messages of a client stream)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    de = GetMessageClass(method.output_type).FromString
    try:
        if method.client_streaming:
            stream = channel.stream_stream(path, request_serializer=bytes, response_deserializer=de)(
                iter(payloads), metadata=metadata, timeout=30)
            return _drain(stream, 30)
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=bytes, response_deserializer=de)(
                payloads[0], metadata=metadata, timeout=30)
            return _drain(stream, 5)
        channel.unary_unary(path, request_serializer=bytes, response_deserializer=de)(
            payloads[0], metadata=metadata, timeout=30)
        return Outcome(grpc.StatusCode.OK, "")
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def temp_dir(base: Path, name: str) -> Path:
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ids_of(*messages: Message) -> Iterator[str]:
    """Every non-empty `id` / `*_id` string field of the given messages (not recursive)."""
    for msg in messages:
        for fd, value in msg.ListFields():
            if fd.type == FieldDescriptor.TYPE_STRING and not fd.is_repeated and (
                    fd.name == "id" or fd.name.endswith("_id")) and value:
                yield value


# ---- the servers ---------------------------------------------------------------------------------

@dataclass
class Stack:
    """Registry, governance and telemetry, seeded with one tenant's resources whose ids the
    fuzz draws from. `keys` are the admin keys the fuzz calls with: the system administrator's
    and the seeded tenant's administrator's."""

    loop: Loop
    backend: str
    servers: dict[str, Any]
    keys: list[str]
    pool: list[str]
    addresses: dict[str, str]

    def stop(self) -> None:
        from tests.conftest import stop_governance, stop_registry
        from tests.telemetry.conftest import stop_telemetry

        async def stop_all() -> None:
            await stop_telemetry(self.servers["telemetry"])
            await stop_governance(self.servers["governance"])
            await stop_registry(self.servers["registry"])
        self.loop.run(stop_all())
        self.loop.close()


def start_stack(backend: str, folder: Path) -> Stack:
    from tests.conftest import new_database_spec, start_governance, start_registry
    from tests.telemetry.conftest import start_telemetry

    loop = Loop()

    async def start() -> Stack:
        registry = await start_registry(new_database_spec(backend, folder, "registry"))
        governance = await start_governance(new_database_spec(backend, folder, "governance"), registry)
        telemetry = await start_telemetry(new_database_spec(backend, folder, "telemetry"), registry, governance)
        pool, tenant_key = await seed(registry.address, registry.admin_key, governance.address)
        return Stack(loop, backend, {"registry": registry, "governance": governance, "telemetry": telemetry},
                     [registry.admin_key, tenant_key], pool,
                     {"registry": registry.address, "governance": governance.address,
                      "telemetry": telemetry.address})
    return loop.run(start())


async def seed(registry_address: str, system_key: str, governance_address: str) -> tuple[list[str], str]:
    """One tenant with a project, environment, template, approved version, instance, operator,
    key, role, policy envelope and approval; returns their ids and the tenant admin's key."""
    from arm.common.v1 import common_pb2
    from arm.governance.v1 import approvals_pb2, policy_pb2
    from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2
    from arm_client import ArmClient
    from tests.helpers import approved_version, operator_key

    system = ArmClient(registry_address, system_key)
    slug = unique("fz")
    created = await system.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
        slug=slug, name="Fuzz", admin_email=f"admin@{slug}.example", admin_name="Fuzz Admin"))
    admin = ArmClient(registry_address, created.admin_api_key)
    gov = ArmClient(governance_address, created.admin_api_key)
    try:
        agent = await approved_version(admin)
        instance = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agent.version.id, environment_id=agent.environment.id, name="fuzz",
            legacy_agent_id=unique("legacy")))).agent_instance
        op_id, _key = await operator_key(admin, "approver")
        keys = (await admin.access.ListApiKeys(access_pb2.ListApiKeysRequest(operator_id=op_id))).api_keys
        role = (await admin.access.CreateRole(access_pb2.CreateRoleRequest(
            name=unique("role"), permissions=["registry:read"]))).role
        envelope = (await gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
            envelope=policy_pb2.PolicyEnvelope(
                name="fuzz", scope=policy_pb2.POLICY_SCOPE_TENANT, scope_id=created.tenant.id,
                mode=policy_pb2.POLICY_MODE_ENFORCE)))).envelope
        approval = (await gov.approvals.RequestApproval(approvals_pb2.RequestApprovalRequest(
            action_type=approvals_pb2.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, instance_id=instance.id,
            tool_name="shell", risk=common_pb2.RISK_LEVEL_HIGH, justification="fuzz",
            run_id="run-1", tool_call_id="call-1"))).approval
        pool = [created.tenant.id, *ids_of(agent.project, agent.environment, agent.template, agent.version,
                                           instance, role, envelope, approval),
                op_id, *(k.id for k in keys), instance.legacy_agent_id, "1", "2"]
        return sorted(set(pool)), created.admin_api_key
    finally:
        await system.close()
        await admin.close()
        await gov.close()


# ---- the property ----------------------------------------------------------------------------------

# RPCs that use up the key they are called with: each call gets a session key of the admin key
# drawn (CreateSessionKey), so the stack's own keys survive them.
SPENDS_ITS_KEY = {"arm.registry.v1.AccessService.RevokeCallerKey"}


def session_key(channel: grpc.Channel, key: str) -> str:
    from google.protobuf import duration_pb2

    from arm.registry.v1 import access_pb2
    path = "/arm.registry.v1.AccessService/CreateSessionKey"
    made = channel.unary_unary(path, request_serializer=access_pb2.CreateSessionKeyRequest.SerializeToString,
                               response_deserializer=access_pb2.CreateSessionKeyResponse.FromString)(
        access_pb2.CreateSessionKeyRequest(ttl=duration_pb2.Duration(seconds=600)), metadata=auth(key), timeout=30)
    return str(made.secret)


def fuzz_method(stack: Stack, service: str, method: MethodDescriptor) -> None:
    """Random well-typed requests to `method` with an admin key: never INTERNAL or UNKNOWN."""
    from hypothesis import given

    wild = Generator(pool=stack.pool).message(method.input_type)
    tame = Generator(pool=stack.pool, tame=True).message(method.input_type)
    requests = st.lists(wild | tame, min_size=1, max_size=3 if method.client_streaming else 1)
    channel = grpc.insecure_channel(stack.addresses[service])
    try:
        @fuzz_settings(stack.backend)
        @given(requests=requests, key=st.sampled_from(stack.keys))
        def property_(requests: list[Message], key: str) -> None:
            if method.full_name in SPENDS_ITS_KEY:
                key = session_key(channel, key)
            outcome = call(channel, method, requests, auth(key))
            assert outcome.code not in BAD_CODES, (
                f"{method.full_name} answered {outcome.code.name}: {outcome.details}\n{requests!r}")
        property_()
        assert serving(channel), f"{service} stopped serving after fuzzing {method.name}"
    finally:
        channel.close()


def undecodable_is_invalid_argument(stack: Stack, service: str, method: MethodDescriptor) -> Outcome:
    """Sends bytes that are not the request message (a truncated length-delimited field)."""
    channel = grpc.insecure_channel(stack.addresses[service])
    try:
        payloads = [b"\x0a\x05ab"] if not method.client_streaming else [b"", b"\x0a\x05ab"]
        return raw_call(channel, method, payloads, auth(stack.keys[0]))
    finally:
        channel.close()
