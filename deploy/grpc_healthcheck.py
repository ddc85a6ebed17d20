"""Container health check: `python deploy/grpc_healthcheck.py [--live] ADDRESS [SERVICE]`.

Asks the standard grpc.health.v1 Health service at ADDRESS (host:port) about SERVICE. Exits 0
when SERVING, 1 otherwise (error, timeout after 3s). SERVICE is
- "" (the default, the whole server) or a service name such as arm.registry.v1.AgentService:
  readiness — NOT_SERVING while the service's database or a peer it needs is unreachable; use it
  to route traffic (readiness probe, compose `service_healthy`);
- `liveness`: SERVING while the process serves at all; use it to decide on a restart (liveness
  probe), so that a database outage does not restart every replica.
With --live (a liveness probe) any answer, SERVING or NOT_SERVING, is enough.

It speaks TLS when ARM_TLS_CA_FILE is set or the container serves TLS (ARM_TLS_CERT_FILE and
ARM_TLS_KEY_FILE, the variables the service itself reads): it trusts ARM_TLS_CA_FILE (else
ARM_TLS_CLIENT_CA_FILE), presents the container's certificate when there is one (mTLS), and
ARM_TLS_SERVER_NAME overrides the name verified in the server's certificate.
(Not named grpc_health.py: the script's folder comes first on sys.path and would shadow the
grpc_health package imported below.)"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def _read(name: str) -> bytes | None:
    path = os.environ.get(name)
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def open_channel(address: str) -> grpc.Channel:
    ca, cert, key = _read("ARM_TLS_CA_FILE"), _read("ARM_TLS_CERT_FILE"), _read("ARM_TLS_KEY_FILE")
    if ca is None and (cert is None or key is None):
        return grpc.insecure_channel(address)
    roots = ca or _read("ARM_TLS_CLIENT_CA_FILE")
    creds = grpc.ssl_channel_credentials(roots, key if cert else None, cert if key else None)
    name = os.environ.get("ARM_TLS_SERVER_NAME")
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)] if name else None)


def main(argv: list[str]) -> int:
    live = argv[:1] == ["--live"]
    argv = argv[1:] if live else argv
    if not 1 <= len(argv) <= 2:
        print("usage: grpc_healthcheck.py [--live] ADDRESS [SERVICE]", file=sys.stderr)
        return 1
    address, service = argv[0], (argv[1] if len(argv) == 2 else "")
    try:
        with open_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name} {exc.details() or ''}".rstrip(), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{address}: cannot read the TLS files: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if live or reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
