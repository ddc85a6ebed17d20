"""TLS and mTLS with certificates made in the test (trustme): plaintext and certificate-less
clients are refused, registry → governance → telemetry work over mTLS as separate hosts, and a
certificate rotated on disk is served to new connections without a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_client import ArmClient
from arm_common import tls
from arm_common.config import ConfigError, ServiceConfig
from tests.conftest import new_database_spec, start_governance, start_registry, stop_governance, stop_registry
from tests.helpers import approved_version
from tests.processes import ROOT, base_env, free_port, spawn, stop
from tests.telemetry.conftest import event, start_telemetry, stop_telemetry


@dataclass
class Pki:
    """A CA and files for a server certificate (naming 127.0.0.1) and a client certificate."""

    ca: trustme.CA
    ca_file: str
    cert_file: str
    key_file: str
    client_cert_file: str
    client_key_file: str

    def server_env(self, *, mtls: bool) -> dict[str, str]:
        env = {"ARM_TLS_CERT_FILE": self.cert_file, "ARM_TLS_KEY_FILE": self.key_file,
               "ARM_TLS_CA_FILE": self.ca_file}
        if mtls:
            env["ARM_TLS_CLIENT_CA_FILE"] = self.ca_file
        return env

    def client(self, address: str, key: str | None, *, with_cert: bool = True) -> ArmClient:
        return ArmClient(address, key, tls_ca_file=self.ca_file,
                         tls_cert_file=self.client_cert_file if with_cert else None,
                         tls_key_file=self.client_key_file if with_cert else None)


def write_leaf(ca: trustme.CA, folder: Path, name: str, *hosts: str) -> tuple[str, str]:
    leaf = ca.issue_cert(*hosts)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert, key = write_leaf(ca, folder, "server", "127.0.0.1", "localhost")
    client_cert, client_key = write_leaf(ca, folder, "client", "arm-test-client")
    return Pki(ca, str(ca_file), cert, key, client_cert, client_key)


async def create_tenant(system_admin: ArmClient) -> str:
    slug = f"t-{secrets.token_hex(5)}"
    resp = await system_admin.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
        slug=slug, name=f"Tenant {slug}", admin_email=f"admin@{slug}.example", admin_name="Admin"))
    return resp.admin_api_key


async def refused(call: object) -> None:
    """The call fails at the connection (TLS handshake), never reaching a servicer."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


async def test_tls_refuses_plaintext_and_untrusted_clients(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), pki.server_env(mtls=False))
    try:
        request = tenancy_pb2.ListTenantsRequest()
        async with ArmClient(registry.address, registry.admin_key) as plain:
            await refused(plain.tenancy.ListTenants(request, timeout=10))
        other = make_pki(tmp_path / "other")
        async with other.client(registry.address, registry.admin_key) as untrusting:
            await refused(untrusting.tenancy.ListTenants(request, timeout=10))
        # TLS without a client certificate is enough when no client CA is configured.
        async with pki.client(registry.address, registry.admin_key, with_cert=False) as good:
            assert (await good.tenancy.ListTenants(request, timeout=10)).tenants
    finally:
        await stop_registry(registry)


async def test_mtls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), pki.server_env(mtls=True))
    try:
        request = tenancy_pb2.ListTenantsRequest()
        async with pki.client(registry.address, registry.admin_key, with_cert=False) as no_cert:
            await refused(no_cert.tenancy.ListTenants(request, timeout=10))
        # A certificate from another CA is refused as well.
        other = make_pki(tmp_path / "other")
        async with ArmClient(registry.address, registry.admin_key, tls_ca_file=pki.ca_file,
                             tls_cert_file=other.client_cert_file, tls_key_file=other.client_key_file) as foreign:
            await refused(foreign.tenancy.ListTenants(request, timeout=10))
        async with pki.client(registry.address, registry.admin_key) as good:
            assert (await good.tenancy.ListTenants(request, timeout=10)).tenants
    finally:
        await stop_registry(registry)


