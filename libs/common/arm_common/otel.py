"""OpenTelemetry set-up: traces and metrics for every RPC (gRPC server interceptor), every
outgoing call (gRPC aio client interceptors, which propagate the trace context to the service
called) and every database call (asyncpg instrumentation on PostgreSQL, covering the statements
SQLAlchemy sends and those sent on the driver directly, e.g. the decision log's batch insert;
SQLAlchemy instrumentation on SQLite), exported over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is
set. Without an endpoint nothing would receive them, so the instrumentation is not installed at
all (it costs a measurable share of a decision even with no-op providers)."""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import metrics, trace

log = logging.getLogger(__name__)
_configured = False


def enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(service_name: str) -> None:
    """Installs SDK providers with OTLP exporters once per process, when an endpoint is set."""
    global _configured
    if _configured or not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]))
    instrument_clients()
    _configured = True
    log.info("OpenTelemetry: exporting to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])


def server_interceptor() -> Any:
    """The gRPC server interceptor producing a span and duration metric per RPC."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor()


_clients_instrumented = False
_asyncpg_instrumented = False


def instrument_clients() -> None:
    """Makes every grpc.aio channel created from now on (insecure or secure) carry a client span
    and the W3C trace context, so a call's trace continues in the service it calls. Health checks
    (readiness probes) are left out."""
    global _clients_instrumented
    if _clients_instrumented or not enabled():
        return
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.grpc.filters import negate, service_name

    GrpcAioInstrumentorClient(filter_=negate(service_name("grpc.health.v1.Health"))).instrument()
    _clients_instrumented = True


def instrument_engine(engine: Any) -> None:
    """Adds a span per database statement: on PostgreSQL by instrumenting asyncpg (once per
    process; it sees SQLAlchemy's statements and the driver-level ones), on SQLite through
    SQLAlchemy's events."""
    global _asyncpg_instrumented
    if not enabled():
        return
    if engine.dialect.name == "postgresql":
        if not _asyncpg_instrumented:
            from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

            AsyncPGInstrumentor().instrument()
            _asyncpg_instrumented = True
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine)


_meter = metrics.get_meter("arm")
_rpc_duration = _meter.create_histogram(
    "rpc.server.duration", unit="ms", description="Duration of ARM RPCs by method and status")


def record_rpc(method: str, code: str, elapsed_ms: float) -> None:
    """One observation per finished RPC (the gRPC instrumentation gives spans, not metrics)."""
    _rpc_duration.record(elapsed_ms, {"rpc.method": method, "rpc.grpc.status_code": code})


_decisions = _meter.create_counter(
    "arm.decisions", unit="{decision}", description="Decisions made, by outcome, tenant and step")
_decision_duration = _meter.create_histogram(
    "arm.decision.duration", unit="ms", description="Time to decide and log one Check, by outcome and step")


def record_decision(outcome: str, tenant_id: str, step: str, elapsed_ms: float) -> None:
    """One decision: counted by outcome, tenant and step; its latency into the histogram."""
    attributes = {"arm.decision": outcome, "arm.tenant_id": tenant_id, "arm.decision.step": step}
    _decisions.add(1, attributes)
    _decision_duration.record(elapsed_ms, attributes)
