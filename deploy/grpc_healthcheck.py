"""Container health check: `python deploy/grpc_healthcheck.py ADDRESS [SERVICE]`.

Asks the standard grpc.health.v1 Health service at ADDRESS (host:port) about SERVICE. Exits 0
when SERVING, 1 otherwise (error, timeout after 3s). SERVICE is
- "" (the default, the whole server) or a service name such as arm.registry.v1.AgentService:
  readiness — NOT_SERVING while the service's database or a peer it needs is unreachable; use it
  to route traffic (readiness probe, compose `service_healthy`);
- `liveness`: SERVING while the process serves at all; use it to decide on a restart (liveness
  probe), so that a database outage does not restart every replica.
(Not named grpc_health.py: the script's folder comes first on sys.path and would shadow the
grpc_health package imported below.)"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: grpc_healthcheck.py ADDRESS [SERVICE]", file=sys.stderr)
        return 1
    address, service = argv[0], (argv[1] if len(argv) == 2 else "")
    try:
        with grpc.insecure_channel(address) as channel:
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
