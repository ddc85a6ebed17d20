"""Decisions per second of the policy engine (arm_engine.engine), single thread, in process.

A ten-envelope policy over the three scopes (locked rules, globs, `when` conditions, risk
thresholds, autonomy tiers, budgets, a shadow envelope), compiled once, and a rotation of ten
calls, some with small arguments. Prints decisions/s and ns/decision for the steady state (memo
tables warm), for a cold policy (compiled afresh for every round of the rotation), and for
compile_policy alone.

    .venv/bin/python bench/engine.py [--seconds 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time
from collections import Counter

from arm_engine.engine import (
    Agent,
    Budgets,
    Call,
    Controls,
    Effect,
    Envelope,
    Grant,
    Risk,
    Scope,
    Spend,
    ToolRule,
    compile_policy,
    decide,
)

ALLOW, DENY, NA = Effect.ALLOW, Effect.DENY, Effect.NEEDS_APPROVAL
T, P, V = "ten_bench", "prj_bench", "ver_bench"

ENVELOPES = [
    # Tenant: locked guard rails, a budget, a baseline default.
    Envelope("env_t_guard", "tenant-guard-rails", 3, Scope.TENANT, T, priority=1000, tool_rules=(
        ToolRule("db.drop_*", DENY, locked=True, description="never drop databases"),
        ToolRule("deploy.**", NA, locked=True, environments=("PROD",)),
        ToolRule("payments.**", NA, locked=True, min_risk=Risk.MEDIUM),
        ToolRule("shell.*", DENY, locked=True, arg_patterns=(r"rm\s+-rf\s+/",)),
    ), budgets=Budgets(daily_usd=500.0, monthly_usd=5000.0)),
    Envelope("env_t_base", "tenant-baseline", 1, Scope.TENANT, T, priority=100,
             deny_at_risk=Risk.CRITICAL, default_effect=ALLOW),
    Envelope("env_t_mail", "tenant-mail", 2, Scope.TENANT, T, priority=100, tool_rules=(
        ToolRule("email.*", NA), ToolRule("email.draft", ALLOW),
    )),
    # Project: risk rules, a tier, a per-run budget, priorities.
    Envelope("env_p_risk", "project-risk", 4, Scope.PROJECT, P, priority=200,
             require_approval_at_risk=Risk.HIGH, budgets=Budgets(per_run_usd=25.0)),
    Envelope("env_p_tier", "project-autonomy", 1, Scope.PROJECT, P, priority=100, autonomy_tier=2),
    Envelope("env_p_tools", "project-tools", 7, Scope.PROJECT, P, priority=100, tool_rules=(
        ToolRule("github.**", ALLOW), ToolRule("github.*.merge", NA),
        ToolRule("github.repo.delete", DENY), ToolRule("k8s.*", NA, environments=("prod", "staging")),
    )),
    # Version: the agent's own allow list, and a stricter lower-priority fallback.
    Envelope("env_v_allow", "version-allow", 2, Scope.VERSION, V, priority=100, tool_rules=(
        ToolRule("fs.read_*", ALLOW), ToolRule("fs.write_*", ALLOW, min_risk=Risk.LOW),
        ToolRule("search.**", ALLOW), ToolRule("http.*", ALLOW),
        ToolRule("http.post", NA, arg_patterns=(r'"url":"https?://[^"]*\.(com|net|io)',)),
    )),
    Envelope("env_v_fallback", "version-fallback", 1, Scope.VERSION, V, priority=50,
             tool_rules=(ToolRule("**", NA, min_risk=Risk.HIGH),)),
    # Shadow: a candidate stricter policy, reported only.
    Envelope("env_p_shadow", "project-candidate", 1, Scope.PROJECT, P, shadow=True,
             deny_at_risk=Risk.HIGH, tool_rules=(ToolRule("http.**", DENY),)),
    # Inactive: must cost nothing.
    Envelope("env_t_old", "tenant-old", 9, Scope.TENANT, T, active=False,
             tool_rules=(ToolRule("**", DENY),)),
]

AGENT = Agent(tenant_id=T, tenant_active=True, project_id=P, environment_id="env_prod",
              environment_name="prod-eu-1", environment_type="PROD", template_id="tpl_bench",
              version_id=V, instance_id="ins_bench", instance_state="ACTIVE",
              version_state="APPROVED")

CALLS = [
    Call("fs.read_file", {"path": "src/app/main.py"}),
    Call("fs.write_file", {"path": "src/app/util.py", "content": "def f():\n    return 1\n"}),
    Call("search.code.grep", {"query": "def main", "max_results": 20}),
    Call("http.get", {"url": "https://example.com/docs"}, estimated_cost_usd=0.001),
    Call("http.post", {"url": "https://internal.example/api", "body": "ok"}),
    Call("github.pr.merge", {"repo": "acme/app", "pr": 42}),
    Call("shell.exec", {"cmd": "rm -rf /tmp/build"}),
    Call("email.send", {"to": "ops@example.com", "subject": "weekly report"}),
    Call("deploy.web.release", {"image": "app:1.2.3"}, declared_risk=Risk.HIGH),
    Call("llm.complete", {"prompt": "summarise the diff", "max_tokens": 512},
         estimated_cost_usd=0.02),
]
SPEND = Spend(run_usd=1.5, day_usd=40.0, month_usd=900.0)
CONTROLS = Controls()


def policy():
    return compile_policy(ENVELOPES, tenant_id=T, project_id=P, version_id=V)


def steady(seconds: float) -> tuple[int, float]:
    """Decisions on one compiled policy (memo tables warm after the first round)."""
    compiled = policy()
    calls = CALLS
    n = 0
    gc.collect()
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            for call in calls:
                decide(compiled, AGENT, call, controls=CONTROLS, spend=SPEND)
        n += 200 * len(calls)
        now = time.perf_counter()
        if now >= deadline:
            return n, now - start


def cold(seconds: float) -> tuple[int, float]:
    """Compile, then one round of the rotation: every decision is a memo miss."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        compiled = policy()
        for call in CALLS:
            decide(compiled, AGENT, call, controls=CONTROLS, spend=SPEND)
        n += len(CALLS)
    return n, time.perf_counter() - start


