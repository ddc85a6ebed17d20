"""What provenance adds to a decision's opEvent: deriving it from the logged decision row
(`op_events.op_event`, what governance's op_event relay does since issue 16; before, `Check`
built it per call) and serializing it, against the same event built without the provenance
fields, measured in the same run. `python bench/provenance_cost.py [--n 200000]`"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from types import SimpleNamespace

from arm.governance.v1 import decision_pb2
from arm.registry.v1 import compat_pb2
from arm.telemetry.v1 import events_pb2
from arm_common.auth import Principal
from arm_common.messages import ts
from arm_engine import engine
from arm_governance.decisions.log import DecisionLog
from arm_governance.decisions.op_events import op_event
from arm_governance.decisions.service import Decider

PROVENANCE_KEYS = ("envelope_id", "envelope_revision", "scope", "scope_id", "rule_kind", "rule_index",
                   "rule_description", "policy_epoch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    n = parser.parse_args().n
    principal = Principal(tenant_id="tnt_1", actor_type="AGENT", actor_id="ins_1", api_key_id="key_1")
    resolved = compat_pb2.ResolvedAgent(tenant_id="tnt_1", project_id="prj_1", environment_id="env_1",
                                        template_id="tpl_1", version_id="ver_1", instance_id="ins_1")
    result = engine.Result(engine.Effect.DENY, (engine.Reason("TOOL_RULE", "denied"),), engine.Risk.HIGH,
                           engine.Step.ENVELOPE, engine.Scope.VERSION, "ver_1", "env_1", 3,
                           engine.RuleKind.TOOL_RULE, 1, "shell.* → DENY", ())
    request = decision_pb2.CheckRequest(instance_id="ins_1", tool_name="shell.exec", run_id="r", tool_call_id="c")
    now = datetime.now(UTC)

    pending = Decider(None, None, None, None, None).pending(  # type: ignore[arg-type]
        principal, request, resolved, resolved.SerializeToString(), result, 7, "", None, now, "dec_1")
    DecisionLog._rows([pending])
    row = SimpleNamespace(**pending.record)

    def with_provenance() -> bytes:
        return op_event(row).SerializeToString()

    # The reference: the same event as before provenance, its payload stripped to the old fields.
    base = op_event(row)
    for key in PROVENANCE_KEYS:
        base.payload.fields.pop(key, None)
    old_payload = base.payload.SerializeToString()

    def without_provenance() -> bytes:
        # The opEvent as Check built it before provenance, with the cached payload of the old fields.
        event = events_pb2.OpEvent(
            event_id="evt-dec_1", tenant_id=principal.tenant_id, type=events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED,
            occur_time=ts(now), run_id=request.run_id, tool_call_id=request.tool_call_id)
        payload = event.payload
        payload.MergeFromString(old_payload)
        payload.fields["decision_id"].string_value = "dec_1"
        payload.fields["tool_name"].string_value = request.tool_name
        event.project_id, event.environment_id = resolved.project_id, resolved.environment_id
        event.template_id, event.version_id = resolved.template_id, resolved.version_id
        event.instance_id, event.legacy_agent_id = resolved.instance_id, resolved.legacy_agent_id
        return event.SerializeToString()

    for name, fn in (("without provenance (reference)", without_provenance), ("with provenance", with_provenance)):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            size = len(fn())
        per_call = (time.perf_counter() - start) / n * 1e6
        print(f"{name:32s} {per_call:6.2f} µs per event, {size} bytes")


if __name__ == "__main__":
    main()