async def test_registry_governance_telemetry_over_mtls(tmp_path: Path) -> None:
    """Every hop is mTLS: governance resolves and follows agents at the registry, the registry
    relays change records to governance, governance relays opEvents to telemetry, telemetry
    resolves legacy ids at the registry."""
    pki = make_pki(tmp_path)
    env = {**pki.server_env(mtls=True), "ARM_OUTBOX_POLL_S": "0.05"}
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), env)
    telemetry = await start_telemetry(new_database_spec("sqlite", tmp_path, "telemetry"), registry, extra_env=env)
    governance = await start_governance(new_database_spec("sqlite", tmp_path, "governance"), registry,
                                        {**env, "ARM_TELEMETRY_ADDRESS": telemetry.address})
    await registry.component.deliver_change_records_to(governance.address, registry.admin_key)
    clients: list[ArmClient] = []
    try:
        system_admin = pki.client(registry.address, registry.admin_key)
        clients.append(system_admin)
        key = await create_tenant(system_admin)
        admin, gov, tel = (pki.client(registry.address, key), pki.client(governance.address, key),
                           pki.client(telemetry.address, key))
        clients += [admin, gov, tel]
        agents = await approved_version(admin)
        legacy = f"legacy-{secrets.token_hex(4)}"
        inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name="w",
            legacy_agent_id=legacy))).agent_instance
        await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))

        checked = await gov.decisions.Check(decision_pb2.CheckRequest(legacy_agent_id=legacy, tool_name="fs.read"))
        assert checked.decision == policy_pb2.DECISION_ALLOW, checked

        ingested = event(legacy_agent_id=legacy)
        resp = await tel.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[ingested]))
        assert resp.accepted_count == 1
        got = {e.event_id: e for e in (await tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest())).events}
        assert got[ingested.event_id].instance_id == inst.id  # resolved through the registry

        # Governance's DECISION_MADE reaches telemetry through its outbox relay.
        decisions: list[events_pb2.OpEvent] = []
        for _ in range(400):
            decisions = [e for e in (await tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest())).events
                         if e.type == events_pb2.OP_EVENT_TYPE_DECISION_MADE]
            if decisions:
                break
            await asyncio.sleep(0.05)
        assert [e.instance_id for e in decisions] == [inst.id]
        # The registry's outbox relay delivers the instance's change records to governance.
        records: list[common_pb2.ChangeRecord] = []
        for _ in range(400):
            records = list((await gov.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
                filter=audit_pb2.ChangeRecordFilter(target_id=inst.id)))).records)
            if records:
                break
            await asyncio.sleep(0.05)
        assert records and all(r.target_id == inst.id for r in records)
    finally:
        for c in clients:
            await c.close()
        await stop_governance(governance)
        await stop_telemetry(telemetry)
        await stop_registry(registry)


def served_serial(address: str, ca_file: str) -> int:
    """Serial number of the certificate a fresh TLS connection to `address` is given."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), pki.server_env(mtls=False))
    try:
        first = x509.load_pem_x509_certificate(Path(pki.cert_file).read_bytes()).serial_number
        assert await asyncio.to_thread(served_serial, registry.address, pki.ca_file) == first
        before = pki.client(registry.address, registry.admin_key, with_cert=False)
        await before.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=10)

        # Rotate to a certificate from a new CA, in place (as a mounted secret is updated).
        new = make_pki(tmp_path / "rotated")
        old_mtime = os.stat(pki.cert_file).st_mtime_ns
        Path(pki.key_file).write_bytes(Path(new.key_file).read_bytes())
        Path(pki.cert_file).write_bytes(Path(new.cert_file).read_bytes())
        if os.stat(pki.cert_file).st_mtime_ns == old_mtime:  # a coarse clock: make the change visible
            os.utime(pki.cert_file, ns=(old_mtime + 1_000_000_000, old_mtime + 1_000_000_000))
        second = x509.load_pem_x509_certificate(Path(pki.cert_file).read_bytes()).serial_number
        assert second != first

        assert await asyncio.to_thread(served_serial, registry.address, new.ca_file) == second
        async with new.client(registry.address, registry.admin_key, with_cert=False) as fresh:
            assert (await fresh.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=10)).tenants
        async with pki.client(registry.address, registry.admin_key, with_cert=False) as stale:
            await refused(stale.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=10))
        # The connection made before the rotation keeps working.
        assert (await before.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=10)).tenants
        await before.close()
    finally:
        await stop_registry(registry)


def test_plaintext_on_a_non_loopback_address_is_flagged() -> None:
    assert tls.is_loopback("127.0.0.1:50051") and tls.is_loopback("localhost:0")
    assert tls.is_loopback("[::1]:50051")
    assert not tls.is_loopback("0.0.0.0:50051") and not tls.is_loopback("10.0.0.5:50051")
    assert not tls.is_loopback("registry.arm.svc:50051")


async def test_health_answers_over_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), pki.server_env(mtls=True))
    try:
        channel = tls.open_channel(registry.address, tls.TlsSettings(
            ca_file=pki.ca_file, cert_file=pki.client_cert_file, key_file=pki.client_key_file))
        async with channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop_registry(registry)


async def test_a_non_loopback_plaintext_listener_logs_one_warning(caplog: pytest.LogCaptureFixture,
                                                                  tmp_path: Path) -> None:
    with caplog.at_level(logging.WARNING, logger="arm_common.server"):
        plain = await start_registry(new_database_spec("sqlite", tmp_path, "plain"),
                                     {"ARM_REGISTRY_LISTEN": "0.0.0.0:0"})
        await stop_registry(plain)
    warnings = [r for r in caplog.records if "PLAINTEXT" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0:0" in warnings[0].getMessage()
    caplog.clear()
    pki = make_pki(tmp_path / "pki")
    with caplog.at_level(logging.WARNING, logger="arm_common.server"):
        secured = await start_registry(new_database_spec("sqlite", tmp_path, "secured"),
                                       {"ARM_REGISTRY_LISTEN": "0.0.0.0:0", **pki.server_env(mtls=True)})
        await stop_registry(secured)
        loopback = await start_registry(new_database_spec("sqlite", tmp_path, "loopback"))
        await stop_registry(loopback)
    assert not [r for r in caplog.records if "PLAINTEXT" in r.getMessage()]


def healthcheck(address: str, env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "grpc_healthcheck.py"), address],
                          env=base_env(**env), capture_output=True, timeout=60).returncode


async def test_the_container_health_check_speaks_mtls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), pki.server_env(mtls=True))
    try:
        client_env = {"ARM_TLS_CA_FILE": pki.ca_file, "ARM_TLS_CERT_FILE": pki.client_cert_file,
                      "ARM_TLS_KEY_FILE": pki.client_key_file}
        assert await asyncio.to_thread(healthcheck, registry.address, client_env) == 0
        assert await asyncio.to_thread(healthcheck, registry.address, {}) == 1
    finally:
        await stop_registry(registry)


async def test_the_all_in_one_server_over_mtls(tmp_path: Path) -> None:
    """The dev server as a process with mTLS: its services reach each other through its own
    TLS port (governance asks the registry about the agent of a Check)."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "allinone.log"
    data = tmp_path / "data"
    proc = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(data), ARM_LISTEN=address,
                                              **pki.server_env(mtls=True)), log=log)
    try:
        key_file = data / "dev-admin-key"
        for _ in range(600):
            if proc.poll() is not None or (key_file.exists() and address in log.read_text()):
                break
            await asyncio.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        async with pki.client(address, key_file.read_text().strip()) as client:
            tenants = (await client.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=10)).tenants
            assert [t.slug for t in tenants if t.system] == ["default"]
            unknown = await client.decisions.Check(decision_pb2.CheckRequest(instance_id="ins_nope", tool_name="fs.read"),
                                                   timeout=10)
            assert unknown.decision == policy_pb2.DECISION_DENY and unknown.reasons[0].code == "UNKNOWN_AGENT"
        async with ArmClient(address, key_file.read_text().strip()) as plain:
            await refused(plain.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=10))
        assert stop(proc) == 0, log.read_text()
    finally:
        stop(proc, signal.SIGKILL)


