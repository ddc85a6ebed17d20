"""OpenTelemetry: with OTEL_EXPORTER_OTLP_ENDPOINT set, a service exports a span per RPC and per
database statement over OTLP. A real OTLP/gRPC receiver stands in for the collector."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient
from tests.conftest import drop_schema, new_database_spec
from tests.processes import free_port, spawn, stop, wait_serving
from tests.test_devserver import registry_env


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, dict[str, str]]] = []
        self.metric_names: set[str] = set()

    async def Export(self, request, context):  # type: ignore[no-untyped-def]
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {a.key: a.value.string_value for a in span.attributes}
                        self.spans.append((span.name, attrs))
            return trace_service_pb2.ExportTraceServiceResponse()
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                self.metric_names.update(m.name for m in sm.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def test_rpc_and_database_spans_are_exported(backend: str, tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    spec = new_database_spec(backend, tmp_path, "registry")
    port = free_port()
    env = registry_env(spec, port)
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
               OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_BSP_SCHEDULE_DELAY="100",
               OTEL_METRIC_EXPORT_INTERVAL="200")
    log = tmp_path / "registry.log"
    assert spawn("arm_registry", "migrate", env=env, log=log).wait(60) == 0
    assert spawn("arm_registry", "bootstrap", env=env, log=log).wait(60) == 0
    key = log.read_text().split("(shown once): ")[1].split()[0]
    proc = spawn("arm_registry", env=env, log=log)
    try:
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        async with ArmClient(f"127.0.0.1:{port}", key) as client:
            await client.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())
        rpc = "arm.registry.v1.TenancyService/ListProjects"

        def has_rpc_span() -> bool:
            return any(rpc in name for name, _ in collector.spans)

        def has_db_span() -> bool:
            return any(a.get("db.system") in ("sqlite", "postgresql") for _, a in collector.spans)

        def has_rpc_metric() -> bool:
            # Other metrics (the connection pool's) may arrive first: wait for the one asserted.
            return any("rpc" in m for m in collector.metric_names)

        # The wait ends on exactly what the assertions below check, or at the deadline.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (has_rpc_span() and has_db_span() and has_rpc_metric()):
            await asyncio.sleep(0.1)
        assert has_rpc_span(), [name for name, _ in collector.spans]
        assert has_db_span(), collector.spans
        assert has_rpc_metric(), collector.metric_names
    finally:
        stop(proc)
        await server.stop(0)
        if spec.schema:
            await drop_schema(spec.schema)
