"""Traces that cross services and decision spans (issue 14 items 3 and 4), with registry and
governance as real processes exporting to a real OTLP/gRPC receiver of the test:
- one Check on a cold cache is one trace spanning governance and the registry it resolves the
  agent through (the client interceptor propagated the context);
- its `governance.decide` span names the same envelope, revision and rule as GetDecision, plus
  the decision and risk; the decision log's commit is a child of it, with its database statement
  under the commit;
- the decision counter and latency histogram are exported, by outcome, tenant and step;
- the logs are JSON lines (ARM_LOG_FORMAT=json)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2 as otlp_common
from opentelemetry.sdk.trace import TracerProvider

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_client import Arm, ArmClient
from arm_client.connection import Settings
from tests.conftest import drop_schema, new_database_spec
from tests.helpers import approved_version
from tests.processes import base_env, free_port, spawn, stop, wait_serving


def _value(v: otlp_common.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    attributes: dict[str, Any]


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.points: dict[str, list[dict[str, Any]]] = {}  # metric name -> data point attributes

    async def Export(self, request, context):  # type: ignore[no-untyped-def]
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for rs in request.resource_spans:
                service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Span(service, s.name, s.trace_id, s.span_id, s.parent_span_id,
                                               {a.key: _value(a.value) for a in s.attributes}))
            return trace_service_pb2.ExportTraceServiceResponse()
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    data = getattr(m, m.WhichOneof("data"))
                    self.points.setdefault(m.name, []).extend(
                        {a.key: _value(a.value) for a in p.attributes} for p in data.data_points)
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def test_one_check_is_one_trace_across_governance_and_registry(backend: str, tmp_path: Path) -> None:
    collector = Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, receiver)
    otlp_port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    otel = dict(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}", OTEL_EXPORTER_OTLP_INSECURE="true",
                OTEL_BSP_SCHEDULE_DELAY="100", OTEL_METRIC_EXPORT_INTERVAL="200", ARM_LOG_FORMAT="json")
    reg_spec = new_database_spec(backend, tmp_path, "registry")
    gov_spec = new_database_spec(backend, tmp_path, "governance")
    reg_port, gov_port = free_port(), free_port()
    reg_env = base_env(ARM_REGISTRY_LISTEN=f"127.0.0.1:{reg_port}", **reg_spec.env("registry"), **otel)
    reg_log, gov_log = tmp_path / "registry.log", tmp_path / "governance.log"
    assert spawn("arm_registry", "migrate", env=reg_env, log=reg_log).wait(60) == 0
    assert spawn("arm_registry", "bootstrap", env=reg_env, log=reg_log).wait(60) == 0
    admin_key = reg_log.read_text().split("(shown once): ")[1].split()[0]
    gov_env = base_env(ARM_GOVERNANCE_LISTEN=f"127.0.0.1:{gov_port}", ARM_REGISTRY_ADDRESS=f"127.0.0.1:{reg_port}",
                       ARM_SERVICE_API_KEY=admin_key, **gov_spec.env("governance"), **otel)
    assert spawn("arm_governance", "migrate", env=gov_env, log=gov_log).wait(60) == 0
    procs = [spawn("arm_registry", env=reg_env, log=reg_log), spawn("arm_governance", env=gov_env, log=gov_log)]
    try:
        await wait_serving(f"127.0.0.1:{reg_port}", procs[0], reg_log)
        await wait_serving(f"127.0.0.1:{gov_port}", procs[1], gov_log)
        async with ArmClient(f"127.0.0.1:{reg_port}", admin_key) as admin:
            created = await admin.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
                slug="traced", name="Traced", admin_email="a@traced.example", admin_name="A"))
        key = created.admin_api_key
        async with ArmClient(f"127.0.0.1:{reg_port}", key) as reg, ArmClient(f"127.0.0.1:{gov_port}", key) as gov:
            agents = await approved_version(reg)
            envelope = (await gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
                envelope=policy_pb2.PolicyEnvelope(
                    name="no shell", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=agents.version.id,
                    mode=policy_pb2.POLICY_MODE_ENFORCE,
                    tool_rules=[policy_pb2.ToolRule(tool="fs.*", effect=policy_pb2.DECISION_ALLOW),
                                policy_pb2.ToolRule(tool="shell.*", effect=policy_pb2.DECISION_DENY)])))).envelope
            inst = (await reg.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
                version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
            await reg.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
                id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
            # Governance has never resolved this instance: the Check asks the registry.
            denied = await gov.decisions.Check(decision_pb2.CheckRequest(instance_id=inst.id, tool_name="shell.exec"))
            assert denied.decision == policy_pb2.DECISION_DENY
            logged = (await gov.decisions.GetDecision(decision_pb2.GetDecisionRequest(
                decision_id=denied.decision_id))).decision.response

        # An agent that traces (its own TracerProvider, not the process-wide one): the SDK's
        # Check carries the agent's trace context into governance.
        agent_tracing = TracerProvider()
        settings = dataclasses.replace(Settings.from_env({
            "ARM_REGISTRY_ADDRESS": f"127.0.0.1:{reg_port}", "ARM_GOVERNANCE_ADDRESS": f"127.0.0.1:{gov_port}",
            "ARM_TELEMETRY_ADDRESS": f"127.0.0.1:{gov_port}", "ARM_API_KEY": key, "ARM_INSTANCE_ID": inst.id}),
            tracer_provider=agent_tracing)
        async with Arm(settings=settings) as arm:
            with agent_tracing.get_tracer("agent").start_as_current_span("agent.step") as agent_span:
                sdk_decision = await arm.check("fs.read")
        agent_trace_id = agent_span.get_span_context().trace_id.to_bytes(16, "big")
        assert sdk_decision.decision_id

        def decide_span() -> Span | None:
            return next((s for s in collector.spans if s.name == "governance.decide"
                         and s.attributes.get("arm.decision_id") == denied.decision_id), None)

        def in_trace(span: Span) -> list[Span]:
            return [s for s in collector.spans if s.trace_id == span.trace_id]

        def complete() -> bool:
            span = decide_span()
            if span is None:
                return False
            services = {s.service for s in in_trace(span)}
            names = {s.name for s in in_trace(span)}
            denies = [p for p in collector.points.get("arm.decisions", [])
                      if p.get("arm.decision") == "DECISION_DENY"]
            return ({"arm-governance", "arm-registry"} <= services and "governance.decision_log.commit" in names
                    and bool(denies) and "arm.decision.duration" in collector.points and bool(sdk_spans()))

        def sdk_spans() -> list[Span]:
            return [s for s in collector.spans if s.trace_id == agent_trace_id and s.service == "arm-governance"
                    and s.name.endswith("DecisionService/Check")]

        # The wait ends on exactly what the assertions below check, or at the deadline.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not complete():
            await asyncio.sleep(0.1)
        span = decide_span()
        assert span is not None, sorted({s.name for s in collector.spans})
        trace_spans = in_trace(span)
        by_id = {s.span_id: s for s in trace_spans}

        # The decision span says what decided: the same as the decision log.
        a = span.attributes
        assert (a["arm.policy.envelope_id"], a["arm.policy.envelope_revision"], a["arm.policy.rule_index"]) == \
            (envelope.envelope_id, 1, 1) == (logged.envelope_id, logged.envelope_revision, logged.rule_index)
        assert a["arm.policy.rule_kind"] == "RULE_KIND_TOOL_RULE" and a["arm.policy.scope"] == "POLICY_SCOPE_VERSION"
        assert a["arm.policy.scope_id"] == agents.version.id
        assert (a["arm.decision"], a["arm.decision.step"]) == ("DECISION_DENY", "DECISION_STEP_ENVELOPE")
        assert a["arm.decision.risk"] == common_pb2.RiskLevel.Name(logged.effective_risk)
        assert a["arm.policy.epoch"] == logged.policy_epoch

        # The decide span is under governance's Check server span.
        check = by_id[span.parent_id]
        assert check.service == "arm-governance" and check.name.endswith("DecisionService/Check"), check

        # The registry's server spans are in this trace, each under a governance client span.
        registry_spans = [s for s in trace_spans if s.service == "arm-registry"]
        assert registry_spans, sorted((s.service, s.name) for s in trace_spans)
        served = [s for s in registry_spans if s.parent_id in by_id and by_id[s.parent_id].service == "arm-governance"]
        assert served, [(s.name, s.parent_id in by_id) for s in registry_spans]

        # The decision log's commit is a child of the decide span; its statement(s) under it.
        commits = [s for s in trace_spans if s.name == "governance.decision_log.commit"]
        assert len(commits) == 1 and commits[0].parent_id == span.span_id, commits
        statements = [s for s in trace_spans if s.parent_id == commits[0].span_id]
        assert statements and all(s.attributes.get("db.system") in ("sqlite", "postgresql") for s in statements), \
            statements

        # Metrics by outcome, tenant and step.
        denies = [p for p in collector.points["arm.decisions"] if p.get("arm.decision") == "DECISION_DENY"]
        assert {(p["arm.tenant_id"], p["arm.decision.step"]) for p in denies} == \
            {(created.tenant.id, "DECISION_STEP_ENVELOPE")}
        assert collector.points["arm.decision.duration"]

        # The SDK's Check joined the agent's trace: governance served it under the agent's trace id.
        assert sdk_spans(), "governance's Check span is not in the agent's trace"

        # JSON log lines.
        lines = [line for line in gov_log.read_text().splitlines() if line.startswith("{")]
        assert lines and all(json.loads(line)["level"] for line in lines)
    finally:
        for proc in procs:
            stop(proc)
        await receiver.stop(0)
        for spec in (reg_spec, gov_spec):
            if spec.schema:
                await drop_schema(spec.schema)
