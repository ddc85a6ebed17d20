"""A port already in use fails the start with a clear message; port sharing (SO_REUSEPORT) only
when asked for with ARM_SHARE_PORT (issue 10 item 8)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from arm_common.auth import Principal
from arm_common.errors import Unauthenticated
from arm_common.server import AddressInUse, Host
from tests.processes import base_env, free_port, health_status, spawn, stop, wait_serving


class RefuseEveryKey:
    """The authenticator of a host that serves only health checks: no key is valid."""

    async def authenticate(self, api_key: str) -> Principal:
        raise Unauthenticated("no keys here")


async def _host(listen: str, *, share_port: bool = False) -> tuple[Host, int]:
    host = Host([], RefuseEveryKey(), listen, share_port=share_port)
    return host, await host.start()


@pytest.mark.parametrize("second", ["127.0.0.1:{port}", "localhost:{port}", "0.0.0.0:{port}"])
async def test_in_process_host_refuses_a_port_in_use(second: str) -> None:
    first, port = await _host("127.0.0.1:0")
    try:
        listen = second.format(port=port)
        with pytest.raises(AddressInUse) as caught:
            await _host(listen)
        message = str(caught.value)
        assert listen in message and "already in use" in message and "ARM_SHARE_PORT=true" in message
        assert await health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        await first.stop(0)


async def test_in_process_hosts_share_a_port_when_asked() -> None:
    first, port = await _host("127.0.0.1:0", share_port=True)
    try:
        second, second_port = await _host(f"127.0.0.1:{port}", share_port=True)
        assert second_port == port
        await first.stop(0)
        # The first is gone; the port still answers, so the second really listens on it.
        assert await health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING
        await second.stop(0)
    finally:
        await first.stop(0)


async def test_sharing_is_refused_by_a_server_that_did_not_ask_for_it() -> None:
    first, port = await _host("127.0.0.1:0")
    try:
        with pytest.raises(AddressInUse) as caught:
            await _host(f"127.0.0.1:{port}", share_port=True)
        assert f"127.0.0.1:{port}" in str(caught.value) and "only with processes" in str(caught.value)
    finally:
        await first.stop(0)


def _exit_with_message(proc, log: Path, address: str) -> str:  # type: ignore[no-untyped-def]
    assert proc.wait(60) == 2, log.read_text()
    text = log.read_text()
    assert f"cannot serve on {address}: the address is already in use" in text, text
    assert "ARM_SHARE_PORT=true" in text and "Traceback" not in text, text
    return text


async def test_second_dev_server_or_service_on_a_used_port_exits_with_a_message(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "first.log"
    first = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(tmp_path / "a"), ARM_LISTEN=address), log=log)
    try:
        await wait_serving(address, first, log)
        second_log = tmp_path / "second.log"
        second = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(tmp_path / "b"), ARM_LISTEN=address),
                       log=second_log)
        _exit_with_message(second, second_log, address)
        registry_log = tmp_path / "registry.log"
        registry = spawn("arm_registry", env=base_env(
            ARM_REGISTRY_LISTEN=address,
            ARM_REGISTRY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"), log=registry_log)
        _exit_with_message(registry, registry_log, address)
        # The first server was not disturbed.
        assert first.poll() is None
        assert await health_status(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop(first, signal.SIGKILL)


async def test_dev_servers_share_a_port_with_ARM_SHARE_PORT(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    try:
        for name in ("a", "b"):
            log = tmp_path / f"{name}.log"
            proc = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(tmp_path / name), ARM_LISTEN=address,
                                                      ARM_SHARE_PORT="true"), log=log)
            procs.append((proc, log))
        for proc, log in procs:
            deadline = time.monotonic() + 60
            while f"listening on {address}" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
        # Both still serve: stop one, the port keeps answering from the other.
        assert stop(procs[0][0]) == 0
        await wait_serving(address, procs[1][0], procs[1][1])
    finally:
        for proc, _ in procs:
            stop(proc, signal.SIGKILL)