def test_the_all_in_one_server_refuses_tls_without_a_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    env = pki.server_env(mtls=False)
    del env["ARM_TLS_CA_FILE"]
    done = subprocess.run([sys.executable, "-m", "arm_allinone"], cwd=ROOT, capture_output=True, timeout=60,
                          env=base_env(ARM_DATA_DIR=str(tmp_path / "data"), ARM_LISTEN=f"127.0.0.1:{free_port()}", **env))
    assert done.returncode == 2 and b"ARM_TLS_CA_FILE together" in done.stderr, done.stderr


async def test_a_broken_certificate_file_keeps_the_previous_certificate(tmp_path: Path) -> None:
    """A rotation caught half-way (the certificate of another key) is not served; once the
    matching key arrives, the new certificate is."""
    pki = make_pki(tmp_path)
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), pki.server_env(mtls=False))
    try:
        first = x509.load_pem_x509_certificate(Path(pki.cert_file).read_bytes()).serial_number
        new = make_pki(tmp_path / "rotated")
        Path(pki.cert_file).write_bytes(Path(new.cert_file).read_bytes())  # key not yet replaced
        assert await asyncio.to_thread(served_serial, registry.address, pki.ca_file) == first
        Path(pki.key_file).write_bytes(Path(new.key_file).read_bytes())
        second = x509.load_pem_x509_certificate(Path(new.cert_file).read_bytes()).serial_number
        assert await asyncio.to_thread(served_serial, registry.address, new.ca_file) == second
    finally:
        await stop_registry(registry)


