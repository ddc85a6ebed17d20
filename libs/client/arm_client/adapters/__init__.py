"""Framework adapters of the runtime SDK: ARM governance inside an agent framework's own tool
loop. Each adapter lives in its own module and imports its framework there, so the core SDK does
not need any framework installed:

- `arm_client.adapters.openai_agents`: OpenAI Agents SDK function tools; DENY comes back to the
  model as a refusal it can act on; NEEDS_APPROVAL is the SDK's own approval interruption
  (`needs_approval`, `RunState.approve` / `reject`), resolved from the ARM approval.
- `arm_client.adapters.langgraph`: a LangGraph tool node that `interrupt()`s with the ARM
  approval id and, resumed, checks again with it.

Shared by both (this package): the refusal text a model sees, deterministic tool call ids, and
running an allowed tool between TOOL_CALL_STARTED and TOOL_CALL_COMPLETED / TOOL_CALL_FAILED."""

from __future__ import annotations

from arm_client.adapters._common import GovernedSpec, refusal_text, spec_for, tool_call_id

__all__ = ["GovernedSpec", "refusal_text", "spec_for", "tool_call_id"]
