"""Policies: not built yet (its page says so)."""

from __future__ import annotations

from arm_console.views.not_built import not_built

VIEW = not_built("policies", "Policies",
                 "Envelopes by scope, revisions with a rule-level diff, the effective policy of an agent, a live evaluator and simulation of a draft envelope.")
