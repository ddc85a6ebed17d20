"""How channels find replicas (dns:/// targets, round_robin) and reflection v1 beside v1alpha."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from arm_common import tls
from arm_common.server import Host
from tests.conftest import RegistryServer, new_database_spec, start_registry, stop_registry

REGISTRY_SERVICES = {"arm.registry.v1.TenancyService", "arm.registry.v1.AccessService",
                     "arm.registry.v1.AgentService", "arm.registry.v1.CompatService"}


@pytest.fixture
async def sqlite_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    server = await start_registry(new_database_spec("sqlite", tmp_path, "registry"))
    yield server
    await stop_registry(server)


def v1_messages() -> tuple[type, type]:
    """grpc.reflection.v1 request and response classes, built from the v1 descriptors the
    server registered (grpcio-reflection ships no v1 module)."""
    pool = descriptor_pool.Default()
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
    return request, response


async def reflect(channel: grpc.aio.Channel, method: str, request: object, response_type: type) -> object:
    call = channel.stream_stream(method, request_serializer=lambda m: m.SerializeToString(),  # type: ignore[attr-defined]
                                 response_deserializer=response_type.FromString)  # type: ignore[attr-defined]

    async def one() -> AsyncIterator[object]:
        yield request

    async for answer in call(one(), timeout=10):
        return answer
    raise AssertionError("no reflection answer")


async def test_reflection_v1_and_v1alpha_list_the_services(sqlite_registry: RegistryServer) -> None:
    request_v1, response_v1 = v1_messages()
    async with tls.open_channel(sqlite_registry.address) as channel:
        listed = await reflect(channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                               request_v1(list_services=""), response_v1)
        names = {s.name for s in listed.list_services_response.service}  # type: ignore[attr-defined]
        assert REGISTRY_SERVICES <= names
        assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
                health.SERVICE_NAME} <= names

        described = await reflect(channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                  request_v1(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
                                  response_v1)
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in described.file_descriptor_response.file_descriptor_proto]  # type: ignore[attr-defined]
        assert [f.package for f in files] == ["grpc.reflection.v1"]
        assert files[0].service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"

        old = await reflect(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                            v1alpha.ServerReflectionRequest(list_services=""), v1alpha.ServerReflectionResponse)
        assert {s.name for s in old.list_services_response.service} == names  # type: ignore[attr-defined]


def test_targets_go_through_dns_with_round_robin() -> None:
    assert tls.dns_target("registry.arm.svc:50051") == "dns:///registry.arm.svc:50051"
    assert tls.dns_target("dns:///registry:50051") == "dns:///registry:50051"
    assert tls.dns_target("ipv4:127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    config = dict(tls.channel_options())["grpc.service_config"]
    assert json.loads(config) == {"loadBalancingConfig": [{"round_robin": {}}]}


async def test_calls_through_a_dns_target_succeed(sqlite_registry: RegistryServer) -> None:
    async with tls.open_channel(sqlite_registry.address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def health_server(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> tuple[grpc.aio.Server, int]:
    """A server whose health service answers `status` for the service "who": which replica
    answered a call can be told from the answer."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("who", status)
    return server, port


async def test_one_channel_spreads_calls_over_every_resolved_replica() -> None:
    """Two replicas behind one target: the channel's round_robin policy calls both (pick_first,
    gRPC's default, would send every call to the first)."""
    a, port_a = await health_server(health_pb2.HealthCheckResponse.SERVING)
    b, port_b = await health_server(health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        async with tls.open_channel(f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            seen: set[int] = set()
            for _ in range(200):
                seen.add((await stub.Check(health_pb2.HealthCheckRequest(service="who"), timeout=10)).status)
                if len(seen) == 2:
                    break
        assert seen == {health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING}
    finally:
        await a.stop(0)
        await b.stop(0)


class _Anyone:
    async def authenticate(self, api_key: str) -> object:
        raise AssertionError("health and reflection need no key")


async def test_connections_are_aged_so_clients_re_resolve() -> None:
    """A host ends connections past their age (GOAWAY), so a client's channel reconnects and
    re-resolves its dns:/// name; the next call succeeds on the new connection."""
    host = Host([], _Anyone(), "127.0.0.1:0", max_connection_age_s=0.5)  # type: ignore[arg-type]
    port = await host.start()
    try:
        async with tls.open_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            # A long-lived stream (like governance's agent change feed) opened on that connection.
            watch = stub.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=30)
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            # The stream outlived its connection's age: it still receives updates.
            await asyncio.sleep(1)  # room for a (wrongly) finite grace to cut the stream; asserts no time
            await host.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert (await asyncio.wait_for(watch.read(), timeout=10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        await host.stop(0)