def test_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    base = {"ARM_REGISTRY_LISTEN": "127.0.0.1:0"}
    with pytest.raises(ConfigError, match="ARM_TLS_CERT_FILE and ARM_TLS_KEY_FILE"):
        ServiceConfig.from_env("registry", {**base, "ARM_TLS_CERT_FILE": pki.cert_file})
    with pytest.raises(ConfigError, match="ARM_TLS_KEY_FILE must name a readable file"):
        ServiceConfig.from_env("registry", {**base, "ARM_TLS_CERT_FILE": pki.cert_file,
                                            "ARM_TLS_KEY_FILE": str(tmp_path / "missing.key")})
    with pytest.raises(ConfigError, match="ARM_TLS_CLIENT_CA_FILE needs"):
        ServiceConfig.from_env("registry", {**base, "ARM_TLS_CLIENT_CA_FILE": pki.ca_file})
    config = ServiceConfig.from_env("registry", {**base, **pki.server_env(mtls=True), "ARM_TLS_SERVER_NAME": "registry"})
    assert config.tls == tls.TlsSettings(pki.cert_file, pki.key_file, pki.ca_file, pki.ca_file, "registry")
    assert ServiceConfig.from_env("registry", base).tls == tls.TlsSettings()


async def test_a_key_that_does_not_match_the_certificate_stops_the_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    other = make_pki(tmp_path / "other")
    env = {**pki.server_env(mtls=False), "ARM_TLS_KEY_FILE": other.key_file}
    with pytest.raises(ConfigError, match="do not load"):
        await start_registry(new_database_spec("sqlite", tmp_path, "registry"), env)


async def test_a_rotated_client_certificate_is_presented_on_new_calls(tmp_path: Path) -> None:
    """An inter-service channel (client certificate, mTLS) follows its files: after a rotation,
    calls go out on a new connection with the new certificate; a half-rotated pair is not used."""
    pki = make_pki(tmp_path)

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        return str(x509.load_pem_x509_certificate(pem).serial_number).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(whoami)}),))
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(tls.TlsSettings(
        cert_file=pki.cert_file, key_file=pki.key_file, client_ca_file=pki.ca_file)))
    await server.start()
    settings = tls.TlsSettings(ca_file=pki.ca_file, cert_file=pki.client_cert_file, key_file=pki.client_key_file)
    channel = tls.ReloadingChannel(f"127.0.0.1:{port}", settings, check_interval_s=0)
    try:
        call = channel.unary_unary("/test.Who/Am")

        def serial_of(path: str) -> int:
            return x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number

        first = serial_of(pki.client_cert_file)
        assert int(await call(b"")) == first
        (tmp_path / "rotated").mkdir()
        new_cert, new_key = write_leaf(pki.ca, tmp_path / "rotated", "client", "arm-test-client")
        Path(pki.client_cert_file).write_bytes(Path(new_cert).read_bytes())  # key not yet replaced
        assert int(await call(b"")) == first
        Path(pki.client_key_file).write_bytes(Path(new_key).read_bytes())
        assert int(await call(b"")) == serial_of(new_cert) != first
    finally:
        await channel.close()
        await server.stop(0)


async def test_the_sdk_and_the_cli_speak_mtls_from_the_environment(tmp_path: Path) -> None:
    """`Arm` and the `arm` command take ARM_TLS_CA_FILE / ARM_TLS_CERT_FILE / ARM_TLS_KEY_FILE
    from the environment: with them a call goes through an mTLS registry, without them it is
    refused at the handshake (UNAVAILABLE), never sent in clear."""
    from arm_client import Arm
    from arm_client.errors import Unavailable

    pki = make_pki(tmp_path)
    registry = await start_registry(new_database_spec("sqlite", tmp_path, "registry"), pki.server_env(mtls=True))
    try:
        env = {"ARM_ADDRESS": registry.address, "ARM_API_KEY": registry.admin_key,
               "ARM_TLS_CA_FILE": pki.ca_file, "ARM_TLS_CERT_FILE": pki.client_cert_file,
               "ARM_TLS_KEY_FILE": pki.client_key_file}
        request = tenancy_pb2.ListTenantsRequest()
        arm = Arm(env=env)
        try:
            assert (await arm.call(arm.stubs.tenancy.ListTenants, request)).tenants
        finally:
            await arm.close()
        plain = Arm(env={k: v for k, v in env.items() if not k.startswith("ARM_TLS_")}, timeout_s=3)
        try:
            with pytest.raises(Unavailable):
                await plain.call(plain.stubs.tenancy.ListTenants, request)
        finally:
            await plain.close()

        cli_env = {**base_env(), **env, "ARM_CONFIG": str(tmp_path / "arm-config.yaml")}
        cli = [sys.executable, "-c", "from arm_cli.main import main; main()", "tenants", "list", "-o", "json"]
        ok = await asyncio.to_thread(subprocess.run, cli, env=cli_env, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert "system" in ok.stdout
        no_tls = {k: v for k, v in cli_env.items() if not k.startswith("ARM_TLS_")} | {"ARM_TIMEOUT_S": "3"}
        bad = await asyncio.to_thread(subprocess.run, cli, env=no_tls, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    finally:
        await stop_registry(registry)
