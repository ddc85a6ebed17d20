"""The Kubernetes manifests (issue 14 item 7): both overlays render with kustomize and every
manifest validates against the Kubernetes schemas (kubernetes-validate, offline, strict); each
service has its Deployment (probes on gRPC health, requests and limits, migrations in an init
container before it, secrets and TLS as files, non-root on a read-only root), a headless Service,
an HPA, a PodDisruptionBudget and a NetworkPolicy letting it reach only what it needs. The probe
script's readiness and liveness answers are checked against a real server. Rendering uses
tests/k8s_render.py (no binary needed), checked against `kubectl kustomize` where kubectl exists."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2

from arm_common.auth import Principal
from arm_common.errors import Unauthenticated
from arm_common.server import Host
from tests import k8s_render

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SERVICES = ("registry", "governance", "telemetry")
PEERS = {"registry": {"governance", "telemetry"}, "governance": {"registry", "telemetry"},
         "telemetry": {"registry", "governance"}}
KUBERNETES_VERSION = "1.30.0"


def render(overlay: str) -> list[dict[str, Any]]:
    return k8s_render.render(K8S / "overlays" / overlay)


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_the_renderer_matches_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed to compare with")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, check=True).stdout
    theirs = {_key(d): d for d in yaml.safe_load_all(out) if d}
    ours = {_key(d): d for d in render(overlay)}
    assert ours == theirs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module", params=["dev", "production"])
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_every_manifest_validates_against_the_kubernetes_schemas(manifests: list[dict[str, Any]]) -> None:
    kinds = set()
    for doc in manifests:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.add(doc["kind"])
        assert doc["metadata"].get("namespace") in ("arm", "arm-dev")
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ConfigMap"} <= kinds


def test_a_broken_manifest_is_caught(manifests: list[dict[str, Any]]) -> None:
    deployment = dict(by_kind(manifests, "Deployment")["registry"])
    deployment["spec"] = {**deployment["spec"], "replicas": "three"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_deployed_as_required(manifests: list[dict[str, Any]], service: str) -> None:
    deployment = by_kind(manifests, "Deployment")[service]
    labels = deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    # Migrations first: the init container migrates this service's database.
    (init,) = pod["initContainers"]
    assert init["args"] == [f"arm_{service}", "migrate"]
    (container,) = pod["containers"]
    assert container["args"] == [f"arm_{service}"]
    for c in (init, container):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"requests", "limits"} <= set(c["resources"])
        assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    # Probes on gRPC health: readiness wants SERVING, liveness any answer.
    ready, live = container["readinessProbe"]["exec"]["command"], container["livenessProbe"]["exec"]["command"]
    assert ready[1].endswith("grpc_healthcheck.py") and "--live" not in ready
    assert live[1].endswith("grpc_healthcheck.py") and "--live" in live
    # Secrets and TLS are files from Secrets, named by *_FILE settings inside mounted folders.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    files = {n: v for n, v in env.items() if n.endswith("_FILE")}
    assert {f"ARM_{service.upper()}_DATABASE_URL_FILE", "ARM_SERVICE_API_KEY_FILE", "ARM_TLS_CERT_FILE",
            "ARM_TLS_KEY_FILE", "ARM_TLS_CA_FILE"} <= set(files)
    assert ("ARM_BOOTSTRAP_ADMIN_KEY_FILE" in files) == (service == "registry")
    for path in files.values():
        assert "secret" in mounts[str(Path(path).parent)], path
    # Secret files are root-owned with group fsGroup: the non-root user reads them through the group.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    for volume in volumes.values():
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o040 and not volume["secret"]["defaultMode"] & 0o007
    assert not any("KEY" in n or "DATABASE_URL" in n for n in env if not n.endswith("_FILE"))
    assert mounts["/tmp"]["emptyDir"] is not None
    # A headless Service for client-side round_robin, an HPA and a PDB for this Deployment.
    svc = by_kind(manifests, "Service")[service]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == labels
    hpa = by_kind(manifests, "HorizontalPodAutoscaler")[service]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = by_kind(manifests, "PodDisruptionBudget")[service]
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    config = by_kind(manifests, "ConfigMap")["arm-config"]["data"]
    assert config[f"ARM_{service.upper()}_ADDRESS"] == f"dns:///{service}:50051"


@pytest.mark.parametrize("service", SERVICES)
def test_network_policies_let_each_service_reach_only_what_it_needs(
        manifests: list[dict[str, Any]], service: str) -> None:
    policies = by_kind(manifests, "NetworkPolicy")
    deny = policies["arm-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    spec = policies[service]["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == service
    assert [r["ports"] for r in spec["ingress"]] == [[{"port": 50051, "protocol": "TCP"}]]
    reachable_pods, open_ports = set(), set()
    for rule in spec["egress"]:
        ports = {p["port"] for p in rule["ports"]}
        if "to" in rule:
            assert ports == {50051}
            reachable_pods |= {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["to"]}
        else:
            open_ports |= ports
    assert reachable_pods == PEERS[service]
    webhooks = {443, 80} if service == "governance" else set()  # notification webhooks' receivers
    assert open_ports == {53, 5432, 4317} | webhooks  # DNS, PostgreSQL, the OTLP collector


class RefuseEveryKey:
    async def authenticate(self, api_key: str) -> Principal:
        raise Unauthenticated("no keys here")


async def _probe(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "deploy" / "grpc_healthcheck.py"),
                                                *args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait()


async def test_probe_script_readiness_wants_serving_liveness_any_answer() -> None:
    host = Host([], RefuseEveryKey(), "127.0.0.1:0")
    port = await host.start()
    address = f"127.0.0.1:{port}"
    try:
        assert await _probe(address) == 0
        assert await _probe("--live", address) == 0
        await host.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await _probe(address) == 1
        assert await _probe("--live", address) == 0
    finally:
        await host.stop(0)
    assert await _probe("--live", address) == 1  # nobody answers


def test_the_console_is_deployed_without_a_key_of_its_own(manifests: list[dict[str, Any]]) -> None:
    deployment = by_kind(manifests, "Deployment")["console"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and "initContainers" not in pod
    (container,) = pod["containers"]
    assert container["args"] == ["arm_console"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ARM_CONSOLE_LISTEN"] == "0.0.0.0:8080" and env["ARM_CONSOLE_SECURE_COOKIE"] == "true"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "secret" in mounts[str(Path(env["ARM_CONSOLE_SESSION_SECRET_FILE"]).parent)]
    assert "ARM_SERVICE_API_KEY_FILE" not in env and not any("DATABASE" in n for n in env)
    spec = by_kind(manifests, "NetworkPolicy")["console"]["spec"]
    assert [r["ports"] for r in spec["ingress"]] == [[{"port": 8080, "protocol": "TCP"}]]
    peers = {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for r in spec["egress"] if "to" in r
             for p in r["to"]}
    assert peers == {"registry", "governance", "telemetry"}
    assert by_kind(manifests, "Service")["console"]["spec"]["ports"][0]["port"] == 8080