def compiles(seconds: float) -> tuple[int, float]:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        policy()
        n += 1
    return n, time.perf_counter() - start


def variants(seconds: float) -> list[tuple[str, int, float]]:
    """The steady state under other conditions: budgets crossed (the exact, unmemoised path),
    a valid grant, a kill switch."""
    compiled = policy()
    out = []
    for label, call_kw, spend, controls in [
        ("budget crossed (exact path)", {}, Spend(run_usd=30.0), CONTROLS),
        ("approval grant", {"grant": Grant("VALID")}, SPEND, CONTROLS),
        ("project PAUSED", {}, SPEND, Controls(project_mode="PAUSED")),
    ]:
        calls = [Call(c.tool, c.arguments, c.declared_risk, c.estimated_cost_usd, grant=call_kw.get("grant"))
                 for c in CALLS]
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(50):
                for call in calls:
                    decide(compiled, AGENT, call, controls=controls, spend=spend)
            n += 50 * len(calls)
        out.append((label, n, time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--profile", action="store_true", help="cProfile the steady state")
    args = parser.parse_args()

    compiled = policy()
    outcomes: Counter[str] = Counter()
    for call in CALLS:
        r = decide(compiled, AGENT, call, controls=CONTROLS, spend=SPEND)
        outcomes[r.effect.name] += 1
        print(f"  {call.tool:<18} {r.effect.name:<15} {r.step.name:<12} {r.reasons[0].code:<38} "
              f"{r.envelope_id or '-':<14} shadow={[s.effect.name if s.effect else None for s in r.shadow]}")
    print(f"rotation: {len(CALLS)} calls, {dict(outcomes)}; policy: {len(ENVELOPES)} envelopes")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        steady(args.seconds)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
        return

    def show(label: str, n: int, elapsed: float) -> None:
        print(f"{label:<34} {n / elapsed:>12,.0f} decisions/s {elapsed / n * 1e9:>10,.0f} ns/decision")

    show("steady state (memo warm)", *steady(args.seconds))
    show("cold (compile + 1 round, misses)", *cold(args.seconds))
    for label, n, elapsed in variants(args.seconds):
        show(label, n, elapsed)
    n, elapsed = compiles(args.seconds)
    print(f"{'compile_policy (10 envelopes)':<34} {n / elapsed:>12,.0f} compiles/s {elapsed / n * 1e6:>10,.1f} µs/compile")


if __name__ == "__main__":
    main()
