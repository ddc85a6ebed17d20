"""Container health check: `python deploy/grpc_healthcheck.py [--live] ADDRESS [SERVICE]`.

Asks the standard grpc.health.v1 Health service at ADDRESS (host:port) about SERVICE
(default "": the whole server). Exits 0 when SERVING, 1 otherwise (error, timeout after 3s).
With --live (a liveness probe) any answer, SERVING or NOT_SERVING, is enough: the process is up
even while its database is away, and restarting it would not help.

When the container serves TLS (ARM_TLS_CERT_FILE and ARM_TLS_KEY_FILE set, as for the service
itself) the check speaks TLS: it trusts ARM_TLS_CA_FILE (else ARM_TLS_CLIENT_CA_FILE), presents
the container's own certificate (for mTLS), and expects the name ARM_TLS_SERVER_NAME (default
`localhost`) in the server's certificate.
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


def channel(address: str) -> grpc.Channel:
    cert, key = _read("ARM_TLS_CERT_FILE"), _read("ARM_TLS_KEY_FILE")
    if cert is None or key is None:
        return grpc.insecure_channel(address)
    roots = _read("ARM_TLS_CA_FILE") or _read("ARM_TLS_CLIENT_CA_FILE")
    credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)
    name = os.environ.get("ARM_TLS_SERVER_NAME") or "localhost"
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", name)])


def main(argv: list[str]) -> int:
    live = argv[:1] == ["--live"]
    argv = argv[1:] if live else argv
    if not 1 <= len(argv) <= 2:
        print("usage: grpc_healthcheck.py [--live] ADDRESS [SERVICE]", file=sys.stderr)
        return 1
    address, service = argv[0], (argv[1] if len(argv) == 2 else "")
    try:
        with channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
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
