"""Container health check: `python deploy/grpc_healthcheck.py ADDRESS [SERVICE]`.

Asks the standard grpc.health.v1 Health service at ADDRESS (host:port) about SERVICE
(default "": the whole server). Exits 0 when SERVING, 1 otherwise (error, timeout after 3s).
With ARM_TLS_CA_FILE set it speaks TLS, verifying the server against that CA and presenting
ARM_TLS_CERT_FILE / ARM_TLS_KEY_FILE as its client certificate when they are set (mTLS), the
same variables the service itself reads; ARM_TLS_SERVER_NAME overrides the name verified.
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
    ca = _read("ARM_TLS_CA_FILE")
    if ca is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(ca, _read("ARM_TLS_KEY_FILE"), _read("ARM_TLS_CERT_FILE"))
    name = os.environ.get("ARM_TLS_SERVER_NAME")
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)] if name else None)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: grpc_healthcheck.py ADDRESS [SERVICE]", file=sys.stderr)
        return 1
    address, service = argv[0], (argv[1] if len(argv) == 2 else "")
    try:
        with open_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name} {exc.details() or ''}".rstrip(), file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
